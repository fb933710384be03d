"""CPU fast paths used at inference (no autograd), and a few used by the CPU training path with
autograd (:func:`patchify_conv`, :func:`upsample_trilinear`, :func:`pointwise`,
:func:`grouped_conv`; docs/training.md). Each computes the same function as the plain module code,
up to float rounding (tests compare them to 1e-4).

Profiling the plain network on one CPU thread showed the time going to memory-bound work around
tiny matrices: attention scores of 2-4 heads x 54..432 tokens, 1x1 convolutions through PyTorch's
slow conv path, max pooling with indices, trilinear interpolation of 3-token grids and layer norms
written as nine element-wise passes. These helpers replace them with cache-sized batched GEMMs,
separable reductions and folded affine parameters. A second round (profile per module, then per
operator) found: the value product of attention in a BLAS shape 4x slower than its transpose;
PyTorch's CPU instance norm 4x slower than two plain passes; the pixel-shuffle head (44% of the
MACs) at the GEMM floor, so it now does half the multiply-adds through Winograd F(4, 3); and page
faults on the head's fresh temporaries doubling its time, so it reuses them. A third round: the
softmax is bound by ``exp``, and ``exp2`` is 2.7x faster, so attention runs in base 2 and takes its
row sums from the value GEMM; PyTorch's group norm (one channel per group) beats the two passes.
A fourth, on an AVX2-only CPU whose GEMMs top out at 8-10 GMAC/s on one thread: the JL
convolutions' 3^3 and 5^3 branches at 24^3 and 12^3 share one FFT of their input
(:func:`grouped_conv_fft`), which needs a fraction of their multiply-adds. A fifth: the head's
Winograd also runs over depth (F(2, 3), :func:`conv3x3_shuffle_winograd2d`), a third of the
direct convolution's multiply-adds instead of a half. A sixth, on the same CPU: only the 5^3
branch takes the FFT (the 3^3 one is cheaper direct, :data:`FFT_CONV_MIN_KERNEL`); residual 1x1
convolutions accumulate into one fresh tensor, or into a temporary the caller hands over, instead
of copying it again (and the PWA block's double residual rides along as a scale); biases that an
instance norm cancels are not added (:func:`bias_before`); the complex products of the FFT path
are fused multiply-adds; the head adds its bias to one of its 24 Winograd products, which carries
it to all 8 outputs. A seventh: the head's GEMMs put the output channels innermost (width
sub-position first), so its pixel-shuffle copy writes whole output rows, and that copy and the
attention's window gathers go through numpy's copy loop on one thread (:func:`strided_copy`); the
decoder's up-sampling is one such GEMM and copy (:func:`conv1x1_shuffle`); the smallest stride-2
convolution goes back to oneDNN (:data:`IM2COL_MIN_SIZE`).
"""
from __future__ import annotations

import math
import threading
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def use_fast(enabled: bool, x: torch.Tensor) -> bool:
    """Whether a block takes its fast path: switched on, no autograd, and a CPU tensor. On a GPU
    the plain modules run (they are what autocast and cuDNN are made for)."""
    return bool(enabled) and not torch.is_grad_enabled() and x.device.type == "cpu"


def cached(module, name: str, tensors, build):
    """Weights derived for the fast path (folded norms, regrouped or block-diagonal matrices),
    rebuilt only when a source tensor changes (storage or in-place version): without the cache,
    re-deriving them costs a quarter of a 96^3 forward pass in small-op overhead."""
    signature = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    store = module.__dict__.setdefault("_fast_cache", {})
    hit = store.get(name)
    if hit is not None and hit[0] == signature:
        return hit[1]
    value = build()
    store[name] = (signature, value)
    return value


