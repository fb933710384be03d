"""PET border refinement (VeloxSegLib/infer/petrefine.py): the rule, its guards, an independent
SciPy implementation as its peer, the pipeline, bundles and the command line."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from VeloxSegLib.bundle import BundleError, validate_meta
from VeloxSegLib.cli import main
from VeloxSegLib.errors import ConfigError
from VeloxSegLib.infer.petrefine import PET_REFINE_DEFAULTS, fraction_for_volume, pet_refine_settings, refine_with_pet

SPACING = (3.0, 3.0, 3.5)  # x, y, z mm, the PET/CT phantoms' CT grid
ZYX = SPACING[::-1]


def _ball(shape, centre, radius_mm, spacing_zyx=ZYX):
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((z, y, x), centre, spacing_zyx))
    return d2 <= radius_mm ** 2


def _blurred(arr, sigma_mm=3.0):
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(SPACING)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm))


def _crop(pet):
    return lambda lo, hi: pet[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]


def _dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _scene(noise=0.0, seed=0):
    """A 15 mm-radius hot lesion (SUV 8 over a background of 1, blurred like a PET scanner) and a
    network mask of radius 21 mm around it (over-segmented by two voxels), probability 0.6."""
    shape = (32, 36, 36)
    centre = (16, 18, 18)
    truth = _ball(shape, centre, 15.0)
    pet = _blurred(1.0 + 7.0 * truth)
    if noise:
        pet = pet + np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)
    net = _ball(shape, centre, 21.0)
    prob = np.where(net, 0.6, 0.1).astype(np.float32)
    return truth, pet, net, prob


def test_an_over_segmented_lesion_is_drawn_back_to_its_uptake():
    truth, pet, net, prob = _scene(noise=0.2)
    labels = net.astype(np.uint8)
    counts = refine_with_pet(labels, prob, _crop(pet), SPACING)
    assert counts["refined"] == 1
    before, after = _dice(net, truth), _dice(labels == 1, truth)
    assert before < 0.6 and after > 0.9, (before, after)
    assert set(np.unique(labels)) == {0, 1}


def test_an_under_segmented_lesion_grows_only_within_the_margin():
    truth, pet, _net, _prob = _scene()
    small = _ball(truth.shape, (16, 18, 18), 9.0)
    labels = small.astype(np.uint8)
    prob = np.where(small, 0.9, 0.2).astype(np.float32)
    refine_with_pet(labels, prob, _crop(pet), SPACING, {"margin_mm": 3.5})
    grown = labels == 1
    assert grown.sum() > small.sum()
    dist = ndi.distance_transform_edt(~small, sampling=ZYX)
    assert dist[grown].max() <= 3.5  # the margin bounds the growth
    margin_wide = small.astype(np.uint8)
    refine_with_pet(margin_wide, prob, _crop(pet), SPACING, {"margin_mm": 10.0})
    assert _dice(margin_wide == 1, truth) > _dice(grown, truth) > _dice(small, truth)


def test_a_necrotic_core_stays_inside_the_lesion():
    shape = (32, 36, 36)
    outer = _ball(shape, (16, 18, 18), 18.0)
    core = _ball(shape, (16, 18, 18), 9.0)
    pet = _blurred(1.0 + 9.0 * (outer & ~core) + 0.5 * core, sigma_mm=2.0)
    labels = _ball(shape, (16, 18, 18), 21.0).astype(np.uint8)
    prob = np.where(labels == 1, 0.6, 0.0).astype(np.float32)
    refine_with_pet(labels, prob, _crop(pet), SPACING)
    assert (labels[core] == 1).all()  # the cold core is below the threshold, and filled
    assert _dice(labels == 1, outer) > 0.85


def test_small_components_other_labels_and_flat_pet_are_left_alone():
    truth, pet, net, prob = _scene()
    labels = net.astype(np.uint8)
    tiny = _ball(truth.shape, (4, 4, 4), 4.0)
    labels[tiny] = 1
    labels[14:18, 18:22, 30:34] = 2  # another class inside the lesion's margin, with the lesion's uptake
    pet[14:18, 18:22, 30:34] = pet.max()
    before = labels.copy()
    smallest = {"min_component_mm3": 500.0}  # stage 16's setting; the default (0) refines every component
    counts = refine_with_pet(labels, np.maximum(prob, tiny * 0.9), _crop(pet), SPACING, smallest)
    assert counts["refined"] == 1 and counts["too_small"] == 1  # 4 mm ball: well under 500 mm^3
    np.testing.assert_array_equal(labels[tiny], before[tiny])
    np.testing.assert_array_equal(labels == 2, before == 2)
    flat = before.copy()
    counts = refine_with_pet(flat, prob, _crop(np.ones_like(pet)), SPACING, smallest)
    assert counts == {"refined": 0, "lung": 0, "too_small": 1, "no_background": 0, "no_uptake": 1}  # no peak above the background
    flat = before.copy()
    counts = refine_with_pet(flat, prob, _crop(np.ones_like(pet)), SPACING)
    assert counts == {"refined": 0, "lung": 0, "too_small": 0, "no_background": 0, "no_uptake": 2}
    np.testing.assert_array_equal(flat, before)


def test_a_small_lesion_is_cut_at_a_larger_fraction_of_its_peak():
    """The scanner's blur spreads a small lesion's uptake and lowers its peak, so its border lies at
    a larger fraction of that peak: one fraction for every size (0.35, the large lesions' one)
    keeps too much of an over-drawn small lesion; the size-dependent rule cuts it closer."""
    shape, centre = (24, 28, 28), (12, 14, 14)
    truth = _ball(shape, centre, 4.5)  # 11 voxels, 350 mm^3
    pet = _blurred(1.0 + 7.0 * truth)
    net = _ball(shape, centre, 7.5)  # drawn at 1540 mm^3
    prob = np.where(net, 0.6, 0.1).astype(np.float32)
    one = net.astype(np.uint8)
    refine_with_pet(one, prob, _crop(pet), SPACING, {"fraction": 0.35, "weight": 16.0, "min_component_mm3": 0.0})
    sized = net.astype(np.uint8)
    assert refine_with_pet(sized, prob, _crop(pet), SPACING)["refined"] == 1
    assert (sized == 1).sum() < (one == 1).sum() < net.sum()
    assert _dice(sized == 1, truth) > _dice(one == 1, truth) + 0.1, (_dice(sized == 1, truth), _dice(one == 1, truth))


def test_the_fraction_falls_with_the_drawn_volume_between_two_sizes():
    s = pet_refine_settings(None)
    assert (s["fraction_small"], s["fraction"], s["small_mm3"], s["large_mm3"]) == (0.65, 0.35, 500.0, 5000.0)
    assert fraction_for_volume(10.0, s) == fraction_for_volume(500.0, s) == 0.65
    assert fraction_for_volume(5000.0, s) == fraction_for_volume(1e6, s) == 0.35
    assert fraction_for_volume(np.sqrt(500.0 * 5000.0), s) == pytest.approx(0.5)  # linear in log volume
    volumes = np.geomspace(100, 50000, 40)
    assert np.all(np.diff([fraction_for_volume(v, s) for v in volumes]) <= 0)
    # a fraction given alone keeps one fraction for every size (bundles written before stage 23)
    old = pet_refine_settings({"fraction": 0.4, "weight": 8.0, "min_component_mm3": 500.0})
    assert old["fraction_small"] == 0.4 and {fraction_for_volume(v, old) for v in volumes} == {0.4}
    assert old["lung_hu"] is None and s["lung_hu"] == -500.0
    assert pet_refine_settings({"fraction": 0.4, "fraction_small": 0.7})["fraction_small"] == 0.7


def _lung_scene():
    """A 7 mm-radius nodule (30 HU, SUV 4) in lung (-800 HU, SUV 0.4), touching a chest wall of
    soft tissue (40 HU) without its uptake (SUV 0.7); PET blurred like a scanner's. The network
    drew a ball 3 voxels wider than the nodule (probability 0.6), which reaches into the wall."""
    shape, centre = (30, 36, 36), (15, 18, 18)
    nodule = _ball(shape, centre, 7.0)
    wall = np.zeros(shape, bool)
    wall[:, :, 21:] = True  # x >= 21: 9 mm from the centre, within the margin of the drawn ball
    wall &= ~nodule
    ct = np.where(nodule, 30.0, np.where(wall, 40.0, -800.0)).astype(np.float32)
    pet = _blurred(np.where(nodule, 4.0, np.where(wall, 0.7, 0.4)))
    net = _ball(shape, centre, 7.0 + 9.0) & ~(wall & ~_ball(shape, centre, 10.0))
    prob = np.where(net, 0.6, 0.05).astype(np.float32)
    return nodule, wall, ct, pet, net, prob


def test_in_the_lung_ct_draws_the_border_and_pet_keeps_the_wall_out():
    nodule, wall, ct, pet, net, prob = _lung_scene()
    with_ct = net.astype(np.uint8)
    counts = refine_with_pet(with_ct, prob, _crop(pet), SPACING, ct_of_box=_crop(ct))
    assert counts["refined"] == 1 and counts["lung"] == 1
    got = with_ct == 1
    assert _dice(got, nodule) > 0.97, _dice(got, nodule)
    # the wall is tissue in CT, but without the lesion's uptake: only PET's spill next to the
    # nodule passes the gate; without the gate the wall within the margin would join
    near = ndi.distance_transform_edt(~nodule, sampling=ZYX) <= 3.0
    assert (got & wall).sum() <= 2 and not (got & wall & ~near).any()
    ungated = net.astype(np.uint8)
    refine_with_pet(ungated, prob, _crop(pet), SPACING, {"lung_fraction": 0.01}, ct_of_box=_crop(ct))
    assert ((ungated == 1) & wall).sum() > 30
    pet_only = net.astype(np.uint8)
    counts = refine_with_pet(pet_only, prob, _crop(pet), SPACING)  # no CT: the PET rule
    assert counts["lung"] == 0
    assert _dice(pet_only == 1, nodule) < _dice(got, nodule) - 0.05
    off = net.astype(np.uint8)
    counts = refine_with_pet(off, prob, _crop(pet), SPACING, {"lung_hu": None}, ct_of_box=_crop(ct))
    assert counts["lung"] == 0
    np.testing.assert_array_equal(off, pet_only)


def test_outside_the_lung_ct_changes_nothing():
    truth, pet, net, prob = _scene(noise=0.2)  # a lesion in soft tissue
    ct = np.where(truth, 45.0, 40.0).astype(np.float32)
    a, b = net.astype(np.uint8), net.astype(np.uint8)
    counts = refine_with_pet(a, prob, _crop(pet), SPACING, ct_of_box=_crop(ct))
    refine_with_pet(b, prob, _crop(pet), SPACING)
    assert counts["refined"] == 1 and counts["lung"] == 0
    np.testing.assert_array_equal(a, b)


def _peer_fraction(volume, s):
    """The fraction for a component of ``volume`` mm^3, by NumPy's interpolation in log volume
    (clamped at both ends)."""
    return float(np.interp(np.log(volume), np.log([s["small_mm3"], s["large_mm3"]]),
                           [s["fraction_small"], s["fraction"]]))


def _peer(labels, p, pet, s, value=1, ct=None):
    """The rule written independently with SciPy: Euclidean distance transforms in mm,
    26-connected components, hole filling with SciPy's default structure."""
    S = np.ones((3, 3, 3), bool)
    out = labels.copy()
    lab, _ = ndi.label(labels == value, S)
    predicted = labels != 0
    for i in range(1, lab.max() + 1):
        C = lab == i
        volume = C.sum() * np.prod(ZYX)
        if volume < s["min_component_mm3"]:
            continue
        d = ndi.distance_transform_edt(~C, sampling=ZYX)
        region = d <= s["margin_mm"]
        shell = (d > s["margin_mm"]) & (d <= s["margin_mm"] + s["shell_mm"]) & ~predicted
        if shell.sum() < 5:
            continue
        b = np.median(pet[shell])
        m = np.sort(pet[C])[::-1][:s["peak_voxels"]].mean()
        if m <= b:
            continue
        rel = (pet - b) / (m - b)
        lung = ct is not None and s["lung_hu"] is not None and np.median(ct[shell]) < s["lung_hu"]
        if lung:
            T = (ct > s["lung_tissue_hu"]) & (rel >= s["lung_fraction"])
        else:
            T = p + s["weight"] * (rel - _peer_fraction(volume, s)) >= 0.5
        T &= region & ((out == 0) | (out == value))
        parts, _ = ndi.label(T, S)
        keep = np.unique(parts[C & T])
        T = ndi.binary_fill_holes(np.isin(parts, keep[keep > 0]))
        if lung and not T.any():
            continue
        out[C] = 0
        out[T & ((out == 0) | (out == value))] = value
    return out


@pytest.mark.parametrize("seed,stage16", [(1, False), (2, False), (3, False), (4, True), (5, False)])
def test_agrees_with_an_independent_scipy_implementation(seed, stage16):
    rng = np.random.default_rng(seed)
    shape = (40, 48, 48)
    lesions = np.zeros(shape, bool)
    for _ in range(4):
        lesions |= _ball(shape, rng.integers(8, 40, 3) * [0.8, 1, 1], rng.uniform(6, 16))
    pet = _blurred(1.0 + rng.uniform(2, 8) * lesions) + rng.normal(0, 0.3, shape).astype(np.float32)
    prob = np.clip(_blurred(lesions.astype(np.float32), 4.0) + rng.normal(0, 0.1, shape), 0, 1).astype(np.float32)
    labels = (prob > 0.35).astype(np.uint8)
    settings = dict(PET_REFINE_DEFAULTS, min_component_mm3=300.0)
    if stage16:  # one fraction for every size, as bundles written before stage 23 hold
        settings = pet_refine_settings({"fraction": 0.4, "weight": 8.0, "min_component_mm3": 300.0})
    comps, n = ndi.label(labels, np.ones((3, 3, 3)))
    volumes = np.bincount(comps.ravel())[1:] * np.prod(ZYX)
    assert n >= 2 and volumes.min() < settings["large_mm3"] and volumes.max() > settings["small_mm3"], volumes
    # CT: lung (-800 HU) on the low-x half, soft tissue (40 HU) on the other, lesions at 30 HU
    ct = np.where(lesions, 30.0, np.where(np.arange(shape[2]) < shape[2] // 2, -800.0, 40.0)).astype(np.float32)
    ct += rng.normal(0, 20, shape).astype(np.float32)
    expected = _peer(labels, prob, pet, settings, ct=ct)
    got = labels.copy()
    counts = refine_with_pet(got, prob, _crop(pet), SPACING, settings, ct_of_box=_crop(ct))
    assert counts["refined"] >= 1
    assert (counts["lung"] >= 1) == (not stage16)  # the stage-16 settings have no lung rule
    assert not np.array_equal(expected, labels)  # the case exercises the rule
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- bundles, pipeline, CLI


def _meta(**inference):
    return {
        "format_version": 1, "name": "m",
        "model": {"name": "veloxseg-b", "in_channels": [1, 1], "num_classes": 2, "patch_size": [96, 96, 96]},
        "spacing": [2.0, 2.0, 2.5],
        "channels": [{"name": "CT", "modality": "CT", "normalization": {"scheme": "none"}},
                     {"name": "PET", "modality": "PET", "normalization": {"scheme": "none"}}],
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}],
        "inference": inference,
    }


def test_bundle_settings_are_validated_and_filled_with_defaults():
    assert validate_meta(_meta())["inference"]["pet_refine"] is None
    assert validate_meta(_meta(pet_refine={}))["inference"]["pet_refine"] == PET_REFINE_DEFAULTS
    got = validate_meta(_meta(pet_refine={"fraction": 0.5}))["inference"]["pet_refine"]
    # alone: one fraction for every size and no lung rule (bundles written before stage 23)
    assert got == dict(PET_REFINE_DEFAULTS, fraction=0.5, fraction_small=0.5, lung_hu=None)
    got = validate_meta(_meta(pet_refine={"fraction": 0.5, "lung_hu": -600}))["inference"]["pet_refine"]
    assert got == dict(PET_REFINE_DEFAULTS, fraction=0.5, fraction_small=0.5, lung_hu=-600.0)
    got = validate_meta(_meta(pet_refine={"lung_hu": None}))["inference"]["pet_refine"]
    assert got == dict(PET_REFINE_DEFAULTS, lung_hu=None)
    got = validate_meta(_meta(pet_refine={"fraction": 0.5, "fraction_small": 0.8}))["inference"]["pet_refine"]
    assert got == dict(PET_REFINE_DEFAULTS, fraction=0.5, fraction_small=0.8)
    bad = [({"fraction": 1.5}, "inference.pet_refine.fraction"), ({"label": 3}, "inference.pet_refine.label"),
           ({"threshold": 0.4}, "inference.pet_refine"), ({"peak_voxels": 0}, "inference.pet_refine.peak_voxels"),
           ({"fraction_small": 1.0}, "inference.pet_refine.fraction_small"),
           ({"small_mm3": 0}, "inference.pet_refine.small_mm3"),
           ({"small_mm3": 800, "large_mm3": 800}, "inference.pet_refine.large_mm3"),
           ({"lung_fraction": 0.0}, "inference.pet_refine.lung_fraction"),
           ({"lung_hu": "lung"}, "inference.pet_refine.lung_hu"),
           ({"lung_tissue_hu": float("nan")}, "inference.pet_refine.lung_tissue_hu")]
    for settings, field in bad:
        with pytest.raises(BundleError, match=field.replace(".", r"\.")):
            validate_meta(_meta(pet_refine=settings))
    no_pet = _meta(pet_refine={})
    no_pet["channels"][1]["modality"] = "MR"
    with pytest.raises(BundleError, match="needs a channel whose modality is PET"):
        validate_meta(no_pet)


def test_the_shipped_petct_bundle_refines_and_the_mri_bundle_does_not():
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.infer.pipeline import InferencePlan

    petct = InferencePlan.from_meta(load_bundle("petct-lesion-demo").meta)
    assert petct.pet_refine == PET_REFINE_DEFAULTS and petct.pet_channel == 1
    mri = InferencePlan.from_meta(load_bundle("brain-tumor-mri-demo").meta)
    assert mri.pet_refine is None and mri.pet_channel is None
    with pytest.raises(ConfigError, match="needs a PET channel"):
        mri.pet_refine_settings()
    with pytest.raises(ConfigError, match="fraction_small must be in"):
        petct.pet_refine_settings({"fraction_small": 1.2})
    with pytest.raises(ConfigError, match="small_mm3 < large_mm3"):
        petct.pet_refine_settings({"small_mm3": 900.0, "large_mm3": 500.0})


@pytest.fixture(scope="module")
def phantom(petct_case):
    return petct_case(900)


def test_pipeline_refines_the_network_labels_and_keeps_its_probabilities(phantom):
    from VeloxSegLib.infer.pipeline import Segmenter

    inputs, _label = phantom
    seg = Segmenter("petct-lesion-demo", threads=2)
    plain = seg.predict(inputs, pet_refine=False, probabilities=True)
    refined = seg.predict(inputs, probabilities=True)  # the bundle's setting: on
    explicit = seg.predict(inputs, pet_refine=dict(PET_REFINE_DEFAULTS))
    probs = sitk.GetArrayFromImage(plain.probabilities)
    net = sitk.GetArrayFromImage(plain.labels)
    np.testing.assert_array_equal(net, (probs[..., 1] > 0.5).astype(np.uint8))  # off: the network's arg-max
    np.testing.assert_array_equal(sitk.GetArrayFromImage(refined.probabilities), probs)
    out = sitk.GetArrayFromImage(refined.labels)
    assert refined.info["pet_refine"]["refined"] >= 1 and "pet_refine" not in plain.info
    assert not np.array_equal(out, net)
    np.testing.assert_array_equal(out, sitk.GetArrayFromImage(explicit.labels))
    # changes stay within the margin of the network's components
    dist = ndi.distance_transform_edt(net == 0, sampling=ZYX)
    assert dist[out != net].max() <= PET_REFINE_DEFAULTS["margin_mm"]


def test_the_pipeline_gives_the_lung_rule_the_models_ct(petct_case):
    """Seed 903's phantom has lesions the demo finds in the lung: they are redrawn from the CT
    input (tissue above -400 HU), closer to the truth (Dice 0.94 against 0.88 without)."""
    from VeloxSegLib.infer.pipeline import Segmenter
    from VeloxSegLib.metrics import dice_score

    inputs, label = petct_case(903)
    seg = Segmenter("petct-lesion-demo", threads=2)
    on = seg.predict(inputs)
    off = seg.predict(inputs, pet_refine={"lung_hu": None})
    assert on.info["pet_refine"]["lung"] >= 1 and off.info["pet_refine"]["lung"] == 0
    a, b = sitk.GetArrayFromImage(on.labels) == 1, sitk.GetArrayFromImage(off.labels) == 1
    assert (a != b).any()
    ct = sitk.GetArrayFromImage(sitk.ReadImage(inputs[0]))  # the reference grid is the CT's
    assert (ct[a & ~b] > -400).all()  # what the lung rule adds is tissue in CT
    assert (ct[b & ~a] <= -400).any()  # and it takes out parenchyma the PET rule kept
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label))) == 1
    assert dice_score(a, truth) > dice_score(b, truth) + 0.03


