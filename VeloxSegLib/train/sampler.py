"""Training patches: cases held in memory, patches centred 1:1 on foreground and background.

Every other patch drawn is a foreground patch: a labelled class is chosen uniformly among
those present in a random case, then one of its voxels, and the patch is placed so that the
voxel lies at a random position inside it (as nnU-Net's oversampling does). A voxel drawn that
way falls on a large lesion far more often than on a small one; with ``component_fraction`` f
> 0, a fraction f of the foreground patches instead choose one connected component (26-connected,
as the metrics count lesions) of the class uniformly, then a voxel of it, so that every lesion
of a case is a patch's centre equally often whatever its size. The others are
background patches around a random voxel of label 0. Regions beyond the volume are padded with
the channel's normalized background and label 0. The sampler owns its random generator; its
state (and the count of patches drawn) is plain JSON, saved in checkpoints so a resumed run
draws exactly the patches the uninterrupted run would have drawn.

With ``threads`` > 0 the sampler prepares the next batches in background threads while the
network trains on the current one (what keeps a GPU fed). Every random number is still drawn
on the calling thread, in the same order; the threads only cut and augment. The saved state is
the one before the oldest batch not yet handed out, so a checkpoint taken with batches in
flight resumes on exactly the batch the run would have received next: the patch stream is the
same with or without threads.
"""
from __future__ import annotations

import collections
import copy
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..metrics import _components
from .augment import AugmentParams, Augmenter

#: At most this many voxel indices are kept per class and case (a strided subset).
MAX_FG_INDICES = 200_000


