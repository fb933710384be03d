"""Lesion-wise scores (``metrics.lesion_metrics``, ``veloxseg evaluate --lesions``).

Expected values come from the geometry of hand-built masks, and from an independent brute-force
implementation on SciPy's connected components (``scipy.ndimage``, a test-only dependency).
"""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from VeloxSegLib import metrics as M
from VeloxSegLib.cli import main
from VeloxSegLib.commands.evaluate import DEFAULT_LESION_HD95_PENALTY_MM


def three_lesions():
    """A: 8 voxels predicted exactly; B: 16 voxels, half predicted; C: 1 voxel, missed; one
    8-voxel false-positive component."""
    r = np.zeros((20, 20, 20), bool)
    p = np.zeros_like(r)
    r[2:4, 2:4, 2:4] = True
    r[10:14, 2:4, 2:4] = True
    r[2, 15, 15] = True
    p[2:4, 2:4, 2:4] = True
    p[10:12, 2:4, 2:4] = True
    p[15:17, 15:17, 15:17] = True
    return p, r


def test_hand_built_lesions():
    p, r = three_lesions()
    out = M.lesion_metrics(p, r, (1.0, 2.0, 0.5))
    assert (out["lesions"], out["found"], out["missed"], out["fp_components"]) == (3, 2, 1, 1)
    assert out["lesion_sensitivity"] == pytest.approx(2 / 3)
    assert out["lesion_f1"] == pytest.approx(4 / (4 + 1 + 1))
    dice_b = 2 * 8 / (16 + 8)
    assert out["lesionwise_dice"] == pytest.approx((1.0 + dice_b + 0.0) / (3 + 1))
    sizes = [e["voxels"] for e in out["per_lesion"]]
    assert sizes == [16, 8, 1]  # largest first
    b, a, c = out["per_lesion"]
    assert b["dice"] == pytest.approx(dice_b) and a["dice"] == 1.0 and c["dice"] == 0.0
    assert (a["found"], b["found"], c["found"]) == (True, True, False)
    assert b["volume_ml"] == pytest.approx(16 * 1.0 * 2.0 * 0.5 / 1000)
    assert b["centroid"] == pytest.approx([11.5, 2.5, 2.5]) and c["centroid"] == [2.0, 15.0, 15.0]
    assert a["hd95_mm"] == 0.0 and math.isinf(c["hd95_mm"])
    assert b["hd95_mm"] == pytest.approx(M.hd95(p[8:15], r[8:15], (1.0, 2.0, 0.5)))
    assert b["hd95_mm"] == pytest.approx(2.0)  # the missed half, 2 slices of 1 mm
    # BraTS 2023 lesion-wise HD95: A 0 mm, B 2 mm, C missed and the FP component 374 mm each
    assert out["lesionwise_hd95_mm"] == pytest.approx((0.0 + 2.0 + 374.0 + 374.0) / 4)
    other = M.lesion_metrics(p, r, (1.0, 2.0, 0.5), hd95_penalty_mm=100.0)
    assert other["lesionwise_hd95_mm"] == pytest.approx((0.0 + 2.0 + 100.0 + 100.0) / 4)
    assert "lesionwise_hd95_mm" not in M.lesion_metrics(p, r, (1.0, 2.0, 0.5), with_hd95=False)


def test_min_voxels_leaves_out_small_lesions_and_components():
    p, r = three_lesions()
    out = M.lesion_metrics(p, r, (1, 1, 1), min_voxels=2)
    assert (out["lesions"], out["found"], out["fp_components"]) == (2, 2, 1)  # C (1 voxel) left out
    assert out["lesionwise_dice"] == pytest.approx((1.0 + 2 / 3) / 3)
    out = M.lesion_metrics(p, r, (1, 1, 1), min_voxels=9)  # A and the FP component too
    assert (out["lesions"], out["fp_components"]) == (1, 0)
    # a component that touches only a left-out lesion is neither found nor a false positive
    r2 = np.zeros((8, 8, 8), bool)
    r2[1, 1, 1] = True
    p2 = np.zeros_like(r2)
    p2[1:3, 1:3, 1:3] = True
    out = M.lesion_metrics(p2, r2, (1, 1, 1), min_voxels=2)
    assert (out["lesions"], out["fp_components"], out["lesionwise_dice"]) == (0, 0, 1.0)


