"""Metrics: our Dice and HD95 against MONAI on the same masks, empty-mask conventions, autoPET volumes."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib import metrics as M

SPACING = (3.0, 0.8, 1.3)  # array axis order (z, y, x), anisotropic


def ellipsoid(shape, centre, radii):
    z, y, x = np.indices(shape)
    return sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii)) <= 1.0


def random_pairs(n=5, shape=(24, 36, 30), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = ellipsoid(shape, rng.uniform(6, 18, 3), rng.uniform(2, 8, 3))
        b = ellipsoid(shape, rng.uniform(6, 18, 3), rng.uniform(2, 8, 3))
        if i == 1:
            a |= ellipsoid(shape, (2, 30, 3), (4, 4, 4))  # a second component touching the border
        if i == 2:
            b = a.copy()
            b[:, :, 15:] = False  # partial overlap, shared surface
        if i == 3:
            b = np.roll(a, 2, axis=0)
        out.append((a, b))
    return out


def _monai_onehot(mask):
    import torch

    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # a MONAI-internal deprecation notice
def test_dice_and_hd95_match_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    pytest.importorskip("scipy")  # MONAI's surface distances need it (test-only)
    for pred, ref in random_pairs():
        assert pred.any() and ref.any()
        ours_dice = M.dice_score(pred, ref)
        ours_hd = M.hd95(pred, ref, SPACING)
        theirs_dice = monai_metrics.compute_dice(_monai_onehot(pred), _monai_onehot(ref),
                                                 include_background=False)[0, 0].item()
        theirs_hd = monai_metrics.compute_hausdorff_distance(
            _monai_onehot(pred), _monai_onehot(ref), include_background=False, percentile=95,
            spacing=SPACING)[0, 0].item()
        # MONAI computes in float32; our distance map is SimpleITK's float32 Maurer transform
        assert ours_dice == pytest.approx(theirs_dice, rel=1e-6, abs=1e-6)
        assert ours_hd == pytest.approx(theirs_hd, rel=1e-5, abs=1e-3)
        # spacing matters: isotropic 1 mm gives a different number than the anisotropic one
        if ours_hd > 0:
            assert M.hd95(pred, ref, (1.0, 1.0, 1.0)) != pytest.approx(ours_hd)


def test_hd95_brute_force_small():
    """Exact check against all-pairs distances on a tiny example (no MONAI needed)."""
    pred = np.zeros((5, 6, 7), bool)
    ref = np.zeros((5, 6, 7), bool)
    pred[1:3, 1:4, 1:3] = True
    ref[2:5, 2:6, 3:7] = True
    sp = (2.0, 0.5, 1.5)
    ep, er = np.argwhere(M.surface_voxels(pred)) * sp, np.argwhere(M.surface_voxels(ref)) * sp
    d = np.sqrt(((ep[:, None, :] - er[None, :, :]) ** 2).sum(-1))
    expected = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert M.hd95(pred, ref, sp) == pytest.approx(expected, abs=1e-4)
    assert M.hd95(pred, pred, sp) == 0.0
    # masks that are all surface (single voxels, at the array's corner)
    a = np.zeros((5, 6, 7), bool)
    b = np.zeros((5, 6, 7), bool)
    a[0, 0, 0] = True
    b[2, 3, 4] = True
    assert M.hd95(a, b, sp) == pytest.approx(math.sqrt(4.0 ** 2 + 1.5 ** 2 + 6.0 ** 2), abs=1e-4)


def test_surface_voxels():
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    s = M.surface_voxels(m)
    assert s.sum() == 26 and not s[2, 2, 2]
    full = np.ones((3, 3, 3), bool)  # the array border counts as outside
    assert M.surface_voxels(full).sum() == 26


def test_empty_mask_conventions():
    empty = np.zeros((4, 4, 4), bool)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = True
    both = M.label_metrics(empty, empty, SPACING)
    assert both == {"dice": 1.0, "hd95_mm": 0.0, "precision": 1.0, "recall": 1.0, "fp_volume_ml": 0.0,
                    "fn_volume_ml": 0.0, "pred_volume_ml": 0.0, "ref_volume_ml": 0.0}
    vox_ml = 3.0 * 0.8 * 1.3 / 1000
    missed = M.label_metrics(empty, some, SPACING)  # nothing predicted
    assert missed["dice"] == 0.0 and missed["precision"] == 0.0 and missed["recall"] == 0.0
    assert math.isinf(missed["hd95_mm"])
    assert missed["fn_volume_ml"] == pytest.approx(8 * vox_ml) and missed["fp_volume_ml"] == 0.0
    spurious = M.label_metrics(some, empty, SPACING)  # negative case, something predicted
    assert spurious["dice"] == 0.0 and spurious["recall"] == 0.0 and spurious["precision"] == 0.0
    assert math.isinf(spurious["hd95_mm"])
    assert spurious["fp_volume_ml"] == pytest.approx(8 * vox_ml) and spurious["fn_volume_ml"] == 0.0
    # JSON output: inf becomes null and the text is strict JSON
    text = json.dumps(M.json_safe({1: missed}), allow_nan=False)
    assert json.loads(text)["1"]["hd95_mm"] is None


def test_precision_recall_counts():
    pred = np.zeros((2, 5, 5), bool)
    ref = np.zeros((2, 5, 5), bool)
    pred[0, :, :2] = True  # 10 voxels
    ref[0, :, 1:4] = True  # 15 voxels, 5 shared
    assert M.confusion_counts(pred, ref) == (5, 5, 10)
    assert M.precision_score(pred, ref) == pytest.approx(0.5)
    assert M.recall_score(pred, ref) == pytest.approx(5 / 15)
    assert M.dice_score(pred, ref) == pytest.approx(10 / 25)


def test_autopet_fp_fn_volumes():
    shape = (20, 20, 20)
    ref = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    ref[2:6, 2:6, 2:6] = True      # lesion A (64 voxels), found
    pred[3:7, 3:7, 3:7] = True     # overlaps A: not FP even where it spills over
    ref[10:12, 10:12, 10:12] = True  # lesion B (8 voxels), missed -> FN
    pred[15:18, 2:4, 2:4] = True   # 12 voxels, no lesion there -> FP
    pred[0, 19, 19] = True         # 1 voxel FP
    # corner-touching voxel: 26-connected to the found component, so not a separate FP
    pred[7, 7, 7] = True
    sp = (2.0, 1.0, 1.5)
    vox_ml = 3.0 / 1000
    fp, fn = M.lesion_fp_fn_volumes(pred, ref, sp)
    assert fp == pytest.approx(13 * vox_ml)
    assert fn == pytest.approx(8 * vox_ml)
    fp6, _ = M.lesion_fp_fn_volumes(pred, ref, sp, fully_connected=False)
    assert fp6 == pytest.approx(14 * vox_ml)  # with 6-connectivity the corner voxel is its own FP


def test_evaluate_images_and_geometry():
    ref = np.zeros((6, 7, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[4:6, 4:6, 4:6] = 2
    pred = ref.copy()
    pred[1, 1, 1] = 0
    ri, pi = sitk.GetImageFromArray(ref), sitk.GetImageFromArray(pred)
    for img in (ri, pi):
        img.SetSpacing((1.3, 0.8, 3.0))  # x, y, z
        img.SetOrigin((10, -5, 2))
    res = M.evaluate_images(pi, ri, [1, 2])
    assert res[2]["dice"] == 1.0
    assert res[1]["recall"] == pytest.approx(26 / 27)
    assert res[1]["ref_volume_ml"] == pytest.approx(27 * 1.3 * 0.8 * 3.0 / 1000)
    assert res == M.evaluate_arrays(pred, ref, [1, 2], SPACING)  # same as array order (z, y, x)
    assert M.geometry_mismatch(pi, ri) is None
    pi.SetOrigin((10, -5, 2.5))
    assert "origin" in M.geometry_mismatch(pi, ri)
    with pytest.raises(ValueError, match="grids differ"):
        M.evaluate_images(pi, ri, [1])


def test_mean_metrics_skip_infinite_hd95():
    per_case = [
        {1: {"dice": 1.0, "hd95_mm": 2.0, "precision": 1.0, "recall": 1.0, "fp_volume_ml": 0.0,
             "fn_volume_ml": 0.0, "pred_volume_ml": 1.0, "ref_volume_ml": 1.0}},
        {1: {"dice": 0.0, "hd95_mm": math.inf, "precision": 0.0, "recall": 0.0, "fp_volume_ml": 0.0,
             "fn_volume_ml": 2.0, "pred_volume_ml": 0.0, "ref_volume_ml": 2.0}},
    ]
    mean = M.mean_metrics(per_case)[1]
    assert mean["dice"] == 0.5 and mean["hd95_mm"] == 2.0
    assert mean["hd95_cases"] == 1 and mean["cases"] == 2 and mean["fn_volume_ml"] == 1.0


def test_paired_comparison_agrees_with_scipys_permutation_test_and_bootstrap():
    """The sign-flip p-value and the bootstrap interval against SciPy's own implementations:
    exact for 10 cases (every flip enumerated by both), sampled for 40."""
    import numpy as np
    from scipy import stats

    from VeloxSegLib.metrics import paired_comparison

    rng = np.random.default_rng(3)
    for n, exact in ((10, True), (40, False)):
        a = rng.uniform(0.3, 0.9, n)
        b = np.clip(a + rng.normal(0.03, 0.08, n), 0, 1)
        out = paired_comparison(a, b)
        d = b - a
        ref = stats.permutation_test((b, a), lambda x, y: np.mean(x - y), permutation_type="samples",
                                     n_resamples=10 ** 6 if exact else 20000, alternative="two-sided",
                                     random_state=1)
        if exact:
            assert out["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)
        else:
            assert out["p_value"] == pytest.approx(ref.pvalue, abs=0.02)
        boot = stats.bootstrap((d,), np.mean, confidence_level=0.95, method="percentile", n_resamples=20000,
                               random_state=1).confidence_interval
        spread = boot.high - boot.low
        assert out["ci_low"] == pytest.approx(boot.low, abs=0.05 * spread)
        assert out["ci_high"] == pytest.approx(boot.high, abs=0.05 * spread)
        assert out["mean_difference"] == pytest.approx(d.mean())
        assert out["se"] == pytest.approx(stats.sem(d))
        assert (out["better"], out["worse"], out["tied"]) == (int((d > 0).sum()), int((d < 0).sum()), 0)
        assert out["n"] == n


def test_paired_comparison_edge_cases():
    import math

    from VeloxSegLib.metrics import paired_comparison

    same = paired_comparison([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert same["p_value"] == 1.0 and same["ci_low"] == same["ci_high"] == 0.0 and same["tied"] == 3
    # every case better by the same amount: 2 of the 2^5 sign patterns reach it
    up = paired_comparison([0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.3, 0.4, 0.5, 0.6])
    assert up["p_value"] == pytest.approx(2 / 32) and up["ci_low"] == pytest.approx(0.1)
    assert up["ci_high"] == pytest.approx(0.1) and (up["better"], up["worse"]) == (5, 0)
    down = paired_comparison([0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert down["mean_difference"] == pytest.approx(-0.1) and down["worse"] == 5
    # 30 cases all better: sampled, add-one estimate, never 0
    many = paired_comparison([0.0] * 30, [1.0] * 30, resamples=999)
    assert many["p_value"] == pytest.approx(1 / 1000)
    assert math.isnan(paired_comparison([0.2], [0.4])["se"])
    for bad in (([], []), ([0.1, 0.2], [0.1]), ([0.1, float("nan")], [0.2, 0.3])):
        with pytest.raises(ValueError):
            paired_comparison(*bad)
