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
