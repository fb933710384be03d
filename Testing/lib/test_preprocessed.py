"""Preprocessed training cases on disk (train/cache.py): the same arrays and weights as in memory,
reused across runs, redone when a file or setting changes or a file is damaged, never unpickled."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from VeloxSegLib.errors import ConfigError, InputError
from VeloxSegLib.train import trainer
from VeloxSegLib.train.cache import CaseStore, case_key, prepare_cases
from VeloxSegLib.train.ddp import DistInfo
from VeloxSegLib.train.progress import make_reporter
from VeloxSegLib.train.trainer import TrainConfig, preprocess_case, run_training


@pytest.fixture
def dataset(store_dataset):
    return store_dataset[0]


@pytest.fixture
def setup(store_dataset):
    return store_dataset[1]


def _config(**kw):
    base = dict(epochs=1, iterations_per_epoch=3, batch_size=1, val_every=5, device="cpu", seed=5,
                final_weights="last", split=(1.0, 0.0, 0.0))
    base.update(kw)
    return TrainConfig(**base)


def _weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _messages(records):
    return [r["message"] for r in records if r.get("event") == "message"]


def test_memory_mapped_cases_train_the_weights_of_in_memory_cases(dataset, tmp_path):
    torch.set_num_threads(1)
    records = []
    mapped = run_training(dataset, tmp_path / "mapped", _config(),
                          progress=make_reporter("none", records.append))
    held = run_training(dataset, tmp_path / "held", _config(in_memory=True))
    assert _weights_equal(mapped.model, held.model)
    started = [r["event"] for r in records if r["event"] != "prepare"]
    assert started[0] == "start"  # the cases' message comes after it
    assert any("3 training case(s) memory-mapped" in m and "3 preprocessed now, 0 reused" in m
               for m in _messages(records))
    store = tmp_path / "mapped.training" / "preprocessed"
    assert len(list(store.glob("*.json"))) == 3 and len(list(store.glob("*.npy"))) == 6
    assert not (tmp_path / "held.training" / "preprocessed").exists()


def test_mapped_arrays_are_exactly_the_preprocessed_ones(dataset, setup, tmp_path):
    from VeloxSegLib.data.nnunet import load_dataset

    ds = load_dataset(dataset)
    store = CaseStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    mapped = prepare_cases(ds, ds.cases, setup, preprocess_case, store, DistInfo())
    for case, data in zip(ds.cases, mapped):
        ref = preprocess_case(ds, case, setup)
        assert isinstance(data.image, np.memmap) and not data.image.flags.writeable
        assert np.array_equal(data.image, ref.image) and np.array_equal(data.label, ref.label)
        assert data.pad_values == ref.pad_values and data.spacing == pytest.approx(ref.spacing)


def test_a_second_run_reuses_the_cases_without_reading_the_images(dataset, tmp_path, monkeypatch):
    """Another run (a fold, a fine-tune, a resume) on the same data and settings maps the
    shared folder: nothing is read or preprocessed again, and the weights are the same."""
    torch.set_num_threads(1)
    shared = tmp_path / "shared"
    first = run_training(dataset, tmp_path / "a", _config(preprocessed=str(shared)))

    def boom(*a, **k):
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(trainer, "preprocess_case", boom)
    records = []
    second = run_training(dataset, tmp_path / "b", _config(preprocessed=str(shared)),
                          progress=make_reporter("none", records.append))
    assert _weights_equal(first.model, second.model)
    assert any("0 preprocessed now, 3 reused" in m for m in _messages(records))


def test_a_changed_file_or_setting_gives_a_new_key(dataset, setup, tmp_path):
    from dataclasses import replace

    import shutil

    from VeloxSegLib.data.nnunet import load_dataset

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    ds = load_dataset(copy)
    case = ds.cases[0]
    key = case_key(ds, case, setup)
    assert key == case_key(load_dataset(copy), case, setup)  # stable
    twin = tmp_path / "twin"
    shutil.copytree(copy, twin)  # copy2: the same names, sizes and modification times, elsewhere
    assert case_key(load_dataset(twin), case, setup) != key
    assert case_key(ds, case, replace(setup, spacing=(2.0, 2.0, 2.0))) != key
    norm = [dict(c) for c in setup.channels]
    norm[1] = {**norm[1], "normalization": {"scheme": "zscore_nonzero"}}
    assert case_key(ds, case, replace(setup, channels=norm)) != key
    label = ds.label_path(case)
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # a label edited in place
    assert case_key(ds, case, setup) != key


def _saved_case(dataset, setup, tmp_path):
    """A store holding the dataset's first case: (dataset, store, case, key, the mapped case)."""
    from VeloxSegLib.data.nnunet import load_dataset

    ds = load_dataset(dataset)
    (tmp_path / "store").mkdir()
    store = CaseStore(tmp_path / "store")
    case = ds.cases[0]
    key = case_key(ds, case, setup)
    return ds, store, case, key, store.save(case, key, preprocess_case(ds, case, setup))