def test_one_pass_can_return_the_labels_before_refinement(phantom):
    """``keep_unrefined`` gives what ``pet_refine=False`` gives (small components removed alike),
    from the same network pass as the refined labels (veloxseg crossval scores both)."""
    from VeloxSegLib.infer.pipeline import Segmenter

    inputs, _label = phantom
    seg = Segmenter("petct-lesion-demo", threads=2)
    for volume in (0.0, 300.0):
        both = seg.predict(inputs, keep_unrefined=True, min_component_mm3=volume)
        plain = seg.predict(inputs, pet_refine=False, min_component_mm3=volume)
        refined = seg.predict(inputs, min_component_mm3=volume)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(both.unrefined_labels),
                                      sitk.GetArrayFromImage(plain.labels))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(both.labels), sitk.GetArrayFromImage(refined.labels))
        assert both.unrefined_labels.GetOrigin() == plain.labels.GetOrigin()
    assert not np.array_equal(sitk.GetArrayFromImage(both.unrefined_labels), sitk.GetArrayFromImage(both.labels))
    assert seg.predict(inputs).unrefined_labels is None  # only when asked
    assert seg.predict(inputs, pet_refine=False, keep_unrefined=True).unrefined_labels is None  # nothing refined


def test_cli_switches_refinement_and_refuses_it_without_pet(phantom, tmp_path, capsys):
    inputs, _label = phantom
    on, off = tmp_path / "on.nii.gz", tmp_path / "off.nii.gz"
    assert main(["predict", "-m", "petct-lesion-demo", "-i", *inputs, "-o", str(on), "--threads", "2",
                 "--progress", "none"]) == 0
    assert main(["predict", "-m", "petct-lesion-demo", "-i", *inputs, "-o", str(off), "--threads", "2",
                 "--progress", "none", "--no-pet-refine"]) == 0
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (on, off))
    assert not np.array_equal(a, b)
    mri_in = [inputs[0]] * 4
    out = tmp_path / "mri.nii.gz"
    code = main(["predict", "-m", "brain-tumor-mri-demo", "-i", *mri_in, "-o", str(out), "--pet-refine",
                 "--progress", "none"])
    assert code != 0 and not out.exists()
    assert "needs a PET channel" in capsys.readouterr().err


