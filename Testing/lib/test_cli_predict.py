"""`veloxseg predict`: end to end on real files, bad input, JSON progress, cancellation."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from VeloxSegLib import build_model
from VeloxSegLib.bundle import save_bundle
from VeloxSegLib.cli import main

ROOT = Path(__file__).resolve().parents[2]
PATCH = (64, 64, 64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=PATCH)
    meta = {
        "format_version": 1, "name": "cli-test",
        "model": {"name": "veloxseg-b", "in_channels": [1, 1], "num_classes": 2, "patch_size": list(PATCH)},
        "spacing": [2.0, 2.0, 2.0],
        "channels": [
            {"name": "CT", "modality": "CT",
             "normalization": {"scheme": "ct", "clip": [-1000.0, 600.0], "mean": 40.0, "std": 200.0}},
            {"name": "PET", "modality": "PET", "normalization": {"scheme": "pet_zscore_body"}}],
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion", "color": [230, 80, 60]}],
        "inference": {"overlap": 0.25},
    }
    return save_bundle(tmp_path_factory.mktemp("bundle") / "cli-test", meta, net.state_dict())


def _case(folder, shape=(40, 48, 56), spacing=(2.5, 2.0, 3.0), origin=(-40.0, 12.0, -300.0), name="case"):
    """CT (int16, body ellipse in air) and PET (coarser grid, shifted origin) files."""
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 <= 1
    ct = np.where(body, 40, -1000).astype(np.int16) * np.ones((shape[0], 1, 1), np.int16)
    cti = sitk.GetImageFromArray(ct)
    cti.SetSpacing(spacing)
    cti.SetOrigin(origin)
    pet = np.zeros(tuple(s // 2 for s in shape), np.float32)
    pet[2:-2, 3:-3, 3:-3] = 1.0
    pet[8:11, 10:13, 12:15] = 20.0
    peti = sitk.GetImageFromArray(pet)
    peti.SetSpacing(tuple(2 * s for s in spacing))
    peti.SetOrigin(tuple(o + 1.0 for o in origin))
    paths = [Path(folder) / f"{name}_0000.nii.gz", Path(folder) / f"{name}_0001.nii.gz"]
    sitk.WriteImage(cti, str(paths[0]), True)
    sitk.WriteImage(peti, str(paths[1]), True)
    return paths


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _cli(*args, env=None, **kw):
    cmd = [sys.executable, "-m", "VeloxSegLib.cli", *map(str, args)]
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300, **kw)


def test_predict_writes_a_uint8_label_map_in_the_ct_geometry(tmp_path, bundle, capsys):
    ct, pet = _case(tmp_path)
    out = tmp_path / "seg.nii.gz"
    before = _snapshot(tmp_path)
    rc = main(["predict", "-m", str(bundle), "-i", str(ct), str(pet), "-o", str(out), "--threads", "1",
               "--progress", "none"])
    assert rc == 0
    seg, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(ct))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert seg.GetSize() == ref.GetSize() and seg.GetDirection() == ref.GetDirection()
    assert np.allclose(seg.GetOrigin(), ref.GetOrigin()) and np.allclose(seg.GetSpacing(), ref.GetSpacing())
    assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= {0, 1}
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "seg.nii.gz"} == before  # inputs unchanged
    assert sorted(after) == sorted(list(before) + ["seg.nii.gz"])


def _bad_missing(d, ct, pet):
    return [d / "nope.nii.gz", pet], r"nope\.nii\.gz.*no such file"


def _bad_corrupt(d, ct, pet):
    bad = d / "corrupt.nii.gz"
    bad.write_bytes(os.urandom(5000))
    return [ct, bad], r"corrupt\.nii\.gz.*not a readable image"


def _bad_truncated(d, ct, pet):
    bad = d / "cut.nii.gz"
    data = Path(pet).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return [ct, bad], r"cut\.nii\.gz.*truncated"


def _bad_count(d, ct, pet):
    return [ct], r"expects 2 input image\(s\) in this order: 1\) CT, 2\) PET; got 1"


def _bad_2d(d, ct, pet):
    p = d / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 30), np.float32)), str(p))
    return [ct, p], r"flat\.nii\.gz.*2D"


def _bad_4d(d, ct, pet):
    p = d / "dyn.nii.gz"
    v = sitk.ReadImage(str(pet))
    sitk.WriteImage(sitk.JoinSeries([v, v, v]), str(p))
    return [ct, p], r"dyn\.nii\.gz.*4D"


def _bad_nan(d, ct, pet):
    p = d / "nan.nii.gz"
    img = sitk.ReadImage(str(pet))
    arr = sitk.GetArrayFromImage(img)
    arr[3, 3, 3] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(p), True)
    return [ct, p], r"nan\.nii\.gz.*NaN"


def _bad_disjoint(d, ct, pet):
    p = d / "far.nii.gz"
    img = sitk.ReadImage(str(pet))
    img.SetOrigin((5000.0, 0.0, 0.0))
    sitk.WriteImage(img, str(p), True)
    return [ct, p], r"far\.nii\.gz.*does not overlap"


def _bad_named_order(d, ct, pet):
    named = [d / "p7_PET.nii.gz", d / "p7_CT.nii.gz"]  # names in the other order than the model's
    named[0].write_bytes(Path(ct).read_bytes())
    named[1].write_bytes(Path(pet).read_bytes())
    return named, r"another order: input 1 \(CT\) is '.*p7_PET\.nii\.gz', named like PET; .*in this order: 1\) CT, 2\) PET"


@pytest.mark.parametrize("make", [_bad_missing, _bad_corrupt, _bad_truncated, _bad_count, _bad_2d, _bad_4d,
                                  _bad_nan, _bad_disjoint, _bad_named_order],
                         ids=["missing", "corrupt", "truncated", "count", "2d", "4d", "nan", "non-overlapping",
                              "named-in-another-order"])
def test_bad_input_gives_one_line_error_and_leaves_nothing(tmp_path, bundle, capsys, make):
    ct, pet = _case(tmp_path)
    inputs, pattern = make(tmp_path, ct, pet)
    before = _snapshot(tmp_path)
    rc = main(["predict", "-m", str(bundle), "-i", *map(str, inputs), "-o", str(tmp_path / "seg.nii.gz"),
               "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("veloxseg predict: error:")
    assert __import__("re").search(pattern, err[0]), err[0]
    assert _snapshot(tmp_path) == before


def test_missing_inputs_print_the_expected_order(tmp_path, bundle, capsys):
    rc = main(["predict", "-m", str(bundle), "-o", str(tmp_path / "seg.nii.gz")])
    assert rc == 2
    assert "in this order: 1) CT, 2) PET" in capsys.readouterr().err


def test_output_folder_must_exist(tmp_path, bundle, capsys):
    ct, pet = _case(tmp_path)
    before = _snapshot(tmp_path)
    rc = main(["predict", "-m", str(bundle), "-i", str(ct), str(pet), "-o", str(tmp_path / "no" / "seg.nii.gz")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before and not (tmp_path / "no").exists()


def test_existing_output_needs_overwrite(tmp_path, bundle, capsys):
    ct, pet = _case(tmp_path)
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"precious")
    args = ["predict", "-m", str(bundle), "-i", str(ct), str(pet), "-o", str(out), "--progress", "none"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(args + ["--overwrite"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct)).GetSize()


def test_volume_smaller_than_a_window_is_padded(tmp_path, bundle):
    ct, pet = _case(tmp_path, shape=(12, 16, 20), spacing=(2.0, 2.0, 2.0))
    out = tmp_path / "seg.nrrd"
    assert main(["predict", "-m", str(bundle), "-i", str(ct), str(pet), "-o", str(out), "--progress", "none"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == (20, 16, 12)


def test_bf16_precision_option_runs_and_matches_fp32(tmp_path, bundle):
    ct, pet = _case(tmp_path)
    outs = {}
    for precision in ("fp32", "bf16"):
        outs[precision] = tmp_path / f"seg-{precision}.nii.gz"
        assert main(["predict", "-m", str(bundle), "-i", str(ct), str(pet), "-o", str(outs[precision]),
                     "--threads", "1", "--precision", precision, "--progress", "none"]) == 0
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(outs[p]))) for p in ("fp32", "bf16"))
    assert (a == b).mean() > 0.99


def test_folder_of_nnunet_cases(tmp_path, bundle):
    src = tmp_path / "in"
    src.mkdir()
    _case(src, name="p1")
    _case(src, shape=(20, 30, 30), name="p2")
    assert main(["predict", "-m", str(bundle), "-i", str(src), "-o", str(tmp_path / "out"),
                 "--progress", "none"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p1.nii.gz", "p2.nii.gz"]
    assert sitk.ReadImage(str(tmp_path / "out" / "p2.nii.gz")).GetSize() == (30, 30, 20)


def test_json_progress_is_the_only_thing_on_stdout(tmp_path, bundle):
    ct, pet = _case(tmp_path)
    out, prob = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    r = _cli("predict", "-m", bundle, "-i", ct, pet, "-o", out, "--probabilities", prob, "--progress", "json",
             "--threads", "1", "--overlap", "0.5")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]  # every line is JSON
    assert events and all({"stage", "fraction", "elapsed"} <= set(e) for e in events)
    stages = [e["stage"] for e in events]
    assert stages[-1] == "done" and "predict" in stages and "write" in stages
    assert all(0 <= e["fraction"] <= 1 for e in events)
    assert [e["elapsed"] for e in events] == sorted(e["elapsed"] for e in events)
    assert sitk.ReadImage(str(prob)).GetNumberOfComponentsPerPixel() == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_cancels_cleanly_without_partial_output(tmp_path, bundle, sig):
    ct, pet = _case(tmp_path, shape=(64, 128, 128), spacing=(2.0, 2.0, 2.0))  # ~70 TTA passes
    before = _snapshot(tmp_path)
    cmd = [sys.executable, "-m", "VeloxSegLib.cli", "predict", "-m", str(bundle), "-i", str(ct), str(pet),
           "-o", str(tmp_path / "seg.nii.gz"), "--progress", "json", "--threads", "1", "--tta", "--overlap", "0.5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if json.loads(line)["stage"] == "predict":
                break
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert rc == 130, stderr
    assert "cancelled" in stderr
    assert _snapshot(tmp_path) == before


def test_wholebody_benchmark_harness_measures_a_small_case(tmp_path):
    from VeloxSegLib.infer.bench_wholebody import benchmark_wholebody

    res = benchmark_wholebody(tmp_path, threads=1, patch_size=PATCH, shape=(80, 72, 40), spacing=(4.0, 4.0, 6.0),
                              monai_reference=False)
    assert res["returncode"] == 0, res["stderr_tail"]
    assert res["seconds"] > 0 and 50 < res["peak_rss_mb"] < 4000
    assert 0 < res["windows_run"] <= res["windows_total"]
    seg = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert seg.GetSize() == (80, 72, 40) and seg.GetPixelID() == sitk.sitkUInt8


def test_dataset_root_says_to_use_imagesTr(tmp_path, bundle, capsys):
    root = tmp_path / "mri"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    _case(root / "imagesTr", shape=(8, 8, 8))
    (root / "dataset.json").write_text("{}")
    rc = main(["predict", "-m", str(bundle), "-i", str(root), "-o", str(tmp_path / "pdir"), "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"'{root}': holds no case images" in err[0] and f"use '{root / 'imagesTr'}'" in err[0]
    assert "output file ending" not in err[0] and not (tmp_path / "pdir").exists()


def test_folder_without_images_or_dicom_is_named(tmp_path, bundle, capsys):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "readme.txt").write_text("x")
    (src / "sub").mkdir()
    rc = main(["predict", "-m", str(bundle), "-i", str(src), "-o", str(tmp_path / "pdir"), "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"'{src}': holds no case images" in err[0] and "no DICOM series" in err[0]