def workspace(module, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor kept on ``module`` and reused while shape, dtype and device stay the same.

    The shuffle head's temporaries are the largest of the forward pass (about 30 MB at 96^3) and
    are allocated last, after the allocator has handed most freed memory back to the system:
    fresh pages cost a page fault each, which doubled the head's time. Reusing them removes that
    (results are unchanged; the buffers live as long as the model). Each thread gets its own
    buffers, so concurrent forward passes of one model do not share scratch memory.
    """
    store = module.__dict__.setdefault("_workspace", {})
    key = (name, threading.get_ident())
    shape = tuple(int(v) for v in shape)
    buf = store.get(key)
    if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        store[key] = buf
    return buf


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
              residual_scale: float = 1.0, overwrite_residual: bool = False) -> torch.Tensor:
    """1x1x1 convolution as a (batched) GEMM: (B, C, *S) -> (B, O, *S); optional fused residual
    (``residual_scale * residual`` is added); ``out`` (contiguous, (B, O, *S)) receives the result
    instead of a new tensor (not with a residual).

    With a residual the GEMM accumulates in place into one fresh tensor that already holds
    ``residual_scale * residual + bias`` (one pass; ``baddbmm`` with a separate base copies it
    again). ``overwrite_residual`` (only for a contiguous temporary the caller no longer needs,
    without autograd) accumulates into ``residual`` itself and returns it.
    """
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    w = weight.reshape(weight.shape[0], c)
    xf = x.reshape(b, c, -1)
    dst = None if out is None else out.view(b, w.shape[0], -1)
    if residual is not None:
        if out is not None:
            raise ValueError("pointwise: out is not supported with a residual")
        if overwrite_residual and residual_scale == 1.0 and residual.is_contiguous():
            base = residual.view(b, w.shape[0], -1)
            if bias is not None:
                base.add_(bias.view(1, -1, 1))
        elif bias is not None:
            base = torch.add(bias.view(1, -1, 1), residual.reshape(b, w.shape[0], -1), alpha=residual_scale)
        else:
            base = residual.reshape(b, w.shape[0], -1).mul(residual_scale)
        res = base.baddbmm_(w.expand(b, -1, -1), xf)
    elif bias is not None:
        res = torch.baddbmm(bias.view(1, -1, 1), w.expand(b, -1, -1), xf, out=dst)
    else:
        res = torch.matmul(w, xf, out=dst)
    return res.view(b, w.shape[0], *spatial)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in place, for fresh temporaries: same values as ``F.gelu`` without a new
    allocation (fresh pages for every hidden activation cost a page fault each)."""
    return torch.ops.aten.gelu_(x)


@lru_cache(maxsize=None)
def grouped_conv_channels_last_default() -> bool:
    """Whether :func:`grouped_conv` runs in channels-last layout by default: on x86 CPUs whose
    widest vector unit PyTorch uses is AVX2. There oneDNN runs the JL convolutions (4-8 channels
    per group, 3^3 and 5^3 kernels) in the default layout at about 2 GMAC/s, half of a 96^3
    forward pass; channels-last 3D is 2-3x faster for them (veloxseg-b 302 -> 230 ms per 96^3
    patch on one AVX2 core). On AVX-512 CPUs the default layout already runs near the vector
    peak, so it stays."""
    try:
        return torch.backends.cpu.get_cpu_capability() == "AVX2"
    except Exception:  # pragma: no cover - older or unusual builds
        return False


#: smallest grid (every axis) at which :func:`grouped_conv` goes channels-last by default: on the
#: 6^3 and 3^3 stages (8 and 16 channels per group) oneDNN's default layout is the faster one
#: (2026-12-04, one AVX2 core: 5^3 at 3^3 x 128 channels 1.0 against 1.8 ms, at 6^3 x 64 1.8
#: against 2.2 ms; with autograd, 2 threads, batch 2: 5.8 against 9.7 ms at 3^3), at 12^3 the two
#: tie at inference and channels-last wins with autograd (28 against 35 ms for the 5^3 branch)
CHANNELS_LAST_MIN_SIZE = 12


def grouped_conv(conv: torch.nn.Conv3d, x: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """``conv(x)`` for a grouped 3D convolution, computed in channels-last 3D layout when
    ``channels_last`` (default: :func:`grouped_conv_channels_last_default` on the CPU, for grids of
    at least :data:`CHANNELS_LAST_MIN_SIZE` voxels along every axis); the result is returned in the
    default contiguous layout either way (same values up to float rounding)."""
    if channels_last is None:
        channels_last = (x.device.type == "cpu" and conv.groups > 1 and min(x.shape[2:]) >= CHANNELS_LAST_MIN_SIZE
                         and grouped_conv_channels_last_default())
    if not channels_last:
        return conv(x)
    return conv(x.contiguous(memory_format=torch.channels_last_3d)).contiguous()


def patchify_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride=kernel)`` for a kernel equal to its stride (no padding,
    one group, every axis divisible by the kernel): each output voxel is one non-overlapping patch
    times the weight, so the whole convolution is one GEMM over the patches. Used with autograd on
    the CPU, where PyTorch's weight gradient of the patch embedding (one input channel, 4^3 stride
    4) took 40 ms per 96^3 batch of 2 against 11 ms for this GEMM's forward and backward
    (2026-12-04, 2 threads); without autograd the direct convolution is faster and stays."""
    b, c, d, h, w = x.shape
    o = weight.shape[0]
    kd, kh, kw = weight.shape[2:]
    if weight.shape[1] != c or d % kd or h % kh or w % kw:
        raise ValueError(f"patchify_conv needs {weight.shape[1]} channels and a grid divisible by the kernel "
                         f"{(kd, kh, kw)}, got {tuple(x.shape)}")
    patches = x.reshape(b, c, d // kd, kd, h // kh, kh, w // kw, kw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    patches = patches.reshape(-1, c * kd * kh * kw)
    wt = weight.reshape(o, -1).t()
    y = torch.addmm(bias, patches, wt) if bias is not None else patches @ wt
    return y.view(b, d // kd, h // kh, w // kw, o).permute(0, 4, 1, 2, 3).contiguous()


#: smallest spatial size (every axis) at which :func:`grouped_conv_fft` beats oneDNN on AVX2
#: (one thread, 2026-12-04: 3^3 + 5^3 branches at 24^3 x 16 channels 21 against 32 ms, at 12^3 x 32
#: channels 7.5 against 10.2 ms; at 6^3 5.7 against 2.8 ms, where the FFTs' overhead dominates)
FFT_CONV_MIN_SIZE = 12
#: smallest kernel :class:`JLConv` sends through :func:`grouped_conv_fft`: the 3^3 branch costs the
#: FFT route an inverse transform and a spectral product, as much as its direct channels-last
#: convolution at 24^3 and twice as much at 12^3 (one thread, 2026-12-04: 5^3 through the FFT and
#: 3^3 direct 5.5 against 6.9 ms for both through the FFT at 12^3 x 32 channels; 16.7 against 17.5
#: at 24^3 x 16), so only the 5^3 branch takes it
FFT_CONV_MIN_KERNEL = 5


def fft_conv_default(x: torch.Tensor) -> bool:
    """Whether :class:`JLConv` runs its 3^3 and 5^3 branches through :func:`grouped_conv_fft`: a
    float32 CPU tensor of at least :data:`FFT_CONV_MIN_SIZE` voxels along every axis, on an AVX2
    CPU (where oneDNN's grouped convolutions run at about 5 GMAC/s even channels-last; AVX-512 CPUs
    run them near the vector peak and keep them)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and min(x.shape[2:]) >= FFT_CONV_MIN_SIZE
            and grouped_conv_channels_last_default())


