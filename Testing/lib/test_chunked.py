"""Compressed preprocessed cases (train/chunked.py, ``--compress-preprocessed``): lossless chunked
arrays read like numpy arrays, the same patches and weights as the uncompressed folder, less disk,
damaged files refused or preprocessed again."""
import json

import numpy as np
import pytest
import torch

from VeloxSegLib.errors import ConfigError, InputError
from VeloxSegLib.train.cache import CaseStore, case_key, prepare_cases
from VeloxSegLib.train.chunked import ChunkedArray, write_chunked
from VeloxSegLib.train.ddp import DistInfo
from VeloxSegLib.train.progress import make_reporter
from VeloxSegLib.train.trainer import TrainConfig, preprocess_case, run_training


def _write(path, arr, **kw):
    with open(path, "wb") as f:
        n = write_chunked(f, arr, **kw)
    assert path.stat().st_size == n
    return ChunkedArray(path)


def _config(**kw):
    base = dict(epochs=1, iterations_per_epoch=3, batch_size=1, val_every=5, device="cpu", seed=5,
                final_weights="last", split=(1.0, 0.0, 0.0))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("dtype,shape,chunk", [
    ("float32", (2, 21, 34, 17), (8, 16, 5)),   # edges that are not whole chunks
    ("uint8", (19, 7, 40), (16, 16, 16)),       # one chunk along an axis, three leading-free axes
    ("int16", (1, 3, 33, 9, 10), (4, 4, 4)),    # two leading axes
])
def test_every_index_reads_what_numpy_reads(tmp_path, dtype, shape, chunk):
    rng = np.random.default_rng(0)
    ref = (rng.normal(size=shape) * 50).astype(dtype)
    a = _write(tmp_path / "a.vxc", ref, chunk=chunk)
    assert a.shape == ref.shape and a.dtype == ref.dtype and a.nbytes == ref.nbytes and a.ndim == ref.ndim
    assert np.array_equal(np.asarray(a), ref)
    spatial = shape[-3:]
    for _ in range(300):
        key = tuple(slice(int(rng.integers(-n - 2, n + 2)), int(rng.integers(-n - 2, n + 3)),
                          int(rng.choice([1, 1, 1, 2, 3, -1, -2]))) for n in spatial)
        assert np.array_equal(a[(Ellipsis,) + key], ref[(Ellipsis,) + key]), key
        point = tuple(int(rng.integers(-n, n)) for n in shape)
        assert a[point] == ref[point]
        mixed = tuple(int(rng.integers(n)) if rng.random() < 0.3 else slice(None) for n in shape)
        assert np.array_equal(a[mixed], ref[mixed]), mixed
    assert np.array_equal(a[0], ref[0])
    with pytest.raises(IndexError):
        a[(0,) * (len(shape) - 1) + (shape[-1],)]
    with pytest.raises(IndexError):
        a[..., [0, 1]]


def test_a_phantom_case_compresses_losslessly_and_patches_come_back_exact(store_dataset, tmp_path):
    dataset, setup = store_dataset
    from VeloxSegLib.data.nnunet import load_dataset
    from VeloxSegLib.train.sampler import crop_padded

    ds = load_dataset(dataset)
    case = preprocess_case(ds, ds.cases[0], setup)
    image = _write(tmp_path / "i.vxc", case.image)
    label = _write(tmp_path / "l.vxc", case.label)
    assert image.stored_bytes < case.image.nbytes / 2 and label.stored_bytes < case.label.nbytes / 10
    rng = np.random.default_rng(1)
    for _ in range(20):  # patches reaching beyond the volume are padded the same way
        lo = [int(rng.integers(-20, n)) for n in case.label.shape]
        shape = [int(rng.integers(1, 40)) for _ in range(3)]
        assert np.array_equal(crop_padded(image, lo, shape, case.pad_values),
                              crop_padded(case.image, lo, shape, case.pad_values))
        assert np.array_equal(crop_padded(label, lo, shape, 0), crop_padded(case.label, lo, shape, 0))


