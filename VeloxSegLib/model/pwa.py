"""Paired Window Attention (PWA, paper Sec. 3.1) and the transformer block around it."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fastops
from .layers import FFN, Conv1x1, Dropout, LayerNorm3d

Size3 = Tuple[int, int, int]


def window_pairs(feature_size: Sequence[int], min_big: Sequence[int], min_small: Sequence[int] = (1, 1, 1),
                 ratio: int = 2) -> Tuple[List[Size3], List[Size3]]:
    """Big/small window pairs B_i = B_1 r^(i-1), S_i = S_1 r^(i-1) while B_i fits the feature map."""
    bigs, smalls = [], []
    big, small = list(min_big), list(min_small)
    while any(b <= f for b, f in zip(big, feature_size)):
        bigs.append(tuple(big))
        smalls.append(tuple(small))
        big = [b * ratio for b in big]
        small = [s * ratio for s in small]
    return bigs, smalls


def relative_position_index(n: Sequence[int]) -> torch.Tensor:
    """(L, L) index into a ((2n0-1)(2n1-1)(2n2-1)) table of relative offsets (Swin-style)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(k) for k in n], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + torch.tensor([k - 1 for k in n])
    mult = torch.tensor([(2 * n[1] - 1) * (2 * n[2] - 1), 2 * n[2] - 1, 1])
    return (rel * mult).sum(-1)


def resize_relative_position_bias_table(table: torch.Tensor, old_n: Sequence[int],
                                        new_n: Sequence[int]) -> torch.Tensor:
    """A bias table for ``old_n`` tokens per axis, re-laid for ``new_n`` tokens per axis.

    Entries are indexed by relative offset (``relative_position_index``), and an offset is the
    same distance on the feature grid at any window size, so every offset both tables hold keeps
    its learned bias exactly: the old table goes to the centre of the new one (or the new one is
    cut from the old one's centre). Offsets the old table never held take the value of the
    nearest offset it did (edge replication). ``table`` is ((2n0-1)(2n1-1)(2n2-1), heads).
    """
    old_n, new_n = tuple(int(v) for v in old_n), tuple(int(v) for v in new_n)
    old_shape = tuple(2 * k - 1 for k in old_n)
    if table.ndim != 2 or table.shape[0] != math.prod(old_shape):
        raise ValueError(f"bias table of shape {tuple(table.shape)} does not fit {old_n} tokens per axis")
    heads = table.shape[1]
    grid = table.detach().reshape(*old_shape, heads).permute(3, 0, 1, 2)  # (heads, 2n0-1, 2n1-1, 2n2-1)
    for axis, (o, n) in enumerate(zip(old_n, new_n)):
        d = n - o
        if d < 0:  # keep the central offsets -(n-1)..(n-1)
            grid = grid.narrow(axis + 1, -d, 2 * n - 1)
        elif d > 0:  # replicate the outermost offsets outward, d on each side
            idx = torch.arange(-d, 2 * o - 1 + d).clamp(0, 2 * o - 2)
            grid = grid.index_select(axis + 1, idx)
    return grid.permute(1, 2, 3, 0).reshape(-1, heads).contiguous().to(table.dtype)


