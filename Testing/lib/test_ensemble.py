"""Ensembles (several bundles, e.g. the folds of a cross-validation) predicting as one model."""
import json
import os
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
from VeloxSegLib.errors import ConfigError
from VeloxSegLib.infer.pipeline import InferencePlan, Segmenter, predict_case

ROOT = Path(__file__).resolve().parents[2]
PATCH = (32, 32, 32)
BUNDLE_PATCH = [64, 32, 32]  # the smallest window VeloxSeg's paired windows tile


def _plan(**kw):
    base = dict(
        patch_size=PATCH, spacing=(2.0, 2.0, 2.0),
        channels=[{"name": "CT", "normalization": {"scheme": "ct", "clip": [-1000, 600], "mean": 0, "std": 100}},
                  {"name": "PET", "normalization": {"scheme": "pet_zscore_body"}}],
        labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}])
    base.update(kw)
    return InferencePlan(**base)


def _images(shape=(40, 50, 60), seed=0):
    """A CT with a body ellipse and a PET on a coarser, shifted grid with random uptake."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.42)) ** 2 <= 1
    ct = np.where(body, rng.normal(40, 30, shape), -1000).astype(np.int16)
    cti = sitk.GetImageFromArray(ct)
    cti.SetSpacing((1.5, 1.5, 2.5))
    cti.SetOrigin((-40.0, -30.0, 10.0))
    pet = rng.gamma(2.0, 0.5, tuple(s // 2 for s in shape)).astype(np.float32)
    peti = sitk.GetImageFromArray(pet)
    peti.SetSpacing((3.0, 3.0, 5.0))
    peti.SetOrigin((-39.0, -29.0, 11.0))
    return cti, peti


def _conv(seed):
    torch.manual_seed(seed)
    return torch.nn.Conv3d(2, 2, 3, padding=1).eval()


def _mean_conv(a, b):
    """The single network whose logits are the mean of a's and b's (convolutions are linear)."""
    m = torch.nn.Conv3d(2, 2, 3, padding=1).eval()
    with torch.no_grad():
        m.weight.copy_((a.weight + b.weight) / 2)
        m.bias.copy_((a.bias + b.bias) / 2)
    return m


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "mirror-tta"])
def test_an_ensemble_averages_its_networks_logits_in_every_window(tta):
    # for linear networks the mean of the logits is the logit of the mean weights: an ensemble
    # of two must predict exactly what that one network predicts, through the whole pipeline
    a, b = _conv(1), _conv(2)
    ct, pet = _images()
    plan = _plan(blending="gaussian", overlap=0.5, tta_axes=("x", "z"))
    ens = predict_case([a, b], [ct, pet], plan=plan, probabilities=True, tta=tta)
    one = predict_case(_mean_conv(a, b), [ct, pet], plan=plan, probabilities=True, tta=tta)
    pa = sitk.GetArrayFromImage(ens.probabilities)
    assert np.allclose(pa, sitk.GetArrayFromImage(one.probabilities), atol=2e-6)
    assert np.array_equal(sitk.GetArrayFromImage(ens.labels), sitk.GetArrayFromImage(one.labels))
    # and it is neither member alone
    alone = sitk.GetArrayFromImage(predict_case(a, [ct, pet], plan=plan, probabilities=True, tta=tta).probabilities)
    assert np.abs(pa - alone).max() > 1e-2
    assert ens.info["networks"] == 2 and one.info["networks"] == 1


def test_members_are_run_on_the_same_windows_once_per_window():
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def forward(self, x):
            self.shapes.append(tuple(x.shape))
            return torch.zeros((x.shape[0], 2) + tuple(x.shape[2:]))

    a, b, alone = Counting(), Counting(), Counting()
    ct, pet = _images()
    predict_case([a, b], [ct, pet], plan=_plan())
    predict_case(alone, [ct, pet], plan=_plan())
    assert a.shapes == b.shapes == alone.shapes and len(alone.shapes) > 1


def _meta(name, **change):
    meta = {
        "format_version": 1, "name": name,
        "model": {"name": "veloxseg-b", "in_channels": [1, 1], "num_classes": 2, "patch_size": BUNDLE_PATCH},
        "spacing": [2.0, 2.0, 2.0],
        "channels": [
            {"name": "CT", "modality": "CT",
             "normalization": {"scheme": "ct", "clip": [-1000.0, 600.0], "mean": 40.0, "std": 200.0}},
            {"name": "PET", "modality": "PET", "normalization": {"scheme": "pet_zscore_body"}}],
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}],
        "inference": {"overlap": 0.25},
    }
    for key, value in change.items():
        meta[key] = value
    return meta


def _bundle(folder, name, seed, **change):
    meta = _meta(name, **change)
    torch.manual_seed(seed)
    net = build_model("veloxseg-b", in_channels=tuple(meta["model"]["in_channels"]),
                      num_classes=meta["model"]["num_classes"], patch_size=tuple(meta["model"]["patch_size"]))
    return save_bundle(Path(folder) / name, meta, net.state_dict())


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return [_bundle(root, f"fold{k}", seed=k) for k in range(2)]


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    paths = [folder / "case_0000.nii.gz", folder / "case_0001.nii.gz"]
    for img, p in zip(_images(seed=3), paths):
        sitk.WriteImage(img, str(p), True)
    return paths


def _probabilities(model, case_files):
    seg = Segmenter(model, device="cpu", threads=1)
    return sitk.GetArrayFromImage(seg.predict([str(p) for p in case_files], probabilities=True).probabilities)


def test_the_same_bundle_twice_predicts_what_it_predicts_alone(folds, case_files):
    alone = _probabilities(str(folds[0]), case_files)
    twice = _probabilities([str(folds[0]), str(folds[0])], case_files)
    assert np.array_equal(alone, twice)  # (y + y) / 2 is y in floating point


def test_the_predict_command_takes_several_bundles(folds, case_files, tmp_path):
    out, probs = tmp_path / "seg.nii.gz", tmp_path / "p.nii.gz"
    rc = main(["predict", "-m", str(folds[0]), str(folds[1]), "-i", *map(str, case_files), "-o", str(out),
               "--probabilities", str(probs), "--threads", "1", "--progress", "none"])
    assert rc == 0
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(probs)))
    assert np.allclose(got, _probabilities([str(f) for f in folds], case_files), atol=1e-6)
    for fold in folds:  # neither fold alone
        assert np.abs(got - _probabilities(str(fold), case_files)).max() > 1e-3
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.array_equal(labels, np.argmax(got, axis=-1).astype(np.uint8))


@pytest.mark.parametrize("change,message", [
    (dict(channels=[{"name": "CT", "modality": "CT", "normalization": {"scheme": "ct", "clip": [-1000.0, 600.0],
                                                                        "mean": 40.0, "std": 200.0}},
                    {"name": "FDG", "modality": "PET", "normalization": {"scheme": "pet_zscore_body"}}]),
     "inputs differ"),
    (dict(labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "tumour"}]), "labels differ"),
], ids=["channel-name", "labels"])
def test_bundles_that_cannot_be_averaged_are_refused_naming_both(folds, case_files, tmp_path, change, message):
    odd = _bundle(tmp_path, "odd", seed=5, **change)
    with pytest.raises(ConfigError, match=message) as info:
        Segmenter([str(folds[0]), str(odd)], device="cpu")
    assert str(folds[0]) in str(info.value) and str(odd) in str(info.value)
    # the command: a clear message, a non-zero exit, nothing written
    out = tmp_path / "seg.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "VeloxSegLib.cli", "predict", "-m", str(folds[0]), str(odd),
                           "-i", *map(str, case_files), "-o", str(out), "--progress", "none"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 4  # a configuration error
    assert message in proc.stderr and str(odd) in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


def test_the_first_members_inference_settings_are_used_and_a_difference_is_named(folds, case_files, tmp_path):
    # a member that would remove every component: its setting is not the ensemble's unless it comes first
    wipes = _bundle(tmp_path, "wipes", seed=0, inference={"overlap": 0.25, "min_component_mm3": 1e12})
    with pytest.warns(UserWarning, match=r"min_component_mm3: 0 in '[^']*fold0', 1e\+12 in '[^']*wipes'"):
        kept = Segmenter([str(folds[0]), str(wipes)], device="cpu", threads=1)
    with pytest.warns(UserWarning, match="using those of the first, '[^']*wipes'"):
        wiped = Segmenter([str(wipes), str(folds[0])], device="cpu", threads=1)
    a = sitk.GetArrayFromImage(kept.predict([str(p) for p in case_files]).labels)
    b = sitk.GetArrayFromImage(wiped.predict([str(p) for p in case_files]).labels)
    assert a.any() and not b.any()
    assert kept.plan.name == "fold0 + wipes"


# --------------------------------------------------------------------------- configurations

CONFIGURATIONS = {  # how a second configuration differs from the folds'
    "spacing": dict(spacing=[3.0, 3.0, 3.5]),
    "window": dict(model={"name": "veloxseg-b", "in_channels": [1, 1], "num_classes": 2, "patch_size": [64, 64, 64]}),
    "normalization": dict(channels=[
        {"name": "CT", "modality": "CT",
         "normalization": {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0, "std": 80.0}},
        {"name": "PET", "modality": "PET", "normalization": {"scheme": "pet_suv", "suv_factor": 1.0, "mean": 0.5, "std": 1.5}}]),
}


@pytest.mark.parametrize("kind", list(CONFIGURATIONS))
def test_configurations_are_averaged_as_probabilities_on_the_first_inputs_grid(folds, case_files, tmp_path, kind):
    """nnU-Net's ensemble of configurations: each predicts on its own grid, window and
    normalization; their class probabilities are averaged on the output grid, each configuration
    weighing the same however many folds it has."""
    other = _bundle(tmp_path, "other", seed=7, **CONFIGURATIONS[kind])
    seg = Segmenter([str(folds[0]), str(folds[1]), str(other)], device="cpu", threads=1)
    assert seg.configurations == 2 and seg.members == 3
    got = seg.predict([str(p) for p in case_files], probabilities=True)
    expected = (_probabilities([str(f) for f in folds], case_files) + _probabilities(str(other), case_files)) / 2
    probs = sitk.GetArrayFromImage(got.probabilities)
    assert np.allclose(probs, expected, atol=1e-6)
    assert np.abs(probs - _probabilities([str(f) for f in folds], case_files)).max() > 1e-3  # not the folds alone
    assert np.array_equal(sitk.GetArrayFromImage(got.labels), np.argmax(expected, axis=-1).astype(np.uint8))
    reference = sitk.ReadImage(str(case_files[0]))
    assert got.labels.GetSize() == reference.GetSize() and got.labels.GetSpacing() == reference.GetSpacing()
    assert got.info["networks"] == 3 and len(got.info["configurations"]) == 2


def test_the_predict_command_averages_configurations(folds, case_files, tmp_path):
    other = _bundle(tmp_path, "coarse", seed=7, spacing=[3.0, 3.0, 3.5])
    out, probs = tmp_path / "seg.nii.gz", tmp_path / "p.nii.gz"
    rc = main(["predict", "-m", str(folds[0]), str(other), "-i", *map(str, case_files), "-o", str(out),
               "--probabilities", str(probs), "--threads", "1", "--progress", "none"])
    assert rc == 0
    expected = (_probabilities(str(folds[0]), case_files) + _probabilities(str(other), case_files)) / 2
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(probs))), expected, atol=1e-6)


def test_configurations_post_process_once_with_the_first_members_settings(folds, case_files, tmp_path):
    # a first member that removes every component: the ensemble's labels are empty, though the
    # second configuration alone would keep its own (and the difference is named)
    wipes = _bundle(tmp_path, "wipes", seed=0, spacing=[3.0, 3.0, 3.5],
                    inference={"overlap": 0.25, "min_component_mm3": 1e12})
    with pytest.warns(UserWarning, match=r"min_component_mm3: 1e\+12 in '[^']*wipes', 0 in '[^']*fold0'"):
        seg = Segmenter([str(wipes), str(folds[0])], device="cpu", threads=1)
    result = seg.predict([str(p) for p in case_files], probabilities=True)
    assert sitk.GetArrayFromImage(result.probabilities)[..., 1].max() > 0.5  # there were lesion voxels ...
    assert not sitk.GetArrayFromImage(result.labels).any()  # ... removed once, on the mean
    assert seg.predict([str(p) for p in case_files], min_component_mm3=0).labels is not None


def test_configurations_refine_the_mean_with_pet_as_one_configuration_does(tmp_path):
    """The PET border refinement runs once, on the configurations' mean. The shipped PET/CT demo
    beside a copy of itself at a spacing 1e-5 finer (another configuration, the same function)
    must segment a phantom as the demo does alone, refinement included."""
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.data.phantom import write_phantom_dataset

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 1, seed=905)
    inputs = [str(ds / "imagesTr" / f"petct_0000_000{c}.nii.gz") for c in range(2)]
    demo = load_bundle("petct-lesion-demo")
    meta = json.loads(json.dumps(demo.meta))
    meta["spacing"] = [v * (1 - 1e-5) for v in meta["spacing"]]
    twin = save_bundle(tmp_path / "twin", meta, demo.state_dict())
    seg = Segmenter(["petct-lesion-demo", str(twin)], device="cpu", threads=1)
    assert seg.configurations == 2
    both = seg.predict(inputs, keep_unrefined=True)
    alone = Segmenter("petct-lesion-demo", device="cpu", threads=1).predict(inputs, keep_unrefined=True)
    refined, unrefined = sitk.GetArrayFromImage(both.labels), sitk.GetArrayFromImage(both.unrefined_labels)
    assert (refined != unrefined).sum() > 20  # the refinement changed the labels ...
    assert np.array_equal(refined, sitk.GetArrayFromImage(alone.labels))  # ... as it does for one configuration
    # (before the refinement a few border voxels at a probability of 0.5 may fall either way: the
    # single configuration takes its arg-max from float16 probabilities, an ensemble from float32)
    assert (unrefined != sitk.GetArrayFromImage(alone.unrefined_labels)).sum() <= 20
    assert both.info["pet_refine"] == alone.info["pet_refine"] and both.info["pet_refine"]["refined"] > 0


def test_configurations_are_refused_where_one_is_needed(folds, tmp_path):
    from VeloxSegLib.infer.ensemble import pack_ensemble

    coarse = _bundle(tmp_path, "coarse", seed=7, spacing=[3.0, 3.0, 3.5])
    with pytest.raises(ConfigError, match="spacings differ .*The models of one configuration"):
        pack_ensemble([str(folds[0]), str(coarse)], tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    # a caller's plan applies to every member: they must all fit it
    plan = InferencePlan.from_meta(_meta("given"))
    with pytest.raises(ConfigError, match="spacings differ"):
        Segmenter([str(folds[0]), str(coarse)], plan, device="cpu")


def test_a_plan_given_for_bare_networks_is_required_and_checked():
    with pytest.raises(ConfigError, match="a plan is required"):
        Segmenter([_conv(1), _conv(2)], device="cpu")
    with pytest.raises(ConfigError, match="no model given"):
        Segmenter([], device="cpu")


def test_folds_of_a_cross_validation_predict_as_an_ensemble(tmp_path):
    """The documented workflow, end to end: two folds trained by the command, then one predict."""
    from VeloxSegLib.data.phantom import write_phantom_dataset

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 5, seed=4, size=(64, 64, 48))
    torch.set_num_threads(1)
    bundles = []
    for k in range(2):
        out = tmp_path / f"fold{k}"
        rc = main(["train", str(ds), "-o", str(out), "--fold", str(k), "--epochs", "1", "--iterations-per-epoch", "1",
                   "--batch-size", "1", "--patch-size", "32", "32", "64", "--device", "cpu", "--seed", str(k),
                   "--preprocessed", str(tmp_path / "pre"), "--progress", "none"])
        assert rc == 0
        bundles.append(out)
    splits = [json.loads((b / "bundle.json").read_text())["training"] for b in bundles]
    assert splits[0] != splits[1]
    seg = tmp_path / "seg.nii.gz"
    images = [str(ds / "imagesTr" / f"petct_0000_000{c}.nii.gz") for c in range(2)]
    rc = main(["predict", "-m", *map(str, bundles), "-i", *images, "-o", str(seg), "--threads", "1",
               "--progress", "none"])
    assert rc == 0
    out = sitk.ReadImage(str(seg))
    assert out.GetSize() == sitk.ReadImage(images[0]).GetSize()


# --------------------------------------------------------------------------- packed ensembles


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("suffix", ["", ".zip"], ids=["folder", "zip"])
def test_a_packed_ensemble_predicts_what_its_members_predict_together(folds, case_files, tmp_path, suffix):
    before = [_bytes(f) for f in folds]
    out = tmp_path / f"ens{suffix}"
    assert main(["ensemble", *map(str, folds), "-o", str(out), "--name", "my-ensemble"]) == 0
    assert [_bytes(f) for f in folds] == before  # the members are only read
    from VeloxSegLib.bundle import load_bundle

    b = load_bundle(out)
    assert b.name == "my-ensemble" and b.members == 2 and b.meta["model"]["members"] == 2
    notes = json.loads(b.meta["training"]["notes"])
    assert [m["name"] for m in notes["ensemble"]] == ["fold0", "fold1"]
    assert "veloxseg ensemble" in b.meta["training"]["command"]
    assert np.array_equal(_probabilities(str(out), case_files), _probabilities([str(f) for f in folds], case_files))
    assert Segmenter(str(out), device="cpu").members == 2


def test_an_ensemble_bundle_beside_other_bundles_counts_each_network_once(folds, case_files, tmp_path):
    third = _bundle(tmp_path, "fold2", seed=2)
    from VeloxSegLib.infer.ensemble import pack_ensemble

    ens = pack_ensemble([str(f) for f in folds], tmp_path / "ens")
    seg = Segmenter([str(ens), str(third)], device="cpu", threads=1)
    assert seg.members == 3
    assert np.array_equal(_probabilities([str(ens), str(third)], case_files),
                          _probabilities([str(folds[0]), str(folds[1]), str(third)], case_files))


def test_an_ensemble_bundle_is_listed_and_found_by_name(folds, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    assert main(["ensemble", *map(str, folds), "-o", str(models / "cv5"), "--name", "cv-ensemble"]) == 0
    monkeypatch.setenv("VELOXSEG_MODELS", str(models))
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    entry = [e for e in json.loads(capsys.readouterr().out)["bundles"] if e["name"] == "cv-ensemble"]
    assert entry and entry[0]["model"] == "veloxseg-b x2"
    assert Segmenter("cv-ensemble", device="cpu").members == 2


def test_packing_refuses_members_that_do_not_fit_and_writes_nothing(folds, tmp_path):
    from VeloxSegLib.infer.ensemble import pack_ensemble

    odd_spacing = _bundle(tmp_path, "odd", seed=5, spacing=[3.0, 3.0, 3.0])
    with pytest.raises(ConfigError, match="spacings differ"):
        pack_ensemble([str(folds[0]), str(odd_spacing)], tmp_path / "a")
    other_net = _bundle(tmp_path, "small", seed=5,
                        model={"name": "veloxseg-s", "in_channels": [1, 1], "num_classes": 2,
                               "patch_size": BUNDLE_PATCH})
    with pytest.raises(ConfigError, match=r"their networks differ \(veloxseg-b, .*; veloxseg-s"):
        pack_ensemble([str(folds[0]), str(other_net)], tmp_path / "b")
    ens = pack_ensemble([str(f) for f in folds], tmp_path / "ens")
    with pytest.raises(ConfigError, match="is itself an ensemble of 2 networks"):
        pack_ensemble([str(ens), str(folds[0])], tmp_path / "c")
    with pytest.raises(ConfigError, match="at least 2 bundles"):
        pack_ensemble([str(folds[0])], tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "odd", "small"]


def test_packing_never_writes_over_a_member(folds, tmp_path):
    import shutil

    member = tmp_path / "fold0"
    shutil.copytree(folds[0], member)
    before = _bytes(member)
    proc = subprocess.run([sys.executable, "-m", "VeloxSegLib.cli", "ensemble", str(member), str(folds[1]),
                           "-o", str(member), "--overwrite"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is one of the members" in proc.stderr
    assert _bytes(member) == before


def test_damaged_ensemble_weights_are_refused_naming_the_member(folds, tmp_path):
    from safetensors.torch import load_file, save_file

    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.errors import BundleError
    from VeloxSegLib.infer.ensemble import pack_ensemble

    ens = pack_ensemble([str(f) for f in folds], tmp_path / "ens")
    weights = ens / "model.safetensors"
    full = load_file(str(weights))
    save_file({k: v for k, v in full.items() if not k.startswith("members.1.")}, str(weights), metadata={"format": "pt"})
    with pytest.raises(BundleError, match="member 1: lacks"):
        load_bundle(ens).build_model()
    save_file(dict(full, **{"stray.weight": torch.zeros(1)}), str(weights), metadata={"format": "pt"})
    with pytest.raises(BundleError, match=r"1 tensor\(s\) outside the ensemble's 2 members \(e.g. stray.weight\)"):
        load_bundle(ens).build_model()


def test_an_ensemble_bundle_is_not_fine_tuned(folds, tmp_path):
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.infer.ensemble import pack_ensemble

    ens = pack_ensemble([str(f) for f in folds], tmp_path / "ens")
    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 2, seed=1, size=(64, 64, 48))
    proc = subprocess.run([sys.executable, "-m", "VeloxSegLib.cli", "finetune", "-m", str(ens), str(ds),
                           "-o", str(tmp_path / "ft")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is an ensemble of 2 networks" in proc.stderr
    assert not (tmp_path / "ft").exists()


def test_compare_counts_every_members_inference_parameters(folds, tmp_path):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.commands.compare import _inference_params
    from VeloxSegLib.infer.ensemble import pack_ensemble

    ens = pack_ensemble([str(f) for f in folds], tmp_path / "ens")
    one = _inference_params(load_bundle(folds[0]))
    assert _inference_params(load_bundle(ens)) == pytest.approx(2 * one)
    assert 1.0 < one < 2.0  # veloxseg-b without its teachers and deep-supervision heads


def test_a_member_with_damaged_weights_is_refused_before_anything_is_written(folds, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from VeloxSegLib.errors import BundleError
    from VeloxSegLib.infer.ensemble import pack_ensemble

    broken = tmp_path / "broken"
    shutil.copytree(folds[1], broken)
    weights = load_file(str(broken / "model.safetensors"))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(BundleError, match=r"broken/model.safetensors: lacks 1 tensor\(s\)"):
        pack_ensemble([str(folds[0]), str(broken)], tmp_path / "ens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_packing_can_set_the_ensembles_smallest_component(folds, case_files, tmp_path):
    out = tmp_path / "ens"
    assert main(["ensemble", *map(str, folds), "-o", str(out), "--min-component-mm3", "1e12"]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["inference"]["min_component_mm3"] == 1e12
    assert meta["inference"]["overlap"] == 0.25  # the first member's other settings stay
    labels = Segmenter(str(out), device="cpu", threads=1).predict([str(p) for p in case_files]).labels
    assert not sitk.GetArrayFromImage(labels).any()  # every component is under 1e12 mm^3
    plain = Segmenter([str(f) for f in folds], device="cpu", threads=1).predict([str(p) for p in case_files]).labels
    assert sitk.GetArrayFromImage(plain).any()  # the members' own setting keeps them
    assert main(["ensemble", *map(str, folds), "-o", str(tmp_path / "bad"), "--min-component-mm3", "-1"]) == 4
    assert not (tmp_path / "bad").exists()