def test_damaged_files_are_refused_with_the_file_named(tmp_path):
    ref = np.arange(2 * 20 * 20 * 20, dtype=np.float32).reshape(2, 20, 20, 20)
    path = tmp_path / "a.vxc"
    _write(path, ref, chunk=(8, 8, 8)).close()
    data = path.read_bytes()
    for name, blob, match in (("cut.vxc", data[:-10], "cut short"), ("empty.vxc", b"", "too short"),
                              ("magic.vxc", b"NOTCHUNK" + data[8:], "magic"),
                              ("npy.vxc", b"\x93NUMPY" + data[6:], "magic")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=match):
            ChunkedArray(tmp_path / name)
    flipped = bytearray(data)
    flipped[-30] ^= 0xFF  # inside the last chunk's compressed bytes: found when that chunk is read
    (tmp_path / "flip.vxc").write_bytes(bytes(flipped))
    a = ChunkedArray(tmp_path / "flip.vxc")
    assert np.array_equal(a[:, :8, :8, :8], ref[:, :8, :8, :8])
    with pytest.raises(InputError, match=r"flip\.vxc: chunk \(2, 2, 2\) is damaged .*delete this file"):
        a[:, 16:, 16:, 16:]


def test_a_compressed_folder_trains_the_weights_of_an_uncompressed_one_on_less_disk(store_dataset, tmp_path):
    dataset = store_dataset[0]
    torch.set_num_threads(1)
    plain = run_training(dataset, tmp_path / "plain", _config(preprocessed=str(tmp_path / "p")))
    records = []
    packed = run_training(dataset, tmp_path / "packed", _config(preprocessed=str(tmp_path / "c"),
                                                                compress_preprocessed=True),
                          progress=make_reporter("none", records.append))
    sa, sb = plain.model.state_dict(), packed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list((tmp_path / "c").glob("*.npy")) and len(list((tmp_path / "c").glob("*.vxc"))) == 6
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.vxc"))
    raw = sum(p.stat().st_size for p in (tmp_path / "p").glob("*.npy"))
    assert on_disk < raw / 2
    for meta in (tmp_path / "c").glob("*.json"):
        doc = json.loads(meta.read_text())
        assert doc["storage"] == "chunked" and doc["stored_bytes"] < doc["bytes"]
    [said] = [r["message"] for r in records if r.get("event") == "message" and "memory-mapped" in r["message"]]
    raw_arrays = sum(doc["bytes"] for doc in (json.loads(m.read_text()) for m in (tmp_path / "c").glob("*.json")))
    assert f"({raw_arrays / 1e6:.1f} MB, {on_disk / 1e6:.1f} MB on disk; 3 preprocessed now" in said


def test_the_loader_threads_draw_the_same_batches_from_compressed_cases(store_dataset, tmp_path):
    dataset, setup = store_dataset
    from VeloxSegLib.data.nnunet import load_dataset
    from VeloxSegLib.train.augment import Augmenter
    from VeloxSegLib.train.sampler import PatchSampler

    ds = load_dataset(dataset)
    (tmp_path / "c").mkdir()
    packed = prepare_cases(ds, ds.cases, setup, preprocess_case, CaseStore(tmp_path / "c", compress=True), DistInfo())
    held = [preprocess_case(ds, c, setup) for c in ds.cases]
    assert all(isinstance(c.image, ChunkedArray) and isinstance(c.label, ChunkedArray) for c in packed)

    def batches(cases, threads):
        s = PatchSampler(cases, (32, 32, 24), 2, np.random.default_rng(3), Augmenter(rotate_p=1.0),
                         threads=threads, component_fraction=0.5)
        try:
            return [s.sample() for _ in range(4)]
        finally:
            s.close()

    for (xa, ya), (xb, yb) in zip(batches(packed, 2), batches(held, 0)):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_cases_are_reused_as_stored_and_a_damaged_one_is_redone_compressed(store_dataset, tmp_path, monkeypatch):
    dataset, setup = store_dataset
    from VeloxSegLib.data.nnunet import load_dataset

    ds = load_dataset(dataset)
    root = tmp_path / "s"
    root.mkdir()
    prepare_cases(ds, ds.cases, setup, preprocess_case, CaseStore(root), DistInfo())  # uncompressed
    calls = []

    def counted(ds_, case, setup_):
        calls.append(case)
        return preprocess_case(ds_, case, setup_)

    again = prepare_cases(ds, ds.cases, setup, counted, CaseStore(root, compress=True), DistInfo())
    assert calls == [] and all(isinstance(c.image, np.memmap) for c in again)
    case = ds.cases[1]
    key = case_key(ds, case, setup)
    _, image, _ = CaseStore(root).paths(case, key)
    image.write_bytes(image.read_bytes()[:100])  # a damaged .npy: preprocessed again, now compressed
    [redone] = prepare_cases(ds, [case], setup, counted, CaseStore(root, compress=True), DistInfo())
    assert calls == [case] and isinstance(redone.image, ChunkedArray)
    assert np.array_equal(np.asarray(redone.image), preprocess_case(ds, case, setup).image)
    assert not image.exists()  # the old copy goes; only the case's chunked files and JSON stay
    assert sorted(p.name for p in root.glob(f"{case}.*")) == sorted(
        f"{case}.{key}{ext}" for ext in (".json", ".image.vxc", ".label.vxc"))
    chunked = CaseStore(root).paths(case, key, "chunked")[1]
    chunked.write_bytes(chunked.read_bytes()[:-7])  # a cut-short compressed file: redone too
    assert CaseStore(root).load(case, key) is None
    [third] = prepare_cases(ds, [case], setup, counted, CaseStore(root, compress=True), DistInfo())
    assert calls == [case, case] and np.array_equal(np.asarray(third.label), redone.label[...])