def fft_kernel_spectrum(conv: torch.nn.Conv3d, size: Sequence[int]) -> torch.Tensor:
    """rfftn of ``conv``'s weight laid out for a circular correlation on a grid of ``size``:
    (groups, out per group, in per group, frequencies), complex64; the bias is not included."""
    o, gin = conv.weight.shape[:2]
    groups = conv.groups
    h = conv.weight.new_zeros((o, gin) + tuple(size))
    k = conv.kernel_size
    # correlation y[i] = sum_t w[t] x[i + t - pad] == circular convolution with h[(pad - t) mod P]
    h[:, :, :k[0], :k[1], :k[2]] = conv.weight.flip(2, 3, 4)
    h = torch.roll(h, shifts=tuple(-p for p in conv.padding), dims=(2, 3, 4))
    spec = torch.fft.rfftn(h, dim=(2, 3, 4))
    return spec.reshape(groups, o // groups, gin, -1).contiguous()


def grouped_conv_fft(x: torch.Tensor, convs: Sequence[torch.nn.Conv3d], spectra=None, biases=None) -> list:
    """``[conv(x) for conv in convs]`` for stride-1 grouped 3D convolutions with "same" zero
    padding (odd kernels, padding k // 2) and the same groups, through one FFT of ``x``: each
    output is a grouped product of spectra and one inverse FFT. The grid is the input padded by
    the largest kernel minus one, so the circular correlation equals the zero-padded one on the
    output voxels. The same function as the direct convolution up to float rounding (a few 1e-7
    relative). ``spectra``: per conv, a function of the grid size that returns
    :func:`fft_kernel_spectrum` (so callers can cache them); default computes them. ``biases``:
    per conv, the bias to add (None for none); default each conv's own."""
    b, c, d, h, w = x.shape
    kmax = max(max(conv.kernel_size) for conv in convs)
    size = (d + kmax - 1, h + kmax - 1, w + kmax - 1)
    n = size[0] * size[1] * size[2]
    xf = torch.fft.rfftn(F.pad(x, (0, kmax - 1, 0, kmax - 1, 0, kmax - 1)), dim=(2, 3, 4))
    fshape = xf.shape[2:]
    outs = []
    for j, conv in enumerate(convs):
        spec = spectra[j](size) if spectra is not None else fft_kernel_spectrum(conv, size)
        groups, og, gin, nf = spec.shape
        xg = xf.reshape(b, groups, 1, gin, nf)
        y = spec[:, :, 0] * xg[:, :, :, 0]  # (B, groups, out per group, frequencies)
        for i in range(1, gin):  # fused multiply-add: no temporary per input channel
            y.addcmul_(spec[:, :, i], xg[:, :, :, i])
        bias = conv.bias if biases is None else biases[j]
        if bias is not None:  # a constant on the whole grid lives in the zero frequency
            y.view(b, groups * og, nf)[:, :, 0] += bias * n
        outs.append(_irfft3_cropped(y.reshape(b, groups * og, *fshape), size, (d, h, w)))
    return outs


def _irfft3_cropped(spec: torch.Tensor, size: Sequence[int], keep: Sequence[int]) -> torch.Tensor:
    """``irfftn(spec, s=size)[..., :keep[0], :keep[1], :keep[2]]``, contiguous: one axis at a time,
    each inverse transform only on what the crop keeps of the axes already done (the depth
    transform on every (height, width) frequency, the height transform on the kept depths, the
    real width transform on the kept (depth, height) rows). One AVX2 core, 2026-12-05, alternating:
    1.10x faster than ``irfftn`` and the crop at 28^3 x 16 channels, 1.47x at 16^3 x 32."""
    a = torch.fft.ifft(spec, dim=2)[:, :, :keep[0]]
    a = torch.fft.ifft(a, dim=3)[:, :, :, :keep[1]]
    return torch.fft.irfft(a, n=size[2], dim=4)[..., :keep[2]].contiguous()


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, C/groups, 1, 1, 1) grouped 1x1 weight -> dense (O, C) block-diagonal matrix."""
    o, cg = weight.shape[:2]
    og = o // groups
    dense = weight.new_zeros(o, cg * groups)
    w = weight.reshape(o, cg)
    for g in range(groups):
        dense[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = w[g * og:(g + 1) * og]
    return dense


def channel_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer norm over channels (dim 1) without affine: (x - mean) / sqrt(var + eps)."""
    d = x - x.mean(1, keepdim=True)
    var = (d * d).mean(1, keepdim=True)  # (torch.var_mean over dim 1 is 20x slower on CPU)
    return d.mul_(torch.rsqrt(var.add_(eps)))


