"""LightMedSeg: a re-implementation of the peer network from its public abstract.

Reference: K. Tyagi, V. Rathi, P. Goyal, "LightMedSeg: Lightweight 3D Medical Image
Segmentation with Learned Spatial Anchors", arXiv:2603.07228 (2026). Code was not released,
so this module is written from the abstract and the component list of the project brief
(GhostConv3D stride-2 stem, K learned anchors, texture routing map, FiLM in every encoder
stage, skip router, adaptive decoder, final ConvTranspose3D). Every design decision they do not
pin down is listed below as *abstract / brief says* -> *we chose*. No code was copied.

Overall data flow (input N x Cin x D x H x W, D/H/W multiples of 16)::

    x --GhostConv3D s2--> stem (1/2) --+--> LocalStructuralPrior --> texture logit map L (1/2)
                                       +--> GlobalAnchorDetector --> K anchors (coords, code g)
    stem -> Stage0 (1/2) -> Stage1 (1/4) -> Stage2 (1/8) -> Stage3 (1/16, bottleneck)
             every stage: [GhostConv3D s2 down] + TextureRoutedBlock x depth (FiLM from g,
             routing map = L max-pooled to the stage resolution)
    decoder 1/16 -> 1/8 -> 1/4 -> 1/2: trilinear x2 + 1x1, SkipRouter (multi-scale encoder
             skips, per-voxel softmax with anchor-relative position bias), AdaptiveDecoderBlock
    1/2 --ConvTranspose3d(k2, s2)--> full-resolution logits

Design choices (abstract / brief -> this implementation)
--------------------------------------------------------
* "modular UNet-style" -> 4-level encoder/decoder (1/2, 1/4, 1/8, 1/16) with widths
  ``widths=(32, 48, 64, 80)`` and encoder depths ``depths=(2, 1, 1, 1)``. The widths and
  depths were chosen by us so that the network has about 0.48 M parameters for 4 input
  channels / 4 classes (the paper's figure) while spending most of the compute at 1/2
  resolution (14.64 GFLOPs for 0.48 M parameters suggests wide early, narrow deep stages); the
  paper's exact layout is unknown.
* "GhostConv3D stem with stride 2" -> Ghost module (Han et al., GhostNet) in 3D: a dense
  3x3x3 "primary" convolution (stride 2 in the stem and in the encoder down-samplers) gives
  half of the output channels, a cheap depthwise 3x3x3 convolution of those gives the other
  half ("ghost" maps); concatenation, GroupNorm, LeakyReLU.
* "global anchor detector giving K learned spatial anchors" -> K = 8 (the abstract gives no K;
  a third-party lay summary of the paper mentions 8 anchors). The stem features are
  average-pooled to 1/8, passed through a 3x3x3 conv (``anchor_hidden=24`` channels), and a 1x1
  conv with K output channels gives one heat-map per anchor (the K learned filters are the
  anchor "queries"). A spatial softmax with a learned temperature gives per-anchor attention;
  soft-argmax over the normalised grid [-1, 1]^3 gives each anchor's position
  (differentiable), attention-pooling gives each anchor's descriptor. Each anchor token =
  LeakyReLU(Linear([descriptor, position]) + learned anchor embedding); the K tokens are
  flattened and projected to a global anchor code ``g`` (dimension ``anchor_dim=32``).
* "local structural prior module" giving a "texture routing map" -> high-pass stem features
  (x - 3x3x3 local mean), their magnitude, a depthwise 3x3x3 conv (local structure energy),
  GroupNorm, LeakyReLU and a 1x1 conv to one channel: a texture logit map L at 1/2 resolution;
  sigmoid(L) is high at boundary-rich voxels. It is max-pooled to each coarser stage (so a
  coarse voxel counts as textured if any of its children is), and each routed block applies its
  own learned affine (scale, shift) to the logit before the sigmoid.
* "anchor-conditioned FiLM in every encoder stage" -> every encoder block (and hence every
  stage) modulates its normalised features channel-wise: y * (1 + gamma(g)) + beta(g), with
  gamma/beta from a Linear layer on the anchor code. The Linear is initialised with a small
  normal (std 0.02) and zero bias so the modulation starts near identity but gradients reach
  the anchor detector from the first step (a zero init would block them).
* "texture-aware routing ... ghost and depthwise convolutions" -> TextureRoutedBlock: a rich
  branch (GhostConv3D 3x3x3) and a cheap branch (depthwise 3x3x3) are mixed per voxel,
  r * rich + (1 - r) * cheap, with r = sigmoid(a * L + b); then GroupNorm, FiLM, LeakyReLU,
  a 1x1 channel-mixing conv, GroupNorm and a residual connection. Routing is soft (both
  branches are evaluated everywhere): hard sparse routing would save FLOPs only with gather /
  scatter kernels that are slow on CPU, and it is not differentiable.
* "learned skip router with anchor-relative spatial position bias" -> SkipRouter at each
  decoder level l: candidate skips are the encoder features of level l, level l-1 (avg-pooled)
  and level l+1 (trilinear-upsampled), each projected to the level width by a 1x1 conv (the
  same-level one is used as is). Per-voxel routing logits over the candidates come from a 1x1
  conv on the upsampled decoder feature plus a position bias: for every voxel the offsets to the
  K anchors (3K values) and Gaussian proximities exp(-|p - a_k|^2 / (2 s_k^2)) with learned
  widths s_k (K values) go through a 1x1 conv. The softmax-weighted skip is concatenated with
  the decoder feature and fused by a 1x1 conv.
* "adaptive decoder" -> AdaptiveDecoderBlock: two depthwise 3x3x3 branches (dilation 1 and 2)
  mixed per voxel by a softmax predicted from the features (adaptive receptive field), 1x1
  conv, GroupNorm, and a channel gate computed from the global average of the features and the
  anchor code (adaptive channel recalibration), residual, LeakyReLU. One block per level.
* "final ConvTranspose3D to full resolution" -> ConvTranspose3d(kernel 2, stride 2) from the
  1/2 decoder level straight to ``num_classes`` logits.
* Deep supervision (not in the abstract): ``forward_train`` also returns 1x1 heads on the 1/4 and
  1/8 decoder levels, upsampled (trilinear) to the input size, ordered fine to coarse. They are
  not used by ``forward`` and are excluded from the eval-path parameter count.
* Normalisation (not in the abstract): GroupNorm with 4 channels per group, not InstanceNorm,
  so that the 1/16 level also works for 16^3 inputs (one voxel) and small batches.
* Activation: LeakyReLU(0.01); initialisation: He (kaiming normal, a = 0.01) for all
  convolutions, transposed convolutions and Linear layers (except the FiLM projections, see
  above), zero biases, GroupNorm ones/zeros, anchor embeddings normal(std 0.02).
* Cost (measured, torch.utils.flop_counter, convolutions and matmuls only): 4 -> 4 channels:
  480,326 parameters on the eval path (+456 in the deep-supervision heads), 6.24 GMAC
  (12.5 GFLOPs at 2 FLOPs per MAC) for one 96^3 patch; 2 -> 2 channels: 478,948 parameters,
  6.09 GMAC. Paper: 0.48 M, 14.64 GFLOPs (the paper's FLOP convention is not stated). We did not
  add width at full resolution just to chase that number, to stay CPU-friendly.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .outputs import TrainOutput

_NEG_SLOPE = 1e-2


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with (about) 4 channels per group; works for any spatial size."""
    groups = max(1, channels // 4)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(_NEG_SLOPE, inplace=True)


def _norm_grid(shape: Sequence[int], device, dtype) -> torch.Tensor:
    """Voxel-centre coordinates normalised to [-1, 1] (align_corners=False), (3, D, H, W)."""
    axes = [(torch.arange(s, device=device, dtype=dtype) + 0.5) * (2.0 / s) - 1.0 for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


class GhostConv3D(nn.Module):
    """Ghost module: dense primary conv to ceil(out/2) maps + depthwise "ghost" maps, concat.

    Returns the raw concatenation (no norm / activation); callers decide.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dw_kernel: int = 3):
        super().__init__()
        self.out_ch = out_ch
        init_ch = math.ceil(out_ch / 2)
        self.primary = nn.Conv3d(in_ch, init_ch, kernel_size, stride, kernel_size // 2, bias=False)
        self.cheap = nn.Conv3d(init_ch, init_ch, dw_kernel, 1, dw_kernel // 2, groups=init_ch, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        return torch.cat([p, self.cheap(p)], dim=1)[:, : self.out_ch]


class GhostConvNormAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(GhostConv3D(in_ch, out_ch, kernel_size, stride), _norm(out_ch), _act())


class LocalStructuralPrior(nn.Module):
    """High-frequency energy of the stem features -> texture logit map (N, 1, D, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv3d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.norm = _norm(channels)
        self.act = _act()
        self.head = nn.Conv3d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = x - F.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
        return self.head(self.act(self.norm(self.dw(high.abs()))))


class GlobalAnchorDetector(nn.Module):
    """K learned spatial anchors: soft-argmax positions, attention-pooled descriptors, code g."""

    def __init__(self, in_ch: int, hidden: int, num_anchors: int, code_dim: int, pool: int = 4):
        super().__init__()
        self.pool = pool
        self.k = num_anchors
        self.feat = nn.Sequential(nn.Conv3d(in_ch, hidden, 3, 1, 1, bias=False), _norm(hidden), _act())
        self.heat = nn.Conv3d(hidden, num_anchors, 1)
        self.log_temp = nn.Parameter(torch.zeros(1))
        self.token = nn.Linear(hidden + 3, code_dim)
        self.anchor_embed = nn.Parameter(torch.zeros(num_anchors, code_dim))
        self.code = nn.Linear(num_anchors * code_dim, code_dim)
        self.act = _act()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (positions (N, K, 3) in [-1, 1], global anchor code (N, code_dim))."""
        f = self.feat(F.avg_pool3d(x, self.pool))
        grid = rearrange(_norm_grid(f.shape[2:], f.device, f.dtype), "c d h w -> (d h w) c")
        att = self.heat(f).flatten(2) * torch.exp(self.log_temp)  # (N, K, S)
        att = att.softmax(dim=-1)
        pos = att @ grid  # (N, K, 3)
        desc = torch.einsum("nks,ncs->nkc", att, f.flatten(2))  # (N, K, hidden)
        tokens = self.act(self.token(torch.cat([desc, pos], dim=-1)) + self.anchor_embed)
        return pos, self.code(rearrange(tokens, "n k e -> n (k e)"))


class FiLM(nn.Module):
    """Channel-wise y * (1 + gamma(g)) + beta(g) from the anchor code g."""

    def __init__(self, code_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(code_dim, 2 * channels)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        gamma, beta = rearrange(self.proj(code), "n (two c) -> two n c 1 1 1", two=2)
        return x * (1.0 + gamma) + beta


class TextureRoutedBlock(nn.Module):
    """r * Ghost(x) + (1 - r) * DW(x) -> GN -> FiLM -> act -> 1x1 -> GN, residual, act."""

    def __init__(self, channels: int, code_dim: int):
        super().__init__()
        self.rich = GhostConv3D(channels, channels, 3)
        self.cheap = nn.Conv3d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.route_scale = nn.Parameter(torch.ones(1))
        self.route_shift = nn.Parameter(torch.zeros(1))
        self.norm1 = _norm(channels)
        self.film = FiLM(code_dim, channels)
        self.act = _act()
        self.pw = nn.Conv3d(channels, channels, 1, bias=False)
        self.norm2 = _norm(channels)

    def forward(self, x: torch.Tensor, texture_logit: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(self.route_scale * texture_logit + self.route_shift)
        cheap = self.cheap(x)
        y = cheap + r * (self.rich(x) - cheap)
        y = self.act(self.film(self.norm1(y), code))
        y = self.norm2(self.pw(y))
        return self.act(x + y)


class EncoderStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, depth: int, code_dim: int, downsample: bool):
        super().__init__()
        self.down = GhostConvNormAct(in_ch, out_ch, 3, 2) if downsample else None
        if not downsample and in_ch != out_ch:
            raise ValueError("a stage without down-sampling must keep its width")
        self.blocks = nn.ModuleList(TextureRoutedBlock(out_ch, code_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, texture_logit: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        for blk in self.blocks:
            x = blk(x, texture_logit, code)
        return x


class SkipRouter(nn.Module):
    """Per-voxel softmax over multi-scale encoder skips, biased by anchor-relative position."""

    def __init__(self, channels: int, cand_channels: Sequence[Optional[int]], num_anchors: int):
        super().__init__()
        # cand_channels: width of each candidate, None = same width (used as is).
        self.proj = nn.ModuleList(
            nn.Identity() if c is None else nn.Conv3d(c, channels, 1, bias=False) for c in cand_channels
        )
        n = len(cand_channels)
        self.logits = nn.Conv3d(channels, n, 1)
        self.pos_bias = nn.Conv3d(4 * num_anchors, n, 1)
        self.log_sigma = nn.Parameter(torch.full((num_anchors,), math.log(0.5)))
        self.fuse = nn.Sequential(nn.Conv3d(2 * channels, channels, 1, bias=False), _norm(channels), _act())

    def position_features(self, anchors: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        grid = _norm_grid(shape, anchors.device, anchors.dtype)  # (3, D, H, W)
        rel = grid[None, None] - anchors[..., None, None, None]  # (N, K, 3, D, H, W)
        dist2 = rel.pow(2).sum(2)  # (N, K, D, H, W)
        prox = torch.exp(-dist2 / (2 * torch.exp(2 * self.log_sigma))[None, :, None, None, None])
        return torch.cat([rearrange(rel, "n k c d h w -> n (k c) d h w"), prox], dim=1)

    def forward(self, up: torch.Tensor, candidates: List[torch.Tensor], anchors: torch.Tensor) -> torch.Tensor:
        logits = self.logits(up) + self.pos_bias(self.position_features(anchors, up.shape[2:]))
        w = logits.softmax(dim=1)
        skip = sum(w[:, i : i + 1] * p(c) for i, (p, c) in enumerate(zip(self.proj, candidates)))
        return self.fuse(torch.cat([up, skip], dim=1))


class AdaptiveDecoderBlock(nn.Module):
    """Per-voxel mix of dilation-1/2 depthwise convs, 1x1, GN, content+anchor channel gate."""

    def __init__(self, channels: int, code_dim: int):
        super().__init__()
        self.dw1 = nn.Conv3d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.dw2 = nn.Conv3d(channels, channels, 3, 1, 2, dilation=2, groups=channels, bias=False)
        self.select = nn.Conv3d(channels, 2, 1)
        self.pw = nn.Conv3d(channels, channels, 1, bias=False)
        self.norm = _norm(channels)
        self.gate = nn.Linear(channels + code_dim, channels)
        self.act = _act()

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        s = self.select(x).softmax(dim=1)
        y = s[:, :1] * self.dw1(x) + s[:, 1:] * self.dw2(x)
        y = self.norm(self.pw(y))
        g = torch.sigmoid(self.gate(torch.cat([y.mean(dim=(2, 3, 4)), code], dim=1)))
        return self.act(x + y * g[:, :, None, None, None])


class LightMedSeg(nn.Module):
    """LightMedSeg (see module docstring for the design choices).

    Args:
        in_channels: channels per modality; the network uses sum(in_channels) input channels.
        num_classes: output logit channels.
        patch_size: training patch size (each side a multiple of 16); kept for reference only,
            any input whose sides are multiples of 16 works.
        widths / depths: encoder widths at 1/2, 1/4, 1/8, 1/16 and blocks per stage.
        num_anchors: K; anchor_dim: size of the anchor code; deep_supervision: extra heads in
            ``forward_train``.
    """

    #: Modules used only by ``forward_train`` (bundles may store them or not).
    training_only_prefixes = ("ds_heads.",)

    def __init__(
        self,
        in_channels: Sequence[int] = (4,),
        num_classes: int = 4,
        patch_size: Sequence[int] = (96, 96, 96),
        widths: Sequence[int] = (32, 48, 64, 80),
        depths: Sequence[int] = (2, 1, 1, 1),
        num_anchors: int = 8,
        anchor_dim: int = 32,
        anchor_hidden: int = 24,
        deep_supervision: bool = True,
        **kwargs,
    ):
        super().__init__()
        if isinstance(in_channels, int):
            in_channels = (in_channels,)
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = int(num_classes)
        self.patch_size = tuple(int(p) for p in patch_size)
        if any(p % 16 for p in self.patch_size):
            raise ValueError(f"patch size {self.patch_size} must be a multiple of 16")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError("LightMedSeg has exactly 4 levels (1/2, 1/4, 1/8, 1/16)")
        self.widths = widths
        cin = sum(self.in_channels)

        self.stem = GhostConvNormAct(cin, widths[0], 3, 2)
        self.prior = LocalStructuralPrior(widths[0])
        self.anchors = GlobalAnchorDetector(widths[0], anchor_hidden, num_anchors, anchor_dim)
        self.encoder = nn.ModuleList(
            EncoderStage(widths[max(i - 1, 0)], widths[i], depths[i], anchor_dim, downsample=i > 0)
            for i in range(4)
        )
        # decoder levels 2, 1, 0 (1/8, 1/4, 1/2)
        self.up = nn.ModuleList()
        self.routers = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for lvl in (2, 1, 0):
            self.up.append(nn.Conv3d(widths[lvl + 1], widths[lvl], 1, bias=False))
            cands: List[Optional[int]] = [None, widths[lvl + 1]]
            if lvl > 0:
                cands.append(widths[lvl - 1])
            self.routers.append(SkipRouter(widths[lvl], cands, num_anchors))
            self.dec_blocks.append(AdaptiveDecoderBlock(widths[lvl], anchor_dim))
        self.final = nn.ConvTranspose3d(widths[0], self.num_classes, 2, 2)
        self.deep_supervision = bool(deep_supervision)
        self.ds_heads = nn.ModuleList(
            nn.Conv3d(widths[lvl], self.num_classes, 1) for lvl in (1, 2)
        ) if self.deep_supervision else nn.ModuleList()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=_NEG_SLOPE)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=_NEG_SLOPE)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, FiLM):
                nn.init.normal_(m.proj.weight, std=0.02)
        nn.init.normal_(self.anchors.anchor_embed, std=0.02)

    def _features(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != sum(self.in_channels):
            raise ValueError(f"expected (N, {sum(self.in_channels)}, D, H, W), got {tuple(x.shape)}")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be a multiple of 16")
        stem = self.stem(x)
        texture = self.prior(stem)
        anchors, code = self.anchors(stem)
        feats = []
        h = stem
        for i, stage in enumerate(self.encoder):
            t = texture if i == 0 else F.max_pool3d(texture, 2 ** i)
            h = stage(h, t, code)
            feats.append(h)
        decoded = []
        d = feats[3]
        for j, lvl in enumerate((2, 1, 0)):
            up = self.up[j](F.interpolate(d, scale_factor=2, mode="trilinear", align_corners=False))
            cands = [feats[lvl], F.interpolate(feats[lvl + 1], scale_factor=2, mode="trilinear", align_corners=False)]
            if lvl > 0:
                cands.append(F.avg_pool3d(feats[lvl - 1], 2))
            d = self.routers[j](up, cands, anchors)
            d = self.dec_blocks[j](d, code)
            decoded.append(d)
        return decoded  # [1/8, 1/4, 1/2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self._features(x)[-1])

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        decoded = self._features(x)
        logits = [self.final(decoded[-1])]
        if self.deep_supervision:
            for head, feat in zip(self.ds_heads, (decoded[1], decoded[0])):
                logits.append(F.interpolate(head(feat), size=x.shape[2:], mode="trilinear", align_corners=False))
        return TrainOutput(logits=logits)
