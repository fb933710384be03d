"""``veloxseg evaluate`` on small label maps written to disk (files and folders, JSON, bad input)."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib import metrics as M
from VeloxSegLib.errors import InputError
from VeloxSegLib.cli import main

SPACING_XYZ = (1.5, 0.8, 3.0)


def write(path, arr, spacing=SPACING_XYZ, origin=(0.0, 0.0, 0.0), pixel=None):
    img = sitk.GetImageFromArray(arr if pixel is None else arr.astype(pixel))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def masks(seed):
    rng = np.random.default_rng(seed)
    ref = np.zeros((10, 16, 14), np.uint8)
    z, y, x = rng.integers(2, 6, 3)
    ref[z:z + 4, y:y + 6, x:x + 5] = 1
    ref[7:9, 10:14, 9:12] = 2
    pred = np.roll(ref, int(rng.integers(0, 2)), axis=2)
    pred[0, 0, 0:2] = 1  # a small false-positive component
    return pred, ref


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in pathlib.Path(folder).rglob("*"))


def run_cli(capsys, *argv):
    code = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    exts = [".nii.gz", ".nrrd", ".mha"]
    for i, ext in enumerate(exts):
        pred, ref = masks(i)
        write(ref_dir / f"case{i}{ext}", ref)
        write(pred_dir / f"case{i}.nii.gz", pred)  # matched by case name, not ending
    return pred_dir, ref_dir


def test_single_files_table(tmp_path, capsys):
    pred, ref = masks(0)
    p = write(tmp_path / "p.nii.gz", pred)
    r = write(tmp_path / "r.nii", ref)
    code, out, err = run_cli(capsys, "--pred", p, "--ref", r)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["case", "label", "Dice", "HD95_mm"]
    assert any(line.startswith("r ") and "1 label 1" in line for line in lines)
    assert any(line.startswith("mean (1)") for line in lines)
    expected = M.evaluate_arrays(pred, ref, [1, 2], tuple(reversed(SPACING_XYZ)))
    row = next(line for line in lines if line.startswith("r ") and " 2 label 2" in line)
    assert f"{expected[2]['dice']:.4f}" in row and f"{expected[2]['hd95_mm']:.2f}" in row


def test_a_datasets_labels_folder_names_the_labels_from_its_dataset_json(folders, tmp_path, capsys):
    pred_dir, ref_dir = folders
    ds = tmp_path / "Dataset001"
    ds.mkdir()
    labels_tr = ref_dir.rename(ds / "labelsTr")
    # nnU-Net's region-based entries (lists) name no single value and are left out
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                 "numTraining": 3, "labels": {"background": 0, "tumour": 1,
                                                                              "cyst": 2, "both": [1, 2]}}))
    code, out, err = run_cli(capsys, "--pred", pred_dir, "--ref", labels_tr, "--json", "-")
    data = json.loads(out)
    assert code == 0 and data["labels"] == {"1": "tumour", "2": "cyst"}, err
    code, out, err = run_cli(capsys, "--pred", pred_dir, "--ref", labels_tr)
    assert code == 0 and any(line.startswith("case0 ") and " 1 tumour " in line for line in out.splitlines())
    # another folder beside a dataset.json is not a dataset's labels: values as before
    other = labels_tr.rename(ds / "refs")
    code, out, err = run_cli(capsys, "--pred", pred_dir, "--ref", other, "--json", "-")
    assert code == 0 and json.loads(out)["labels"] == {"1": "label 1", "2": "label 2"}
    # a broken dataset.json only costs the names
    other.rename(labels_tr)
    (ds / "dataset.json").write_text("{not json")
    code, out, err = run_cli(capsys, "--pred", pred_dir, "--ref", labels_tr, "--json", "-")
    assert code == 0 and json.loads(out)["labels"] == {"1": "label 1", "2": "label 2"}


def test_folders_json(folders, tmp_path, capsys):
    pred_dir, ref_dir = folders
    before = snapshot(tmp_path)
    out_json = tmp_path / "res.json"
    code, out, err = run_cli(capsys, "--pred", pred_dir, "--ref", ref_dir, "--labels", 1, 2, "--json", out_json)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert [c["case"] for c in data["cases"]] == ["case0", "case1", "case2"]
    assert set(data["mean"]) == {"1", "2"} and data["labels"] == {"1": "label 1", "2": "label 2"}
    for i, case in enumerate(data["cases"]):
        pred, ref = masks(i)
        expected = M.evaluate_arrays(pred, ref, [1, 2], tuple(reversed(SPACING_XYZ)))
        for lab in (1, 2):
            got = case["metrics"][str(lab)]
            for key in M.METRIC_KEYS:
                assert got[key] == pytest.approx(expected[lab][key], rel=1e-5, abs=1e-5), (i, lab, key)
    mean_dice = np.mean([c["metrics"]["1"]["dice"] for c in data["cases"]])
    assert data["mean"]["1"]["dice"] == pytest.approx(mean_dice)
    assert data["cases"][0]["spacing"] == pytest.approx(list(SPACING_XYZ))
    # inputs untouched, nothing but the JSON added, no temporary left
    after = snapshot(tmp_path)
    assert [s for s in after if s not in before] == [("res.json", out_json.stat().st_size,
                                                        out_json.stat().st_mtime_ns)]
    # an existing JSON is kept unless --overwrite
    code, _, err = run_cli(capsys, "--pred", pred_dir, "--ref", ref_dir, "--json", out_json)
    assert code == 2 and "res.json" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "--pred", pred_dir, "--ref", ref_dir, "--json", out_json, "--overwrite")
    assert code == 0, err


def test_empty_masks_give_documented_values_and_valid_json(tmp_path, capsys):
    ref = np.zeros((6, 6, 6), np.uint8)
    pred = ref.copy()
    pred[1:3, 1:3, 1:3] = 1  # negative case with a false positive
    p = write(tmp_path / "p.nrrd", pred)
    r = write(tmp_path / "r.nrrd", ref)
    code, out, err = run_cli(capsys, "--pred", p, "--ref", r, "--labels", 1, "--json", "-")
    assert code == 0, err
    data = json.loads(out)  # strict JSON on stdout, nothing else
    m = data["cases"][0]["metrics"]["1"]
    assert m["dice"] == 0.0 and m["hd95_mm"] is None and m["recall"] == 0.0
    assert m["fp_volume_ml"] == pytest.approx(8 * 1.5 * 0.8 * 3.0 / 1000)
    assert data["mean"]["1"]["hd95_mm"] is None and data["mean"]["1"]["hd95_cases"] == 0
    # both empty: perfect
    code, out, _ = run_cli(capsys, "--pred", r, "--ref", r, "--labels", 1, "--json", "-")
    m = json.loads(out)["cases"][0]["metrics"]["1"]
    assert (m["dice"], m["hd95_mm"], m["precision"], m["recall"]) == (1.0, 0.0, 1.0, 1.0)
    # the table shows inf and a note about the mean
    code, out, _ = run_cli(capsys, "--pred", p, "--ref", r, "--labels", 1)
    assert " inf " in out and "finite" in out


def test_discovered_labels_fill_absent_ones(tmp_path, capsys):
    a = np.zeros((6, 6, 6), np.uint8)
    a[1:3, 1:3, 1:3] = 1
    b = np.zeros((6, 6, 6), np.uint8)
    b[3:5, 3:5, 3:5] = 2
    for d in ("p", "r"):
        (tmp_path / d).mkdir()
        write(tmp_path / d / "a.nii.gz", a)
        write(tmp_path / d / "b.nii.gz", b)
    code, out, err = run_cli(capsys, "--pred", tmp_path / "p", "--ref", tmp_path / "r", "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert data["cases"][0]["metrics"]["2"]["dice"] == 1.0  # label 2 absent from both masks of case a
    assert data["mean"]["1"]["dice"] == 1.0 and data["mean"]["2"]["hd95_mm"] == 0.0


@pytest.mark.parametrize("problem", ["unknown-label-ref", "unknown-label-pred", "geometry-origin",
                                     "geometry-size", "missing-case", "mixed", "not-integer", "corrupt",
                                     "missing-file", "json-folder-missing", "empty-folder", "2d",
                                     "label-zero"])
def test_bad_input(tmp_path, capsys, problem):
    pred, ref = masks(1)
    pdir, rdir = tmp_path / "pred", tmp_path / "ref"
    pdir.mkdir()
    rdir.mkdir()
    p = write(pdir / "c.nii.gz", pred)
    r = write(rdir / "c.nii.gz", ref)
    args = ["--pred", p, "--ref", r]
    expect = []
    if problem == "unknown-label-ref":
        args += ["--labels", 1]
        expect = [str(r), "reference holds label(s) 2", "known labels (1)"]
    elif problem == "unknown-label-pred":
        bad = pred.copy()
        bad[0, 0, 0] = 7
        write(p, bad)
        args += ["--labels", 1, 2]
        expect = [str(p), "prediction holds label(s) 7"]
    elif problem == "geometry-origin":
        write(p, pred, origin=(0.0, 0.0, 5.0))
        expect = [str(p), str(r), "different grids", "origin"]
    elif problem == "geometry-size":
        write(p, pred[:, :, :-1])
        expect = [str(p), str(r), "size (13, 16, 10) vs (14, 16, 10)"]
    elif problem == "missing-case":
        write(rdir / "d.nrrd", ref)
        args = ["--pred", pdir, "--ref", rdir]
        expect = [str(pdir), "no prediction for 1 reference case(s): d"]
    elif problem == "mixed":
        args = ["--pred", pdir, "--ref", r]
        expect = ["must both be files or both be folders"]
    elif problem == "not-integer":
        write(p, pred.astype(np.float32) * 0.5)
        expect = [str(p), "non-integer voxel values"]
    elif problem == "corrupt":
        p.write_bytes(b"\x1f\x8b" + os.urandom(200))
        expect = [str(p)]
    elif problem == "missing-file":
        args = ["--pred", pdir / "nope.nii.gz", "--ref", r]
        expect = ["nope.nii.gz", "not found"]
    elif problem == "json-folder-missing":
        args += ["--json", tmp_path / "no" / "out.json"]
        expect = ["out.json", "does not exist"]
    elif problem == "empty-folder":
        (tmp_path / "empty").mkdir()
        args = ["--pred", pdir, "--ref", tmp_path / "empty"]
        expect = ["empty", "holds no label maps"]
    elif problem == "label-zero":
        args += ["--labels", 0, 1, 2]
        expect = ["--labels: 0 not valid", "0 is background"]
    elif problem == "2d":
        write(r, ref[0])
        expect = [str(r), "2D"]
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("veloxseg evaluate: error: ")
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_labels_from_bundle(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from VeloxSegLib.bundle import save_bundle

    meta = {
        "format_version": 1, "name": "two-organs",
        "model": {"name": "veloxseg-b", "in_channels": [1], "num_classes": 3, "patch_size": [64, 64, 64]},
        "spacing": [1, 1, 1],
        "channels": [{"name": "CT", "modality": "CT", "normalization": {"scheme": "none"}}],
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}],
    }
    bundle = save_bundle(tmp_path / "b.zip", meta, {"w": torch.zeros(2)})
    pred, ref = masks(2)
    p = write(tmp_path / "p.mha", pred)
    r = write(tmp_path / "r.mha", ref)
    code, out, err = run_cli(capsys, "--pred", p, "--ref", r, "-m", bundle, "--json", "-")
    assert code == 0, err
    assert json.loads(out)["labels"] == {"1": "liver", "2": "spleen"}
    code, out, err = run_cli(capsys, "--pred", p, "--ref", r, "-m", bundle, "--labels", 5)
    assert code != 0 and "--labels 5 not in bundle 'two-organs'" in err


def test_subprocess(tmp_path):
    pred, ref = masks(0)
    p = write(tmp_path / "p.nii.gz", pred)
    r = write(tmp_path / "r.nii.gz", ref)
    out_json = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "VeloxSegLib.cli", "evaluate", "--pred", str(p), "--ref", str(r),
                           "--labels", "1", "2", "--json", str(out_json)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mean (1)" in proc.stdout
    data = json.loads(out_json.read_text())
    assert math.isfinite(data["mean"]["1"]["hd95_mm"])
    bad = subprocess.run([sys.executable, "-m", "VeloxSegLib.cli", "evaluate", "--pred", str(p), "--ref", str(r),
                          "--labels", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "label(s) 2" in bad.stderr


def test_regions_are_evaluated_as_unions_of_labels(tmp_path):
    import SimpleITK as sitk
    import numpy as np

    from VeloxSegLib.cli import main

    ref = np.zeros((6, 8, 8), np.uint8)
    ref[1:3, 2:6, 2:6] = 2
    ref[2, 3:5, 3:5] = 1
    pred = ref.copy()
    pred[pred == 1] = 2  # label 1 missed, but the union {1, 2} is perfect
    for name, arr in (("p.nii.gz", pred), ("r.nii.gz", ref)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
    out = tmp_path / "m.json"
    code = main(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"),
                 "--labels", "1", "2", "--regions", "TC=1", "WT=1,2", "--json", str(out)])
    assert code == 0
    import json

    mean = json.loads(out.read_text())["mean"]
    assert mean["1"]["dice"] == 0.0 and mean["WT"]["dice"] == 1.0 and mean["TC"]["dice"] == 0.0


def test_malformed_region_is_a_clear_error(tmp_path, capsys):
    from VeloxSegLib.cli import main

    code = main(["evaluate", "--pred", str(tmp_path), "--ref", str(tmp_path), "--regions", "WT"])
    assert code != 0
    assert "--regions: 'WT'" in capsys.readouterr().err


def _brats_like(tmp_path):
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[1:3, 2:6, 2:6] = 2
    ref[2, 3:5, 3:5] = 1
    p, r = write(tmp_path / "p.nii.gz", ref), write(tmp_path / "r.nii.gz", ref)
    return p, r


def test_region_label_outside_the_known_labels_is_an_error(tmp_path, capsys):
    p, r = _brats_like(tmp_path)
    code, out, err = run_cli(capsys, "--pred", p, "--ref", r, "--labels", "1", "2", "--regions", "ET=4", "WT=1,2,4")
    assert code != 0 and out == ""
    assert err.strip().count("\n") == 0
    assert "--regions: region 'ET' uses label(s) 4" in err and "known labels (1, 2)" in err


def test_region_empty_everywhere_gets_a_warning_without_labels(tmp_path, capsys):
    p, r = _brats_like(tmp_path)
    code, out, err = run_cli(capsys, "--pred", p, "--ref", r, "--regions", "ET=4", "WT=1,2")
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "region 'ET'" in warnings[0] and "empty in every prediction and reference" in warnings[0]


@pytest.mark.parametrize("region", ["1=1,2", "2=1", "+1=1,2"])
def test_region_named_like_a_label_value_is_refused(tmp_path, capsys, region):
    p, r = _brats_like(tmp_path)
    out_json = tmp_path / "m.json"
    code, out, err = run_cli(capsys, "--pred", p, "--ref", r, "--labels", "1", "2", "--regions", region,
                             "--json", out_json)
    assert code != 0 and not out_json.exists()
    assert err.strip().count("\n") == 0 and "looks like a label value" in err


def test_region_named_like_a_label_name_is_refused(tmp_path, capsys):
    p, r = _brats_like(tmp_path)
    with pytest.raises(InputError, match="region name 'Core' is the name of label 1"):
        from VeloxSegLib.commands.evaluate import evaluate
        evaluate(p, r, labels=[1, 2], label_names={1: "core", 2: "edema"}, regions={"Core": [1, 2]})