def test_dilation_merges_near_lesions_and_matches_near_predictions():
    r = np.zeros((12, 12, 12), bool)
    r[2:4, 2:4, 2:4] = True
    r[2:4, 2:4, 5:7] = True  # one empty voxel between the two blocks
    p = np.zeros_like(r)
    p[2:4, 2:4, 7:9] = True  # next to the second block without overlapping it: touches it only when dilated
    plain = M.lesion_metrics(p, r, (1, 1, 1))
    assert (plain["lesions"], plain["found"], plain["fp_components"]) == (2, 0, 1)
    merged = M.lesion_metrics(p, r, (1, 1, 1), dilation=1)
    assert (merged["lesions"], merged["found"], merged["fp_components"]) == (1, 0, 0)
    assert merged["per_lesion"][0]["voxels"] == 16  # the reference voxels only, not the dilation
    assert merged["lesionwise_dice"] == 0.0  # matched but not overlapping: missed, not a false positive


def test_empty_mask_conventions():
    z = np.zeros((6, 6, 6), bool)
    one = z.copy()
    one[2:4, 2:4, 2:4] = True
    both = M.lesion_metrics(z, z, (1, 1, 1))
    assert (both["lesions"], both["fp_components"], both["lesion_sensitivity"], both["lesion_f1"],
            both["lesionwise_dice"]) == (0, 0, 1.0, 1.0, 1.0)
    only_pred = M.lesion_metrics(one, z, (1, 1, 1))
    assert (only_pred["fp_components"], only_pred["lesion_f1"], only_pred["lesionwise_dice"]) == (1, 0.0, 0.0)
    only_ref = M.lesion_metrics(z, one, (1, 1, 1))
    assert (only_ref["missed"], only_ref["lesion_sensitivity"], only_ref["lesionwise_dice"]) == (1, 0.0, 0.0)
    assert (both["lesionwise_hd95_mm"], only_pred["lesionwise_hd95_mm"], only_ref["lesionwise_hd95_mm"]) == \
        (0.0, 374.0, 374.0)  # BraTS: nothing to find and nothing predicted 0; else the penalty
    with pytest.raises(ValueError):
        M.lesion_metrics(one, one[:5], (1, 1, 1))
    with pytest.raises(ValueError):
        M.lesion_metrics(one, one, (1, 1, 1), dilation=-1)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            M.lesion_metrics(one, one, (1, 1, 1), hd95_penalty_mm=bad)


def scipy_matching(p, r, dilation, min_voxels):
    """The lesions and their components, independently, on scipy.ndimage: for each lesion kept
    (its reference voxels, the components touching its region), the component labels, and the
    FP components' labels."""
    full = np.ones((3, 3, 3), bool)
    grown = ndimage.binary_dilation(r, full, iterations=dilation) if dilation and r.any() else r
    regions, n_regions = ndimage.label(grown, full)
    comps, n_comps = ndimage.label(p, full)
    kept, touched = [], set()
    for g in range(1, n_regions + 1):
        region = regions == g
        hits = [c for c in range(1, n_comps + 1) if np.any((comps == c) & region)]
        touched.update(hits)
        lesion = r & region
        if lesion.sum() >= max(1, min_voxels):
            kept.append((lesion, hits))
    fp = [c for c in range(1, n_comps + 1) if c not in touched and np.sum(comps == c) >= max(1, min_voxels)]
    return kept, comps, fp