def test_a_damaged_case_is_preprocessed_again(dataset, setup, tmp_path):
    ds, store, case, key, ref = _saved_case(dataset, setup, tmp_path)
    meta, image, label = store.paths(case, key)
    size = image.stat().st_size
    with open(image, "r+b") as f:  # cut short, as by a full disk
        f.truncate(size // 2)
    assert store.load(case, key) is None
    [again] = prepare_cases(ds, [case], setup, preprocess_case, store, DistInfo())
    assert np.array_equal(again.image, preprocess_case(ds, case, setup).image)
    assert image.stat().st_size == size
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "case": "another"}))
    assert store.load(case, key) is None
    assert ref.image.shape == again.image.shape


class _Marker:
    """Unpickling this object writes a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_array_in_the_folder_is_never_unpickled(dataset, setup, tmp_path):
    ds, store, case, key, _ = _saved_case(dataset, setup, tmp_path)
    _, image, _ = store.paths(case, key)
    marker = tmp_path / "unpickled"
    evil = np.empty(1, dtype=object)
    evil[0] = _Marker(str(marker))
    with open(image, "wb") as f:
        np.save(f, evil, allow_pickle=True)
    assert store.load(case, key) is None
    assert not marker.exists()
    assert pickle.dumps(_Marker("x"))  # (the marker does pickle: the test would notice an unpickling)


def test_a_failing_case_leaves_the_cases_before_it_whole_and_no_temporary_files(dataset, setup, tmp_path,
                                                                                monkeypatch):
    from VeloxSegLib.data.nnunet import load_dataset

    ds = load_dataset(dataset)
    root = tmp_path / "store"
    root.mkdir()
    store = CaseStore(root)
    broken = ds.cases[1]

    def preprocess(ds_, case, setup_):
        if case == broken:
            raise InputError(f"case {case!r}: broken")
        return preprocess_case(ds_, case, setup_)

    with pytest.raises(InputError, match="broken"):
        prepare_cases(ds, ds.cases, setup, preprocess, store, DistInfo())
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(f"{ds.cases[0]}.{case_key(ds, ds.cases[0], setup)}{ext}"
                           for ext in (".json", ".image.npy", ".label.npy"))


def test_a_run_failing_before_its_first_checkpoint_removes_the_default_folder_and_keeps_a_given_one(dataset,
                                                                                                   tmp_path):
    """Divergence at the first step: nothing resumable exists. The default folder is part of the
    work folder and goes with it; a folder given with --preprocessed is a cache the user asked
    for and keeps its whole cases (and nothing half written)."""
    torch.set_num_threads(1)
    existing = tmp_path / "w-existing"  # a work folder that was there before: it stays, empty
    existing.mkdir()
    for given, work in ((None, tmp_path / "w-default"), (None, existing), (tmp_path / "cache", tmp_path / "w-given")):
        out = tmp_path / "out"
        with pytest.raises(ConfigError, match="diverged"):
            run_training(dataset, out, _config(preprocessed=str(given) if given else None, lr=1e12), work_dir=work)
        assert not out.exists()
        assert (sorted(os.listdir(work)) == []) if work == existing else not work.exists()
        if given:
            assert len(list(given.glob("*.json"))) == 3
            assert not [p for p in given.iterdir() if p.name.startswith(".")]


def test_options_are_checked_before_anything_is_written(dataset, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        run_training(dataset, tmp_path / "o", _config(preprocessed=str(tmp_path / "c"), in_memory=True))
    with pytest.raises(InputError, match="inside the dataset"):
        run_training(dataset, tmp_path / "o", _config(preprocessed=str(dataset / "cache")))
    with pytest.raises(InputError, match="inside the output bundle"):
        run_training(dataset, tmp_path / "o", _config(preprocessed=str(tmp_path / "o" / "cache")))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        run_training(dataset, tmp_path / "o", _config(preprocessed=str(tmp_path / "afile")))
    assert not (dataset / "cache").exists() and not (tmp_path / "o").exists()
    assert not (tmp_path / "o.training").exists()


def test_cli_options_reach_the_run(dataset, tmp_path):
    from VeloxSegLib.cli import build_parser
    from VeloxSegLib.commands.train import config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", str(dataset), "-o", str(tmp_path / "o"), "--preprocessed", "P"])
    assert config_from_args(args).preprocessed == "P"
    args = parser.parse_args(["finetune", "-m", "petct-lesion-demo", str(dataset), "-o", "x", "--in-memory"])
    assert config_from_args(args).in_memory
    with pytest.raises(SystemExit):
        parser.parse_args(["train", str(dataset), "-o", "x", "--in-memory", "--preprocessed", "P"])


def test_a_run_on_a_shared_folder_plans_from_the_saved_fingerprint_until_the_dataset_changes(dataset, tmp_path,
                                                                                             monkeypatch):
    """Planning reads every case; a second run on the unchanged dataset plans from the saved
    measurements instead (the same plans), and a changed file makes it measure again."""
    import shutil

    from VeloxSegLib.train import planner

    torch.set_num_threads(1)
    data = tmp_path / "ds"
    shutil.copytree(dataset, data)
    shared = tmp_path / "shared"
    calls = []
    measure = planner.fingerprint_dataset

    def counted(*a, **k):
        calls.append(1)
        return measure(*a, **k)

    monkeypatch.setattr(planner, "fingerprint_dataset", counted)
    run_training(data, tmp_path / "a", _config(preprocessed=str(shared)))
    assert len(calls) == 1 and len(list(shared.glob("fingerprints/*.json"))) == 1
    records = []
    run_training(data, tmp_path / "b", _config(preprocessed=str(shared)), progress=make_reporter("none", records.append))
    assert len(calls) == 1
    assert any("planned from the dataset fingerprint" in m for m in _messages(records))
    plans_a = json.loads((tmp_path / "a.training" / "plans.json").read_text())
    plans_b = json.loads((tmp_path / "b.training" / "plans.json").read_text())
    assert plans_a == plans_b
    label = next((data / "labelsTr").iterdir())
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    run_training(data, tmp_path / "c", _config(preprocessed=str(shared)))
    assert len(calls) == 2 and len(list(shared.glob("fingerprints/*.json"))) == 2


def test_the_size_estimate_matches_what_is_written(dataset, setup, tmp_path):
    from VeloxSegLib.data.nnunet import load_dataset
    from VeloxSegLib.train.cache import estimate_bytes

    ds = load_dataset(dataset)
    root = tmp_path / "store"
    root.mkdir()
    mapped = prepare_cases(ds, ds.cases, setup, preprocess_case, CaseStore(root), DistInfo())
    assert estimate_bytes(ds, ds.cases, setup) == sum(c.image.nbytes + c.label.nbytes for c in mapped)


def test_a_disk_too_small_is_refused_before_the_first_case_naming_the_need(dataset, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    torch.set_num_threads(1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    given = tmp_path / "cache"
    with pytest.raises(InputError, match=r"need about 0\.0 GB and the disk has 0\.0 GB free.*--in-memory"):
        run_training(dataset, tmp_path / "o", _config(preprocessed=str(given)))
    assert not list(given.glob("*.npy")) and not (tmp_path / "o").exists()
    # --in-memory needs no disk
    run_training(dataset, tmp_path / "o", _config(in_memory=True))


def test_a_write_failure_names_the_folder_and_the_case(dataset, setup, tmp_path, monkeypatch):
    from VeloxSegLib.data.nnunet import load_dataset
    from VeloxSegLib.train import cache

    ds = load_dataset(dataset)
    root = tmp_path / "store"
    root.mkdir()

    def full(f, arr, allow_pickle=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", full)
    with pytest.raises(InputError, match=rf"store: cannot write the preprocessed case '{ds.cases[0]}' \(No space left"):
        prepare_cases(ds, ds.cases[:1], setup, preprocess_case, CaseStore(root), DistInfo())
    assert list(root.iterdir()) == []