def instance_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a plain ``InstanceNorm3d`` (no affine, no running statistics), computed as
    a group norm with one channel per group: the same normalization, and PyTorch's CPU group norm
    kernel is 1.6-4x faster than two plain passes over each (sample, channel) row, which were
    themselves 4x faster than its instance norm (it goes through batch norm). Other norms run as
    themselves."""
    if not isinstance(norm, torch.nn.InstanceNorm3d) or norm.affine or norm.track_running_stats:
        return norm(x)
    return F.group_norm(x, x.shape[1], eps=norm.eps)


def bias_before(norm: torch.nn.Module, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``bias`` of a layer whose output goes straight into ``norm``, or None where the norm cancels
    it: a plain ``InstanceNorm3d`` (no affine, no running statistics) subtracts each channel's
    mean, so a per-channel constant added before it changes nothing but the rounding. The fast
    paths then skip the pass that adds it."""
    if isinstance(norm, torch.nn.InstanceNorm3d) and not norm.affine and not norm.track_running_stats:
        return None
    return bias


def fold_affine(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor):
    """W (gamma * x + beta) + b == (W * gamma) x + (W beta + b) for a 1x1 conv after a norm."""
    w = weight.reshape(weight.shape[0], -1)
    new_w = w * gamma[None, :]
    new_b = w @ beta
    if bias is not None:
        new_b = new_b + bias
    return new_w, new_b


