"""Sliding-window inference with compact, streaming accumulation.

Windows tile the volume like MONAI's ``sliding_window_inference`` (same positions: step
``int(patch * (1 - overlap))``, the last window flush with the end; volumes smaller than a
window are padded symmetrically). Window outputs are weighted (uniform or Gaussian importance)
and summed, then divided by the summed weights.

Unlike a whole-volume accumulator, :func:`stream_windows` walks the windows in rows of equal
first-axis (z) start and keeps buffers only ``patch[0]`` slices deep: once the next row starts
at ``z``, every slice below ``z`` is final and is handed to the caller (who arg-maxes it to
uint8), then the buffer shifts. Memory is ``classes x patch_z x Y x X`` floats whatever the
scan length. Windows the caller marks empty (no body voxel) are never run; voxels that no run
window covers get weight 0, which the caller reads as background.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import Cancelled, ConfigError

Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, patch: int, overlap: float) -> List[int]:
    """Start indices along one axis (``size >= patch``), as MONAI places them."""
    if size <= patch:
        return [0]
    step = max(int(patch * (1.0 - overlap)), 1)
    n = int(math.ceil((size - patch) / step)) + 1
    return sorted({min(i * step, size - patch) for i in range(n)})


def window_grid(shape: Sequence[int], patch: Sequence[int], overlap: float) -> List[Tuple[int, int, int]]:
    """All window start corners (z, y, x) for a padded volume, z-major order."""
    zs, ys, xs = (window_starts(s, p, overlap) for s, p in zip(shape, patch))
    return [(z, y, x) for z in zs for y in ys for x in xs]


def importance_map(patch: Sequence[int], blending: str = "uniform", sigma_scale: float = 0.125,
                   dtype=torch.float32) -> torch.Tensor:
    """Per-voxel window weight: ones (``uniform``) or a centred Gaussian with sigma = patch x
    sigma_scale, scaled to a maximum of 1 and floored at its smallest positive value
    (``gaussian``, as nnU-Net does), so the border of a window still counts a little."""
    if blending in ("uniform", "constant"):
        return torch.ones(tuple(patch), dtype=dtype)
    if blending != "gaussian":
        raise ConfigError(f"unknown blending '{blending}'; expected 'uniform' or 'gaussian'")
    axes = []
    for p in patch:
        sigma = max(p * sigma_scale, 1e-3)
        c = (p - 1) / 2.0
        x = torch.arange(p, dtype=torch.float64)
        axes.append(torch.exp(-0.5 * ((x - c) / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    w = torch.clamp(w, min=float(w[w > 0].min()))
    return w.to(dtype)


def _pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> List[Tuple[int, int]]:
    """(before, after) per axis so each axis is at least one patch (MONAI's symmetric split)."""
    out = []
    for s, p in zip(shape, patch):
        d = max(p - s, 0)
        out.append((d // 2, d - d // 2))
    return out


def _check_cancel(cancel) -> None:
    if cancel is None:
        return
    flag = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if flag:
        raise Cancelled("cancelled")


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float,
                  body: Optional[np.ndarray] = None) -> Tuple[int, int]:
    """(windows that will run, all windows) for a volume of ``shape`` (before padding)."""
    pads = _pad_amounts(shape, patch)
    padded = [s + a + b for s, (a, b) in zip(shape, pads)]
    starts = window_grid(padded, patch, overlap)
    if body is None:
        return len(starts), len(starts)
    keep = _non_empty(starts, patch, body, pads)
    return int(sum(keep)), len(starts)


def _non_empty(starts, patch, body: np.ndarray, pads) -> List[bool]:
    """Whether each window (in padded coordinates) contains a body voxel (a scan of the
    window's part of the mask; no volume-sized temporaries)."""
    out = []
    for start in starts:
        lo = [max(st - a, 0) for st, (a, _) in zip(start, pads)]
        hi = [min(st - a + p, n) for st, (a, _), p, n in zip(start, pads, patch, body.shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            out.append(False)
            continue
        out.append(bool(body[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()))
    return out


def stream_windows(
    image: torch.Tensor,
    patch: Sequence[int],
    predictor: Predictor,
    *,
    overlap: float = 0.25,
    blending: str = "uniform",
    batch_size: int = 1,
    pad_value: float | Sequence[float] = 0.0,
    body: Optional[np.ndarray] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel=None,
    num_classes: Optional[int] = None,
) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Run ``predictor`` over windows of ``image`` and yield finished z-slabs.

    image: (C, Z, Y, X) float tensor (CPU). predictor: (B, C, *patch) -> (B, K, *patch) logits
    (any device; results are accumulated in float32 on the CPU). body: optional bool (Z, Y, X)
    mask; windows without a True voxel are skipped. pad_value: scalar or one per channel, used
    where the volume is smaller than a window. progress(done, total) is called after each batch.
    num_classes: K, if known (otherwise taken from the first output).

    Yields (z0, z1, acc, weight): acc (K, z1-z0, Y, X) is the weighted sum of window outputs and
    weight (z1-z0, Y, X) the summed weights for slices z0..z1-1 of the unpadded volume. Both are
    views into reusable buffers, valid until the next iteration. Voxels with weight 0 were not
    covered by any run window.
    """
    if image.dim() != 4:
        raise ValueError("image must be (C, Z, Y, X)")
    patch = tuple(int(p) for p in patch)
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
    shape = tuple(image.shape[1:])
    pads = _pad_amounts(shape, patch)
    if any(a or b for a, b in pads):
        image = _pad(image, pads, pad_value)
    pshape = tuple(image.shape[1:])
    starts = window_grid(pshape, patch, overlap)
    keep = _non_empty(starts, patch, body, pads) if body is not None else [True] * len(starts)
    total = int(sum(keep))
    imp = importance_map(patch, blending)
    uniform = blending in ("uniform", "constant")

    pz = patch[0]
    (za, _), (ya, yb), (xa, xb) = pads
    ysl = slice(ya, pshape[1] - yb)
    xsl = slice(xa, pshape[2] - xb)
    acc: Optional[torch.Tensor] = None  # (K, pz, Yp, Xp), allocated on the first output
    if num_classes:
        acc = torch.zeros((int(num_classes), pz) + pshape[1:], dtype=torch.float32)
    weight = torch.zeros((pz,) + pshape[1:], dtype=torch.float32)
    base = 0  # padded z of buffer slice 0

    def finished(z_end: int):
        """Yield padded slices [base, z_end) as unpadded coordinates."""
        lo = max(base, za)
        hi = min(z_end, pshape[0] - pads[0][1])
        if hi > lo and acc is not None:
            b0, b1 = lo - base, hi - base
            yield lo - za, hi - za, acc[:, b0:b1, ysl, xsl], weight[b0:b1, ysl, xsl]
        elif hi > lo:  # nothing ran at all: caller still gets zero weights
            b0, b1 = lo - base, hi - base
            yield lo - za, hi - za, torch.zeros((1, b1 - b0, shape[1], shape[2])), weight[b0:b1, ysl, xsl]

    rows: dict = {}
    for (s, k) in zip(starts, keep):
        rows.setdefault(s[0], []).append((s, k))
    done = 0
    for z in sorted(rows):
        _check_cancel(cancel)
        if z > base:
            yield from finished(min(z, base + pz))
            shift = z - base
            if shift >= pz:
                weight.zero_()
                if acc is not None:
                    acc.zero_()
            else:
                weight[: pz - shift] = weight[shift:].clone()
                weight[pz - shift:] = 0
                if acc is not None:
                    acc[:, : pz - shift] = acc[:, shift:].clone()
                    acc[:, pz - shift:] = 0
            base = z
        todo = [s for s, k in rows[z] if k]
        for i in range(0, len(todo), batch_size):
            _check_cancel(cancel)
            group = todo[i:i + batch_size]
            batch = torch.stack([image[:, sz:sz + pz, sy:sy + patch[1], sx:sx + patch[2]] for sz, sy, sx in group])
            out = predictor(batch)
            if out.shape[0] != len(group) or tuple(out.shape[2:]) != patch:
                raise ValueError(f"predictor returned shape {tuple(out.shape)} for windows {tuple(batch.shape)}")
            out = out.detach().to("cpu", torch.float32)
            if acc is None:
                acc = torch.zeros((out.shape[1], pz) + pshape[1:], dtype=torch.float32)
            for (sz, sy, sx), o in zip(group, out):
                region = (slice(sy, sy + patch[1]), slice(sx, sx + patch[2]))
                if uniform:
                    acc[(slice(None), slice(0, pz)) + region] += o
                    weight[(slice(0, pz),) + region] += 1.0
                else:
                    acc[(slice(None), slice(0, pz)) + region] += o * imp
                    weight[(slice(0, pz),) + region] += imp
            done += len(group)
            if progress is not None:
                progress(done, total)
    yield from finished(pshape[0])


def _pad(image: torch.Tensor, pads, pad_value) -> torch.Tensor:
    c = image.shape[0]
    values = [float(pad_value)] * c if np.isscalar(pad_value) else [float(v) for v in pad_value]
    shape = (c,) + tuple(s + a + b for s, (a, b) in zip(image.shape[1:], pads))
    out = torch.empty(shape, dtype=image.dtype)
    for ch in range(c):
        out[ch].fill_(values[ch])
    (za, zb), (ya, yb), (xa, xb) = pads
    out[:, za:za + image.shape[1], ya:ya + image.shape[2], xa:xa + image.shape[3]] = image
    return out


def sliding_window(image: torch.Tensor, patch: Sequence[int], predictor: Predictor, *, overlap: float = 0.25,
                   blending: str = "uniform", batch_size: int = 1, pad_value: float = 0.0,
                   body: Optional[np.ndarray] = None, cancel=None) -> torch.Tensor:
    """Dense averaged output (N, K, Z, Y, X) for an (N, C, Z, Y, X) input: MONAI's interface
    (uncovered voxels are 0). For small volumes and tests; the pipeline streams instead."""
    outs = []
    for n in range(image.shape[0]):
        full = None
        for z0, z1, acc, w in stream_windows(image[n], patch, predictor, overlap=overlap, blending=blending,
                                             batch_size=batch_size, pad_value=pad_value, body=body, cancel=cancel):
            if full is None:
                full = torch.zeros((acc.shape[0],) + tuple(image.shape[2:]), dtype=torch.float32)
            full[:, z0:z1] = acc / torch.clamp(w, min=1e-12)
        outs.append(full)
    return torch.stack(outs)


__all__ = ["window_starts", "window_grid", "importance_map", "count_windows", "stream_windows", "sliding_window"]