def test_the_free_space_check_counts_compression_and_suggests_it(store_dataset, tmp_path, monkeypatch):
    dataset, setup = store_dataset
    import shutil
    from collections import namedtuple

    from VeloxSegLib.train.cache import WORST_COMPRESSION, check_free_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 10 * 10 ** 9))
    need = int(10 * 10 ** 9 * 1.1)  # does not fit as it is, fits compressed at the worst ratio
    assert need / WORST_COMPRESSION * 1.05 < 10 * 10 ** 9
    with pytest.raises(InputError, match="need about 11.0 GB and .*compress them with --compress-preprocessed"):
        check_free_space(CaseStore(tmp_path), need)
    check_free_space(CaseStore(tmp_path, compress=True), need)
    with pytest.raises(InputError, match=r"need about 16\.7 GB compressed and the disk has 10\.0 GB free") as err:
        check_free_space(CaseStore(tmp_path, compress=True), 20 * 10 ** 9)
    assert "--compress-preprocessed" not in str(err.value)


def test_cli_option_reaches_the_run_and_excludes_in_memory(store_dataset, tmp_path):
    dataset = store_dataset[0]
    from VeloxSegLib.cli import build_parser
    from VeloxSegLib.commands.train import config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", str(dataset), "-o", "x", "--compress-preprocessed"])
    assert config_from_args(args).compress_preprocessed
    args = parser.parse_args(["finetune", "-m", "petct-lesion-demo", str(dataset), "-o", "x",
                              "--compress-preprocessed", "--preprocessed", "P"])
    assert config_from_args(args).compress_preprocessed and config_from_args(args).preprocessed == "P"
    assert not config_from_args(parser.parse_args(["train", str(dataset), "-o", "x"])).compress_preprocessed
    with pytest.raises(ConfigError, match="--in-memory has none"):
        run_training(dataset, tmp_path / "o", _config(in_memory=True, compress_preprocessed=True))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.training").exists()


def test_the_bench_section_measures_both_folders_and_checks_their_patches(monkeypatch):
    from VeloxSegLib import bench
    from VeloxSegLib.train.cache import store_benchmark
    from VeloxSegLib.train.chunked import ChunkedArray as CA

    out = store_benchmark(cases=2, batches=4, rounds=2)
    npy, packed = out["rows"]
    assert (npy["storage"], packed["storage"]) == ("npy", "chunked")
    assert npy["bytes"] > out["array_bytes"] > 2 * packed["bytes"]  # .npy headers: a little over the arrays
    assert len(npy["batch_ms"]) == len(packed["batch_ms"]) == 4
    md = bench.render_markdown({"machine": {k: "x" for k in ("cpu", "cores", "memory_gib", "os", "python",
                                                               "torch", "date")}, "patch": [], "store": out})
    assert "## Preprocessed folder" in md and "`--compress-preprocessed` |" in md
    read = CA.read
    monkeypatch.setattr(CA, "read", lambda self, lo, hi: read(self, lo, hi) + (self.dtype.kind == "f"))
    with pytest.raises(RuntimeError, match="other patches"):
        store_benchmark(cases=2, batches=2, rounds=1)
