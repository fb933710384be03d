"""JL-guided convolution block (JLC, paper Sec. 3.2)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fastops


class JLConv(nn.Module):
    """Parallel grouped convolutions: y = x + sum_k GELU(IN(GroupConv_k(x))).

    With a single kernel size (preset S) the branch is the bare grouped conv, as in the
    reference implementation.
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[int], group_size: int):
        super().__init__()
        if channels % group_size:
            raise ValueError(f"group size {group_size} does not divide width {channels}")
        groups = channels // group_size
        self.kernel_sizes = tuple(kernel_sizes)
        self.branches = nn.ModuleList()
        for k in self.kernel_sizes:
            conv = nn.Conv3d(channels, channels, k, padding=k // 2, groups=groups)
            if len(self.kernel_sizes) > 1:
                self.branches.append(nn.Sequential(conv, nn.InstanceNorm3d(channels), nn.GELU()))
            else:
                self.branches.append(nn.Sequential(conv))

    fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fastops.use_fast(self.fast, x):
            out = x
            for branch in self.branches:
                out = out + branch(x)
            return out
        out = None
        for branch in self.branches:
            y = self._branch_fast(branch, x)
            out = x + y if out is None else out.add_(y)
        return out

    @staticmethod
    def _branch_fast(branch: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        conv = branch[0]
        if conv.kernel_size == (1, 1, 1):
            # grouped 1x1 conv as one dense GEMM with a block-diagonal weight
            dense = fastops.cached(conv, "block_diagonal", (conv.weight,),
                                   lambda: fastops.block_diagonal(conv.weight, conv.groups))
            y = fastops.pointwise(x, dense, conv.bias)
        else:
            y = fastops.grouped_conv(conv, x)
        if len(branch) > 1:  # instance norm, GELU
            y = fastops.gelu_(fastops.instance_norm(branch[1], y))
        return y


class JLCBlock(nn.Module):
    """JLConv, then out = y + Dropout(Conv1x1(GELU(Conv1x1(IN(y)))))."""

    def __init__(self, channels: int, kernel_sizes: Sequence[int], group_size: int, expansion: int,
                 dropout: float = 0.0):
        super().__init__()
        self.conv = JLConv(channels, kernel_sizes, group_size)
        self.norm = nn.InstanceNorm3d(channels)
        self.fc1 = nn.Conv3d(channels, channels * expansion, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(channels * expansion, channels, 1)
        self.drop = nn.Dropout(dropout)

    fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if fastops.use_fast(self.fast, x):
            hidden = fastops.gelu_(fastops.pointwise(fastops.instance_norm(self.norm, y), self.fc1.weight,
                                                     self.fc1.bias))
            return fastops.pointwise(hidden, self.fc2.weight, self.fc2.bias, residual=y)
        return y + self.drop(self.fc2(self.act(self.fc1(self.norm(y)))))


def jlc_stage(channels: int, depth: int, kernel_sizes: Sequence[int], group_size: int, expansion: int,
              dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(*[JLCBlock(channels, kernel_sizes, group_size, expansion, dropout) for _ in range(depth)])