def max_pool_separable(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Non-overlapping 3D max pooling as three 1D max reductions (exact, no indices).

    Outer axes first, so that the first two passes reduce whole contiguous rows (a pair of rows
    by one element-wise maximum); the innermost axis, the only strided one, is reduced last on
    the smallest tensor.
    """
    b, c, d, h, w = x.shape
    sd, sh, sw = size
    if sd > 1:
        x = x.reshape(b, c, d // sd, sd, h * w)
        x = torch.maximum(x[:, :, :, 0], x[:, :, :, 1]) if sd == 2 else x.amax(3)
    if sh > 1:
        x = x.reshape(b, c, d // sd, h // sh, sh, w)
        x = torch.maximum(x[:, :, :, :, 0], x[:, :, :, :, 1]) if sh == 2 else x.amax(4)
    if sw > 1:
        x = x.reshape(b, c, d // sd, h // sh, w // sw, sw).amax(-1)
    return x.reshape(b, c, d // sd, h // sh, w // sw)


@lru_cache(maxsize=64)
def _interp_matrix_cpu(n: int, size: int) -> torch.Tensor:
    """(size, n) linear interpolation matrix with align_corners=True (called by
    :func:`interp_matrix` only, outside inference mode)."""
    a = torch.zeros(size, n, dtype=torch.float64)
    if n == 1 or size == 1:
        a[:, 0] = 1.0
        return a
    pos = torch.arange(size, dtype=torch.float64) * (n - 1) / (size - 1)
    lo = pos.floor().clamp(max=n - 2).long()
    frac = pos - lo
    rows = torch.arange(size)
    a[rows, lo] += 1 - frac
    a[rows, lo + 1] += frac
    return a


@lru_cache(maxsize=256)
def interp_matrix(n: int, size: int, dtype, device) -> torch.Tensor:
    """:func:`_interp_matrix_cpu` in ``dtype`` on ``device``, cached. Built outside inference mode
    whatever the caller's mode: a cached inference tensor, made by the fast path during a
    validation, could not be saved for backward by a later training step."""
    with torch.inference_mode(False):
        return _interp_matrix_cpu(n, size).to(dtype=dtype, device=device)


def upsample_trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="trilinear", align_corners=True)`` for (N, C, d, h, w) as three
    small matrix products, one per axis (the interpolation is separable). With autograd on the CPU
    the deep-supervision logits (3^3, 6^3 and 12^3 grids to 96^3) go forward and backward in 5-9 ms
    each against 38 ms for ``F.interpolate`` (2026-12-04, batch 2, 2 threads)."""
    n, c, d, h, w = x.shape
    big_d, big_h, big_w = (int(v) for v in size)
    t = torch.matmul(x, interp_matrix(w, big_w, x.dtype, x.device).t())  # (n, c, d, h, W)
    t = torch.matmul(interp_matrix(h, big_h, x.dtype, x.device), t)  # (n, c, d, H, W)
    t = torch.matmul(interp_matrix(d, big_d, x.dtype, x.device), t.reshape(n, c, d, big_h * big_w))
    return t.view(n, c, big_d, big_h, big_w)


LOG2E = 1.4426950408889634  # log2(e): softmax(s) == 2^(s log2 e) / sum 2^(s log2 e)
# Row sums of 2^scores outside [_SUM_MIN, inf) (overflow, NaN, or every score so negative that the
# largest terms are subnormal) send a chunk through the max-subtracted softmax instead.
_SUM_MIN = 2.0 ** -100


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v1_t: torch.Tensor, bias2: torch.Tensor,
                       chunk_elems: int = 1 << 18, scratch=None) -> torch.Tensor:
    """softmax(q k^T + bias) v over (B, heads, windows, T, d), computed in base 2 and returned
    transposed: (B, heads, windows, dv, T).

    Inputs are in log2 units: ``q`` already carries the 1/sqrt(d) scale times log2(e) and
    ``bias2`` (heads, T, T) is the bias times log2(e), so the probabilities are
    2^s / sum 2^s, the same numbers as the natural-base softmax; ``exp2`` runs 2.7x faster than
    ``exp`` on CPU. ``v1_t`` is v transposed with one extra row of ones, (B, heads, windows,
    dv + 1, T): the value GEMM then also yields every row's sum, so the T x T probabilities are
    never normalized (the dv x T result is). The usual max subtraction, which only guards
    against overflow, is skipped; a chunk whose row sums overflow or underflow is recomputed with
    it. The value product is v^T P^T: with dv of 4-8 the (T x T)(T x dv) GEMM runs at a quarter
    of the speed of its transpose on CPU BLAS. Windows go in chunks whose score block stays in
    cache; the bias is fused into the score GEMM through baddbmm. ``scratch(name, shape)``
    supplies reusable temporaries (see :func:`workspace`).
    """
    b, h, nw, t, _ = q.shape
    dv = v1_t.shape[-2] - 1
    out = q.new_empty(b, h, nw, dv, t)
    n = min(nw, max(1, chunk_elems // (t * t)))
    scratch = scratch or (lambda name, shape: q.new_empty(shape))
    s_buf = scratch("scores", (n, t, t))
    r_buf = scratch("values", (n, dv + 1, t))
    for bi in range(b):
        for hi in range(h):
            bh = bias2[hi]
            for w0 in range(0, nw, n):
                w1 = min(nw, w0 + n)
                s, r = s_buf[:w1 - w0], r_buf[:w1 - w0]
                qc, kc, vc = q[bi, hi, w0:w1], k[bi, hi, w0:w1].transpose(1, 2), v1_t[bi, hi, w0:w1]
                torch.baddbmm(bh.expand(w1 - w0, t, t), qc, kc, out=s).exp2_()
                torch.bmm(vc, s.transpose(1, 2), out=r)
                low, high = torch.aminmax(r[:, dv])  # the row sums
                if not (low.item() >= _SUM_MIN and high.item() < math.inf):
                    torch.baddbmm(bh.expand(w1 - w0, t, t), qc, kc, out=s)
                    s.sub_(s.amax(-1, keepdim=True)).exp2_()
                    torch.bmm(vc, s.transpose(1, 2), out=r)
                torch.div(r[:, :dv], r[:, dv:], out=out[bi, hi, w0:w1])
    return out


def conv3x3_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3, 3) -> (kd, O, (kh, kw, C)): the layout :func:`conv3x3_gemm` multiplies with."""
    o, c = weight.shape[:2]
    return weight.permute(2, 0, 3, 4, 1).reshape(3, o, 9 * c).contiguous()


def conv3x3_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 wk: torch.Tensor | None = None) -> torch.Tensor:
    """Dense 3x3x3 convolution (padding 1) as 3 GEMMs over shifted slabs (K = 9 * Cin).

    Faster than PyTorch's CPU conv for few input channels and many outputs (the shuffle head).
    """
    b, c, d, h, w = x.shape
    o = weight.shape[0]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))
    # (b, 9 * c, d + 2, h, w): the 9 in-plane shifts stacked on channels, order (kh, kw, c)
    slab = torch.cat([xp[:, :, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=1)
    wk = weight.permute(2, 0, 3, 4, 1).reshape(3, o, 9 * c) if wk is None else wk  # (kd, o, (kh, kw, c))
    out = x.new_empty(b, o, d * h * w)
    for bi in range(b):
        first = slab[bi, :, 0:d].reshape(9 * c, d * h * w)
        if bias is not None:
            torch.addmm(bias.view(o, 1), wk[0], first, out=out[bi])
        else:
            torch.mm(wk[0], first, out=out[bi])
        for kd in range(1, 3):
            out[bi].addmm_(wk[kd], slab[bi, :, kd:kd + d].reshape(9 * c, d * h * w))
    return out.view(b, o, d, h, w)


# Winograd F(4, 3) (Lavin & Gray 2016): 4 outputs of a 3-tap correlation from 6 products.
_WINO_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
           (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
WINO_TILE = 4


def _winograd_input_rows(t0, t1, t2, t3, t4, t5):
    """F(4, 3)'s input transform B^T: the 6 transformed rows of a 6-row input tile."""
    return (4 * t0 - 5 * t2 + t4, t3 + t4 - 4 * (t1 + t2), 4 * (t1 - t2) + t4 - t3,
            2 * (t3 - t1) + t4 - t2, 2 * (t1 - t3) + t4 - t2, 4 * t1 - 5 * t3 + t5)


def _winograd_height_input(x: torch.Tensor) -> torch.Tensor:
    """One sample (C, d, h, w), zero-padded by 1 on every side, with F(4, 3)'s input transform over
    the height: (6, C, d + 2, h / 4, w + 2), the 6 transformed rows of every 4-row output tile."""
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))  # (C, d + 2, h + 2, w + 2)
    return torch.stack(_winograd_input_rows(*xp.unfold(2, 6, WINO_TILE).unbind(-1)))


