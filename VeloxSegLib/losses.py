"""Training losses: CE + soft Dice with deep supervision, reconstruction MSE and the SDKT Gram term.

Loss = sum_i w_i (CE + Dice)(logits_i, y) + lambda_rc * MSE(reconstruction, x)
       + lambda_sdkt * mean_m MSE(GM(teacher_m), GM(student))        (paper Eq. 10)
       [+ lambda_lesion * lesion-wise Dice(logits_0, y)]             (optional, off by default)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model.layers import gram_matrix  # noqa: F401  (re-exported: GM of the SDKT term)
from .model.outputs import TrainOutput


def one_hot(target: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """Integer target (N, ...) -> one-hot (N, K, ...) of ``dtype``."""
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).to(dtype)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                   smooth: float = 1e-5, batch: bool = False, onehot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - soft Dice over (foreground) classes, averaged over samples and classes.

    logits (N, K, ...) and integer target (N, ...) or (N, 1, ...). Same definition as MONAI's
    DiceLoss(softmax=True, to_onehot_y=True, include_background=False[, batch=True]).

    ``batch=True`` ("batch Dice", nnU-Net's choice for 3D) sums intersection and volumes over the
    whole batch before the ratio: a patch without foreground then still penalises false positives
    through the denominator instead of contributing a constant ~1 with no useful gradient, which
    matters for small, sparse targets such as PET lesions.

    ``onehot``: :func:`one_hot` of ``target``, when the caller already has it (the deep-supervision
    outputs share one target: building it once saved 3 of 4 one-hot passes over a 96^3 batch).
    """
    if target.dim() == logits.dim():
        target = target[:, 0]
    k = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    if onehot is None:
        onehot = one_hot(target, k, probs.dtype)
    if not include_background and k > 1:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, probs.dim()))
    if batch:
        dims = (0,) + dims
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = False,
                 onehot: Optional[torch.Tensor] = None) -> torch.Tensor:
    if target.dim() == logits.dim():
        target = target[:, 0]
    return (F.cross_entropy(logits.float(), target.long())
            + soft_dice_loss(logits, target, batch=batch_dice, onehot=onehot))


def lesion_components(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-voxel lesion ids (N, ...) int64 for an integer target (N, ...): the 26-connected
    components of every foreground class of every sample, numbered 1..L across the batch
    (0: background). Computed on the CPU (SimpleITK), as the metrics count lesions."""
    import numpy as np

    from .metrics import _components

    lab = target.detach().cpu().numpy()
    ids = np.zeros(lab.shape, dtype=np.int64)
    n = 0
    for b in range(lab.shape[0]):
        for c in range(1, num_classes):
            mask = lab[b] == c
            if not mask.any():
                continue
            cc = _components(mask, fully_connected=True).astype(np.int64)
            ids[b][mask] = cc[mask] + n
            n += int(cc.max())
    return torch.from_numpy(ids).to(target.device)


def lesion_dice_loss(logits: torch.Tensor, target: torch.Tensor, components: Optional[torch.Tensor] = None,
                     smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice of each lesion on its own, averaged over the lesions of the batch.

    Batch Dice counts voxels: a 20-voxel lesion missed whole costs a patch with a 2000-voxel
    lesion 1% of its Dice. Here every connected component (lesion) k of class c weighs the
    same, as in the "blob loss" of Kofler et al. (IPMI 2023): its Dice is taken over its sample
    with the other lesions of class c masked out, so the class-c probability it is scored on
    is its own plus every false positive of the sample,

        Dice_k = 2 sum_{v in k} p_c(v) / (|k| + sum_v p_c(v) - sum_{v in other lesions of c} p_c(v)).

    logits (N, K, ...), integer target (N, ...) or (N, 1, ...); ``components``: the output of
    :func:`lesion_components` (computed when not given). A batch without lesions gives 0.
    """
    if target.dim() == logits.dim():
        target = target[:, 0]
    n, k = logits.shape[:2]
    if components is None:
        components = lesion_components(target, k)
    num = int(components.max()) if components.numel() else 0
    if num == 0:
        return logits.sum() * 0.0
    probs = logits.float().softmax(dim=1)
    # the probability of each voxel's own class (0 where background: such voxels have id 0)
    own = probs.gather(1, target.long().clamp(min=0).unsqueeze(1))[:, 0]
    ids = components.reshape(-1)
    inside = torch.zeros(num + 1, dtype=probs.dtype, device=probs.device).index_add_(0, ids, own.reshape(-1))[1:]
    size = torch.bincount(ids, minlength=num + 1)[1:].to(probs.dtype)
    # per lesion: its sample and class, then that sample's total class probability and the
    # probability on every lesion of that class in the sample
    flat_target = target.reshape(n, -1)
    first = torch.zeros(num + 1, dtype=torch.long, device=probs.device)
    first.scatter_(0, ids, torch.arange(ids.numel(), device=probs.device))  # any voxel of each lesion
    first = first[1:]
    sample = first // flat_target.shape[1]
    cls = flat_target.reshape(-1)[first].long()
    total = probs.flatten(2).sum(-1)  # (N, K)
    on_class = torch.zeros(n * k, dtype=probs.dtype, device=probs.device)
    on_class.index_add_(0, sample * k + cls, inside)
    others = on_class[sample * k + cls] - inside
    denom = size + total[sample, cls] - others
    return (1.0 - (2.0 * inside + smooth) / (denom + smooth)).mean()


def deep_supervision_weights(n: int, weights: Optional[Sequence[float]] = None) -> list:
    """Normalized weights (equal by default, as the reference's (1, 1, 1, 1)).

    Given weights are matched to the heads from full resolution down: extra weights are dropped
    and heads without a weight get 0 (so one setting serves networks with 1-4 heads).
    """
    w = [1.0] * n if weights is None else [float(v) for v in weights][:n]
    w += [0.0] * (n - len(w))
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"need {n} deep-supervision weights with a positive sum, got {weights}")
    total = sum(w)
    return [v / total for v in w]


