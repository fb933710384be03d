"""Outputs never land on inputs, bad options are refused before any work, and interrupts end
cleanly: `predict`, `evaluate`, `plan`, `compare`, `finetune` and the `veloxseg` entry point."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib.cli import main

from test_cli_predict import ROOT, _case, _snapshot, bundle  # noqa: F401  (bundle: the module fixture)


def _labels(folder, name, reference):
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(reference))) > 0
    image = sitk.GetImageFromArray(lab.astype(np.uint8))
    image.CopyInformation(sitk.ReadImage(str(reference)))
    path = Path(folder) / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _dataset(root, n=2):
    """A tiny nnU-Net raw dataset (CT + PET, one label) written with this file's case maker."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        ct, _ = _case(root / "imagesTr", shape=(24, 40, 40), name=f"c{i}")
        _labels(root / "labelsTr", f"c{i}", ct)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def _one_error_line(capsys):
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l]
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_json_may_not_overwrite_its_reference(tmp_path, capsys):
    ct, _ = _case(tmp_path)
    ref = _labels(tmp_path, "ref", ct)
    pred = _labels(tmp_path, "pred", ct)
    before = _snapshot(tmp_path)
    for target in (ref, pred):
        rc = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--json", str(target), "--overwrite"])
        assert rc == 2 and "would overwrite an input" in _one_error_line(capsys)
    # nor an image inside a reference folder
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(ref, refs / "pred.nii.gz")
    snap = _snapshot(refs)
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(refs / "pred.nii.gz"), "--json",
               str(refs / "pred.nii.gz"), "--overwrite"])
    assert rc == 2
    capsys.readouterr()
    assert _snapshot(tmp_path) == before and _snapshot(refs) == snap
    # a JSON file beside them is fine
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())


# ---------------------------------------------------------------------------------- plan


