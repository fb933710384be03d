"""Compressed, chunked arrays with random access: the compressed form of the preprocessed folder.

A preprocessed case is float32 on the working grid; a whole-body PET/CT at 2 x 2 x 3 mm takes
about 400 MB (two channels), so a dataset of a thousand studies takes 400 GB as ``.npy`` files.
nnU-Net v2 compresses its preprocessed folder (blosc2) for that reason. Here the same is done
with the standard library alone: the array is cut into chunks over its last three axes (every
leading channel in each chunk), each chunk's bytes are shuffled (byte 0 of every value first,
then byte 1, ...: the exponent bytes of neighbouring floats are alike and compress well) and
compressed with zlib. A patch is read by inflating only the chunks it overlaps, so training
draws patches exactly as from the memory-mapped ``.npy`` files (the values are lossless).

File layout (little-endian)::

    b"VXCHUNK1"                    magic, 8 bytes
    uint32 n                       length of the JSON header
    n bytes                        JSON: dtype, shape, chunk (the last three axes), codec, level
    uint64 x (chunks + 1)          byte offsets of the chunks (C order over the chunk grid) from the
                                   start of the data; the last is the data's length
    data                           the compressed chunks

The file is read through a read-only memory map (shared by every process, like the ``.npy``
files it replaces); ``zlib`` releases the GIL while it inflates, so the sampler's loader threads
decompress in parallel. Nothing is ever unpickled.
"""
from __future__ import annotations

import itertools
import json
import mmap
import struct
import zlib
from pathlib import Path
from typing import Iterable, Sequence, Tuple

import numpy as np

from ..errors import InputError

MAGIC = b"VXCHUNK1"
CODEC = "zlib-shuffle"
#: Chunk edge over the last three axes. 16^3 keeps the bytes inflated for a 96^3 patch within
#: about 1.6 times its own (32^3: about 3 times), at the same compression.
DEFAULT_CHUNK = (16, 16, 16)
DEFAULT_LEVEL = 1  # zlib level: 3-6 compress a few percent more at half the writing speed
_DTYPES = ("float32", "uint8", "int16", "float16", "int32", "uint16")


def _shuffle(raw: np.ndarray) -> bytes:
    b = np.ascontiguousarray(raw)
    if b.itemsize == 1:
        return b.tobytes()
    return np.ascontiguousarray(b.reshape(-1).view(np.uint8).reshape(-1, b.itemsize).T).tobytes()


