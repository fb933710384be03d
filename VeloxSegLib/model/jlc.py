"""JL-guided convolution block (JLC, paper Sec. 3.2)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import fastops
from .layers import Conv1x1, Dropout


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
                out = out + self._branch_plain(branch, x)
            return out
        convolved = {}  # branch index -> its convolution, done through one FFT of x
        spatial = [i for i, b in enumerate(self.branches) if min(b[0].kernel_size) >= fastops.FFT_CONV_MIN_KERNEL]
        if spatial and self.fft and fastops.fft_conv_default(x):
            convs = [self.branches[i][0] for i in spatial]
            biases = [self._fast_bias(self.branches[i]) for i in spatial]
            convolved = dict(zip(spatial, fastops.grouped_conv_fft(x, convs, [self._spectrum(c) for c in convs],
                                                                   biases)))
        out = None
        for i, branch in enumerate(self.branches):
            y = self._branch_fast(branch, x, convolved.get(i))
            out = x + y if out is None else out.add_(y)
        return out

    #: the 5^3 branch through an FFT of the input where it is faster (see
    #: :func:`fastops.fft_conv_default` and :data:`fastops.FFT_CONV_MIN_KERNEL`); False keeps
    #: oneDNN's convolutions everywhere
    fft = True

    def _spectrum(self, conv: nn.Conv3d):
        return lambda size: fastops.cached(conv, f"fft{tuple(size)}", (conv.weight,),
                                           lambda: fastops.fft_kernel_spectrum(conv, size))

    @staticmethod
    def _branch_plain(branch: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """``branch(x)`` with autograd (training), its grouped convolution in the layout
        :func:`fastops.grouped_conv` picks: channels-last 3D on AVX2 CPUs, where forward and
        backward of the 5^3 branch at 24^3 take half the time (2026-12-04, batch 2, 2 threads: 106
        against 209 ms for both spatial branches)."""
        conv = branch[0]
        y = conv(x) if conv.kernel_size == (1, 1, 1) else fastops.grouped_conv(conv, x)
        for module in list(branch)[1:]:
            y = module(y)
        return y

    @staticmethod
    def _fast_bias(branch: nn.Sequential) -> Optional[torch.Tensor]:
        """The bias the fast path adds to the branch's convolution: none where the branch's
        instance norm cancels it (:func:`fastops.bias_before`), the conv's own in a bare branch."""
        conv = branch[0]
        return fastops.bias_before(branch[1], conv.bias) if len(branch) > 1 else conv.bias

    @staticmethod
    def _branch_fast(branch: nn.Sequential, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The branch on ``x``; ``y``, when given, is its convolution already computed."""
        conv = branch[0]
        if y is None and conv.kernel_size == (1, 1, 1):
            # grouped 1x1 conv as one dense GEMM with a block-diagonal weight
            dense = fastops.cached(conv, "block_diagonal", (conv.weight,),
                                   lambda: fastops.block_diagonal(conv.weight, conv.groups))
            y = fastops.pointwise(x, dense, JLConv._fast_bias(branch))
        elif y is None:
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
        self.fc1 = Conv1x1(channels, channels * expansion)
        self.act = nn.GELU()
        self.fc2 = Conv1x1(channels * expansion, channels)
        self.drop = Dropout(dropout)

    fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if fastops.use_fast(self.fast, x):
            hidden = fastops.gelu_(fastops.pointwise(fastops.instance_norm(self.norm, y), self.fc1.weight,
                                                     self.fc1.bias))
            # y is the JL convolution's fresh output: the second 1x1 conv accumulates into it
            return fastops.pointwise(hidden, self.fc2.weight, self.fc2.bias, residual=y, overwrite_residual=True)
        return y + self.drop(self.fc2(self.act(self.fc1(self.norm(y)))))


def jlc_stage(channels: int, depth: int, kernel_sizes: Sequence[int], group_size: int, expansion: int,
              dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(*[JLCBlock(channels, kernel_sizes, group_size, expansion, dropout) for _ in range(depth)])
