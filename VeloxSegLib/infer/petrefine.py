"""PET border refinement: redraw the border of each predicted lesion from the PET image.

The network finds a lesion; the border it draws comes from features on a quarter-resolution
grid. PET itself says where the uptake falls off. For every connected component of the
refined label (26-connected) of at least ``min_component_mm3``, on the output grid:

1. ``R``: the voxels within ``margin_mm`` of the component (the component included);
2. the background uptake ``b``: the median PET over a shell ``shell_mm`` thick outside ``R``
   (voxels of any predicted label left out); the peak ``m``: the mean of the component's
   ``peak_voxels`` highest PET values;
3. a voxel of ``R`` belongs to the lesion when
   ``p + weight * ((PET - b) / (m - b) - f) >= 0.5``, with ``p`` the network's
   probability of the label: a background-corrected fraction ``f`` of the peak (the adaptive
   threshold of PET practice, e.g. Nestle et al., J Nucl Med 2005), tilted by the network
   where the uptake is near the threshold. ``f`` depends on the component's volume ``V`` as
   drawn by the network, as PET practice's volume-dependent thresholds do (Erdi et al., Cancer
   1997): ``fraction_small`` up to ``small_mm3``, ``fraction`` from ``large_mm3`` on, and
   linear in ``log V`` between. The scanner's blur spreads a small lesion's uptake and lowers
   its peak, so its border lies at a larger fraction of that peak than a large lesion's;
4. in the lung, where CT draws the border PET blurs: a component whose background shell has a
   median CT below ``lung_hu`` (HU; None turns this off, and so does a missing CT) is drawn
   instead as the voxels of ``R`` that are tissue in CT (above ``lung_tissue_hu``) and have
   uptake of at least ``lung_fraction`` of the way from ``b`` to ``m``: the nodule as CT
   shows it, cut from the parenchyma and from tissue without its uptake;
5. of those voxels, the parts connected to the component are kept and their holes filled
   (a necrotic core colder than the rim stays inside the lesion).

Voxels of other labels are never taken; components without a usable background shell (fewer
than 5 voxels) or whose peak is not above the background are left as the network drew them.
The rule and its settings were chosen on validation phantoms (docs/models.md, stages 16, 23 and
24). Settings that give a ``fraction`` but no ``fraction_small`` (bundles written before stage
23) keep one fraction for every size and no lung rule.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import ConfigError

#: Settings of a bundle's ``inference.pet_refine`` (bundle.json) and their defaults.
PET_REFINE_DEFAULTS: Dict[str, Any] = {
    "label": 1,
    "fraction": 0.35,
    "fraction_small": 0.65,
    "small_mm3": 500.0,
    "large_mm3": 5000.0,
    "weight": 16.0,
    "margin_mm": 3.5,
    "shell_mm": 7.0,
    "peak_voxels": 3,
    "min_component_mm3": 0.0,
    "lung_hu": -500.0,
    "lung_tissue_hu": -400.0,
    "lung_fraction": 0.3,
}

_MIN_SHELL_VOXELS = 5


def pet_refine_settings(settings: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The defaults updated with ``settings`` (unknown keys are an error). Settings that give a
    ``fraction`` without a ``fraction_small`` mean one fraction for every size and no lung rule
    unless they give one (the rule of stage 16, which bundles written before stage 23 hold)."""
    out = dict(PET_REFINE_DEFAULTS)
    given = dict(settings or {})
    for key, value in given.items():
        if key not in out:
            raise ConfigError(f"unknown PET refinement setting {key!r} (known: {', '.join(out)})")
        out[key] = value
    if "fraction" in given and "fraction_small" not in given:
        out["fraction_small"] = out["fraction"]
        if "lung_hu" not in given:
            out["lung_hu"] = None
    return out


def fraction_for_volume(volume_mm3: float, settings: Mapping[str, Any]) -> float:
    """The fraction of the peak above the background at which a component of ``volume_mm3``
    (as the network drew it) is cut: ``fraction_small`` up to ``small_mm3``, ``fraction`` from
    ``large_mm3`` on, linear in the logarithm of the volume between."""
    small, large = float(settings["fraction_small"]), float(settings["fraction"])
    v0, v1 = float(settings["small_mm3"]), float(settings["large_mm3"])
    if volume_mm3 <= v0:
        return small
    if volume_mm3 >= v1:
        return large
    t = math.log(volume_mm3 / v0) / math.log(v1 / v0)
    return small + t * (large - small)


def _array(mask: np.ndarray, spacing) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing([float(s) for s in spacing])
    return img


