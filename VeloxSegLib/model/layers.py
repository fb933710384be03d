"""Small building blocks shared by the VeloxSeg streams and decoders."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fastops


class LayerNorm3d(nn.Module):
    """Layer norm over the channel axis of a (N, C, D, H, W) tensor (channels-first)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class Conv1x1(nn.Conv3d):
    """A dense 1x1x1 ``nn.Conv3d`` (same parameters and state-dict keys) that on the CPU runs as
    one batched GEMM (:func:`fastops.pointwise`): the same function, and with autograd forward and
    backward take about half the time of PyTorch's convolution (2026-12-04, 2 threads, batch 2:
    16 -> 48 channels at 24^3 5.4 against 10.2 ms, 48 -> 16 5.2 against 12.9 ms). On a GPU it is
    the convolution."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 5:
            return fastops.pointwise(x, self.weight, self.bias)
        return super().forward(x)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask, in CPU training, comes from ``torch.rand`` (kept where the draw
    is >= p, scaled by 1 / (1 - p)): the same distribution as PyTorch's dropout, whose CPU
    ``bernoulli_`` is twice as slow (2026-12-04, 2 threads: forward and backward of the 6.7 M
    attention probabilities of a 96^3 batch of 2 in 56 against 93 ms; dropout was 8% of a
    training step). Elsewhere (GPU, evaluation, p = 0) it is ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and x.device.type == "cpu" and not self.inplace:
            return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return super().forward(x)


class FFN(nn.Module):
    """Pointwise feed-forward: 1x1 expand, GELU, dropout, 1x1 back, dropout."""

    def __init__(self, channels: int, expansion: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = Conv1x1(channels, channels * expansion)
        self.fc2 = Conv1x1(channels * expansion, channels)
        self.act = nn.GELU()
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """2x2x2 space-to-depth; channel index = offset * C + c, offsets (a, b, c) with c fastest."""
    n, c, d, h, w = x.shape
    x = x.reshape(n, c, d // 2, 2, h // 2, 2, w // 2, 2)
    x = x.permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(n, 8 * c, d // 2, h // 2, w // 2)


class PatchMerging(nn.Module):
    """Swin-style patch merging for 3D: space-to-depth (8C), layer norm, 1x1 conv to 2C."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = LayerNorm3d(8 * channels)
        self.reduction = Conv1x1(8 * channels, 2 * channels, bias=False)

    fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fastops.use_fast(self.fast, x):
            w, b = fastops.cached(self, "folded", (self.reduction.weight, self.norm.weight, self.norm.bias),
                                  lambda: fastops.fold_affine(self.reduction.weight, None, self.norm.weight,
                                                              self.norm.bias))
            return fastops.pointwise(fastops.channel_normalize(space_to_depth(x), self.norm.eps), w, b)
        return self.reduction(self.norm(space_to_depth(x)))


class DownConv(nn.Module):
    """Strided conv (kernel 2p-1, stride p, padding p-1) + instance norm."""

    fast = True

    def __init__(self, cin: int, cout: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv3d(cin, cout, 2 * factor - 1, stride=factor, padding=factor - 1)
        self.norm = nn.InstanceNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fastops.use_fast(self.fast, x):
            bias = fastops.bias_before(self.norm, self.conv.bias)  # the instance norm cancels it
            y = (fastops.conv3d_im2col(x, self.conv.weight, bias, 2, 1)
                 if self.factor == 2 and min(x.shape[2:]) >= fastops.IM2COL_MIN_SIZE
                 else F.conv3d(x, self.conv.weight, bias, self.conv.stride, self.conv.padding))
            return fastops.instance_norm(self.norm, y)
        return self.norm(self.conv(x))


class UpConv(nn.Module):
    """Transposed conv kernel 2 stride 2 + instance norm."""

    fast = True

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.ConvTranspose3d(cin, cout, 2, stride=2)
        self.norm = nn.InstanceNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fastops.use_fast(self.fast, x):
            # kernel 2 / stride 2 transposed conv == 1x1 conv to 8*Cout, then depth-to-space by 2
            w = self.conv.weight  # (Cin, Cout, 2, 2, 2)
            wt = fastops.cached(self, "gemm_t", (w,), lambda: fastops.shuffle_width_first(
                w.reshape(w.shape[0], -1), 2, dim=1).contiguous())
            bias = fastops.bias_before(self.norm, self.conv.bias)  # the instance norm cancels it
            if bias is not None:
                bias = fastops.shuffle_width_first(bias.repeat_interleave(8), 2)
            return fastops.instance_norm(self.norm, fastops.conv1x1_shuffle(x, wt, bias, 2))
        return self.norm(self.conv(x))


def pixel_shuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, C*r^3, D, H, W) -> (N, C, D*r, H*r, W*r), channel layout (c, s1, s2, s3)."""
    n, crrr, d, h, w = x.shape
    c = crrr // (r ** 3)
    x = x.reshape(n, c, r, r, r, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(n, c, d * r, h * r, w * r)


class ModalMixer(nn.Module):
    """1x1 conv + instance norm mapping the attention stream's features (all modalities
    concatenated) onto the conv stream's width ("modal mixer")."""

    fast = True

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = Conv1x1(cin, cout)
        self.norm = nn.InstanceNorm3d(cout)

    def forward(self, xs) -> torch.Tensor:
        if fastops.use_fast(self.fast, xs[0]):
            # the concatenation is folded into a sum of per-modality GEMMs
            w = self.conv.weight.reshape(self.conv.out_channels, -1)
            out, start = None, 0
            for x in xs:
                c = x.shape[1]
                bias = fastops.bias_before(self.norm, self.conv.bias) if out is None else None
                part = fastops.pointwise(x, w[:, start:start + c], bias,
                                         residual=out, overwrite_residual=True)
                out, start = part, start + c
            return fastops.instance_norm(self.norm, out)
        return self.norm(self.conv(torch.cat(list(xs), dim=1)))