def test_plan_never_overwrites_the_datasets_files_and_needs_overwrite(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds")
    before = (ds / "dataset.json").read_bytes()
    assert main(["plan", str(ds), "-o", str(ds / "dataset.json"), "--overwrite"]) == 2
    assert "would overwrite a file of the input folder" in _one_error_line(capsys)
    assert (ds / "dataset.json").read_bytes() == before
    assert main(["plan", str(ds), "-o", str(ds / "imagesTr" / "c0_0000.nii.gz"), "--overwrite"]) == 2
    capsys.readouterr()
    assert main(["plan", str(ds)]) == 0  # the default, DATASET/plans.json
    capsys.readouterr()
    first = (ds / "plans.json").read_bytes()
    assert main(["plan", str(ds), "--batch-size", "4"]) == 2
    assert "pass --overwrite" in _one_error_line(capsys) and (ds / "plans.json").read_bytes() == first
    assert main(["plan", str(ds), "--batch-size", "4", "--overwrite"]) == 0
    assert json.loads((ds / "plans.json").read_text())["batch_size"] == 4


def test_a_mistyped_dataset_is_named_as_missing_not_as_an_output_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-dataset"  # plans.json would go inside it by default
    assert main(["plan", str(missing)]) == 2
    assert _one_error_line(capsys).endswith(f"{missing}: not a directory")
    assert not missing.exists()


# ------------------------------------------------------------------------------- compare


def test_compare_checks_its_output_before_any_bundle_runs(tmp_path, bundle, capsys):  # noqa: F811
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    before = _snapshot(copy)
    missing = tmp_path / "no-such-heldout"  # the output is refused before the held-out set is even looked at
    for out, pattern in ((copy / "bundle.json", "would overwrite a file of the input folder|inside the bundle"),
                         (copy / "comparison.json", "inside the bundle"),
                         (tmp_path / "nope" / "c.json", "does not exist")):
        rc = main(["compare", str(copy), "--heldout", str(missing), "-o", str(out), "--overwrite"])
        line = _one_error_line(capsys)
        assert rc == 2 and __import__("re").search(pattern, line), line
    assert _snapshot(copy) == before and not (tmp_path / "nope").exists()
    (tmp_path / "c.json").write_text("{}")
    assert main(["compare", str(copy), "--heldout", str(missing), "-o", str(tmp_path / "c.json")]) == 2
    assert "pass --overwrite" in _one_error_line(capsys)


# ------------------------------------------------------------------------------- predict


def test_predict_refuses_its_input_folder_as_output(tmp_path, bundle, capsys):  # noqa: F811
    cases = tmp_path / "cases"
    cases.mkdir()
    _case(cases, name="p1")
    before = _snapshot(cases)
    for out in (cases, cases / "segs"):
        assert main(["predict", "-m", str(bundle), "-i", str(cases), "-o", str(out), "--progress", "none"]) == 2
        assert "input folder" in _one_error_line(capsys)
    assert _snapshot(cases) == before and sorted(os.listdir(cases)) == sorted(before)


def test_predict_names_a_mistyped_input_before_looking_at_the_output(tmp_path, bundle, capsys):  # noqa: F811
    missing = f"{tmp_path / 'no-such-cases'}{os.sep}"  # a folder meant, so -o has no image ending either
    assert main(["predict", "-m", str(bundle), "-i", missing, "-o", str(tmp_path / "segs"), "--progress", "none"]) == 2
    assert _one_error_line(capsys).endswith(f"'{missing}': no such file or folder")
    ct, _ = _case(tmp_path)  # the second of two inputs too
    before = _snapshot(tmp_path)
    assert main(["predict", "-m", str(bundle), "-i", str(ct), str(tmp_path / "pet.nii"), "-o", str(tmp_path / "out"),
                 "--progress", "none"]) == 2
    assert _one_error_line(capsys).endswith(f"'{tmp_path / 'pet.nii'}': no such file or folder")
    assert _snapshot(tmp_path) == before


def test_predict_folder_checks_every_case_before_the_first_runs(tmp_path, bundle, capsys):  # noqa: F811
    cases = tmp_path / "cases"
    cases.mkdir()
    _case(cases, name="p1")
    _, pet = _case(cases, name="p2")
    pet.write_bytes(b"not an image at all")
    rc = main(["predict", "-m", str(bundle), "-i", str(cases), "-o", str(tmp_path / "out"), "--progress", "none"])
    line = _one_error_line(capsys)
    assert rc == 2 and "p2_0001.nii.gz" in line and "not a readable image" in line
    assert not (tmp_path / "out").exists()  # p1 did not run; the folder was never made


@pytest.mark.parametrize("option, value", [("--batch-size", "-3"), ("--batch-size", "0"),
                                           ("--min-component-mm3", "-5"), ("--min-component-mm3", "nan")])
def test_predict_refuses_numbers_that_would_silently_segment_nothing(tmp_path, bundle, capsys, option, value):  # noqa: F811
    ct, pet = _case(tmp_path)
    before = _snapshot(tmp_path)
    rc = main(["predict", "-m", str(bundle), "-i", str(ct), str(pet), "-o", str(tmp_path / "seg.nii.gz"),
               option, value, "--progress", "none"])
    assert rc == 4 and option in _one_error_line(capsys)
    assert _snapshot(tmp_path) == before


def test_predict_refuses_swapped_pet_and_ct(tmp_path, bundle, capsys):  # noqa: F811
    ct, pet = _case(tmp_path)
    before = _snapshot(tmp_path)
    rc = main(["predict", "-m", str(bundle), "-i", str(pet), str(ct), "-o", str(tmp_path / "seg.nii.gz"),
               "--progress", "none"])
    line = _one_error_line(capsys)
    assert rc == 2 and f"'{ct}': given as PET" in line and "1) CT, 2) PET" in line
    assert _snapshot(tmp_path) == before
    # a PET with small negative values (reconstruction noise) is still PET
    image = sitk.ReadImage(str(pet))
    noisy = sitk.GetArrayFromImage(image) - 0.3
    out = sitk.GetImageFromArray(noisy)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(pet))
    assert main(["predict", "-m", str(bundle), "-i", str(ct), str(pet), "-o", str(tmp_path / "seg.nii.gz"),
                 "--progress", "none"]) == 0