def _winograd_output_rows(m: torch.Tensor, z: torch.Tensor, tmp: torch.Tensor) -> None:
    """F(4, 3)'s output transform A^T along the first axis: ``m`` (6, ...) -> ``z`` (4, ...), with
    ``tmp`` (4, ...) as scratch (10 element-wise passes)."""
    s12, d12, s34, d34 = tmp.unbind(0)
    torch.add(m[1], m[2], out=s12)
    torch.sub(m[1], m[2], out=d12)
    torch.add(m[3], m[4], out=s34)
    torch.sub(m[3], m[4], out=d34)
    torch.add(s12, s34, out=z[0]).add_(m[0])
    torch.add(d12, d34, alpha=2, out=z[1])
    torch.add(s12, s34, alpha=4, out=z[2])
    torch.add(d12, d34, alpha=8, out=z[3]).add_(m[5])


def winograd_head_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3, 3) -> (6, O, (kd, kw, C)): the kh taps folded by F(4, 3)'s G (in float64)."""
    g = torch.tensor(_WINO_G, dtype=torch.float64, device=weight.device)
    wp = torch.einsum("pk,ocdkw->pocdw", g, weight.double())  # (6, O, C, kd, kw)
    return wp.permute(0, 1, 3, 4, 2).reshape(6, weight.shape[0], -1).to(weight.dtype).contiguous()


def conv3x3_shuffle_winograd(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None, r: int,
                             scratch=None, chunk_elems: int = 1 << 18) -> torch.Tensor:
    """Dense 3x3x3 convolution (padding 1) followed by a 3D pixel shuffle by r, in one piece.

    The convolution uses Winograd F(4, 3) along the height axis: every 4 output rows come from
    6 transformed input rows, so the channel GEMMs (K = 9 * Cin over the depth and width taps)
    do 6/12 of the multiply-adds of a direct convolution (the shuffle head is 44% of
    VeloxSeg-B's MACs). Output transform, bias and pixel shuffle are fused into one strided copy
    whose inner axes stay those of the plain pixel shuffle. Rounding differs from the direct
    convolution by a few 1e-6 relative (the fast-path test bounds the whole network at 1e-4).
    Needs the height to be a multiple of 4 (see :data:`WINO_TILE`). The GEMM, the transform and
    the copy go over a few depth slices at a time (``chunk_elems`` floats of GEMM output, about
    1 MB), so the GEMM's output is still in cache when the transform reads it.
    ``scratch(name, shape)`` supplies reusable temporaries (see :func:`workspace`); by default
    they are allocated.
    """
    b, c, d, h, w = x.shape
    o = wp.shape[1]
    k = o // r ** 3
    nt = h // WINO_TILE
    per_slice = nt * w  # GEMM columns per depth slice
    step = max(1, min(d, chunk_elems // (6 * o * per_slice)))
    scratch = scratch or (lambda name, shape: x.new_empty(shape))
    y = x.new_empty(b, k, d * r, h * r, w * r)
    for bi in range(b):
        u = _winograd_height_input(x[bi])  # (6, C, d + 2, nt, w + 2)
        slab = scratch("slab", (6, 9 * c, d, nt, w))
        torch.cat([u[:, :, i:i + d, :, j:j + w] for i in range(3) for j in range(3)], dim=1, out=slab)
        slab = slab.view(6, 9 * c, d, per_slice)
        yv = y[bi].view(k, d, r, nt, WINO_TILE, r, w, r)
        m_buf = scratch("m", (6, o, step * per_slice))
        pairs_buf = scratch("pairs", (4, o, step * per_slice))
        z_buf = scratch("z", (WINO_TILE, o, step * per_slice))
        for d0 in range(0, d, step):
            d1 = min(d, d0 + step)
            n = (d1 - d0) * per_slice
            m = torch.bmm(wp, slab[:, :, d0:d1].reshape(6, 9 * c, n), out=m_buf[:, :, :n])
            z = z_buf[:, :, :n]
            _winograd_output_rows(m, z, pairs_buf[:, :, :n])
            if bias is not None:
                z.add_(bias.view(1, o, 1))
            # y (k, d, s1, t, e, s2, w, s3) <- z (e, k, s1, s2, s3, d, t, w)
            yv[:, d0:d1].copy_(z.view(WINO_TILE, k, r, r, r, d1 - d0, nt, w).permute(1, 5, 2, 6, 0, 3, 7, 4))
    return y


# Winograd F(2, 3): 2 outputs of a 3-tap correlation from 4 products (small coefficients).
_WINO2_G = ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1))
WINO2_TILE = 2


