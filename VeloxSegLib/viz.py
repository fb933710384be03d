"""Small picture helpers with numpy only: a PNG writer and orthogonal-slice overlays."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

PRED_COLOR = (255, 60, 40)
TRUTH_COLOR = (60, 220, 90)


def write_png(path, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG (atomically)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path


def window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] to 0..255 gray (uint8)."""
    scaled = (np.asarray(image, np.float32) - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a 2D boolean mask (4-neighbourhood)."""
    m = np.asarray(mask, bool)
    if not m.any():
        return m
    p = np.pad(m, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:] & m
    return m & ~interior


def _resize_nearest(a: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) + 0.5) * a.shape[0] / shape[0], a.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * a.shape[1] / shape[1], a.shape[1] - 1).astype(int)
    return a[rows][:, cols]


def overlay(gray: np.ndarray, masks: Sequence[Tuple[np.ndarray, Tuple[int, int, int]]],
            pixel_mm: Tuple[float, float], scale_mm: float) -> np.ndarray:
    """Gray slice with coloured mask contours, resampled to square pixels of ``scale_mm``."""
    shape = (max(1, int(round(gray.shape[0] * pixel_mm[0] / scale_mm))),
             max(1, int(round(gray.shape[1] * pixel_mm[1] / scale_mm))))
    rgb = np.repeat(_resize_nearest(gray, shape)[..., None], 3, axis=2)
    for mask, color in masks:
        edge = contour(_resize_nearest(np.asarray(mask, bool), shape))
        rgb[edge] = color
    return rgb


def orthogonal_panel(ct: np.ndarray, pet: np.ndarray, spacing_zyx: Sequence[float], pred: np.ndarray,
                     truth: Optional[np.ndarray] = None, centre: Optional[Sequence[int]] = None,
                     ct_window=(-160.0, 240.0), pet_window=(0.0, 8.0)) -> np.ndarray:
    """Axial, coronal and sagittal slices of CT (left) and PET (right) with the predicted (red)
    and true (green) contours. Arrays are (z, y, x) on one grid; PET is shown inverted."""
    ct, pet = np.asarray(ct), np.asarray(pet)
    if centre is None:
        ref = truth if truth is not None and np.any(truth) else pred
        centre = ([int(round(c)) for c in np.argwhere(ref).mean(0)] if np.any(ref)
                  else [s // 2 for s in ct.shape])
        if truth is not None and np.any(truth):  # centre on the largest slice of the truth
            centre = [int(np.argmax(np.asarray(truth, bool).sum(axis=tuple(i for i in range(3) if i != a))))
                      for a in range(3)]
    z, y, x = centre
    sz, sy, sx = spacing_zyx
    scale = min(spacing_zyx) / 2  # two display pixels per finest voxel
    views = [  # (slicer, pixel spacing (rows, cols)); coronal/sagittal flipped so the head is up
        (lambda a: a[z], (sy, sx)),
        (lambda a: a[::-1, y, :], (sz, sx)),
        (lambda a: a[::-1, :, x], (sz, sy)),
    ]
    rows = []
    for take, px in views:
        masks = [(take(pred), PRED_COLOR)]
        if truth is not None:
            masks.append((take(truth), TRUTH_COLOR))
        left = overlay(window(take(ct), *ct_window), masks, px, scale)
        right = overlay(255 - window(take(pet), *pet_window), masks, px, scale)
        gap = np.full((left.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([left, gap, right], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)