def refine_with_pet(labels: np.ndarray, probability: np.ndarray, pet_of_box, spacing: Sequence[float],
                    settings: Optional[Mapping[str, Any]] = None, cancel=None, ct_of_box=None) -> Dict[str, int]:
    """Refine the borders of ``labels == settings["label"]`` in place (see the module docstring).

    labels: uint8 array (z, y, x) on the output grid; modified in place.
    probability: float array of the same shape: the network's probability of the label.
    pet_of_box: ``pet_of_box(lo, hi)`` -> float array of PET on the voxels ``lo..hi`` (x, y, z
        index, ``hi`` exclusive) of the output grid (the caller resamples its PET image there).
    spacing: (x, y, z) mm of the output grid.
    ct_of_box: the same for CT in HU, or None (then no component gets the lung rule).
    Returns counts: components refined (``lung``: of them, by the lung rule), skipped (too
    small, no shell, no uptake).
    """
    from .sliding_window import _check_cancel

    s = pet_refine_settings(settings)
    value = int(s["label"])
    spacing = tuple(float(v) for v in spacing)
    counts = {"refined": 0, "lung": 0, "too_small": 0, "no_background": 0, "no_uptake": 0}
    lung_hu = None if s["lung_hu"] is None or ct_of_box is None else float(s["lung_hu"])
    mask = labels == value
    if not mask.any():
        return counts
    cc = sitk.ConnectedComponent(_array(mask, spacing), True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    comp = sitk.GetArrayViewFromImage(cc)
    predicted = labels != 0  # the shells leave every predicted voxel out, as the network drew them
    voxel_mm3 = float(np.prod(spacing))
    reach = float(s["margin_mm"]) + float(s["shell_mm"])
    pad = [int(math.ceil(reach / sp)) + 1 for sp in spacing]
    size_xyz = labels.shape[::-1]
    for i in stats.GetLabels():
        _check_cancel(cancel)
        volume = stats.GetNumberOfPixels(i) * voxel_mm3
        if volume < float(s["min_component_mm3"]):
            counts["too_small"] += 1
            continue
        bb = stats.GetBoundingBox(i)  # x, y, z start, then sizes
        lo = [max(bb[d] - pad[d], 0) for d in range(3)]
        hi = [min(bb[d] + bb[d + 3] + pad[d], size_xyz[d]) for d in range(3)]
        box = tuple(slice(lo[d], hi[d]) for d in (2, 1, 0))
        C = comp[box] == i
        dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            _array(C, spacing), insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
        region = dist <= float(s["margin_mm"])
        shell = (dist > float(s["margin_mm"])) & (dist <= reach) & ~predicted[box]
        if int(shell.sum()) < _MIN_SHELL_VOXELS:
            counts["no_background"] += 1
            continue
        pet = np.asarray(pet_of_box(lo, hi), dtype=np.float32)
        background = float(np.median(pet[shell]))
        inside = np.sort(pet[C])[::-1]
        peak = float(inside[:max(int(s["peak_voxels"]), 1)].mean())
        if not peak > background:
            counts["no_uptake"] += 1
            continue
        relative = (pet - background) / (peak - background)
        ct = None
        if lung_hu is not None:
            ct = np.asarray(ct_of_box(lo, hi), dtype=np.float32)
            if not float(np.median(ct[shell])) < lung_hu:
                ct = None
        if ct is not None:  # in the lung: CT's tissue with the lesion's uptake
            lesion = (ct > float(s["lung_tissue_hu"])) & (relative >= float(s["lung_fraction"]))
        else:
            lesion = probability[box].astype(np.float32) + float(s["weight"]) * (
                relative - fraction_for_volume(volume, s)) >= 0.5
        sub = labels[box]
        lesion &= region & ((sub == 0) | (sub == value))
        parts = sitk.GetArrayFromImage(sitk.ConnectedComponent(_array(lesion, spacing), True))
        keep = np.unique(parts[C & lesion])
        lesion = np.isin(parts, keep[keep > 0])
        lesion = sitk.GetArrayFromImage(sitk.BinaryFillhole(_array(lesion, spacing), False, 1)) > 0
        if ct is not None and not lesion.any():  # nothing in CT's tissue: left as drawn
            counts["no_uptake"] += 1
            continue
        sub[C] = 0
        sub[lesion & ((sub == 0) | (sub == value))] = value
        counts["refined"] += 1
        counts["lung"] += ct is not None
    return counts


__all__ = ["PET_REFINE_DEFAULTS", "fraction_for_volume", "pet_refine_settings", "refine_with_pet"]