def _unshuffle(data: bytes, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
    flat = np.frombuffer(data, dtype=np.uint8)
    if dtype.itemsize > 1:
        flat = np.ascontiguousarray(flat.reshape(dtype.itemsize, -1).T)
    return flat.view(dtype).reshape(shape)


def _grid(shape: Sequence[int], chunk: Sequence[int]) -> Tuple[int, int, int]:
    return tuple(-(-int(n) // int(c)) for n, c in zip(shape[-3:], chunk))


def write_chunked(f, array: np.ndarray, chunk: Sequence[int] = DEFAULT_CHUNK, level: int = DEFAULT_LEVEL) -> int:
    """Write ``array`` (at least 3-D; chunked over its last three axes) to the open binary file
    ``f``; returns the bytes written."""
    arr = np.asarray(array)
    if arr.ndim < 3:
        raise ValueError(f"a chunked array needs at least 3 dimensions, got shape {arr.shape}")
    if arr.dtype.name not in _DTYPES or arr.dtype.byteorder == ">":
        raise ValueError(f"unsupported dtype {arr.dtype} for a chunked array")
    chunk = tuple(int(c) for c in chunk)
    if len(chunk) != 3 or min(chunk) < 1:
        raise ValueError(f"chunk must be three positive sizes, got {chunk}")
    header = json.dumps({"dtype": arr.dtype.name, "shape": [int(s) for s in arr.shape], "chunk": list(chunk),
                         "codec": CODEC, "level": int(level)}).encode()
    blobs = []
    for idx in itertools.product(*(range(g) for g in _grid(arr.shape, chunk))):
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunk))
        blobs.append(zlib.compress(_shuffle(arr[(Ellipsis,) + box]), int(level)))
    offsets = np.zeros(len(blobs) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    f.write(MAGIC)
    f.write(struct.pack("<I", len(header)))
    f.write(header)
    f.write(offsets.tobytes())
    for b in blobs:
        f.write(b)
    return len(MAGIC) + 4 + len(header) + offsets.nbytes + int(offsets[-1])


class ChunkedArray:
    """A read-only chunked array file (see the module docstring), indexed like a numpy array.

    Supported indexing: an integer or a slice per axis (``Ellipsis`` allowed), as the training
    sampler and :class:`~VeloxSegLib.train.sampler.CaseData` use it; only the chunks the
    request overlaps are inflated. ``np.asarray(a)`` reads the whole array.
    """

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            size = self.path.stat().st_size
            if size < len(MAGIC) + 4:
                raise ValueError("too short for a chunked array")
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if self._mm[:len(MAGIC)] != MAGIC:
                raise ValueError("not a chunked array (wrong magic bytes)")
            (n,) = struct.unpack("<I", self._mm[len(MAGIC):len(MAGIC) + 4])
            start = len(MAGIC) + 4
            head = json.loads(bytes(self._mm[start:start + n]).decode())
            if head.get("codec") != CODEC or head.get("dtype") not in _DTYPES:
                raise ValueError(f"unsupported chunked array (codec {head.get('codec')!r}, dtype {head.get('dtype')!r})")
            self.dtype = np.dtype(head["dtype"])
            self.shape = tuple(int(s) for s in head["shape"])
            self.chunk = tuple(int(c) for c in head["chunk"])
            if len(self.shape) < 3 or len(self.chunk) != 3 or min(self.chunk) < 1 or min(self.shape) < 0:
                raise ValueError("its header has a bad shape or chunk")
            self._grid = _grid(self.shape, self.chunk)
            count = int(np.prod(self._grid))
            off_at = start + n
            self._data_at = off_at + 8 * (count + 1)
            if self._data_at > size:
                raise ValueError("cut short (its chunk table is incomplete)")
            self._offsets = np.frombuffer(self._mm, dtype="<u8", count=count + 1, offset=off_at).astype(np.int64)
            if self._offsets[0] != 0 or np.any(np.diff(self._offsets) < 0) or self._data_at + self._offsets[-1] != size:
                raise ValueError("cut short or damaged (its chunk table does not match the file's size)")
        except BaseException:
            self._mm.close()
            raise

    # numpy-like attributes --------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """The bytes of the array itself (uncompressed), as numpy counts them."""
        return self.size * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        return len(self._mm)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ChunkedArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype.name})"

    def close(self) -> None:
        self._mm.close()

    # reading ------------------------------------------------------------------------------------
    def _chunk(self, idx: Tuple[int, int, int]) -> np.ndarray:
        k = (idx[0] * self._grid[1] + idx[1]) * self._grid[2] + idx[2]
        a, b = self._data_at + int(self._offsets[k]), self._data_at + int(self._offsets[k + 1])
        shape = self.shape[:-3] + tuple(min(c, n - i * c) for i, c, n in zip(idx, self.chunk, self.shape[-3:]))
        try:
            raw = zlib.decompress(self._mm[a:b])
        except zlib.error as exc:
            raise self._damaged(idx, str(exc)) from None
        if len(raw) != int(np.prod(shape)) * self.dtype.itemsize:
            raise self._damaged(idx, "wrong length")
        return _unshuffle(raw, self.dtype, shape)

    def _damaged(self, idx, why: str) -> InputError:
        # found only when the chunk is read (opening checks the file's length, not every chunk)
        return InputError(f"{self.path}: chunk {idx} is damaged ({why}); delete this file and run again to "
                          f"preprocess its case anew")

    def read(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """Every leading axis, and ``lo[d]:hi[d]`` of each of the last three axes (within bounds)."""
        lo = [int(v) for v in lo]
        hi = [int(v) for v in hi]
        spatial = self.shape[-3:]
        if any(not 0 <= l0 <= h0 <= n for l0, h0, n in zip(lo, hi, spatial)):
            raise IndexError(f"box {lo}..{hi} outside the array's {spatial}")
        out = np.empty(self.shape[:-3] + tuple(h0 - l0 for l0, h0 in zip(lo, hi)), dtype=self.dtype)
        if out.size == 0:
            return out
        ranges: Iterable = (range(l0 // c, (h0 - 1) // c + 1) for l0, h0, c in zip(lo, hi, self.chunk))
        for idx in itertools.product(*ranges):
            c0 = [i * c for i, c in zip(idx, self.chunk)]
            s0 = [max(l0, a) for l0, a in zip(lo, c0)]
            s1 = [min(h0, a + c) for h0, a, c in zip(hi, c0, self.chunk)]
            block = self._chunk(idx)
            src = tuple(slice(a - b, e - b) for a, e, b in zip(s0, s1, c0))
            dst = tuple(slice(a - l0, e - l0) for a, e, l0 in zip(s0, s1, lo))
            out[(Ellipsis,) + dst] = block[(Ellipsis,) + src]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.read((0, 0, 0), self.shape[-3:])
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError("an index can only have a single ellipsis")
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for an array of {self.ndim} dimensions")
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, spatial = key[:-3], key[-3:]
        lo, hi, post = [], [], []
        for k, n in zip(spatial, self.shape[-3:]):
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if int(k) < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(k)} is out of bounds for an axis of size {n}")
                lo.append(i)
                hi.append(i + 1)
                post.append(0)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                picked = range(start, stop, step)
                if len(picked) == 0:
                    lo.append(0)
                    hi.append(0)
                    post.append(slice(None))
                    continue
                a, b = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
                lo.append(a)
                hi.append(b)
                last = picked[-1] - a + (1 if step > 0 else -1)
                post.append(slice(picked[0] - a, None if last < 0 else last, step))
            else:
                raise IndexError(f"a chunked array takes integers and slices, not {type(k).__name__}")
        return self.read(lo, hi)[tuple(lead) + tuple(post)]


__all__ = ["ChunkedArray", "write_chunked", "DEFAULT_CHUNK", "DEFAULT_LEVEL", "MAGIC"]
