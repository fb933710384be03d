"""Post-processing of label maps and window outputs."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch


def labels_from_logits(acc: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Arg-max over classes (dim 0) as uint8. The summed (not averaged) window outputs can be
    used directly: dividing by a positive weight does not change the arg-max, and voxels with
    no window (all zeros) come out as 0, the background."""
    if acc.shape[0] == 2:  # two classes: a comparison is cheaper than argmax's int64 result
        lab = acc[1] > acc[0]
    else:
        lab = torch.argmax(acc, dim=0)
    if out is None:
        return lab.to(torch.uint8)
    out.copy_(lab)
    return out


def probabilities_from_logits(acc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Softmax of the averaged logits, (K, ...) float32; uncovered voxels are pure background."""
    covered = weight > 0
    mean = acc / torch.clamp(weight, min=1e-12)
    prob = torch.softmax(mean, dim=0)
    if not bool(covered.all()):
        bg = torch.zeros_like(prob)
        bg[0] = 1.0
        prob = torch.where(covered.unsqueeze(0), prob, bg)
    return prob


def probabilities_to_grid(probs: torch.Tensor, source, target, num_classes: int, labels_out: np.ndarray,
                          probs_out: Optional[np.ndarray] = None, *, max_voxels: int = 1 << 23, cancel=None,
                          progress=None, score_out: Optional[np.ndarray] = None, score_class: int = 1) -> np.ndarray:
    """Resample class probabilities linearly from the ``source`` grid onto the ``target`` grid
    and take the arg-max there: the soft output is interpolated first and decided after, as
    nnU-Net does, instead of putting labels back by nearest neighbour (which copies each
    working voxel's decision onto the target voxels nearest to it, staircase and all).

    probs: (S, z, y, x) tensor on ``source`` (float16 or float32); S == ``num_classes``, or 1
    for two classes, holding the foreground probability alone (the background's is 1 - p, so
    the arg-max is p > 0.5, as the arg-max of the two logits on the working grid). Voxels of the
    target outside the source take pure background.
    labels_out: uint8 array of ``target.shape``, written (ties go to the lower class).
    probs_out: optional float32 array ``target.shape + (num_classes,)``, written.
    score_out: optional float array of ``target.shape``, written with the probability of class
    ``score_class`` alone (what the PET border refinement needs, without all K maps).

    The target is done in z-slabs of at most ``max_voxels`` voxels, each from the source
    slices around it only, so the extra memory is a few slab-sized float32 arrays however
    large the target grid is (a 0.8 mm CT). ``cancel`` is checked and ``progress(fraction)``
    called between slabs."""
    from ..data.alignment import index_box, resample_to_grid
    from .sliding_window import _check_cancel

    n_scores = int(probs.shape[0])
    if n_scores not in (num_classes, 1) or (n_scores == 1 and num_classes != 2):
        raise ValueError(f"{n_scores} probability maps for {num_classes} classes")
    if tuple(labels_out.shape) != tuple(target.shape):
        raise ValueError(f"labels_out has shape {labels_out.shape}, the target grid {target.shape}")
    nx, ny, nz = target.size
    step = max(1, int(max_voxels) // max(nx * ny, 1))
    for a in range(0, nz, step):
        _check_cancel(cancel)
        b = min(nz, a + step)
        slab = target.crop((0, 0, a), (nx, ny, b))
        lo, hi = index_box(source, slab)  # the source slices this slab's voxels lie between
        s0 = max(int(math.floor(lo[2])) - 1, 0)
        s1 = min(int(math.ceil(hi[2])) + 2, source.size[2])
        lab = labels_out[a:b]
        if s1 <= s0:  # the slab lies outside the source: background
            lab[...] = 0
            if probs_out is not None:
                probs_out[a:b] = 0.0
                probs_out[a:b, ..., 0] = 1.0
            if score_out is not None:
                score_out[a:b] = 0.0
            continue
        part = source.crop((0, 0, s0), (source.size[0], source.size[1], s1))
        best = None
        for k in range(n_scores):
            img = part.stamp(sitk.GetImageFromArray(probs[k, s0:s1].float().numpy()))
            background = k == 0 and n_scores == num_classes
            p = sitk.GetArrayFromImage(resample_to_grid(img, slab, default=1.0 if background else 0.0))
            del img
            if score_out is not None and (k == score_class if n_scores == num_classes else score_class == 1):
                score_out[a:b] = p
            if n_scores == 1:
                np.greater(p, 0.5, out=lab, casting="unsafe")
                if probs_out is not None:
                    probs_out[a:b, ..., 1] = p
                    probs_out[a:b, ..., 0] = 1.0 - p
            elif k == 0:
                best = p
                lab[...] = 0
            else:
                higher = p > best
                lab[higher] = k
                np.maximum(best, p, out=best)
            if probs_out is not None and n_scores > 1:
                probs_out[a:b, ..., k] = p
        if progress is not None:
            progress(b / nz)
    return labels_out


def min_component_voxels(min_volume_mm3: float, spacing: Sequence[float]) -> int:
    """Smallest component size (voxels) kept for a volume threshold in mm^3."""
    vox = float(np.prod(spacing))
    return max(int(math.ceil(min_volume_mm3 / vox - 1e-9)), 0)


def remove_small_components(labels: np.ndarray, spacing: Sequence[float], min_volume_mm3: float,
                            fully_connected: bool = True) -> np.ndarray:
    """Set to background every connected component (per label) smaller than ``min_volume_mm3``.

    labels: integer array (z, y, x), modified in place and returned. spacing: (x, y, z) mm.
    Components are 26-connected by default (``fully_connected``), per label value.
    """
    if not min_volume_mm3 or min_volume_mm3 <= 0:
        return labels
    min_vox = min_component_voxels(min_volume_mm3, spacing)
    if min_vox <= 1:
        return labels
    if not labels.any():
        return labels
    from ..metrics import _bbox

    full = labels
    # components are found inside the labels' bounding box only: on a whole-body CT at its
    # own resolution the label image of the whole scan would be 4 bytes a voxel
    labels = labels[_bbox(labels)]
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = (labels == value)
        img = sitk.GetImageFromArray(mask.view(np.uint8))
        img.SetSpacing([float(s) for s in spacing])
        cc = sitk.ConnectedComponent(img, fully_connected)
        kept = sitk.RelabelComponent(cc, minimumObjectSize=min_vox)
        drop = mask & (sitk.GetArrayViewFromImage(kept) == 0)
        labels[drop] = 0
    return full


__all__ = ["labels_from_logits", "probabilities_from_logits", "probabilities_to_grid", "min_component_voxels", "remove_small_components"]
