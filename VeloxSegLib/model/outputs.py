"""Named training outputs (no positional lists)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class TrainOutput:
    """What ``model.forward_train(x)`` returns.

    logits: deep-supervision logits, each (N, classes, *patch_size); index 0 is the main
        full-resolution output, the others are auxiliary heads upsampled to the patch size
        (VeloxSeg: up2, up3, enc4), ordered from fine to coarse.
    reconstruction: per-modality texture-teacher reconstructions concatenated on channels,
        (N, sum(in_channels), *patch_size); None for networks without teachers.
    student_gram: Gram matrix of the segmentation decoder's last level, (N, C, C); or None.
    teacher_grams: one Gram matrix per modality teacher, each (N, C, C); empty if none.
    """

    logits: List[torch.Tensor]
    reconstruction: Optional[torch.Tensor] = None
    student_gram: Optional[torch.Tensor] = None
    teacher_grams: List[torch.Tensor] = field(default_factory=list)
