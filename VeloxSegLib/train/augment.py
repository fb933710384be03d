"""Patch augmentation of the paper's recipe: random z-flip and small rotations about z; and,
off by default, modality dropout (not in the paper).

The paper flips along z; its reference implementation rotates about z by up to +-15 degrees
with probability 0.5. We do both. Parameters are drawn first (:meth:`Augmenter.draw`) so the
sampler can cut a source region large enough that a rotated patch has no empty corners
(:meth:`AugmentParams.source_shape`); :meth:`Augmenter.apply` then rotates (image linear,
label nearest) and centre-crops to the patch. Arrays are (C, z, y, x) images and (z, y, x)
labels; every random number comes from the caller's ``numpy.random.Generator``.

Modality dropout (``modality_dropout`` P, ModDrop of Neverova et al., TPAMI 2016): a patch
has, with probability P, one of its input channels, chosen uniformly, replaced by zeros (the
channel's normalized mean) and its label kept, so the network learns what each modality shows
on its own instead of leaning on the one that is easiest (PET, for PET/CT lesions). With P = 0
no random number is drawn for it, so the recipe's patches are the same as without the option.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class AugmentParams:
    flip_z: bool = False
    angle_deg: float = 0.0
    drop_channel: int = -1  # the input channel set to zeros (modality dropout); -1: none

    def source_shape(self, patch: Sequence[int]) -> Tuple[int, int, int]:
        """The (z, y, x) region to cut so that the rotated patch lies inside it."""
        pz, py, px = (int(p) for p in patch)
        if not self.angle_deg:
            return pz, py, px
        a = math.radians(abs(self.angle_deg))
        c, s = math.cos(a), math.sin(a)
        return pz, int(math.ceil(py * c + px * s)) + 2, int(math.ceil(py * s + px * c)) + 2


@dataclass(frozen=True)
class Augmenter:
    """Random z-flip (probability ``flip_p``) and rotation about z (``rotate_p``, +-``max_angle``);
    with ``modality_dropout`` P > 0, one of the ``channels`` input channels zeroed with probability P."""

    flip_p: float = 0.5
    rotate_p: float = 0.5
    max_angle: float = 15.0
    modality_dropout: float = 0.0
    channels: int = 1

    @property
    def mirror_axes(self) -> Tuple[str, ...]:
        """Image axes this augmentation mirrors (what a bundle's mirror TTA may flip)."""
        return ("z",) if self.flip_p > 0 else ()

    def draw(self, rng: np.random.Generator) -> AugmentParams:
        flip = bool(rng.random() < self.flip_p)
        angle = float(rng.uniform(-self.max_angle, self.max_angle)) if rng.random() < self.rotate_p else 0.0
        drop = -1
        if self.modality_dropout > 0 and rng.random() < self.modality_dropout:
            drop = int(rng.integers(self.channels))
        return AugmentParams(flip, angle, drop)

    def apply(self, image: np.ndarray, label: np.ndarray, params: AugmentParams, patch: Sequence[int]):
        """Rotate/flip a source region cut with ``params.source_shape(patch)``; returns the patch."""
        patch = tuple(int(p) for p in patch)
        if params.angle_deg:
            image, label = rotate_z(image, label, params.angle_deg, patch)
        else:
            image, label = center_crop(image, patch), center_crop(label, patch)
        if params.flip_z:
            image, label = image[..., ::-1, :, :], label[::-1]
        if params.drop_channel >= 0:
            image = np.array(image)  # a copy: the case's own array (a memory map) is never written
            image[params.drop_channel] = 0
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def center_crop(arr: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    lo = [(s - p) // 2 for s, p in zip(arr.shape[-3:], patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(lo, patch))
    return arr[(Ellipsis,) + sl]


def rotate_z(image: np.ndarray, label: np.ndarray, angle_deg: float, patch: Sequence[int]):
    """Rotate about the z axis (in the y-x plane) around the region's centre and cut the central
    ``patch``: image trilinear, label nearest neighbour."""
    import torch
    import torch.nn.functional as F

    pz, py, px = patch
    sz, sy, sx = image.shape[-3:]
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    # output voxel offsets from the patch centre, rotated into source index space
    z = torch.arange(pz, dtype=torch.float32) - (pz - 1) / 2
    y = torch.arange(py, dtype=torch.float32) - (py - 1) / 2
    x = torch.arange(px, dtype=torch.float32) - (px - 1) / 2
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    src_y = c * yy - s * xx + (sy - 1) / 2
    src_x = s * yy + c * xx + (sx - 1) / 2
    src_z = zz + (sz - 1) / 2
    # grid_sample wants (x, y, z) normalized to [-1, 1] (align_corners=True)
    grid = torch.stack([2 * src_x / max(sx - 1, 1) - 1, 2 * src_y / max(sy - 1, 1) - 1,
                        2 * src_z / max(sz - 1, 1) - 1], dim=-1)[None]
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    lab = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32))[None, None]
    lab_out = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    return out.numpy(), lab_out.numpy().astype(label.dtype)


__all__ = ["AugmentParams", "Augmenter", "rotate_z", "center_crop"]