@dataclass
class CaseData:
    """One preprocessed case: image (C, z, y, x) float32 normalized, label (z, y, x) uint8: numpy
    arrays, memory maps, or :class:`~VeloxSegLib.train.chunked.ChunkedArray` (a compressed store)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    pad_values: Tuple[float, ...] = ()
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    _fg: Optional[Dict[int, np.ndarray]] = field(default=None, repr=False)
    _cc: Optional[Dict[int, Tuple[np.ndarray, np.ndarray]]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.image.ndim != 4 or self.label.shape != self.image.shape[1:]:
            raise ConfigError(f"case {self.name}: image {self.image.shape} and label {self.label.shape} do not match")
        if not self.pad_values:
            self.pad_values = tuple(float(self.image[c].min()) for c in range(self.image.shape[0]))

    @property
    def foreground(self) -> Dict[int, np.ndarray]:
        """Flat voxel indices of every label value > 0 present (strided to MAX_FG_INDICES)."""
        if self._fg is None:
            flat = np.asarray(self.label).reshape(-1)  # (a compressed label is read whole, once)
            out = {}
            for v in np.unique(flat):
                if v == 0:
                    continue
                idx = np.flatnonzero(flat == v)
                step = max(1, len(idx) // MAX_FG_INDICES)
                out[int(v)] = idx[::step]
            self._fg = out
        return self._fg

    @property
    def components(self) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """Per label value > 0: (flat voxel indices grouped by connected component, start offsets).

        Component k holds ``indices[starts[k]:starts[k + 1]]`` (``starts`` ends with the total).
        Components are 26-connected; every voxel is kept (lesions are small next to the volume).
        """
        if self._cc is None:
            out = {}
            label = np.asarray(self.label)
            for v in self.foreground:
                cc = _components(label == v, fully_connected=True).reshape(-1)
                idx = np.flatnonzero(cc)
                ids = cc[idx]
                order = np.argsort(ids, kind="stable")
                counts = np.bincount(ids)[1:]  # ids run 1..n: entry 0 is always empty
                out[v] = (idx[order], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
            self._cc = out
        return self._cc


def crop_padded(arr: np.ndarray, lo: Sequence[int], shape: Sequence[int], pad) -> np.ndarray:
    """``arr[..., lo:lo+shape]`` over the last three axes, padding outside the array.

    ``pad``: one value, or one per leading channel of a (C, z, y, x) array.
    """
    lead = arr.shape[:-3]
    out = np.empty(lead + tuple(shape), dtype=arr.dtype)
    if lead and np.ndim(pad):
        for c, v in enumerate(pad):
            out[c] = v
    else:
        out[...] = pad
    src, dst = [], []
    for a, (l0, n, size) in enumerate(zip(lo, shape, arr.shape[-3:])):
        s0, s1 = max(l0, 0), min(l0 + n, size)
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - l0, s1 - l0))
    out[(Ellipsis,) + tuple(dst)] = arr[(Ellipsis,) + tuple(src)]
    return out


class PatchSampler:
    """Draws batches ``(images (N, C, *patch), labels (N, *patch))`` as numpy arrays."""

    def __init__(self, cases: Sequence[CaseData], patch_size: Sequence[int], batch_size: int,
                 rng: np.random.Generator, augmenter: Optional[Augmenter] = None, fg_fraction: float = 0.5,
                 threads: int = 0, component_fraction: float = 0.0):
        if not cases:
            raise ConfigError("the sampler needs at least one training case")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if threads < 0:
            raise ConfigError(f"loader threads must be >= 0, got {threads}")
        if not 0.0 <= component_fraction <= 1.0:
            raise ConfigError(f"the component-sampling fraction must be in [0, 1], got {component_fraction}")
        self.threads = int(threads)
        # batches prepared ahead: enough to keep every thread busy, at least two
        self.depth = max(2, math.ceil(2 * self.threads / batch_size)) if self.threads else 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: collections.deque = collections.deque()  # (state before, [futures])
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.rng = rng
        self.augmenter = augmenter
        self.fg_fraction = float(fg_fraction)
        self.component_fraction = float(component_fraction)
        self.drawn = 0

    def _is_foreground_draw(self) -> bool:
        # 1:1 (fg_fraction 0.5) as a strict alternation starting with foreground; other fractions
        # by the running count (draw n is foreground when n * f crosses an integer)
        n, f = self.drawn, self.fg_fraction
        return math.floor(n * f + 1e-9) != math.floor((n - 1) * f + 1e-9)

    def _centre(self, case: CaseData, foreground: bool) -> np.ndarray:
        shape = case.label.shape
        fg = case.foreground if foreground else {}
        if fg:
            cls = sorted(fg)[int(self.rng.integers(len(fg)))]
            # no random number is spent on the choice when the fraction is 0 or 1, so the default
            # (0) draws exactly the stream it drew before components existed
            f = self.component_fraction
            if f >= 1.0 or (f > 0.0 and self.rng.random() < f):
                idx, starts = case.components[cls]
                k = int(self.rng.integers(len(starts) - 1))
                flat = int(idx[starts[k] + int(self.rng.integers(starts[k + 1] - starts[k]))])
            else:
                idx = fg[cls]
                flat = int(idx[int(self.rng.integers(len(idx)))])
            return np.array(np.unravel_index(flat, shape))
        for _ in range(10):  # a background voxel (label 0); any voxel if none found
            c = np.array([int(self.rng.integers(s)) for s in shape])
            if case.label[tuple(c)] == 0:
                break
        return c

    def _draw_spec(self):
        """Every random choice of one patch (case, place, augmentation), in the stream's order."""
        case = self.cases[int(self.rng.integers(len(self.cases)))]
        centre = self._centre(case, self._is_foreground_draw())
        self.drawn += 1
        params = self.augmenter.draw(self.rng) if self.augmenter else AugmentParams()
        src = params.source_shape(self.patch)
        # the centre voxel lands at a random place of the final patch, which is the source's middle
        offset = np.array([int(self.rng.integers(p)) for p in self.patch])
        lo = centre - offset - (np.array(src) - np.array(self.patch)) // 2
        return case, lo, src, params

    def _make(self, spec) -> Tuple[np.ndarray, np.ndarray]:
        """Cut and augment a drawn patch (no random numbers: safe in a worker thread)."""
        case, lo, src, params = spec
        img = crop_padded(case.image, lo, src, case.pad_values)
        lab = crop_padded(case.label, lo, src, 0)
        if self.augmenter:
            return self.augmenter.apply(img, lab, params, self.patch)
        return img, lab

    def draw_one(self) -> Tuple[np.ndarray, np.ndarray]:
        return self._make(self._draw_spec())

    @staticmethod
    def _stack(pairs) -> Tuple[np.ndarray, np.ndarray]:
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def sample(self) -> Tuple[np.ndarray, np.ndarray]:
        if not self.threads:
            return self._stack([self.draw_one() for _ in range(self.batch_size)])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="veloxseg-loader")
        while len(self._pending) < self.depth:
            before = self._own_state()
            specs = [self._draw_spec() for _ in range(self.batch_size)]
            self._pending.append((before, [self._pool.submit(self._make, sp) for sp in specs]))
        _, futures = self._pending.popleft()
        return self._stack([f.result() for f in futures])

    def _drop_pending(self) -> Optional[dict]:
        """Forget the batches prepared ahead; returns the state before the first of them."""
        first = self._pending[0][0] if self._pending else None
        for _, futures in self._pending:
            for f in futures:
                f.cancel()
        self._pending.clear()
        return first

    def close(self) -> None:
        """Stop the loader threads (batches prepared ahead are dropped; the state stays exact)."""
        before = self._drop_pending()
        if before is not None:
            self._set_state(before)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # -- checkpointing -------------------------------------------------------------------------
    def _own_state(self) -> dict:
        return {"rng": copy.deepcopy(self.rng.bit_generator.state), "drawn": self.drawn}

    def _set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.drawn = int(state["drawn"])

    def state_dict(self) -> dict:
        """The state as of the batches handed out (not those prepared ahead)."""
        return copy.deepcopy(self._pending[0][0]) if self._pending else self._own_state()

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self._set_state(state)


def rank_generator(seed: int, rank: int = 0) -> np.random.Generator:
    """The sampler's generator for one data-parallel rank: ranks draw different patches."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 7919, int(rank)]))


__all__ = ["CaseData", "PatchSampler", "crop_padded", "rank_generator", "MAX_FG_INDICES"]
