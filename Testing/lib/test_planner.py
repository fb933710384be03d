"""Dataset fingerprint and plans (VeloxSegLib.train.planner, `veloxseg plan`)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib.bundle import validate_meta
from VeloxSegLib.cli import main
from VeloxSegLib.data.nnunet import make_dataset_json, write_dataset_json
from VeloxSegLib.errors import ConfigError
from VeloxSegLib.train.planner import (channel_modality, choose_patch_size, choose_spacing, fingerprint_dataset,
                                       make_plans, parse_normalization, plans_for_configuration)


def fake_fingerprint(size, spacing, n=10, channels=("CT", "PET")):
    return {
        "dataset": "/x", "name": "x", "num_cases": n,
        "spacings": [list(spacing)] * n, "sizes": [list(size)] * n,
        "median_spacing": list(spacing), "median_size": list(size),
        "channels": [{"index": i, "name": c, "modality": channel_modality(c), "on_reference_grid": True,
                      "foreground": {"count": 100, "mean": 50.0, "std": 30.0, "percentile_00_5": -90.0,
                                     "percentile_99_5": 300.0},
                      "body": {"count": 100, "mean": 1.0, "std": 2.0}} for i, c in enumerate(channels)],
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}],
    }


def write(path, arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def as_bundle_meta(plans):
    return {"format_version": 1, "name": "planned", "model": plans["model"], "spacing": plans["spacing"],
            "channels": plans["channels"], "labels": plans["labels"]}


@pytest.mark.parametrize("size, spacing", [
    ((400, 400, 326), (2.0364, 2.0364, 3.0)),   # AutoPET-II whole body
    ((200, 200, 310), (1.0, 1.0, 1.0)),         # Hecktor-like
    ((240, 240, 155), (1.0, 1.0, 1.0)),         # BraTS
    ((512, 512, 40), (0.7, 0.7, 5.0)),          # thick slices
    ((64, 64, 48), (6.0, 6.0, 7.0)),            # small phantom
    ((30, 300, 300), (1.0, 1.0, 1.0)),          # thin along x
])
def test_patch_sizes_are_multiples_of_32_within_median_size_and_budget(size, spacing):
    fp = fake_fingerprint(size, spacing)
    target, _ = choose_spacing(fp)
    patch, _, shape = choose_patch_size(fp, target)
    assert all(p % 32 == 0 and p >= 32 for p in patch)
    assert all(p <= max(32, int(s / 32 + 0.5) * 32) for p, s in zip(patch, shape))
    assert np.prod(patch) <= 96 ** 3


def test_typical_petct_gets_96_cubed_patches():
    plans = make_plans(fake_fingerprint((400, 400, 326), (2.0364, 2.0364, 3.0)))
    assert plans["model"]["patch_size"] == [96, 96, 96]
    assert plans["spacing"] == [2.0364, 2.0364, 3.0]
    assert plans["batch_size"] == 2
    assert plans["model"]["in_channels"] == [1, 1] and plans["model"]["num_classes"] == 2


def test_anisotropic_spacing_takes_the_tenth_percentile_of_the_coarse_axis():
    fp = fake_fingerprint((512, 512, 40), (0.7, 0.7, 5.0))
    fp["spacings"] = [[0.7, 0.7, z] for z in (2.5, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0)]
    spacing, reason = choose_spacing(fp)
    assert spacing[:2] == [0.7, 0.7] and 2.5 < spacing[2] < 5.0 and "anisotropic" in reason
    iso, reason = choose_spacing(fake_fingerprint((128, 128, 96), (3.0, 3.0, 3.5)))
    assert iso == [3.0, 3.0, 3.5] and reason.startswith("median")


def _cover(patch, shape):
    return float(np.prod(patch)) / float(np.prod(shape))


@pytest.mark.parametrize("size, spacing", [
    ((400, 400, 326), (2.0364, 2.0364, 3.0)),   # AutoPET-II whole body: 96^3 covers 2% of it
    ((512, 512, 40), (0.7, 0.7, 5.0)),          # thick slices: only x and y grow at first
])
def test_large_images_get_a_low_resolution_configuration_whose_window_covers_a_quarter(size, spacing):
    """nnU-Net's 3d_lowres rule: planned when the full-resolution window covers under 25% of the
    median image; its spacing grows until its own window covers at least 25%."""
    plans = make_plans(fake_fingerprint(size, spacing))
    full = plans["median_size_at_spacing"]
    assert _cover(plans["model"]["patch_size"], full) < 0.25
    low = plans["configurations"]["3d_lowres"]
    assert all(a > b for a, b in zip(low["spacing"], plans["spacing"][:2]))  # coarser in plane
    assert all(p % 32 == 0 for p in low["patch_size"]) and np.prod(low["patch_size"]) <= 96 ** 3
    assert _cover(low["patch_size"], low["median_size_at_spacing"]) >= 0.25
    # the smallest such spacing: one 3% step less (on the axes that grew) covers under a quarter
    grew = [a > b for a, b in zip(low["spacing"], plans["spacing"])]
    back = [v / 1.03 if g else v for v, g in zip(low["spacing"], grew)]
    patch, _, shape = choose_patch_size(fake_fingerprint(size, spacing), back)
    assert _cover(patch, shape) < 0.25
    if spacing[2] > 2 * spacing[0]:  # anisotropic: only the axes over 2x finer than the coarsest grow
        assert grew == [True, True, False] and low["spacing"][2] == plans["spacing"][2]
    else:
        assert grew == [True, True, True]
    assert "3d_lowres" in plans["decisions"] and "25%" in plans["decisions"]["3d_lowres"]
    lowres = plans_for_configuration(plans, "3d_lowres")
    assert lowres["spacing"] == low["spacing"] and lowres["model"]["patch_size"] == low["patch_size"]
    assert lowres["batch_size"] == low["batch_size"] and lowres["configuration"] == "3d_lowres"
    assert plans["spacing"] != lowres["spacing"]  # the plans themselves are unchanged
    assert plans_for_configuration(plans, "3d_fullres") is plans


def test_small_images_get_no_low_resolution_configuration_and_asking_for_one_says_why():
    plans = make_plans(fake_fingerprint((128, 128, 96), (3.0, 3.0, 3.5)))  # 96^3 covers 56% of the phantom
    assert plans["configurations"] == {} and "covers 56%" in plans["decisions"]["3d_lowres"]
    with pytest.raises(ConfigError, match=r"no 3d_lowres configuration \(not planned: the full-resolution window "
                                          r"covers 56%"):
        plans_for_configuration(plans, "3d_lowres")


@pytest.mark.parametrize("name, modality, scheme", [
    ("CT", "CT", "ct"), ("CTres", "CT", "ct"), ("PET", "PET", "pet_suv"), ("PT", "PET", "pet_suv"),
    ("SUV", "PET", "pet_suv"), ("T1", "MR", "zscore_nonzero"), ("T1ce", "MR", "zscore_nonzero"),
    ("t2", "MR", "zscore_nonzero"), ("FLAIR", "MR", "zscore_nonzero"), ("MR", "MR", "zscore_nonzero"),
])
def test_normalization_is_chosen_from_the_channel_name(name, modality, scheme):
    assert channel_modality(name) == modality
    plans = make_plans(fake_fingerprint((128, 128, 96), (3.0, 3.0, 3.5), channels=(name,)))
    assert plans["channels"][0]["modality"] == modality
    assert plans["channels"][0]["normalization"]["scheme"] == scheme


def test_ct_normalization_uses_foreground_percentiles_and_moments():
    plans = make_plans(fake_fingerprint((128, 128, 96), (3.0, 3.0, 3.5)))
    assert plans["channels"][0]["normalization"] == {"scheme": "ct", "clip": [-90.0, 300.0], "mean": 50.0,
                                                     "std": 30.0}
    # PET in SUV: fixed statistics (the body's), as nnU-Net normalizes SUV
    assert plans["channels"][1]["normalization"] == {"scheme": "pet_suv", "suv_factor": 1.0, "mean": 1.0, "std": 2.0}
    validate_meta(as_bundle_meta(plans))


def test_pet_not_in_suv_gets_a_per_image_zscore():
    fp = fake_fingerprint((128, 128, 96), (3.0, 3.0, 3.5))
    fp["channels"][1]["body"].update(mean=3000.0, std=9000.0, percentile_99_5=40000.0)  # Bq/mL
    plans = make_plans(fp)
    assert plans["channels"][1]["normalization"] == {"scheme": "pet_zscore_body"}
    assert "not in SUV" in plans["decisions"]["normalization"]["PET"]


def test_mri_contrasts_get_one_early_fusion_stream():
    plans = make_plans(fake_fingerprint((240, 240, 155), (1.0, 1.0, 1.0), channels=("T1", "T1ce", "T2", "FLAIR")))
    assert plans["model"]["in_channels"] == [4]


def test_overrides_are_used_and_recorded():
    fp = fake_fingerprint((400, 400, 326), (2.0364, 2.0364, 3.0))
    plans = make_plans(fp, spacing=[2, 2, 2], patch_size=[128, 128, 64], batch_size=3,
                       normalization={"CT": "ct",
                                      "1": {"scheme": "pet_suv", "suv_factor": 0.5}},
                       in_channels=[2])
    assert plans["spacing"] == [2.0, 2.0, 2.0] and plans["model"]["patch_size"] == [128, 128, 64]
    assert plans["batch_size"] == 3 and plans["model"]["in_channels"] == [2]
    assert plans["overrides"] == {"spacing": [2.0, 2.0, 2.0], "patch_size": [128, 128, 64], "batch_size": 3,
                                  "normalization": {"CT": {"scheme": "ct"}, "PET": {"scheme": "pet_suv",
                                                                                    "suv_factor": 0.5}},
                                  "in_channels": [2]}
    assert plans["decisions"]["patch_size"] == "given on the command line"
    # statistics the user left out come from the fingerprint (pet_suv: body stats x factor)
    assert plans["channels"][0]["normalization"]["clip"] == [-90.0, 300.0]
    assert plans["channels"][1]["normalization"] == {"scheme": "pet_suv", "suv_factor": 0.5, "mean": 0.5, "std": 1.0}
    validate_meta(as_bundle_meta(plans))
    assert make_plans(fp)["overrides"] == {}


def test_normalization_override_syntax():
    assert parse_normalization("CT=ct:clip=-1000,600:mean=40:std=200") == (
        "CT", {"scheme": "ct", "clip": [-1000.0, 600.0], "mean": 40.0, "std": 200.0})
    assert parse_normalization('PET={"scheme": "none"}') == ("PET", {"scheme": "none"})
    with pytest.raises(ConfigError):
        parse_normalization("CT")


@pytest.mark.parametrize("kwargs, message", [
    ({"patch_size": [96, 96, 80]}, "multiple of 32"),
    ({"spacing": [1, 0, 1]}, "positive"),
    ({"batch_size": 0}, "at least 1"),
    ({"normalization": {"CT": "zscore"}}, "unknown normalization scheme"),
    ({"normalization": {"MRI": "none"}}, "no channel 'MRI'"),
    ({"normalization": {"CT": {"scheme": "ct", "clip": [5, 1]}}}, "low < high"),
    ({"in_channels": [1, 2]}, "summing"),
])
def test_invalid_overrides_are_configuration_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_plans(fake_fingerprint((128, 128, 96), (3.0, 3.0, 3.5)), **kwargs)


def test_fingerprint_measures_foreground_body_and_labels(tmp_path):
    ct = np.full((10, 10, 10), -1000, np.int16)
    ct[2:8, 2:8, 2:8] = 40
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[4:6, 4:6, 4:6] = 1
    ct[lab > 0] = 200
    for case in ("a", "b"):
        write(tmp_path / f"imagesTr/{case}_0000.nii.gz", ct, spacing=(2.0, 2.0, 2.0))
        write(tmp_path / f"labelsTr/{case}.nii.gz", lab if case == "a" else np.zeros_like(lab), spacing=(2.0, 2.0, 2.0))
    write_dataset_json(tmp_path, make_dataset_json(["CT"], {"background": 0, "tumour": 1}, 2))
    fp = fingerprint_dataset(tmp_path)
    assert fp["num_cases"] == 2 and fp["median_spacing"] == [2.0, 2.0, 2.0] and fp["median_size"] == [10, 10, 10]
    fg, body = fp["channels"][0]["foreground"], fp["channels"][0]["body"]
    assert fg["count"] == 8 and fg["mean"] == 200 and fg["percentile_99_5"] == 200
    assert body["count"] == 2 * 216 and body["min"] == 40 and body["max"] == 200
    tumour = fp["labels"][1]
    assert tumour["name"] == "tumour" and tumour["cases_with_label"] == 1 and tumour["voxels_per_case"] == [8, 0]
    assert tumour["volume_ml_mean"] == pytest.approx(8 * 8 / 1000)
    assert fingerprint_dataset(tmp_path) == fp  # deterministic


def test_plan_command_accepts_a_petct_phantom_end_to_end(tmp_path, capsys):
    ds = tmp_path / "petct"
    assert main(["phantom", "--kind", "petct", "-n", "2", "-o", str(ds), "--size", "48", "48", "40"]) == 0
    out = tmp_path / "plans.json"
    assert main(["plan", str(ds), "-o", str(out), "--batch-size", "4", "--normalization", "PET=pet_zscore_body"]) == 0
    plans = json.loads(out.read_text())
    assert plans["channels"][0]["name"] == "CT" and plans["channels"][0]["normalization"]["scheme"] == "ct"
    clip = plans["channels"][0]["normalization"]["clip"]
    assert -1000 < clip[0] < clip[1] < 2000  # lesion HU, not air
    assert plans["channels"][1]["normalization"] == {"scheme": "pet_zscore_body"}
    assert plans["channels_need_alignment"] == ["PET"]  # the phantom's PET has its own grid
    assert plans["labels"][1]["name"] == "lesion" and plans["model"]["num_classes"] == 2
    assert all(p % 32 == 0 for p in plans["model"]["patch_size"])
    assert plans["overrides"] == {"batch_size": 4, "normalization": {"PET": {"scheme": "pet_zscore_body"}}}
    assert plans["fingerprint"]["labels"][1]["cases_with_label"] == 2
    pet = plans["fingerprint"]["channels"][1]
    assert pet["foreground"]["mean"] > pet["body"]["mean"]  # lesions take up more than the body
    validate_meta(as_bundle_meta(plans))
    assert f"wrote {out}" in capsys.readouterr().out


def test_plan_command_on_an_mri_phantom_writes_default_plans_file(tmp_path):
    ds = tmp_path / "mri"
    assert main(["phantom", "--kind", "mri", "-n", "1", "-o", str(ds), "--size", "32", "32", "32"]) == 0
    assert main(["plan", str(ds)]) == 0
    plans = json.loads((ds / "plans.json").read_text())
    assert [c["normalization"] for c in plans["channels"]] == [{"scheme": "zscore_nonzero"}] * 4
    assert plans["model"]["in_channels"] == [4] and plans["model"]["num_classes"] == 4
    assert [lab["value"] for lab in plans["labels"]] == [0, 1, 2, 3]
    validate_meta(as_bundle_meta(plans))


def test_plan_command_refuses_a_bad_override_and_writes_nothing(tmp_path, capsys):
    ds = tmp_path / "petct"
    assert main(["phantom", "--kind", "petct", "-n", "1", "-o", str(ds), "--size", "32", "32", "32"]) == 0
    assert main(["plan", str(ds), "--patch-size", "96", "96", "50"]) == 4
    assert "multiple of 32" in capsys.readouterr().err
    assert not (ds / "plans.json").exists()
    assert main(["plan", str(tmp_path / "nothing")]) == 2


def test_model_preset_override_is_checked_and_recorded():
    fp = fake_fingerprint((128, 128, 96), (3.0, 3.0, 3.5))
    plans = make_plans(fp, model="veloxseg-s")
    assert plans["model"]["name"] == "veloxseg-s" and plans["overrides"] == {"model": "veloxseg-s"}
    with pytest.raises(ConfigError, match="unknown model"):
        make_plans(fp, model="resnet")


def test_fingerprint_measures_cases_in_threads_with_the_same_result(tmp_path, monkeypatch):
    """Cases are measured several at once (as nnU-Net's fingerprint extraction runs processes); the
    fingerprint is identical to one thread's, also on a dataset where only some cases' PET needs
    aligning, and progress still counts the cases in order."""
    import threading

    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.errors import InputError
    from VeloxSegLib.train import planner

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 5, seed=3, size=(48, 48, 32))
    ct = sitk.ReadImage(str(ds / "imagesTr" / "petct_0002_0000.nii.gz"))
    pet_path = ds / "imagesTr" / "petct_0002_0001.nii.gz"
    pet = sitk.Resample(sitk.ReadImage(str(pet_path)), ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(pet, str(pet_path), True)  # this case's PET already on its CT grid
    seen = []
    fp1 = fingerprint_dataset(ds, threads=1, progress=lambda d, n: seen.append((d, n)))
    ran_in = []
    measure = planner._measure_case
    monkeypatch.setattr(planner, "_measure_case",
                        lambda *a, **k: ran_in.append(threading.current_thread().name) or measure(*a, **k))
    seen3 = []
    fp3 = fingerprint_dataset(ds, threads=3, progress=lambda d, n: seen3.append((d, n)))
    assert fp3 == fp1 and seen3 == seen == [(k, 5) for k in range(1, 6)]
    assert len(ran_in) == 5 and all(name.startswith("fingerprint") for name in ran_in)
    assert fp1["channels"][1]["on_reference_grid"] is False
    # an error in one case names it, as with one thread
    lab = sitk.ReadImage(str(ds / "labelsTr" / "petct_0003.nii.gz"))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(ds / "labelsTr" / "petct_0003.nii.gz"), True)
    with pytest.raises(InputError, match=r"'petct_0003': label values \[7\]"):
        fingerprint_dataset(ds, threads=3)


def test_plan_command_takes_threads(tmp_path, capsys):
    from VeloxSegLib.data.phantom import write_phantom_dataset

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 3, seed=5, size=(48, 48, 32))
    assert main(["plan", str(ds), "--threads", "0"]) == 4
    assert not (ds / "plans.json").exists()
    assert main(["plan", str(ds), "-o", str(tmp_path / "one.json"), "--threads", "1"]) == 0
    assert main(["plan", str(ds), "-o", str(tmp_path / "two.json"), "--threads", "2"]) == 0
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "two.json").read_text())


def test_train_takes_the_low_resolution_configuration_of_the_plans(tmp_path, capsys):
    """`veloxseg plan` at a fine spacing and a small window plans a 3d_lowres configuration;
    `train --configuration 3d_lowres` trains a bundle at its spacing and window."""
    import torch

    from VeloxSegLib.data.phantom import write_phantom_dataset

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 3, seed=5, size=(64, 64, 48))
    plans_file = tmp_path / "plans.json"
    assert main(["plan", str(ds), "--spacing", "1.5", "1.5", "1.75", "--max-patch-voxels", "65536",
                 "-o", str(plans_file)]) == 0
    assert "3d_lowres (train --configuration 3d_lowres): spacing:" in capsys.readouterr().out
    low = json.loads(plans_file.read_text())["configurations"]["3d_lowres"]
    torch.set_num_threads(1)
    out = tmp_path / "lowres"
    assert main(["train", str(ds), "-o", str(out), "--plans", str(plans_file), "--configuration", "3d_lowres",
                 "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "1", "--device", "cpu",
                 "--progress", "none"]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["spacing"] == pytest.approx(low["spacing"]) and meta["model"]["patch_size"] == low["patch_size"]
    assert json.loads((tmp_path / "lowres.training" / "plans.json").read_text())["configuration"] == "3d_lowres"
    # the configuration and the planner's overrides of spacing or window exclude each other
    capsys.readouterr()
    assert main(["train", str(ds), "-o", str(tmp_path / "x"), "--configuration", "3d_lowres",
                 "--spacing", "2", "2", "2", "--progress", "none"]) == ConfigError.exit_code
    assert "give one or the other" in capsys.readouterr().err and not (tmp_path / "x").exists()
