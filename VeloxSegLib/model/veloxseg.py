"""VeloxSeg (ICLR 2026): two-stream encoder (PWA + JLC), pixel-shuffle decoder, and Gram-matrix
texture teachers used only in training (SDKT). See docs/model.md and shared/design/model.md."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from . import fastops
from .jlc import jlc_stage
from .layers import (Conv1x1, DownConv, Dropout, ModalMixer, PatchMerging, RefineHead, ShuffleHead, UpConv, gram_matrix,
                     he_init)
from .outputs import TrainOutput
from .pwa import PWABlock

NUM_STAGES = 4
# Minimum big window per stage = feature size divided by these (reproduces both published settings).
WINDOW_DIVISORS = (8, 2, 2, 1)


def min_big_windows(patch_size: Sequence[int], patch_factor: int = 4) -> List[Tuple[int, int, int]]:
    """Minimum big window per stage derived from the patch size.

    96^3 -> (3,3,3),(6,6,6),(3,3,3),(3,3,3); 128x128x64 -> (4,4,2),(8,8,4),(4,4,2),(4,4,2).
    Raises ConfigError (a ValueError) naming sizes that work when the windows cannot tile.
    """
    patch_size = tuple(int(p) for p in patch_size)
    unit = patch_factor * 8  # stage-1 features (patch / 4) must split into 8 windows per axis
    if (len(patch_size) != 3 or any(p < unit or p % unit for p in patch_size)
            or max(patch_size) < 2 * unit):  # the last stage needs more than one voxel (instance norm)
        suggestion = tuple(max(unit, int(round(p / unit)) * unit) for p in patch_size)
        if max(suggestion) < 2 * unit:
            suggestion = (2 * unit,) + suggestion[1:]
        raise ConfigError(
            f"patch size {patch_size} cannot be tiled by VeloxSeg's paired windows: every axis must be "
            f"a multiple of {unit} and at least one axis >= {2 * unit} (e.g. {suggestion}; "
            f"64, 96, 128 and 160 work)")
    sizes = []
    feat = [p // patch_factor for p in patch_size]
    for k in range(NUM_STAGES):
        sizes.append(tuple(f // WINDOW_DIVISORS[k] for f in feat))
        feat = [f // 2 for f in feat]
    return sizes


class TextureTeacher(nn.Module):
    """Self-supervised texture teacher of one modality (training only, SDKT).

    Each stage's input is that modality's attention features concatenated with the conv stream's
    encoder features, adapted by 1x1 conv + IN; the decoder mirrors the segmentation decoder and
    reconstructs the modality through a 3x3 conv and pixel shuffle.
    """

    def __init__(self, out_channels: int, attn_ch: int, conv_ch: int, depths, kernel_sizes, group_sizes,
                 expansions, patch_factor: int, dropout: float = 0.0):
        super().__init__()
        enc = attn_ch + conv_ch
        self.adapters = nn.ModuleList([
            nn.Sequential(Conv1x1(enc * 2 ** k, conv_ch * 2 ** k), nn.InstanceNorm3d(conv_ch * 2 ** k))
            for k in range(NUM_STAGES)])
        self.decoder = Decoder(conv_ch, depths, kernel_sizes, group_sizes, expansions, dropout)
        self.head = ShuffleHead(conv_ch, out_channels, patch_factor)

    def forward(self, feats: Sequence[torch.Tensor]):
        feats = [a(f) for a, f in zip(self.adapters, feats)]
        up1 = self.decoder(feats)[0]
        return self.head(up1), gram_matrix(up1)


class Decoder(nn.Module):
    """up3 = JLC(enc3 + Up(enc4)), up2 = JLC(enc2 + Up(up3)), up1 = JLC(enc1 + Up(up2))."""

    def __init__(self, base_ch: int, depths, kernel_sizes, group_sizes, expansions, dropout: float = 0.0):
        super().__init__()
        self.ups = nn.ModuleList([UpConv(base_ch * 2 ** (k + 1), base_ch * 2 ** k) for k in range(NUM_STAGES - 1)])
        self.stages = nn.ModuleList([
            jlc_stage(base_ch * 2 ** k, depths[k], kernel_sizes, group_sizes[k], expansions[k], dropout)
            for k in range(NUM_STAGES - 1)])

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Returns [up1, up2, up3]."""
        x = feats[-1]
        outs = []
        for k in reversed(range(NUM_STAGES - 1)):
            x = self.stages[k](feats[k] + self.ups[k](x))
            outs.append(x)
        return outs[::-1]