class PairedWindowAttention(nn.Module):
    """Multimodal PWA: paired-window gathering, one grouped attention over all pairs and
    modalities, trilinear scattering and a per-modality mixer with residual (paper Eq. 3-6).

    Channel group i of Q/K/V belongs to window pair i. Inside each big window B_i the max over
    every small window S_i is a salient token; all pairs yield L = |B_1/S_1| tokens per window, so
    all pairs and modalities batch into sequences of M*L tokens. The relative position bias over
    the L-token window is shared by every modality pair.
    """

    def __init__(self, channels: int, num_modalities: int, feature_size: Sequence[int],
                 min_big: Sequence[int], min_small: Sequence[int] = (1, 1, 1), num_heads: int = 1,
                 head_dim: int = 4, attn_drop: float = 0.1, proj_drop: float = 0.1, ratio: int = 2):
        super().__init__()
        self.channels = channels
        self.num_modalities = num_modalities
        self.feature_size = tuple(feature_size)
        self.bigs, self.smalls = window_pairs(feature_size, min_big, min_small, ratio)
        for big, small in zip(self.bigs, self.smalls):
            if any(f % b for f, b in zip(feature_size, big)) or any(b % s for b, s in zip(big, small)):
                raise ValueError(f"window pair {big}/{small} does not tile the feature map {tuple(feature_size)}")
        self.tokens_per_axis = tuple(b // s for b, s in zip(self.bigs[0], self.smalls[0]))
        self.num_tokens = math.prod(self.tokens_per_axis)
        self.num_pairs = len(self.bigs)
        self.num_heads = num_heads
        self.qk_dim = head_dim
        self.channels_qk = self.num_pairs * num_heads * head_dim
        self.channels_v = math.ceil(channels / self.channels_qk) * self.channels_qk
        self.v_dim = self.channels_v // (self.num_pairs * num_heads)
        self.scale = head_dim ** -0.5

        self.norms = nn.ModuleList([LayerNorm3d(channels) for _ in range(num_modalities)])
        # q, k and v of one modality in one 1x1 conv (same function as three convs).
        self.qkv = nn.ModuleList([Conv1x1(channels, 2 * self.channels_qk + self.channels_v)
                                  for _ in range(num_modalities)])
        self.mixers = nn.ModuleList([Conv1x1(self.channels_v, channels) for _ in range(num_modalities)])
        self.attn_drop = Dropout(attn_drop)
        self.proj_drops = nn.ModuleList([Dropout(proj_drop) for _ in range(num_modalities)])
        n = self.tokens_per_axis
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * n[0] - 1) * (2 * n[1] - 1) * (2 * n[2] - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(n), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, M*L, M*L): the L x L bias tiled over every modality pair."""
        L = self.num_tokens
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(L, L, self.num_heads).permute(2, 0, 1)
        return bias.repeat(1, self.num_modalities, self.num_modalities)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """(B, pairs*heads*dim, D, H, W) -> (B, heads, windows of all pairs, L, dim)."""
        b = x.shape[0]
        out = []
        per_pair = self.num_heads * dim
        for i, (big, small) in enumerate(zip(self.bigs, self.smalls)):
            xi = x[:, i * per_pair:(i + 1) * per_pair]
            if any(s > 1 for s in small):
                xi = F.max_pool3d(xi, small, small)  # salient token of every small window
            n = tuple(bg // s for bg, s in zip(big, small))
            _, _, d, h, w = xi.shape
            xi = xi.reshape(b, self.num_heads, dim, d // n[0], n[0], h // n[1], n[1], w // n[2], n[2])
            xi = xi.permute(0, 1, 3, 5, 7, 4, 6, 8, 2)  # (B, heads, Nd, Nh, Nw, nd, nh, nw, dim)
            out.append(xi.reshape(b, self.num_heads, -1, self.num_tokens, dim))
        return torch.cat(out, dim=2)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        """(B, heads, windows of all pairs, L, v_dim) -> (B, pairs*heads*v_dim, D, H, W)."""
        b, heads, _, _, c = t.shape
        D, H, W = self.feature_size
        n = self.tokens_per_axis
        out, start = [], 0
        for big, small in zip(self.bigs, self.smalls):
            Nd, Nh, Nw = D // big[0], H // big[1], W // big[2]
            ti = t[:, :, start:start + Nd * Nh * Nw]
            start += Nd * Nh * Nw
            ti = ti.reshape(b, heads, Nd, Nh, Nw, n[0], n[1], n[2], c)
            if any(s > 1 for s in small):
                ti = ti.permute(0, 1, 2, 3, 4, 8, 5, 6, 7).reshape(-1, 1, *n)
                ti = F.interpolate(ti, size=big, mode="trilinear", align_corners=True)
                ti = ti.reshape(b, heads, Nd, Nh, Nw, c, *big).permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
            else:
                ti = ti.permute(0, 1, 8, 2, 5, 3, 6, 4, 7)  # (B, heads, c, Nd, nd, Nh, nh, Nw, nw)
            out.append(ti.reshape(b, heads * c, D, H, W))
        return torch.cat(out, dim=1)

    fast = True  # use the CPU fast path when no gradient is needed (same function)

    def forward(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if fastops.use_fast(self.fast, xs[0]):
            return self._forward_fast(xs)
        M = self.num_modalities
        qs, ks, vs = [], [], []
        for m in range(M):
            qkv = self.qkv[m](self.norms[m](xs[m]))
            q, k, v = torch.split(qkv, [self.channels_qk, self.channels_qk, self.channels_v], dim=1)
            qs.append(self.gather(q, self.qk_dim))
            ks.append(self.gather(k, self.qk_dim))
            vs.append(self.gather(v, self.v_dim))
        q, k, v = torch.cat(qs, -2), torch.cat(ks, -2), torch.cat(vs, -2)  # (B, heads, windows, M*L, dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = scores + self.relative_position_bias()[None, :, None]
        weights = self.attn_drop(scores.softmax(dim=-1))
        attn = torch.matmul(weights, v)
        L = self.num_tokens
        outs = []
        for m in range(M):
            y = self.scatter(attn[..., m * L:(m + 1) * L, :])
            outs.append(xs[m] + self.proj_drops[m](self.mixers[m](y)))
        return outs


    def _fast_projection(self, m: int):
        """q/k/v weights of modality m with the layer-norm affine and the q scale folded in (times
        log2(e): the fast attention works in base 2), rows regrouped per window pair as
        [q_i | k_i | v_i]."""
        w, b = fastops.fold_affine(self.qkv[m].weight, self.qkv[m].bias, self.norms[m].weight, self.norms[m].bias)
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        cq = self.channels_qk
        w_parts, b_parts = [], []
        q_scale = self.scale * fastops.LOG2E
        for i in range(self.num_pairs):
            for off, width, scale in ((0, h * dq, q_scale), (cq, h * dq, 1.0), (2 * cq, h * dv, 1.0)):
                lo = off + i * width
                w_parts.append(w[lo:lo + width] * scale)
                b_parts.append(b[lo:lo + width] * scale)
        return torch.cat(w_parts), torch.cat(b_parts)

    def _forward_fast(self, xs: Sequence[torch.Tensor], residual_scale: float = 1.0) -> List[torch.Tensor]:
        """The fast path; the output is ``residual_scale * x + mixer(attention)`` per modality
        (2 gives the block's double residual in the same pass)."""
        M, B = self.num_modalities, xs[0].shape[0]
        D, H, W = self.feature_size
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        n0, n1, n2 = self.tokens_per_axis
        L = self.num_tokens
        blk = h * (2 * dq + dv)
        eps = self.norms[0].eps
        qkv = xs[0].new_empty(M * B, self.num_pairs * blk, D, H, W)
        for m in range(M):
            fastops.pointwise(fastops.channel_normalize(xs[m], eps), *fastops.cached(
                self, f"qkv{m}", (self.qkv[m].weight, self.qkv[m].bias, self.norms[m].weight, self.norms[m].bias),
                lambda: self._fast_projection(m)), out=qkv[m * B:(m + 1) * B])  # (M*B, pairs*blk, D, H, W)
        counts = [(D // bg[0]) * (H // bg[1]) * (W // bg[2]) for bg in self.bigs]
        total = sum(counts)
        q = qkv.new_empty(B, h, total, M * L, dq)
        k = qkv.new_empty(B, h, total, M * L, dq)
        v_t = qkv.new_empty(B, h, total, dv + 1, M * L)  # transposed for the value GEMM, plus a row
        v_t[:, :, :, dv].fill_(1.0)  # of ones that makes the GEMM sum the probabilities too
        start = 0
        for i, (big, small) in enumerate(zip(self.bigs, self.smalls)):
            xi = qkv[:, i * blk:(i + 1) * blk]
            if any(s > 1 for s in small):
                xi = fastops.max_pool_separable(xi, small)
            Nd, Nh, Nw = D // big[0], H // big[1], W // big[2]
            xv = xi.reshape(M, B, blk, Nd, n0, Nh, n1, Nw, n2)
            for dst, lo, width in ((q, 0, dq), (k, h * dq, dq)):
                src = xv[:, :, lo:lo + h * width].reshape(M, B, h, width, Nd, n0, Nh, n1, Nw, n2)
                tgt = dst[:, :, start:start + counts[i]].view(B, h, Nd, Nh, Nw, M, n0, n1, n2, width)
                fastops.strided_copy(tgt, src.permute(1, 2, 4, 6, 8, 0, 5, 7, 9, 3))
            src = xv[:, :, 2 * h * dq:2 * h * dq + h * dv].reshape(M, B, h, dv, Nd, n0, Nh, n1, Nw, n2)
            tgt = v_t[:, :, start:start + counts[i], :dv].unflatten(-1, (M, n0, n1, n2)).unflatten(2, (Nd, Nh, Nw))
            fastops.strided_copy(tgt, src.permute(1, 2, 4, 6, 8, 3, 0, 5, 7, 9))
            start += counts[i]
        bias = fastops.cached(self, "bias2", (self.relative_position_bias_table,),
                              lambda: self.relative_position_bias() * fastops.LOG2E)
        out = fastops.windowed_attention(q, k, v_t, bias, scratch=lambda name, shape: fastops.workspace(
            self, name, shape, qkv)).transpose(-1, -2)  # (B, h, windows, M*L, dv) view
        y = qkv.new_empty(M * B, self.channels_v, D, H, W)
        start = 0
        for i, (big, small) in enumerate(zip(self.bigs, self.smalls)):
            Nd, Nh, Nw = D // big[0], H // big[1], W // big[2]
            t = out[:, :, start:start + counts[i]].reshape(B, h, Nd, Nh, Nw, M, n0, n1, n2, dv)
            start += counts[i]
            if any(s > 1 for s in small):  # trilinear (align_corners) scattering as 3 small GEMMs
                b0, b1, b2 = big
                a0, a1, a2 = (fastops.interp_matrix(n, bg, t.dtype, t.device) for n, bg in zip((n0, n1, n2), big))
                lead = (B, h, Nd, Nh, Nw, M)
                t = torch.matmul(a2, t)  # (..., n0, n1, b2, dv)
                t = torch.matmul(a1, t.reshape(*lead, n0, n1, b2 * dv)).reshape(*lead, n0, b1 * b2 * dv)
                t = torch.matmul(a0, t).reshape(*lead, b0, b1, b2, dv)
            else:
                b0, b1, b2 = n0, n1, n2
            tgt = y[:, i * h * dv:(i + 1) * h * dv].view(M, B, h, dv, Nd, b0, Nh, b1, Nw, b2)
            fastops.strided_copy(tgt, t.permute(5, 0, 1, 9, 2, 6, 3, 7, 4, 8))
        return [fastops.pointwise(y[m * B:(m + 1) * B], self.mixers[m].weight, self.mixers[m].bias, residual=xs[m],
                                  residual_scale=residual_scale) for m in range(M)]


class PWABlock(nn.Module):
    """Transformer block of the attention stream: multimodal PWA, then per-modality FFN.

    ``double_residual`` (default, as the published weights were trained) adds the block input
    again on top of the PWA output, which already contains it.
    """

    def __init__(self, channels: int, num_modalities: int, feature_size: Sequence[int], min_big: Sequence[int],
                 num_heads: int, head_dim: int, ffn_expansion: int, attn_drop: float = 0.1,
                 proj_drop: float = 0.1, double_residual: bool = True):
        super().__init__()
        self.attn = PairedWindowAttention(channels, num_modalities, feature_size, min_big,
                                          num_heads=num_heads, head_dim=head_dim,
                                          attn_drop=attn_drop, proj_drop=proj_drop)
        self.double_residual = double_residual
        self.norms = nn.ModuleList([LayerNorm3d(channels) for _ in range(num_modalities)])
        self.ffns = nn.ModuleList([FFN(channels, ffn_expansion, proj_drop) for _ in range(num_modalities)])

    fast = True

    def forward(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.double_residual and fastops.use_fast(self.fast and self.attn.fast, xs[0]):
            ys = self.attn._forward_fast(xs, residual_scale=2.0)  # x + (x + PWA(x)) as 2x + PWA(x), one pass
        else:
            ys = self.attn(xs)
            if self.double_residual:
                ys = [x + y for x, y in zip(xs, ys)]
        if fastops.use_fast(self.fast, ys[0]):
            return [self._ffn_fast(m, y) for m, y in enumerate(ys)]
        return [y + self.ffns[m](self.norms[m](y)) for m, y in enumerate(ys)]

    def _ffn_fast(self, m: int, y: torch.Tensor) -> torch.Tensor:
        norm, ffn = self.norms[m], self.ffns[m]
        w1, b1 = fastops.cached(self, f"ffn{m}", (ffn.fc1.weight, ffn.fc1.bias, norm.weight, norm.bias),
                                lambda: fastops.fold_affine(ffn.fc1.weight, ffn.fc1.bias, norm.weight, norm.bias))
        hidden = fastops.gelu_(fastops.pointwise(fastops.channel_normalize(y, norm.eps), w1, b1))
        # y is a fresh tensor (the attention's output): the second 1x1 conv accumulates into it
        return fastops.pointwise(hidden, ffn.fc2.weight, ffn.fc2.bias, residual=y, overwrite_residual=True)
