"""Preprocessed training cases on disk, read through memory maps (nnU-Net's preprocessed folder).

Held in memory, the training cases of a real dataset do not fit: a whole-body PET/CT at
2 x 2 x 3 mm is about 55 M voxels per channel, so 200 MB of float32 per channel, and a dataset
of hundreds of studies needs hundreds of GB. Each rank of a data-parallel run would hold its
own copy. Here every case is preprocessed once (:func:`VeloxSegLib.train.trainer.preprocess_case`,
unchanged) and written as two ``.npy`` files, which the sampler then reads through read-only
memory maps: the pages it touches live in the operating system's file cache, shared by every
process on the machine and given back under memory pressure, so a run's own (anonymous) memory
no longer grows with the dataset. The arrays are the same float32 and uint8 values, so a run
trains on exactly the patches it would draw from memory.

Layout of a store (``WORK/preprocessed`` by default, ``--preprocessed DIR`` to share one between
runs, for example the folds of a cross-validation)::

    fingerprints/{key}.json    the planner's measurements of the dataset (``train`` without --plans
                               reads every case to make them; a run on the unchanged dataset reuses them)
    {case}.{key}.json          written last: the case is complete when this exists
    {case}.{key}.image.npy     (C, z, y, x) float32, normalized, at the target spacing
    {case}.{key}.label.npy     (z, y, x) uint8
    {case}.{key}.image.vxc     the same arrays compressed (``--compress-preprocessed``): chunked,
    {case}.{key}.label.vxc     byte-shuffled zlib (:mod:`VeloxSegLib.train.chunked`), lossless;
                               a case is stored one way or the other, as its JSON says

``key`` is a hash of everything the arrays depend on: the case's source files (full path, size,
modification time), the target spacing, the orientation, each channel's normalization, the number
of classes and :data:`PREPROCESS_VERSION`. A changed file or setting gives a new key, so a stale
case is never read; cases of other settings stay beside it. Every file is written under a
temporary name and renamed, so an interrupted run leaves only complete cases. Files are read with
``allow_pickle=False``; a case whose files do not match its JSON (truncated, replaced) is
preprocessed again.

Compressed cases (``CaseStore(root, compress=True)``) take a fifth of the disk on our phantoms
(much of a phantom is air) and, inside the body, about 1.3 times less; a patch is then read by
inflating the chunks it overlaps (tens of milliseconds for a 96^3 patch of two channels, where
a memory map copies it in about two), work the sampler's loader threads do beside the network.
The arrays read back are the same values either way, so a run draws the same patches and trains
the same weights. Cases already in the folder are reused as they are stored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..data.nnunet import write_json_atomic
from ..errors import InputError
from ..fsutil import nearest_existing
from .sampler import CaseData

log = logging.getLogger(__name__)

#: Bumped whenever preprocess_case would produce other arrays from the same files and settings.
PREPROCESS_VERSION = 1
#: Bumped whenever the planner's fingerprint_dataset would measure something else.
FINGERPRINT_VERSION = 1
FORMAT = "veloxseg-preprocessed"


def _identity(path) -> list:
    """A file as the keys see it: its full path (resolved), size and modification time. (Two
    datasets with the same case names never share keys; a moved dataset is preprocessed again.)"""
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def case_key(ds, case: str, setup) -> str:
    """The hash naming one case's preprocessed files for ``setup`` (see the module docstring)."""
    files = [_identity(p) for p in list(ds.image_paths(case)) + [ds.label_path(case)]]
    doc = {"version": PREPROCESS_VERSION, "spacing": [float(s) for s in setup.spacing],
           "orientation": setup.orientation, "num_classes": int(setup.num_classes),
           "normalization": [c.get("normalization") for c in setup.channels], "files": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CaseStore:
    """A folder of preprocessed cases (see the module docstring)."""

    def __init__(self, root: os.PathLike, compress: bool = False):
        self.root = Path(root)
        self.compress = bool(compress)

    def paths(self, case: str, key: str, storage: str = "npy"):
        """The case's JSON and its two array files as ``storage`` ("npy" or "chunked") names them."""
        stem = f"{case}.{key}"
        ext = {"npy": "npy", "chunked": "vxc"}[storage]
        return (self.root / f"{stem}.json", self.root / f"{stem}.image.{ext}", self.root / f"{stem}.label.{ext}")

    def load(self, case: str, key: str) -> Optional[CaseData]:
        """The case as memory-mapped arrays, or None when it is absent or does not check out."""
        meta_path = self.paths(case, key)[0]
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT or meta.get("case") != case or meta.get("key") != key:
                raise ValueError("its JSON names another case or format")
            storage = meta.get("storage", "npy")
            if storage not in ("npy", "chunked"):
                raise ValueError(f"unknown storage {storage!r}")
            _, image_path, label_path = self.paths(case, key, storage)
            if storage == "chunked":
                from .chunked import ChunkedArray

                image, label = ChunkedArray(image_path), ChunkedArray(label_path)
            else:
                image = np.load(image_path, mmap_mode="r", allow_pickle=False)
                label = np.load(label_path, mmap_mode="r", allow_pickle=False)
            if (image.dtype != np.float32 or label.dtype != np.uint8 or list(image.shape) != meta["image_shape"]
                    or list(label.shape) != meta["image_shape"][1:]):
                raise ValueError(f"arrays {image.dtype}{list(image.shape)} / {label.dtype}{list(label.shape)} do not "
                                 f"match its JSON")
            return CaseData(case, image, label, tuple(float(v) for v in meta["pad_values"]),
                            tuple(float(s) for s in meta["spacing"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: preprocessed case %r unusable (%s); preprocessing it again", self.root, case, exc)
            return None

    def save(self, case: str, key: str, data: CaseData) -> CaseData:
        """Write ``data`` (arrays first, the JSON last, each renamed into place); return it memory-mapped."""
        storage = "chunked" if self.compress else "npy"
        meta_path, image_path, label_path = self.paths(case, key, storage)
        image = np.ascontiguousarray(data.image, dtype=np.float32)
        label = np.ascontiguousarray(data.label, dtype=np.uint8)
        meta = {"format": FORMAT, "case": case, "key": key, "image_shape": list(image.shape),
                "pad_values": [float(v) for v in data.pad_values], "spacing": [float(s) for s in data.spacing],
                "bytes": int(image.nbytes + label.nbytes), "storage": storage}
        try:
            stored = _write_array_atomic(image_path, image, storage) + _write_array_atomic(label_path, label, storage)
            meta["stored_bytes"] = int(stored)
            write_json_atomic(meta_path, meta)
            other = "npy" if storage == "chunked" else "chunked"
            for stale in self.paths(case, key, other)[1:]:  # the case's earlier copy, stored the other way
                stale.unlink(missing_ok=True)
        except OSError as exc:  # a full disk, a folder made read-only meanwhile
            raise InputError(f"{self.root}: cannot write the preprocessed case {case!r} "
                             f"({exc.strerror or exc})") from None
        loaded = self.load(case, key)
        if loaded is None:
            raise InputError(f"{self.root}: the preprocessed case {case!r} just written cannot be read back")
        return loaded


def dataset_key(ds) -> str:
    """A hash of a dataset as the planner reads it: ``dataset.json`` and every case's files
    (full path, size, modification time), with the planner's sampling settings."""
    from .planner import SAMPLES_PER_CASE

    files = [_identity(p) for case in ds.cases for p in list(ds.image_paths(case)) + [ds.label_path(case)]]
    doc = {"version": FINGERPRINT_VERSION, "samples_per_case": SAMPLES_PER_CASE,
           "dataset_json": hashlib.sha256((Path(ds.root) / "dataset.json").read_bytes()).hexdigest(), "files": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_path(root: os.PathLike, key: str) -> Path:
    return Path(root) / "fingerprints" / f"{key}.json"  # a folder: no case's file can take its name


def load_fingerprint(root: os.PathLike, key: str) -> Optional[dict]:
    """The planner's fingerprint of an unchanged dataset, saved by an earlier run, or None."""
    path = fingerprint_path(root, key)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("key") != key or not isinstance(doc.get("fingerprint"), dict):
            raise ValueError("not a saved fingerprint")
        return doc["fingerprint"]
    except (OSError, ValueError) as exc:
        log.warning("%s: unusable (%s); measuring the dataset again", path, exc)
        return None


def save_fingerprint(root: os.PathLike, key: str, fingerprint: dict) -> None:
    doc = {"format": FORMAT, "key": key, "fingerprint": fingerprint}
    fingerprint_path(root, key).parent.mkdir(exist_ok=True)
    write_json_atomic(fingerprint_path(root, key), doc)


def estimate_bytes(ds, cases: Sequence[str], setup) -> int:
    """The bytes ``cases`` take preprocessed (float32 channels + uint8 label on the working grid),
    from the reference images' headers alone."""
    from ..data.alignment import working_grid
    from ..data.nnunet import read_grid

    total = 0
    for case in cases:
        _, work, _ = working_grid(read_grid(ds.image_paths(case)[0]), setup.spacing, setup.orientation, 0.02)
        total += int(np.prod(work.shape)) * (4 * len(setup.channels) + 1)
    return total


#: What compression is sure to save, for the free-space check: the ratio on chunks that hold no
#: air at all (noisy body voxels) is about 1.3 on our phantoms; whole images compress far more.
WORST_COMPRESSION = 1.2


def check_free_space(store: CaseStore, needed: int, margin: float = 1.05) -> None:
    """Refuse before the first case when the store's disk cannot hold what is left to write
    (``needed``: the arrays' own bytes; a compressed store is counted at :data:`WORST_COMPRESSION`)."""
    import shutil

    free = shutil.disk_usage(nearest_existing(store.root)).free
    if store.compress:
        needed = int(needed / WORST_COMPRESSION)
    if needed * margin > free:
        hint = "" if store.compress else (", compress them with --compress-preprocessed (typically 2-5 times "
                                          "smaller, lossless)")
        raise InputError(f"{store.root}: the preprocessed training cases need about {needed / 1e9:.1f} GB "
                         f"{'compressed ' if store.compress else ''}and the disk has {free / 1e9:.1f} GB free; give "
                         f"--preprocessed a folder on a larger disk, free space{hint}, or hold the cases in memory "
                         f"with --in-memory")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _write_array_atomic(path: Path, arr: np.ndarray, storage: str = "npy") -> int:
    """``np.save`` (or :func:`~VeloxSegLib.train.chunked.write_chunked` for "chunked") to a hidden
    temporary sibling (unique per process), renamed onto ``path``; returns the file's bytes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            if storage == "chunked":
                from .chunked import write_chunked

                write_chunked(f, arr)
            else:
                np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
        return path.stat().st_size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_store_folder(root: Path, dataset_root: Path, output: Path) -> None:
    """A store is written to: never inside the dataset or the bundle to be written, and it must
    be creatable and writable."""
    from ..data.io import check_writable_folder

    target = Path(root).resolve()
    for other, what in ((Path(dataset_root).resolve(), f"the dataset {dataset_root}, which is never written to"),
                        (Path(output).resolve(), f"the output bundle {output}")):
        if target == other or other in target.parents:
            raise InputError(f"{root}: the preprocessed folder is inside {what}")
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: the preprocessed folder is a file")
    check_writable_folder(nearest_existing(root))


def prepare_cases(ds, cases: Sequence[str], setup, preprocess: Callable, store: Optional[CaseStore], dist,
                  threads: int = 0, emit: Optional[Callable[[str], None]] = None,
                  on_case: Optional[Callable[[int, int], None]] = None) -> List[CaseData]:
    """The training cases, memory-mapped from ``store`` (preprocessed there first where missing),
    or preprocessed into memory when ``store`` is None.

    Data-parallel: rank r preprocesses the missing cases r, r + N, ... of the list, the ranks
    wait for each other, and every rank then maps every case (a rank that still misses one,
    on a folder not shared between machines, preprocesses it itself). A case that fails on one
    rank fails the run on every rank with the same message.
    ``on_case(done, total)`` is called as this rank finishes each case it preprocesses.
    """
    import threading

    from . import ddp

    lock, count = threading.Lock(), [0]

    def counted(fn, total):
        def wrapped(case):
            out = fn(case)
            if on_case is not None:
                with lock:
                    count[0] += 1
                    on_case(count[0], total)
            return out
        return wrapped

    def run_all(fn, items):
        if threads > 1 and len(items) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:  # reading and resampling release the GIL
                return list(pool.map(fn, items))
        return [fn(c) for c in items]

    if store is None:
        return run_all(counted(lambda c: preprocess(ds, c, setup), len(cases)), list(cases))

    keys = {c: case_key(ds, c, setup) for c in cases}
    mine = [c for i, c in enumerate(cases) if i % dist.world_size == dist.rank]
    mapped = {c: store.load(c, keys[c]) for c in mine}  # this rank's cases, each read once
    todo = [c for c in mine if mapped[c] is None]
    error, need = None, 0
    try:
        need = estimate_bytes(ds, todo, setup)
    except Exception as exc:  # an unreadable header: reported with the other ranks' errors below
        error = exc
    need = sum(ddp.gather_objects(need, dist))  # one disk for every rank (a shared folder, or one machine)
    try:
        if error is not None:
            raise error
        check_free_space(store, need)
        for c, data in zip(todo, run_all(counted(lambda c: store.save(c, keys[c], preprocess(ds, c, setup)),
                                                 len(todo)), todo)):
            mapped[c] = data
    except Exception as exc:  # a broken case: every rank stops with its message
        error = exc
    errors = [e for e in ddp.gather_objects(None if error is None else str(error), dist) if e]
    if error is not None:
        raise error
    if errors:
        raise InputError(errors[0])
    out = []
    for c in cases:
        data = mapped.get(c) or store.load(c, keys[c])  # the other ranks' cases
        if data is None:
            data = store.save(c, keys[c], preprocess(ds, c, setup))
        out.append(data)
    done = ddp.gather_objects(len(todo), dist)
    if emit is not None:
        raw = sum(c.image.nbytes + c.label.nbytes for c in out)
        stored = sum(getattr(a, "stored_bytes", a.nbytes) for c in out for a in (c.image, c.label))
        size = _size(raw) if stored == raw else f"{_size(raw)}, {_size(stored)} on disk"
        emit(f"{len(cases)} training case(s) memory-mapped from {store.root} ({size}; "
             f"{sum(done)} preprocessed now, {len(cases) - sum(done)} reused)")
    return out


def store_benchmark(cases: int = 6, batches: int = 40, rounds: int = 4, seed: int = 1400, progress=None) -> dict:
    """``veloxseg bench``'s preprocessed-folder section: ``cases`` default PET/CT phantoms at the
    demo's grid (2 x 2 x 2.5 mm, 96^3 patches) preprocessed once, written as ``.npy`` files and
    compressed, and batches of 2 drawn from each by the training sampler (rotation and flip as in
    training, no loader threads), the two folders alternating in ``rounds`` rounds. Reports the
    bytes on disk, the seconds to write a case and the milliseconds per batch, each against the
    ``.npy`` folder of the same run; the batches of the two folders are checked to be equal."""
    import tempfile
    import time

    from ..data.nnunet import load_dataset
    from ..data.phantom import write_phantom_dataset
    from .augment import Augmenter
    from .sampler import PatchSampler
    from .trainer import RunSetup, TrainConfig, preprocess_case, resolve_plans

    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="veloxseg-store-bench-") as tmp:
        root = Path(tmp)
        say(f"[bench] preprocessed folder: {cases} PET/CT phantoms")
        write_phantom_dataset(root / "ds", "petct", cases, seed=seed)
        ds = load_dataset(root / "ds")
        plans = resolve_plans(ds.root, spacing=(2.0, 2.0, 2.5), patch_size=(96, 96, 96))
        setup = RunSetup.from_plans(plans, TrainConfig())
        held = [preprocess_case(ds, c, setup) for c in ds.cases]
        stores, rows = {}, []
        for storage in ("npy", "chunked"):
            folder = root / storage
            folder.mkdir()
            store = CaseStore(folder, compress=storage == "chunked")
            t = time.perf_counter()
            stores[storage] = [store.save(c, "bench", data) for c, data in zip(ds.cases, held)]
            write_s = (time.perf_counter() - t) / len(held)
            rows.append({"storage": storage, "bytes": int(sum(p.stat().st_size for p in folder.iterdir())),
                         "write_s_per_case": write_s, "batch_ms": []})
        raw = sum(c.image.nbytes + c.label.nbytes for c in held)
        samplers = {k: PatchSampler(v, setup.patch_size, 2, np.random.default_rng(seed), Augmenter())
                    for k, v in stores.items()}
        for r in range(rounds):
            say(f"[bench] preprocessed folder: round {r + 1} of {rounds}")
            drawn = {}
            for row in rows:
                sampler = samplers[row["storage"]]
                out = []
                for _ in range(batches // rounds):
                    t = time.perf_counter()
                    out.append(sampler.sample())
                    row["batch_ms"].append(1e3 * (time.perf_counter() - t))
                drawn[row["storage"]] = out
            if not all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                       for a, b in zip(drawn["npy"], drawn["chunked"])):
                raise RuntimeError("the compressed folder gave other patches than the .npy folder")
        for s in samplers.values():
            s.close()
        for case in stores["chunked"]:  # unmapped before the folder goes (Windows keeps mapped files)
            case.image.close()
            case.label.close()
        del samplers, stores, held
    base = rows[0]
    for row in rows:
        row["batch_ms_median"] = float(np.median(row["batch_ms"]))
        row["ratio_disk"] = raw / row["bytes"]
    lines = [f"{cases} default PET/CT phantoms preprocessed at 2 x 2 x 2.5 mm ({raw / 1e6:.0f} MB of float32 "
             f"channels and uint8 labels), written both ways; batches of 2 patches of 96^3 drawn by the training "
             f"sampler (rotation and flip, no loader threads) from each folder in {rounds} alternating rounds, "
             f"{batches // rounds} batches per round and folder, the same patches from both (checked); median per "
             f"batch. A training step at this size takes about a second on 2 CPU threads (Training speed).", "",
             "| storage | on disk (MB) | x smaller than the arrays | write s/case | ms per batch | x .npy |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {'`.npy` (memory-mapped)' if row['storage'] == 'npy' else '`--compress-preprocessed`'} | "
                     f"{row['bytes'] / 1e6:.0f} | {row['ratio_disk']:.2f} | {row['write_s_per_case']:.2f} | "
                     f"{row['batch_ms_median']:.1f} | {row['batch_ms_median'] / base['batch_ms_median']:.2f} |")
    return {"cases": cases, "array_bytes": raw, "rows": rows, "markdown": "\n".join(lines)}


__all__ = ["CaseStore", "case_key", "prepare_cases", "check_store_folder", "dataset_key", "load_fingerprint",
           "save_fingerprint", "estimate_bytes", "check_free_space", "PREPROCESS_VERSION", "WORST_COMPRESSION",
           "store_benchmark"]