def shuffle_width_first(t: torch.Tensor, r: int, dim: int = 0) -> torch.Tensor:
    """Reorder axis ``dim`` of ``t`` from the pixel shuffle's channel order (k, s1, s2, s3) to
    (s3, k, s1, s2), the order :func:`conv3x3_shuffle_winograd2d` computes its outputs in (s1, s2,
    s3: the sub-positions along depth, height and width)."""
    o = t.shape[dim]
    k = o // r ** 3
    v = t.movedim(dim, 0).reshape(k, r, r, r, *t.shape[:dim], *t.shape[dim + 1:])
    return v.movedim(3, 0).reshape(o, *t.shape[:dim], *t.shape[dim + 1:]).movedim(0, dim)


def winograd2d_head_weight(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(O, C, 3, 3, 3) -> (24, (kw, C), O): the depth taps folded by F(2, 3)'s G and the height
    taps by F(4, 3)'s (in float64); matrix p * 6 + q holds depth row p, height row q, and its
    columns (the output channels) are in :func:`shuffle_width_first` order for a shuffle by ``r``."""
    g2 = torch.tensor(_WINO2_G, dtype=torch.float64, device=weight.device)
    g4 = torch.tensor(_WINO_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("pk,ql,ockla->pqaco", g2, g4, shuffle_width_first(weight.double(), r))  # (4, 6, kw, C, O)
    return u.reshape(24, -1, weight.shape[0]).to(weight.dtype).contiguous()


#: whether :func:`strided_copy` goes through numpy on one thread: numpy's copy loop takes the
#: fast paths' permuting copies (the shuffle head's width-interleaving copy, 96 contiguous outputs
#: gathered at one stride; the attention's window gathers and scatters) in 35-65% of the time of
#: PyTorch's (one AVX2 core, 2026-12-05: 6.5 against 3.8 ms for the attention's copies in a 96^3
#: pass, each timed alone). With more threads PyTorch's copy runs in parallel and is used.
NUMPY_COPY = True


def strided_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for same-shape, same-dtype CPU tensors without autograd (the fast paths'
    permuting copies), through numpy on one thread (see :data:`NUMPY_COPY`)."""
    if (NUMPY_COPY and torch.get_num_threads() == 1 and dst.device.type == "cpu" and dst.dtype == src.dtype
            and dst.dtype in (torch.float32, torch.float64) and not (dst.requires_grad or src.requires_grad)):
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def conv1x1_shuffle(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, r: int) -> torch.Tensor:
    """A 1x1 convolution to k * r^3 channels followed by a 3D pixel shuffle by r: (B, C, d, h, w) ->
    (B, k, d r, h r, w r); a transposed convolution with kernel and stride r is exactly this.
    ``weight_t`` is (C, k r^3) with its columns in :func:`shuffle_width_first` order, ``bias``
    (k r^3,) in the same order. The GEMM puts the output channels innermost, so the shuffle's copy
    writes whole output rows (:func:`strided_copy`): 1.5-2x faster than a GEMM in the usual layout
    and PyTorch's shuffle copy, whose innermost run is r elements (one AVX2 core, 2026-12-05)."""
    b, c, d, h, w = x.shape
    o = weight_t.shape[1]
    k = o // r ** 3
    y = x.new_empty(b, k, d * r, h * r, w * r)
    for bi in range(b):
        cols = x[bi].reshape(c, d * h * w).t()
        m = torch.addmm(bias, cols, weight_t) if bias is not None else torch.mm(cols, weight_t)
        # y (k, d, s1, h, s2, w, s3) <- m (d, h, w, s3, k, s1, s2)
        strided_copy(y[bi].view(k, d, r, h, r, w, r), m.view(d, h, w, r, k, r, r).permute(4, 0, 5, 1, 6, 2, 3))
    return y


def conv3x3_shuffle_winograd2d(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, r: int,
                               scratch=None, chunk_elems: int = 1 << 20) -> torch.Tensor:
    """:func:`conv3x3_shuffle_winograd` with Winograd on two axes: F(2, 3) over depth and F(4, 3)
    over height. Every 2x4 block of output (depth, height) positions comes from 4x6 transformed
    input positions, so the channel GEMMs (K = 3 * Cin over the width taps) do 24 * 3 / (8 * 27)
    = 1/3 of the multiply-adds of a direct convolution (the height-only version: 1/2). F(4, 3)
    on both axes would do 1/4, but its larger transform coefficients round about twice as much
    and put the network past the fast path's 1e-4 bound; F(2, 3)'s coefficients are 1 and 1/2,
    so the rounding stays that of the height-only version. ``u`` is
    :func:`winograd2d_head_weight` (for this ``r``). The GEMMs put the output channels innermost,
    width sub-position first: the pixel shuffle's copy then writes whole output rows (the width
    times r), reading them at one stride from a cache-sized chunk (:func:`strided_copy`).
    Needs the depth to be even and the height a multiple of 4. The GEMM, the two output
    transforms and the copy go over a few depth tiles at a time (``chunk_elems`` floats of GEMM
    output). ``scratch(name, shape)`` supplies reusable temporaries (see :func:`workspace`).
    """
    b, c, d, h, w = x.shape
    o = u.shape[2]
    k = o // r ** 3
    td, th = d // WINO2_TILE, h // WINO_TILE
    per_tile = th * w  # GEMM rows per depth tile
    step = max(1, min(td, chunk_elems // (24 * o * per_tile)))
    scratch = scratch or (lambda name, shape: x.new_empty(shape))
    bias_row = None if bias is None else shuffle_width_first(bias, r)
    y = x.new_empty(b, k, d * r, h * r, w * r)
    for bi in range(b):
        # F(4, 3)'s B^T over height on the input, then F(2, 3)'s over depth (4 passes on 6 rows)
        v = _winograd_height_input(x[bi])  # (6, C, d + 2, th, w + 2)
        t0, t1, t2, t3 = v.unfold(2, 4, WINO2_TILE).unbind(-1)  # each (6, C, td, th, w + 2)
        v = torch.stack([t0 - t2, t1 + t2, t2 - t1, t1 - t3]).reshape(24, c, td, th, w + 2)
        slab = scratch("slab2d", (24, 3 * c, td, th, w))
        torch.cat([v[..., j:j + w] for j in range(3)], dim=1, out=slab)
        slab = slab.view(24, 3 * c, td * per_tile)
        yv = y[bi].view(k, td, WINO2_TILE, r, th, WINO_TILE, r, w, r)  # (k, td, e, s1, th, f, s2, w, s3)
        rows = step * per_tile
        m_buf = scratch("m2d", (24, rows, o))
        half_buf = scratch("half2d", (WINO2_TILE, 6, rows, o))
        z_buf = scratch("z2d", (WINO2_TILE, WINO_TILE, rows, o))
        tmp_buf = scratch("tmp2d", (4, WINO2_TILE, rows, o))
        for a in range(0, td, step):
            e = min(td, a + step)
            n = (e - a) * per_tile
            m = torch.bmm(slab[:, :, a * per_tile:e * per_tile].transpose(1, 2), u, out=m_buf[:, :n]).view(4, 6, n, o)
            if bias_row is not None:  # product (1, 1) reaches all 8 outputs with weight 1 (both A^T)
                m[1, 1].add_(bias_row)
            half, z = half_buf[:, :, :n], z_buf[:, :, :n]
            torch.add(m[0], m[1], out=half[0]).add_(m[2])  # F(2, 3)'s A^T over depth: (2, 6, n, o)
            torch.sub(m[1], m[2], out=half[1]).sub_(m[3])
            _winograd_output_rows(half.transpose(0, 1), z.transpose(0, 1), tmp_buf[:, :, :n])  # height: (2, 4, n, o)
            # y (k, td, e, s1, th, f, s2, w, s3) <- z (e, f, td, th, w, s3, k, s1, s2)
            strided_copy(yv[:, a:e], z.view(WINO2_TILE, WINO_TILE, e - a, th, w, r, k, r, r)
                         .permute(6, 2, 0, 7, 3, 1, 8, 4, 5))
    return y


#: smallest input grid (every axis) at which :class:`~VeloxSegLib.model.layers.DownConv` runs its
#: stride-2 convolution as :func:`conv3d_im2col`; on smaller grids oneDNN's convolution is faster
#: (one AVX2 core, 2026-12-05, alternating: 64 -> 128 channels from 6^3 1.37x faster through
#: oneDNN alone and 1.23x inside the network; 32 -> 64 from 12^3 1.15x alone but 0.98x inside the
#: network; 16 -> 32 from 24^3 a tie)
IM2COL_MIN_SIZE = 12


def conv3d_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                  padding: int) -> torch.Tensor:
    """Dense strided 3D convolution as one im2col GEMM (PyTorch's CPU path for small strided
    convolutions is the slow reference loop)."""
    b, c = x.shape[:2]
    o, _, k = weight.shape[:3]
    xp = F.pad(x, (padding,) * 6) if padding else x
    cols = xp.unfold(2, k, stride).unfold(3, k, stride).unfold(4, k, stride)  # (b, c, Do, Ho, Wo, k, k, k)
    do, ho, wo = cols.shape[2:5]
    cols = cols.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(b, c * k ** 3, do * ho * wo)
    w = weight.reshape(1, o, c * k ** 3).expand(b, -1, -1)
    if bias is not None:
        out = torch.baddbmm(bias.view(1, o, 1), w, cols)
    else:
        out = torch.bmm(w, cols)
    return out.view(b, o, do, ho, wo)