def test_a_broken_user_bundle_is_reported_as_broken_not_missing(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    (models / "badjson").mkdir(parents=True)
    (models / "badjson" / "bundle.json").write_text("{ not json")
    (models / "badjson" / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("VELOXSEG_MODELS", str(models))
    ct, pet = _case(tmp_path)
    rc = main(["predict", "-m", "badjson", "-i", str(ct), str(pet), "-o", str(tmp_path / "s.nii.gz")])
    line = _one_error_line(capsys)
    assert rc == 3 and "bundle 'badjson'" in line and "cannot be loaded" in line and "no bundle named" not in line


def test_sigterm_while_starting_up_ends_with_one_line_and_no_traceback(tmp_path, bundle):  # noqa: F811
    """Before the command's own handler exists (torch still importing), SIGTERM ends it like Ctrl-C."""
    ct, pet = _case(tmp_path)
    before = _snapshot(tmp_path)
    cmd = [sys.executable, "-m", "VeloxSegLib.cli", "predict", "-m", str(bundle), "-i", str(ct), str(pet),
           "-o", str(tmp_path / "seg.nii.gz"), "--progress", "none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "cancelled" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("sig, raised", [(signal.SIGTERM, "_Terminated"), (signal.SIGINT, "KeyboardInterrupt")])
def test_a_signal_during_start_up_is_held_until_the_imports_are_done(sig, raised):
    """A handler that raises inside torch's import (Python called from pybind11) aborts the process
    with SIGABRT (seen in CI: exit -6, "terminate called after throwing ... error_already_set").
    During start-up the signal is only noted; it ends the run once the block is left."""
    from VeloxSegLib import cli

    outside = signal.signal(signal.SIGTERM, cli._terminate)  # as main() sets it before the block
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        reached = []
        with pytest.raises(BaseException) as info:
            with cli._signals_held():
                os.kill(os.getpid(), sig)
                for _ in range(1000):  # handlers run between bytecodes: give it plenty of them
                    time.sleep(0.0001)
                reached.append("the rest of the start-up ran")
        assert type(info.value).__name__ == raised
        assert reached == ["the rest of the start-up ran"]
        assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before
    finally:
        signal.signal(signal.SIGTERM, outside)


# ------------------------------------------------------------------------------ finetune


def test_finetune_refuses_a_non_bundle_output_and_a_work_dir_in_the_dataset_before_training(tmp_path, bundle, capsys):  # noqa: F811
    ds = _dataset(tmp_path / "ds")
    before = _snapshot(ds / "imagesTr")
    # the dataset itself as the output, with --overwrite: refused at once, no checkpoints written
    rc = main(["finetune", "-m", str(bundle), str(ds), "-o", str(ds), "--overwrite", "--epochs", "1",
               "--iterations-per-epoch", "1", "--progress", "none"])
    assert rc == 2 and "exists and is not a bundle folder" in _one_error_line(capsys)
    assert not (tmp_path / "ds.training").exists()
    rc = main(["finetune", "-m", str(bundle), str(ds), "-o", str(tmp_path / "new"), "--work-dir", str(ds / "work"),
               "--epochs", "1", "--iterations-per-epoch", "1", "--progress", "none"])
    assert rc == 2 and "inside the dataset" in _one_error_line(capsys)
    assert sorted(os.listdir(ds)) == ["dataset.json", "imagesTr", "labelsTr"] and _snapshot(ds / "imagesTr") == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.training").exists()


def test_finetune_stopped_while_loading_cases_leaves_no_work_folder(tmp_path, bundle, capsys):  # noqa: F811
    ds = _dataset(tmp_path / "ds", n=3)
    broken = ds / "imagesTr" / "c2_0001.nii.gz"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # its header reads; its voxels do not
    (tmp_path / "runs").mkdir()
    rc = main(["finetune", "-m", str(bundle), str(ds), "-o", str(tmp_path / "runs" / "new"), "--epochs", "1",
               "--iterations-per-epoch", "1", "--progress", "none", "--work-dir", str(tmp_path / "runs" / "w" / "x")])
    assert rc == 2 and "c2_0001.nii.gz" in _one_error_line(capsys)
    assert os.listdir(tmp_path / "runs") == []  # the work folders it made (w/x) are gone, no bundle


def test_finetune_writes_nothing_inside_its_source_bundle(tmp_path, bundle, capsys):  # noqa: F811
    ds = _dataset(tmp_path / "ds")
    source = tmp_path / "src"
    shutil.copytree(bundle, source)
    before = sorted(os.listdir(source))
    common = ["--epochs", "1", "--iterations-per-epoch", "1", "--progress", "none"]
    rc = main(["finetune", "-m", str(source), str(ds), "-o", str(source / "sub"), *common])
    assert rc == 2 and "inside the source bundle" in _one_error_line(capsys)
    rc = main(["finetune", "-m", str(source), str(ds), "-o", str(tmp_path / "new"), "--work-dir", str(source), *common])
    assert rc == 2 and "inside the source bundle" in _one_error_line(capsys)
    assert sorted(os.listdir(source)) == before and not (tmp_path / "new").exists()


def test_validation_labels_the_model_does_not_have_are_refused_before_training(tmp_path, bundle, capsys):  # noqa: F811
    ds = _dataset(tmp_path / "ds", n=2)
    val = tmp_path / "val"
    shutil.copytree(ds, val)
    label = val / "labelsTr" / "c1.nii.gz"  # only the validation set is wrong: it would score 0, not fail
    image = sitk.ReadImage(str(label))
    array = sitk.GetArrayFromImage(image)
    array[array == 1] = 2
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(label))
    rc = main(["finetune", "-m", str(bundle), str(ds), "-o", str(tmp_path / "new"), "--val-dataset", str(val),
               "--epochs", "1", "--iterations-per-epoch", "1", "--progress", "none"])
    line = _one_error_line(capsys)
    assert rc == 2 and "c1.nii.gz" in line and "[2] are not among the model's labels" in line
    assert sorted(os.listdir(tmp_path)) == ["ds", "val"]


@pytest.mark.parametrize("argv, expected", [
    (["train", "ds", "-o", "b", "--fold", "1", "--split", "0.6,0.2,0.2"], "argument --split: not allowed with argument --fold"),
    (["predict", "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
])
def test_a_usage_mistake_is_one_line_too(capsys, argv, expected):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"veloxseg {argv[0]}: error: {expected}") and line.endswith(f"(see veloxseg {argv[0]} --help)")