class VeloxSeg(nn.Module):
    """The VeloxSeg network.

    Args:
        in_channels: channels of each modality, e.g. (1, 1) for PET/CT with cross-modal attention,
            (2,) for PET and CT stacked (early fusion), (4,) for BraTS ("VeloxSeg-C").
        num_classes: output classes (background included).
        patch_size: the patch the network is built for (window sizes depend on it).
        base_ch / attn_ch: widths of the conv and attention streams at stage 1 (doubling per stage).
        conv_depths / attn_depths: blocks per stage in each stream.
        kernel_sizes: parallel grouped-conv kernels of JLC ({1,3,5}; preset S uses {3}).
        group_sizes: JL-guided channels per group per stage (``jl.jl_group_sizes``).
        conv_expansion / ffn_expansion: expansion ratios per stage.
        num_heads / head_dims: PWA heads and q/k head dimension per stage.
        double_residual: the published PWA block's double residual (default True).
        with_teachers: build the training-only texture teachers (not needed for inference).
        refine_channels: width of an optional full-resolution refinement head over the image and
            the logits (:class:`layers.RefineHead`; not in the paper). 0 (default): none, the
            paper's network. It starts as the identity, so fine-tuning a bundle with it added
            begins from exactly the bundle's function.
    """

    # state-dict prefixes of modules used only in training (a bundle may or may not carry them)
    training_only_prefixes = ("teachers.", "ds_heads.")

    def __init__(self, in_channels: Sequence[int] = (1, 1), num_classes: int = 2,
                 patch_size: Sequence[int] = (96, 96, 96), base_ch: int = 16, attn_ch: int = 16,
                 conv_depths=(1, 1, 1, 1), attn_depths=(1, 1, 1, 1), kernel_sizes=(1, 3, 5),
                 group_sizes=(4, 8, 8, 16), conv_expansion=(3, 3, 2, 2), ffn_expansion=(3, 3, 2, 2),
                 num_heads=(1, 2, 2, 4), head_dims=(4, 8, 8, 16), patch_factor: int = 4,
                 attn_drop: float = 0.1, proj_drop: float = 0.1, conv_drop: float = 0.1,
                 double_residual: bool = True, deep_supervision: bool = True, with_teachers: bool = True,
                 refine_channels: int = 0):
        super().__init__()
        in_channels = tuple(int(c) for c in in_channels)
        if not 1 <= len(in_channels) <= 4 or any(c < 1 for c in in_channels):
            raise ConfigError(f"in_channels must list 1 to 4 modalities with >= 1 channel each, got {in_channels}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if int(refine_channels) < 0 or int(refine_channels) != refine_channels:
            raise ConfigError(f"refine_channels must be a whole number >= 0, got {refine_channels}")
        self.in_channels = in_channels
        self.num_modalities = M = len(in_channels)
        self.num_classes = num_classes
        self.patch_size = tuple(int(p) for p in patch_size)
        self.patch_factor = patch_factor
        windows = min_big_windows(self.patch_size, patch_factor)
        for k, g in enumerate(group_sizes):
            if (base_ch * 2 ** k) % g:
                raise ConfigError(f"group size {g} does not divide stage {k + 1} width {base_ch * 2 ** k}")

        # Attention stream (modal cooperation): one stream per modality, weights not shared.
        self.patch_embeds = nn.ModuleList([nn.Conv3d(c, attn_ch, patch_factor, stride=patch_factor)
                                           for c in in_channels])
        self.embed_drop = Dropout(proj_drop)
        feat = [p // patch_factor for p in self.patch_size]
        self.attn_stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for k in range(NUM_STAGES):
            ch = attn_ch * 2 ** k
            self.attn_stages.append(nn.ModuleList([
                PWABlock(ch, M, feat, windows[k], num_heads[k], head_dims[k], ffn_expansion[k],
                         attn_drop, proj_drop, double_residual) for _ in range(attn_depths[k])]))
            if k < NUM_STAGES - 1:
                self.merges.append(nn.ModuleList([PatchMerging(ch) for _ in range(M)]))
            feat = [f // 2 for f in feat]

        # Convolution stream (modal fusion): all modalities stacked as channels.
        self.downs = nn.ModuleList([DownConv(sum(in_channels), base_ch, patch_factor)] + [
            DownConv(base_ch * 2 ** (k - 1), base_ch * 2 ** k, 2) for k in range(1, NUM_STAGES)])
        self.modal_mixers = nn.ModuleList([ModalMixer(attn_ch * 2 ** k * M, base_ch * 2 ** k)
                                           for k in range(NUM_STAGES)])
        self.conv_stages = nn.ModuleList([
            jlc_stage(base_ch * 2 ** k, conv_depths[k], kernel_sizes, group_sizes[k], conv_expansion[k], conv_drop)
            for k in range(NUM_STAGES)])

        # Segmentation decoder (student) with the pixel-shuffle head.
        self.decoder = Decoder(base_ch, conv_depths, kernel_sizes, group_sizes, conv_expansion, conv_drop)
        self.head = ShuffleHead(base_ch, num_classes, patch_factor)
        self.deep_supervision = deep_supervision
        if deep_supervision:  # 1x1 heads on up2, up3, enc4 (training only)
            self.ds_heads = nn.ModuleList([Conv1x1(base_ch * 2 ** k, num_classes) for k in (1, 2, 3)])
        self.teachers = None
        if with_teachers:
            self.teachers = nn.ModuleList([
                TextureTeacher(c, attn_ch, base_ch, conv_depths, kernel_sizes, group_sizes, conv_expansion,
                               patch_factor, conv_drop) for c in in_channels])
        self.apply(he_init)
        self.refine = None
        if refine_channels:
            self.refine = RefineHead(sum(in_channels), num_classes, int(refine_channels))
            self.refine.apply(he_init)
            self.refine.zero_output()

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor):
        """Returns (attention features per stage: list of M tensors, conv encoder features)."""
        xs = torch.split(x, list(self.in_channels), dim=1)
        xs = [self.embed_drop(self._embed(emb, xm)) for emb, xm in zip(self.patch_embeds, xs)]
        attn_feats, enc_feats = [], []
        h = x
        for k in range(NUM_STAGES):
            if k > 0:
                xs = [merge(xm) for merge, xm in zip(self.merges[k - 1], xs)]
            for block in self.attn_stages[k]:
                xs = block(xs)
            attn_feats.append(xs)
            mixed = self.modal_mixers[k](xs)
            h = self.conv_stages[k](self.downs[k](h) + mixed)
            enc_feats.append(h)
        return attn_feats, enc_feats

    @staticmethod
    def _embed(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding ``conv(x)``; with autograd on the CPU as one GEMM over the
        non-overlapping patches (:func:`fastops.patchify_conv`: the same function, forward and
        backward 3.6x faster than the convolution's)."""
        if torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32:
            return fastops.patchify_conv(x, conv.weight, conv.bias)
        return conv(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != sum(self.in_channels):
            raise ConfigError(f"expected input (N, {sum(self.in_channels)}, D, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.patch_size:
            raise ConfigError(f"this network is built for patch size {self.patch_size}, got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (N, num_classes, *patch_size)."""
        self._check_input(x)
        _, enc = self.encode(x)
        up1 = self.decoder(enc)[0]
        return self._main_logits(x, up1)

    def _main_logits(self, x: torch.Tensor, up1: torch.Tensor) -> torch.Tensor:
        logits = self.head(up1)
        return logits if self.refine is None else self.refine(x, logits)

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Deep-supervision logits, teacher reconstructions and Gram matrices (SDKT)."""
        self._check_input(x)
        attn, enc = self.encode(x)
        up1, up2, up3 = self.decoder(enc)
        logits = [self._main_logits(x, up1)]
        if self.deep_supervision:
            for head, f in zip(self.ds_heads, (up2, up3, enc[3])):
                logits.append(self._upsample(head(f)))
        out = TrainOutput(logits=logits, student_gram=gram_matrix(up1))
        if self.teachers is not None:
            recs = []
            for m, teacher in enumerate(self.teachers):
                feats = [torch.cat([attn[k][m], enc[k]], dim=1) for k in range(NUM_STAGES)]
                rec, gram = teacher(feats)
                recs.append(rec)
                out.teacher_grams.append(gram)
            out.reconstruction = torch.cat(recs, dim=1)
        return out

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Trilinear (align_corners) upsampling of deep-supervision logits to the patch size; on
        the CPU as three small GEMMs (:func:`fastops.upsample_trilinear`, the same function)."""
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return fastops.upsample_trilinear(x, self.patch_size)
        return F.interpolate(x, size=self.patch_size, mode="trilinear", align_corners=True)

    def inference_state_dict(self):
        """State dict without the training-only modules (teachers, deep-supervision heads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.training_only_prefixes)}
