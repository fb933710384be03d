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
    return labels


__all__ = ["labels_from_logits", "probabilities_from_logits", "min_component_voxels", "remove_small_components"]