def brute_force(p, r, dilation, min_voxels):
    """An independent implementation on scipy.ndimage, lesion by lesion."""
    kept, comps, fp = scipy_matching(p, r, dilation, min_voxels)
    dices, hd95s = [], []
    for lesion, hits in kept:
        union = np.isin(comps, hits)
        dices.append(2 * np.sum(lesion & union) / (lesion.sum() + union.sum()))
        if np.any(lesion & union):
            hd95s.append(M.hd95(union, lesion, (1.0, 1.0, 1.0)))
    return sorted(dices), sorted(hd95s), len(fp)


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_a_brute_force_scipy_implementation(seed):
    rng = np.random.default_rng(seed)
    shape = (14, 18, 16)
    r = ndimage.binary_opening(rng.random(shape) < 0.12 + 0.04 * (seed % 3))  # blobs of varied size
    r |= rng.random(shape) < 0.01  # and single voxels
    p = np.roll(r, 1, axis=seed % 3) & (rng.random(shape) < 0.9)
    p |= rng.random(shape) < 0.01
    for dilation, min_voxels in ((0, 0), (1, 0), (0, 3), (2, 2)):
        dices, hd95s, fp = brute_force(p, r, dilation, min_voxels)
        out = M.lesion_metrics(p, r, (1.0, 1.0, 1.0), dilation=dilation, min_voxels=min_voxels,
                               hd95_penalty_mm=50.0)
        assert out["lesions"] == len(dices) and out["fp_components"] == fp
        assert sorted(e["dice"] for e in out["per_lesion"]) == pytest.approx(dices)
        assert out["found"] == sum(d > 0 for d in dices)
        assert out["lesionwise_dice"] == pytest.approx(sum(dices) / (len(dices) + fp) if dices or fp else 1.0)
        missed = sum(d == 0 for d in dices)
        assert out["lesionwise_hd95_mm"] == pytest.approx(
            (sum(hd95s) + 50.0 * (missed + fp)) / (len(dices) + fp) if dices or fp else 0.0)


def test_dice_budget_hand_built():
    p, r = three_lesions()  # reference 25 voxels (A 8, B 16, C 1), prediction 24 (A 8, half of B 8, FP 8)
    budget = M.lesion_metrics(p, r, (1.0, 2.0, 0.5))["dice_budget"]
    assert budget["dice"] == pytest.approx(2 * 16 / (25 + 24))
    # A and B drawn exactly, the FP component kept: 32 predicted, 24 of them right
    assert budget["borders_exact"] == pytest.approx(2 * 24 / (25 + 32))
    assert budget["missed_added"] == pytest.approx(2 * 17 / (25 + 25))  # C added
    assert budget["no_fp"] == pytest.approx(2 * 16 / (25 + 16))
    # an over-drawn lesion: its component (a 4^3 cube around a 3^3 lesion) gives way to the lesion
    r3 = np.zeros((20, 20, 20), bool)
    p3 = np.zeros_like(r3)
    r3[2:5, 2:5, 2:5] = True
    p3[2:6, 2:6, 2:6] = True
    r3[10:12, 10:12, 10:12] = True  # missed, 8 voxels
    p3[15:17, 15:17, 15:17] = True  # FP, 8 voxels
    over = M.lesion_metrics(p3, r3, (1, 1, 1))["dice_budget"]
    assert over["dice"] == pytest.approx(2 * 27 / (35 + 72))
    assert over["borders_exact"] == pytest.approx(2 * 27 / (35 + 35))
    assert over["missed_added"] == pytest.approx(2 * 35 / (35 + 80))
    assert over["no_fp"] == pytest.approx(2 * 27 / (35 + 64))
    # C (1 voxel) left out: it stays missed; A and the FP component (8 voxels) left out too: they stay
    left_out = M.lesion_metrics(p, r, (1, 1, 1), min_voxels=2)["dice_budget"]
    assert left_out["missed_added"] == pytest.approx(budget["dice"])
    fewer = M.lesion_metrics(p, r, (1, 1, 1), min_voxels=9)["dice_budget"]
    assert fewer["borders_exact"] == pytest.approx(2 * 24 / (25 + 32))  # only B redrawn; A was already exact
    assert fewer["no_fp"] == pytest.approx(budget["dice"])
    # a component matched with a lesion it does not overlap (dilation) goes with the borders
    r2 = np.zeros((12, 12, 12), bool)
    r2[2:4, 2:4, 2:4] = True
    r2[2:4, 2:4, 5:7] = True
    p2 = np.zeros_like(r2)
    p2[2:4, 2:4, 7:9] = True
    near = M.lesion_metrics(p2, r2, (1, 1, 1), dilation=1)["dice_budget"]
    assert (near["dice"], near["borders_exact"], near["no_fp"]) == (0.0, 0.0, 0.0)
    assert near["missed_added"] == pytest.approx(2 * 16 / (16 + 24))
    z = np.zeros((6, 6, 6), bool)
    assert M.lesion_metrics(z, z, (1, 1, 1))["dice_budget"] == {
        "dice": 1.0, "borders_exact": 1.0, "missed_added": 1.0, "no_fp": 1.0}