def sdkt_loss(student_gram: torch.Tensor, teacher_grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over modality teachers of MSE(GM(teacher_m), GM(student)) (no detaching, as published)."""
    return sum(F.mse_loss(student_gram, t) for t in teacher_grams) / len(teacher_grams)


@dataclass
class LossConfig:
    lambda_rc: float = 0.5
    lambda_sdkt: float = 2.0
    ds_weights: Optional[Sequence[float]] = None
    use_reconstruction: bool = True
    use_sdkt: bool = True
    batch_dice: bool = False
    lambda_lesion: float = 0.0  # weight of :func:`lesion_dice_loss` on the main output (0: off, the paper's)


class VeloxSegLoss(nn.Module):
    """The paper's training objective over a ``TrainOutput``; returns (total, parts)."""

    def __init__(self, config: Optional[LossConfig] = None, **kwargs):
        super().__init__()
        self.config = config or LossConfig(**kwargs)

    def forward(self, out: TrainOutput, target: torch.Tensor, image: Optional[torch.Tensor] = None):
        cfg = self.config
        weights = deep_supervision_weights(len(out.logits), cfg.ds_weights)
        if target.dim() == out.logits[0].dim():
            target = target[:, 0]
        target = target.long()
        onehot = one_hot(target, out.logits[0].shape[1])  # shared by every deep-supervision output
        seg = sum(w * dice_ce_loss(lg, target, cfg.batch_dice, onehot) for w, lg in zip(weights, out.logits))
        parts: Dict[str, float] = {"seg": float(seg.detach())}
        total = seg
        if cfg.lambda_lesion > 0:
            les = lesion_dice_loss(out.logits[0], target)
            parts["lesion"] = float(les.detach())
            total = total + cfg.lambda_lesion * les
        if cfg.use_reconstruction and out.reconstruction is not None and cfg.lambda_rc > 0:
            if image is None:
                raise ValueError("the reconstruction loss needs the input image")
            rc = F.mse_loss(out.reconstruction.float(), image.float())
            parts["rc"] = float(rc.detach())
            total = total + cfg.lambda_rc * rc
        if cfg.use_sdkt and out.teacher_grams and out.student_gram is not None and cfg.lambda_sdkt > 0:
            sd = sdkt_loss(out.student_gram.float(), [g.float() for g in out.teacher_grams])
            parts["sdkt"] = float(sd.detach())
            total = total + cfg.lambda_sdkt * sd
        parts["total"] = float(total.detach())
        return total, parts