class ShuffleHead(nn.Module):
    """3x3 conv to r^3 * out channels, then 3D pixel shuffle by r ("unified upsampling")."""

    fast = True

    def __init__(self, cin: int, cout: int, r: int):
        super().__init__()
        self.r = r
        self.conv = nn.Conv3d(cin, cout * r ** 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fastops.use_fast(self.fast, x):
            scratch = lambda name, shape: fastops.workspace(self, name, shape, x)  # noqa: E731
            if x.shape[2] % fastops.WINO2_TILE == 0 and x.shape[3] % fastops.WINO_TILE == 0:
                u = fastops.cached(self, "winograd2d", (self.conv.weight,),
                                   lambda: fastops.winograd2d_head_weight(self.conv.weight, self.r))
                return fastops.conv3x3_shuffle_winograd2d(x, u, self.conv.bias, self.r, scratch)
            if x.shape[3] % fastops.WINO_TILE == 0:
                wp = fastops.cached(self, "winograd", (self.conv.weight,),
                                    lambda: fastops.winograd_head_weight(self.conv.weight))
                return fastops.conv3x3_shuffle_winograd(x, wp, self.conv.bias, self.r, scratch)
            wk = fastops.cached(self, "gemm", (self.conv.weight,), lambda: fastops.conv3x3_weight(self.conv.weight))
            return pixel_shuffle_3d(fastops.conv3x3_gemm(x, self.conv.weight, self.conv.bias, wk), self.r)
        return pixel_shuffle_3d(self.conv(x), self.r)


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """GM(X) = X X^T / (C * H * W * D) per sample (SDKT, paper Eq. 9). Zero in, zero out."""
    n, c = x.shape[:2]
    # float32 even under autocast: in float16 the sum over a 96^3 patch overflows to inf
    with torch.autocast(x.device.type, enabled=False):
        f = x.float().reshape(n, c, -1)
        return torch.bmm(f, f.transpose(1, 2)) / f[0].numel()


class RefineHead(nn.Module):
    """Optional full-resolution refinement of the logits (not part of the paper's network).

    The pixel-shuffle head decides every voxel from features on the quarter grid; this head looks
    at the input image itself: a 3x3x3 convolution over the image channels and the logits, a leaky
    ReLU, and a 1x1 convolution whose output is added to the logits. The 1x1 starts at zero, so a
    network given this head computes exactly the function it computed without it until it trains.
    """

    def __init__(self, image_channels: int, num_classes: int, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv3d(image_channels + num_classes, channels, 3, padding=1)
        self.act = nn.LeakyReLU(1e-2)
        self.out = nn.Conv3d(channels, num_classes, 1)

    def zero_output(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.out(self.act(self.conv(torch.cat([image, logits], dim=1))))


def he_init(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """He (kaiming normal, a = 0.01) for convs, ones/zeros for norms (reference init)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm3d)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