def brute_force_budget(p, r, dilation, min_voxels):
    """The Dice budget on scipy.ndimage, one lesion and one component at a time."""
    kept, comps, fp = scipy_matching(p, r, dilation, min_voxels)

    def dice(a):
        return 1.0 if not (a.any() or r.any()) else 2 * np.sum(a & r) / (a.sum() + r.sum())

    borders, missed_added, no_fp = p.copy(), p.copy(), p.copy()
    for lesion, hits in kept:
        for c in hits:
            borders &= comps != c
        if not np.any(lesion & p):
            missed_added |= lesion
    for lesion, _ in kept:  # then the found lesions, exactly
        if np.any(lesion & p):
            borders |= lesion
    for c in fp:
        no_fp &= comps != c
    return {"dice": dice(p), "borders_exact": dice(borders), "missed_added": dice(missed_added), "no_fp": dice(no_fp)}


@pytest.mark.parametrize("seed", range(4))
def test_dice_budget_agrees_with_a_brute_force_scipy_implementation(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (14, 18, 16)
    r = ndimage.binary_opening(rng.random(shape) < 0.12 + 0.04 * (seed % 3))
    r |= rng.random(shape) < 0.01
    p = np.roll(r, 1, axis=seed % 3) & (rng.random(shape) < 0.9)
    p |= rng.random(shape) < 0.01
    for dilation, min_voxels in ((0, 0), (1, 0), (0, 3), (2, 2)):
        got = M.lesion_metrics(p, r, (1.0, 1.0, 1.0), dilation=dilation, min_voxels=min_voxels)["dice_budget"]
        want = brute_force_budget(p, r, dilation, min_voxels)
        assert got == pytest.approx(want)
        assert got["dice"] <= min(got["borders_exact"], got["missed_added"], got["no_fp"]) + 1e-12


def test_pooling_and_size_bins():
    p, r = three_lesions()
    a = M.lesion_metrics(p, r, (1, 1, 1))  # lesions of 16, 8 and 1 voxels = 0.016, 0.008, 0.001 ml
    b = M.lesion_metrics(np.zeros_like(p), r, (1, 1, 1))  # all three missed, no FP
    pooled = M.pool_lesions([a, b])
    assert (pooled["lesions"], pooled["found"], pooled["missed"], pooled["fp_components"]) == (6, 2, 4, 1)
    assert pooled["lesion_sensitivity"] == pytest.approx(2 / 6)
    assert pooled["lesion_f1"] == pytest.approx(4 / (4 + 4 + 1))
    assert pooled["lesionwise_dice"] == pytest.approx((a["lesionwise_dice"] + 0.0) / 2)
    assert pooled["lesionwise_hd95_mm"] == pytest.approx((a["lesionwise_hd95_mm"] + 374.0) / 2)
    assert "lesionwise_hd95_mm" not in M.pool_lesions([a, M.lesion_metrics(p, r, (1, 1, 1), with_hd95=False)])
    assert pooled["dice_budget"] == pytest.approx({k: (a["dice_budget"][k] + b["dice_budget"][k]) / 2
                                                   for k in ("dice", "borders_exact", "missed_added", "no_fp")})
    assert pooled["dice_budget"]["missed_added"] == pytest.approx((a["dice_budget"]["missed_added"] + 1.0) / 2)
    bins = M.lesions_by_size([a, b], [0.005, 0.01])
    assert [(x["lesions"], x["found"]) for x in bins] == [(2, 0), (2, 1), (2, 1)]
    assert bins[0]["sensitivity"] == 0.0 and bins[0]["dice_found"] is None
    assert bins[2]["dice_found"] == pytest.approx(2 / 3) and math.isinf(bins[2]["max_ml"])
    assert M.lesions_by_size([a], [100.0])[1] == {"min_ml": 100.0, "max_ml": math.inf, "lesions": 0,
                                                  "found": 0, "sensitivity": None, "dice_found": None}


def write(path, arr, spacing=(2.0, 1.0, 3.0), origin=(10.0, -5.0, 7.0)):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def test_cli_lesions_table_and_json(tmp_path, capsys):
    p, r = three_lesions()
    pred, ref = write(tmp_path / "p.nii.gz", p), write(tmp_path / "r.nii.gz", r)
    out_json = tmp_path / "res.json"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--lesion-min-voxels", "2",
                 "--lesion-sizes", "0.05", "--json", str(out_json)]) == 0  # an option implies --lesions
    table = capsys.readouterr().out
    assert "lesion-wise_Dice" in table and "detection by lesion volume" in table
    assert "lesion-wise_HD95" in table and "374 for each missed lesion and FP component" in table
    assert "under 0.05 ml" in table and "0.05 ml or more" in table
    data = json.loads(out_json.read_text())
    les = data["cases"][0]["lesions"]["1"]
    assert (les["lesions"], les["found"], les["fp_components"]) == (2, 2, 1)  # 6 ml voxels: 16 -> 0.096 ml
    # the centre of lesion B (array index z 11.5, y 2.5, x 2.5) in physical coordinates
    assert les["per_lesion"][0]["centre_mm"] == pytest.approx([10.0 + 2.5 * 2.0, -5.0 + 2.5 * 1.0, 7.0 + 11.5 * 3.0])
    assert data["lesion_settings"] == {"dilation": 0, "min_voxels": 2, "sizes_ml": [0.05], "hd95_penalty_mm": 374.0}
    assert data["lesion_mean"]["1"]["lesions"] == 2
    # where the Dice is lost (C, 1 voxel, left out): A exact, B half drawn, one FP component of 8 voxels
    assert data["lesion_mean"]["1"]["dice_budget"] == pytest.approx(
        {"dice": 2 * 16 / 49, "borders_exact": 2 * 24 / 57, "missed_added": 2 * 16 / 49, "no_fp": 2 * 16 / 41})
    assert "where the Dice is lost" in table
    assert f"{2 * 16 / 49:.4f}         {2 * 24 / 57:.4f}" in table
    # A (0 mm) and B (HD95 of its missed half: 2 slices of 3 mm) found, the 8-voxel FP component penalized
    assert les["lesionwise_hd95_mm"] == pytest.approx((0.0 + 6.0 + 374.0) / 3)
    assert data["lesion_mean"]["1"]["lesionwise_hd95_mm"] == pytest.approx(les["lesionwise_hd95_mm"])
    assert DEFAULT_LESION_HD95_PENALTY_MM == M.BRATS_HD95_PENALTY_MM  # the CLI's default is the library's
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--lesion-hd95-penalty", "20",
                 "--json", "-"]) == 0
    penalized = json.loads(capsys.readouterr().out)
    assert penalized["lesion_settings"]["hd95_penalty_mm"] == 20.0  # the option implies --lesions too
    assert penalized["cases"][0]["lesions"]["1"]["lesionwise_hd95_mm"] == pytest.approx((0.0 + 6.0 + 20.0 + 20.0) / 4)
    assert [b["lesions"] for b in data["lesion_sizes"]["1"]] == [1, 1]  # 0.048 ml and 0.096 ml
    # without the option, the output has no lesion part
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--json", "-"]) == 0
    assert "lesions" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv, message", [
    (["--lesion-dilation", "-1"], "--lesion-dilation"),
    (["--lesion-min-voxels", "-3"], "--lesion-min-voxels"),
    (["--lesion-sizes", "0"], "--lesion-sizes"),
    (["--lesion-sizes", "1", "1"], "--lesion-sizes"),
    (["--lesion-hd95-penalty", "-5"], "--lesion-hd95-penalty"),
    (["--lesion-hd95-penalty", "inf"], "--lesion-hd95-penalty"),
])
def test_cli_bad_lesion_options_are_refused_before_writing(tmp_path, capsys, argv, message):
    p, r = three_lesions()
    pred, ref = write(tmp_path / "p.nii.gz", p), write(tmp_path / "r.nii.gz", r)
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--json", str(tmp_path / "o.json"), *argv])
    err = capsys.readouterr().err
    assert code != 0 and message in err
    assert not (tmp_path / "o.json").exists()