def test_a_copied_bundle_can_turn_it_off_in_bundle_json(tmp_path, phantom):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.infer.pipeline import InferencePlan

    src = load_bundle("petct-lesion-demo").path
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["inference"]["pet_refine"] = None
    (dst / "bundle.json").write_text(json.dumps(meta))
    assert InferencePlan.from_meta(load_bundle(dst).meta).pet_refine is None


def test_finetuning_validates_with_the_parents_refinement(tmp_path):
    """A fine-tune of petct-lesion-demo measures its starting Dice on the segmentations the bundle
    gives (refinement on), not on the bare network's."""
    import contextlib
    import io

    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.infer.pipeline import Segmenter
    from VeloxSegLib.metrics import dice_score

    train, val = tmp_path / "train", tmp_path / "val"
    write_phantom_dataset(train, "petct", 2, seed=780, size=(96, 96, 72))
    write_phantom_dataset(val, "petct", 2, seed=781, size=(96, 96, 72))
    seg = Segmenter("petct-lesion-demo", threads=2)
    expected = {}
    for flag in (True, False):
        scores = []
        for case in ("petct_0000", "petct_0001"):
            pred = sitk.GetArrayFromImage(seg.predict(
                [str(val / "imagesTr" / f"{case}_000{c}.nii.gz") for c in range(2)], pet_refine=flag).labels)
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(val / "labelsTr" / f"{case}.nii.gz")))
            scores.append(dice_score(pred == 1, truth == 1))
        expected[flag] = float(np.mean(scores))
    assert abs(expected[True] - expected[False]) > 1e-3  # the two differ on these cases
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["finetune", "-m", "petct-lesion-demo", str(train), "-o", str(tmp_path / "child"),
                   "--val-dataset", str(val), "--target-dice", "0.01", "--threads", "2", "--device", "cpu",
                   "--progress", "none"])
    assert rc == 0
    child = load_bundle(tmp_path / "child")
    assert child.meta["inference"]["pet_refine"] == PET_REFINE_DEFAULTS
    assert child.meta["training"]["metrics"]["start_val_dice"] == pytest.approx(expected[True], abs=1e-6)
