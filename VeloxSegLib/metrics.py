"""Segmentation metrics: Dice, HD95 (mm), precision, recall, autoPET FP/FN volumes (ml).

Definitions, including the values for empty masks, are in ``docs/metrics.md``. In short, for
one label with predicted mask P and reference mask R:

- ``dice`` = 2|P∩R| / (|P|+|R|); ``precision`` = |P∩R| / |P|; ``recall`` = |P∩R| / |R|. A 0/0
  is 1.0 when both masks are empty (nothing to find, nothing found) and 0.0 otherwise.
- ``hd95_mm``: the symmetric 95th-percentile Hausdorff distance between the surface voxels of
  P and R (a surface voxel is a mask voxel with a face neighbour outside the mask or the
  image), in mm using the voxel spacing; the same definition as MONAI's
  ``compute_hausdorff_distance(percentile=95)``. Both empty: 0.0; exactly one empty:
  ``inf`` (written as ``null`` in JSON).
- ``fp_volume_ml``: volume of the predicted connected components that do not touch R;
  ``fn_volume_ml``: volume of the reference components that do not touch P (autoPET). Components
  are 26-connected (SimpleITK ``ConnectedComponent(fullyConnected=True)``).

Per lesion (:func:`lesion_metrics`): the reference's connected components matched with the
prediction's, as in the BraTS 2023 lesion-wise Dice: each lesion's own Dice, how many lesions
were found and missed, false-positive components, lesion sensitivity and F1.

Arrays are indexed like ``SimpleITK.GetArrayFromImage`` (z, y, x) and ``spacing`` is given in
the array's axis order; the ``*_images`` functions take SimpleITK images and handle the order.
Needs numpy and SimpleITK only (no scipy, no torch).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = [
    "METRIC_KEYS",
    "paired_comparison",
    "confusion_counts",
    "dice_score",
    "precision_score",
    "recall_score",
    "surface_voxels",
    "surface_distances",
    "hd95",
    "lesion_fp_fn_volumes",
    "label_metrics",
    "evaluate_arrays",
    "evaluate_images",
    "geometry_mismatch",
    "mean_metrics",
    "lesion_metrics",
    "pool_lesions",
    "lesions_by_size",
    "json_safe",
]

#: Keys of the per-label metric dictionaries, in display order.
METRIC_KEYS = ("dice", "hd95_mm", "precision", "recall", "fp_volume_ml", "fn_volume_ml",
               "pred_volume_ml", "ref_volume_ml")


def _bool(mask) -> np.ndarray:
    a = np.asarray(mask)
    return a if a.dtype == bool else a != 0


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def confusion_counts(pred_mask, ref_mask):
    """``(tp, fp, fn)`` voxel counts of two boolean masks of the same shape."""
    p, r = _bool(pred_mask), _bool(ref_mask)
    if p.shape != r.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {r.shape}")
    tp = int(np.count_nonzero(p & r))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp


def dice_score(pred_mask, ref_mask) -> float:
    """2|P∩R|/(|P|+|R|); 1.0 if both masks are empty, 0.0 if exactly one is."""
    tp, fp, fn = confusion_counts(pred_mask, ref_mask)
    return _ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0)


def precision_score(pred_mask, ref_mask) -> float:
    """|P∩R|/|P|; 1.0 if both masks are empty, 0.0 if only P is empty."""
    tp, fp, fn = confusion_counts(pred_mask, ref_mask)
    return _ratio(tp, tp + fp, tp + fp + fn == 0)


def recall_score(pred_mask, ref_mask) -> float:
    """|P∩R|/|R| (sensitivity); 1.0 if both masks are empty, 0.0 if only R is empty."""
    tp, fp, fn = confusion_counts(pred_mask, ref_mask)
    return _ratio(tp, tp + fn, tp + fp + fn == 0)


def surface_voxels(mask) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside the mask (or the array)."""
    m = _bool(mask)
    padded = np.pad(m, 1, constant_values=False)
    interior = m.copy()
    core = tuple(slice(1, -1) for _ in range(m.ndim))
    for axis in range(m.ndim):
        for step in (-1, 1):
            sl = list(core)
            sl[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            interior &= padded[tuple(sl)]
    return m & ~interior


def _bbox(mask: np.ndarray):
    idx = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        idx.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(idx)


def _distance_to(edges: np.ndarray, spacing: Sequence[float], at: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from each voxel of ``at`` to the nearest voxel centre of ``edges``."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(edges.view(np.uint8))
    img.SetSpacing([float(s) for s in reversed(spacing)])
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayViewFromImage(dist)[at]).astype(np.float64)


def _surfaces(a: np.ndarray, b: np.ndarray):
    box = _bbox(a | b)  # exact: every surface voxel lies in the union's bounding box
    # pad by one: the distance map needs background voxels even when the surface fills the box
    ea = np.pad(surface_voxels(a[box]), 1, constant_values=False)
    eb = np.pad(surface_voxels(b[box]), 1, constant_values=False)
    return ea, eb


def surface_distances(from_mask, to_mask, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``from_mask`` to the surface of ``to_mask``.

    Both masks must be non-empty. ``spacing`` is in the arrays' axis order.
    """
    a, b = _bool(from_mask), _bool(to_mask)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    if len(spacing) != a.ndim:
        raise ValueError(f"spacing needs {a.ndim} values, got {len(spacing)}")
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks")
    ea, eb = _surfaces(a, b)
    return _distance_to(eb, spacing, ea)


def hd95(pred_mask, ref_mask, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance in mm between the masks' surfaces.

    max(q(d(P→R)), q(d(R→P))) with q the ``percentile`` (linear interpolation, as
    ``numpy.percentile`` and ``torch.quantile``). Both masks empty: 0.0; one empty: ``inf``.
    """
    p, r = _bool(pred_mask), _bool(ref_mask)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return 0.0
    if not has_p or not has_r:
        return math.inf
    if len(spacing) != p.ndim or p.shape != r.shape:
        raise ValueError(f"masks {p.shape}, {r.shape} and spacing {tuple(spacing)} do not match")
    ep, er = _surfaces(p, r)
    d_pr = _distance_to(er, spacing, ep)
    d_rp = _distance_to(ep, spacing, er)
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def _components(mask: np.ndarray, fully_connected: bool) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    cc = sitk.ConnectedComponent(img, fully_connected)
    return sitk.GetArrayFromImage(cc)


def _unmatched_voxels(mask: np.ndarray, other: np.ndarray, fully_connected: bool) -> int:
    """Voxels of the components of ``mask`` that do not overlap ``other``."""
    if not mask.any():
        return 0
    if not other.any():
        return int(np.count_nonzero(mask))
    box = _bbox(mask)  # exact: every component of ``mask`` lies inside its bounding box
    mask, other = mask[box], other[box]
    cc = _components(mask, fully_connected).ravel()
    counts = np.bincount(cc)
    hit = np.unique(cc[(mask & other).ravel()])
    hit = hit[hit > 0]
    return int(counts[1:].sum() - counts[hit].sum())


def lesion_fp_fn_volumes(pred_mask, ref_mask, spacing: Sequence[float], fully_connected: bool = True):
    """autoPET ``(fp_volume_ml, fn_volume_ml)``.

    FP volume: total volume of predicted connected components with no voxel in the reference;
    FN volume: total volume of reference components with no voxel in the prediction. Volumes in
    ml (1 ml = 1000 mm^3). An empty reference makes the whole prediction FP; an empty
    prediction makes the whole reference FN.
    """
    p, r = _bool(pred_mask), _bool(ref_mask)
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return (_unmatched_voxels(p, r, fully_connected) * voxel_ml,
            _unmatched_voxels(r, p, fully_connected) * voxel_ml)


def label_metrics(pred_mask, ref_mask, spacing: Sequence[float]) -> Dict[str, float]:
    """All metrics of one label (keys ``METRIC_KEYS``); see the module docstring."""
    p, r = _bool(pred_mask), _bool(ref_mask)
    tp, fp, fn = confusion_counts(p, r)
    both_empty = tp + fp + fn == 0
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    fp_ml, fn_ml = lesion_fp_fn_volumes(p, r, spacing)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "hd95_mm": hd95(p, r, spacing),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
        "fp_volume_ml": fp_ml,
        "fn_volume_ml": fn_ml,
        "pred_volume_ml": (tp + fp) * voxel_ml,
        "ref_volume_ml": (tp + fn) * voxel_ml,
    }


def evaluate_arrays(pred, ref, labels: Iterable[int], spacing: Sequence[float]) -> Dict[int, Dict[str, float]]:
    """``{label: label_metrics}`` for integer label maps ``pred`` and ``ref`` of the same shape."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label map shapes differ: {pred.shape} vs {ref.shape}")
    return {int(lab): label_metrics(pred == lab, ref == lab, spacing) for lab in labels}


def _fmt(values, digits=6) -> str:
    return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"


def geometry_mismatch(a, b, tol: float = 1e-4) -> Optional[str]:
    """Describe how two SimpleITK images' grids differ (size, spacing, origin, direction), or None.

    Spacing is compared relatively (``tol``), origin to ``10*tol`` of the smallest spacing,
    direction cosines absolutely (``tol``).
    """
    if a.GetDimension() != b.GetDimension():
        return f"dimension {a.GetDimension()} vs {b.GetDimension()}"
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        return f"size {tuple(a.GetSize())} vs {tuple(b.GetSize())}"
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if np.any(np.abs(sa - sb) > tol * np.maximum(sa, sb)):
        return f"spacing {_fmt(sa)} vs {_fmt(sb)}"
    oa, ob = np.array(a.GetOrigin()), np.array(b.GetOrigin())
    if np.any(np.abs(oa - ob) > 10 * tol * float(max(sa.min(), 1e-6))):  # 1/1000 voxel by default
        return f"origin {_fmt(oa)} vs {_fmt(ob)}"
    da, db = np.array(a.GetDirection()), np.array(b.GetDirection())
    if np.any(np.abs(da - db) > tol):
        return f"direction {_fmt(da, 4)} vs {_fmt(db, 4)}"
    return None


def evaluate_images(pred_img, ref_img, labels: Iterable[int]) -> Dict[int, Dict[str, float]]:
    """Metrics of SimpleITK label images on the same grid (see :func:`geometry_mismatch`)."""
    import SimpleITK as sitk

    problem = geometry_mismatch(pred_img, ref_img)
    if problem:
        raise ValueError(f"prediction and reference grids differ: {problem}")
    spacing = tuple(reversed(ref_img.GetSpacing()))
    return evaluate_arrays(sitk.GetArrayViewFromImage(pred_img), sitk.GetArrayViewFromImage(ref_img), labels, spacing)


def mean_metrics(per_case: List[Dict[int, Dict[str, float]]]) -> Dict[int, Dict[str, Optional[float]]]:
    """Per-label means over cases.

    Every metric is the plain mean over cases, except ``hd95_mm``, averaged over the cases where
    it is finite (``hd95_cases`` says how many; ``None`` if none). ``cases`` counts the cases.
    """
    out: Dict[int, Dict[str, Optional[float]]] = {}
    seen = {lab: None for case in per_case for lab in case}  # label values, then named regions
    labels = sorted(k for k in seen if not isinstance(k, str)) + [k for k in seen if isinstance(k, str)]
    for lab in labels:
        rows = [case[lab] for case in per_case if lab in case]
        entry: Dict[str, Optional[float]] = {}
        for key in METRIC_KEYS:
            vals = [float(r[key]) for r in rows]
            if key == "hd95_mm":
                finite = [v for v in vals if math.isfinite(v)]
                entry[key] = float(np.mean(finite)) if finite else None
                entry["hd95_cases"] = len(finite)
            else:
                entry[key] = float(np.mean(vals)) if vals else None
        entry["cases"] = len(rows)
        out[lab] = entry
    return out


# --------------------------------------------------------------------------- lesion-wise

def _label_boxes(labels: np.ndarray, count: int):
    """Bounding boxes (tuples of slices) of labels 1..count of an integer array; None if absent."""
    import SimpleITK as sitk

    boxes = [None] * (count + 1)
    if count == 0:
        return boxes
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.GetImageFromArray(labels.astype(np.uint32)))
    nd = labels.ndim
    for lab in stats.GetLabels():
        bb = stats.GetBoundingBox(int(lab))  # x, y, z index then sizes (image order)
        start, size = bb[:nd][::-1], bb[nd:][::-1]
        boxes[int(lab)] = tuple(slice(int(a), int(a) + int(n)) for a, n in zip(start, size))
    return boxes


def _union_box(boxes):
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0])))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    out = sitk.BinaryDilate(img, [int(radius)] * mask.ndim, sitk.sitkBox, 0, 1)
    return sitk.GetArrayFromImage(out).astype(bool)


#: BraTS 2023's lesion-wise HD95 for a missed lesion or a false-positive component, in mm (about the
#: diagonal of their 240 x 240 x 155 volume at 1 mm).
BRATS_HD95_PENALTY_MM = 374.0


def lesion_metrics(pred_mask, ref_mask, spacing: Sequence[float], dilation: int = 0, min_voxels: int = 0,
                   with_hd95: bool = True, hd95_penalty_mm: float = BRATS_HD95_PENALTY_MM) -> Dict[str, object]:
    """Lesion-wise scores of one label: the reference's lesions matched with the prediction's.

    Lesions are the 26-connected components of the reference. With ``dilation`` d > 0, lesions
    closer than about 2d voxels are one lesion: the reference is dilated by a (2d+1)^3 box, and
    each component of the dilated mask, intersected with the reference, is a lesion (the BraTS
    2023 rule; d = 1 is their 3x3x3 dilation). A predicted component (26-connected) is matched
    with every lesion whose dilated region it touches; a lesion's Dice is taken against the
    union of its matched components (whole). A lesion is *found* when that Dice is above 0. A
    predicted component that touches no lesion region is a false positive (FP) component.
    Lesions and FP components of fewer than ``min_voxels`` voxels are left out (BraTS: 50, or 2
    for metastases); a component matched only with left-out lesions is neither.

    Returns ``lesions``, ``found``, ``missed``, ``fp_components`` (counts); ``lesion_sensitivity``
    = found / lesions; ``lesion_f1`` = 2 found / (2 found + missed + FP); ``lesionwise_dice`` =
    the sum of the lesions' Dice (0 for a missed one) over (lesions + FP components), the BraTS
    2023 lesion-wise Dice. A 0/0 is 1.0 when there is nothing to find and nothing predicted,
    else 0.0. With ``with_hd95`` also ``lesionwise_hd95_mm``: the sum of the found lesions' HD95
    and ``hd95_penalty_mm`` for each missed lesion and each FP component, over (lesions + FP
    components), the BraTS 2023 lesion-wise HD95 (0.0 when there is nothing to find and nothing
    predicted). ``per_lesion``: for each lesion, largest first, ``voxels``, ``volume_ml``,
    ``dice``, ``found``, ``hd95_mm`` (against its matched components; ``inf`` when missed; only
    with ``with_hd95``) and ``centroid`` (the voxel-index centroid in the arrays' axis order).

    ``dice_budget``: where the case's (voxel) Dice is lost. ``dice`` is the Dice of the whole
    masks; each other key is the Dice with one kind of error undone and the others left as they
    are: ``borders_exact``, every predicted component matched with a lesion replaced by the
    reference voxels of the lesions found; ``missed_added``, the missed lesions added to the
    prediction; ``no_fp``, the FP components removed. Left-out lesions and components stay as
    they are in all three.
    """
    p, r = _bool(pred_mask), _bool(ref_mask)
    if p.shape != r.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {r.shape}")
    if len(spacing) != r.ndim:
        raise ValueError(f"spacing needs {r.ndim} values, got {len(spacing)}")
    if int(dilation) < 0 or int(min_voxels) < 0:
        raise ValueError(f"dilation and min_voxels must be >= 0, got {dilation} and {min_voxels}")
    if not (math.isfinite(float(hd95_penalty_mm)) and float(hd95_penalty_mm) >= 0):
        raise ValueError(f"hd95_penalty_mm must be a finite distance >= 0, got {hd95_penalty_mm}")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    if r.any():
        regions = _components(_dilate(r, dilation) if dilation else r, True)
    else:
        regions = np.zeros(r.shape, np.int32)
    n_regions = int(regions.max()) if regions.size else 0
    lesion_ids = np.where(r, regions, 0)
    lesion_sizes = np.bincount(lesion_ids.ravel(), minlength=n_regions + 1)
    comps = _components(p, True) if p.any() else np.zeros(p.shape, np.int32)
    n_comps = int(comps.max()) if comps.size else 0
    comp_sizes = np.bincount(comps.ravel(), minlength=n_comps + 1)
    touching = (regions > 0) & (comps > 0)
    pairs = np.unique(regions[touching].astype(np.int64) * (n_comps + 1) + comps[touching])
    matched: Dict[int, List[int]] = {}
    for code in pairs.tolist():
        matched.setdefault(code // (n_comps + 1), []).append(code % (n_comps + 1))
    touched = {c for cs in matched.values() for c in cs}
    region_boxes = _label_boxes(regions, n_regions)
    comp_boxes = _label_boxes(comps, n_comps)
    per_lesion = []
    found_of: Dict[int, bool] = {}
    for g in range(1, n_regions + 1):
        size = int(lesion_sizes[g])
        if size == 0 or size < min_voxels:
            continue
        cs = matched.get(g, [])
        box = _union_box([region_boxes[g]] + [comp_boxes[c] for c in cs])
        les = lesion_ids[box] == g
        union = np.isin(comps[box], cs) if cs else np.zeros(les.shape, bool)
        inter = int(np.count_nonzero(les & union))
        dice = 2.0 * inter / (size + int(np.count_nonzero(union)))
        found_of[g] = inter > 0
        entry = {"voxels": size, "volume_ml": size * voxel_ml, "dice": dice, "found": inter > 0,
                 "centroid": [float(np.mean(ax)) + float(b.start) for ax, b in zip(np.nonzero(les), box)]}
        if with_hd95:
            entry["hd95_mm"] = hd95(union, les, spacing) if inter > 0 else math.inf
        per_lesion.append(entry)
    per_lesion.sort(key=lambda e: -e["voxels"])
    fp_ids = [c for c in range(1, n_comps + 1) if c not in touched and comp_sizes[c] >= max(1, min_voxels)]
    fp = len(fp_ids)
    n = len(per_lesion)
    found = sum(1 for e in per_lesion if e["found"])
    nothing = n == 0 and fp == 0
    out = {
        "lesions": n, "found": found, "missed": n - found, "fp_components": fp,
        "lesion_sensitivity": _ratio(found, n, nothing),
        "lesion_f1": _ratio(2 * found, 2 * found + (n - found) + fp, nothing),
        "lesionwise_dice": _ratio(sum(e["dice"] for e in per_lesion), n + fp, nothing),
    }
    if with_hd95:
        penalized = float(hd95_penalty_mm) * ((n - found) + fp)
        total = sum(e["hd95_mm"] for e in per_lesion if e["found"]) + penalized
        out["lesionwise_hd95_mm"] = 0.0 if nothing else total / (n + fp)
    found_ids = [g for g, hit in found_of.items() if hit]
    missed_ids = [g for g, hit in found_of.items() if not hit]
    matched_comps = sorted({c for g in found_of for c in matched.get(g, [])})
    out["dice_budget"] = _dice_budget(p, r, comps, lesion_ids, found_ids, missed_ids, matched_comps, fp_ids)
    out["per_lesion"] = per_lesion
    return out


def _dice_budget(p, r, comps, lesion_ids, found_ids, missed_ids, matched_comps, fp_comps) -> Dict[str, float]:
    """The case's Dice and what it would be with one kind of error undone (see lesion_metrics)."""
    def isin(labels, ids):
        return np.isin(labels, ids) if ids else np.zeros(labels.shape, bool)

    borders = (p & ~isin(comps, matched_comps)) | isin(lesion_ids, found_ids)
    return {"dice": dice_score(p, r), "borders_exact": dice_score(borders, r),
            "missed_added": dice_score(p | isin(lesion_ids, missed_ids), r),
            "no_fp": dice_score(p & ~isin(comps, fp_comps), r)}


def pool_lesions(per_case: List[Dict[str, object]]) -> Dict[str, Optional[float]]:
    """Lesion counts summed over cases, the pooled sensitivity and F1 from them, and the mean over
    cases of the lesion-wise Dice and (where every case has them) the lesion-wise HD95 and each
    value of the Dice budget (``cases`` says how many)."""
    if not per_case:
        return {"cases": 0}
    tot = {k: int(sum(int(c[k]) for c in per_case)) for k in ("lesions", "found", "missed", "fp_components")}
    nothing = tot["lesions"] == 0 and tot["fp_components"] == 0
    tot["lesion_sensitivity"] = _ratio(tot["found"], tot["lesions"], nothing)
    tot["lesion_f1"] = _ratio(2 * tot["found"], 2 * tot["found"] + tot["missed"] + tot["fp_components"], nothing)
    tot["lesionwise_dice"] = float(np.mean([float(c["lesionwise_dice"]) for c in per_case]))
    if all("dice_budget" in c for c in per_case):
        tot["dice_budget"] = {k: float(np.mean([float(c["dice_budget"][k]) for c in per_case]))
                              for k in ("dice", "borders_exact", "missed_added", "no_fp")}
    if all("lesionwise_hd95_mm" in c for c in per_case):
        tot["lesionwise_hd95_mm"] = float(np.mean([float(c["lesionwise_hd95_mm"]) for c in per_case]))
    tot["cases"] = len(per_case)
    return tot


def lesions_by_size(per_case: List[Dict[str, object]], edges_ml: Sequence[float]) -> List[Dict[str, object]]:
    """Detection by reference lesion volume, pooled over cases: for each bin [lo, hi) of
    ``edges_ml`` (ml; open below the first edge and above the last) the number of lesions, how
    many were found, the sensitivity (None for an empty bin) and the mean Dice of the found ones."""
    edges = sorted(float(e) for e in edges_ml)
    bounds = [0.0] + edges + [math.inf]
    lesions = [e for c in per_case for e in c["per_lesion"]]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = [e for e in lesions if lo <= e["volume_ml"] < hi]
        hits = [e for e in inside if e["found"]]
        rows.append({"min_ml": lo, "max_ml": hi, "lesions": len(inside), "found": len(hits),
                     "sensitivity": len(hits) / len(inside) if inside else None,
                     "dice_found": float(np.mean([e["dice"] for e in hits])) if hits else None})
    return rows


#: Up to this many paired cases the sign-flip test enumerates every flip (2^n); above, it samples.
EXACT_SIGN_FLIPS = 16


def paired_comparison(reference: Sequence[float], other: Sequence[float], resamples: int = 10000,
                      seed: int = 0, tie: float = 1e-9) -> Dict[str, float]:
    """How ``other`` scores against ``reference`` on the same cases (per-case scores in the same
    order; a higher score is better), as a reader of a comparison needs it:

    - ``mean_difference`` (other - reference) and its standard error ``se`` (sample sd / sqrt(n));
    - ``ci_low``, ``ci_high``: a 95% percentile bootstrap interval of the mean difference,
      resampling cases (``resamples`` draws, seeded: the same figures every run);
    - ``better``, ``worse``, ``tied``: cases where ``other`` scores higher, lower, or within ``tie``;
    - ``p_value``: two-sided paired sign-flip (permutation) test of a zero mean difference: each
      case's difference is equally likely to have either sign under the null. Exact (every one
      of the 2^n flips) for n <= :data:`EXACT_SIGN_FLIPS`, else ``resamples`` random flips with
      the add-one estimate (never 0). Distribution-free, as the Wilcoxon test, but on the mean.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two sequences of one length, got {a.shape} and {b.shape}")
    if a.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite and at least one pair")
    d = b - a
    n = d.size
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // n)  # resamples per block: bounded memory for large n
    boots = []
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))
        boots.append(d[idx].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(boots), [2.5, 97.5])
    observed = abs(d.sum()) - 1e-12 * max(1.0, float(np.abs(d).sum()))  # flips tying the observed count
    if n <= EXACT_SIGN_FLIPS:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        sums = (1 - 2 * bits) @ d
        p = float(np.mean(np.abs(sums) >= observed))
    else:
        hits = 0
        for start in range(0, resamples, block):
            signs = rng.choice(np.array([-1.0, 1.0]), size=(min(block, resamples - start), n))
            hits += int(np.count_nonzero(np.abs(signs @ d) >= observed))
        p = (hits + 1) / (resamples + 1)
    return {"n": int(n), "mean_difference": float(d.mean()),
            "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "ci_low": float(lo), "ci_high": float(hi), "better": int(np.count_nonzero(d > tie)),
            "worse": int(np.count_nonzero(d < -tie)), "tied": int(np.count_nonzero(np.abs(d) <= tie)),
            "p_value": p}


def json_safe(obj):
    """Copy of ``obj`` with NaN/±inf floats replaced by None and numpy scalars made plain."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj
