"""Multimodal alignment in physical space (SimpleITK, LPS millimetres).

The first channel is the reference (e.g. the CT): every other modality is resampled onto its
voxel grid through physical coordinates, so a PET with another field of view, spacing or
orientation lands where it belongs. Modalities whose physical extents do not overlap are
rejected. A :class:`Grid` is a voxel grid without pixels (size, origin, spacing, direction):
the pipeline crops and re-spaces grids and resamples each channel once, straight from its own
file onto the working grid.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid in ITK order: size (x, y, z), origin, spacing, direction (row-major 3x3)."""

    size: Tuple[int, int, int]
    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(image.GetOrigin()), tuple(image.GetSpacing()),
                   tuple(image.GetDirection()))

    @property
    def shape(self) -> Tuple[int, int, int]:
        """numpy (z, y, x) shape of an array on this grid."""
        return tuple(reversed(self.size))

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self, index) -> np.ndarray:
        """Continuous index (x, y, z), shape (..., 3) -> physical points (..., 3)."""
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.matrix.T

    def physical_to_index(self, points) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        return (pts @ np.linalg.inv(self.matrix).T) / np.asarray(self.spacing)

    def corners(self) -> np.ndarray:
        """The 8 physical corners of the voxel extent (voxel edges, not centres)."""
        box = [(-0.5, s - 0.5) for s in self.size]
        return self.index_to_physical(np.array(list(itertools.product(*box))))

    def crop(self, lo: Sequence[int], hi: Sequence[int]) -> "Grid":
        """The sub-grid of voxels lo <= index < hi (x, y, z); same spacing and direction."""
        lo = np.asarray(lo, dtype=np.int64)
        hi = np.asarray(hi, dtype=np.int64)
        return Grid(tuple(int(v) for v in hi - lo), tuple(float(v) for v in self.index_to_physical(lo)),
                    self.spacing, self.direction)

    def with_spacing(self, spacing: Sequence[float]) -> "Grid":
        """A grid covering the same physical box (edge to edge) at another spacing.

        Where the box is not a whole number of new voxels, the new grid keeps the box's edge at
        the lower world coordinate of each axis (its patient-right, anterior, inferior edge), so
        the same box stored with its axes reversed or swapped is sampled at the same points."""
        from .orientation import AxisOrder

        spacing = np.asarray(spacing, dtype=np.float64)
        extent = np.asarray(self.size) * np.asarray(self.spacing)
        size = np.maximum(np.round(extent / spacing), 1).astype(np.int64)
        # keep the box's lower edge: first voxel centre moves by half the spacing change; an axis
        # that runs against its world axis keeps its upper (stored) edge instead
        shift = (spacing - np.asarray(self.spacing)) / 2.0
        axes = AxisOrder.of_direction(self.direction)
        for k in range(3):
            if axes.flip[k]:
                a = axes.perm[k]
                shift[a] += extent[a] - size[a] * spacing[a]
        origin = np.asarray(self.origin) + self.matrix @ shift
        return Grid(tuple(int(v) for v in size), tuple(float(v) for v in origin),
                    tuple(float(v) for v in spacing), self.direction)

    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol * max(1.0, max(self.spacing)))
                and np.allclose(self.direction, other.direction, atol=tol))

    def empty_image(self, pixel_type=sitk.sitkUInt8) -> sitk.Image:
        img = sitk.Image([int(s) for s in self.size], pixel_type)
        self.stamp(img)
        return img

    def stamp(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (of this size) this grid's origin, spacing and direction."""
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


def index_box(reference: Grid, other: Grid) -> Tuple[np.ndarray, np.ndarray]:
    """The axis-aligned box (lo, hi) in ``reference`` continuous index space that contains
    ``other``'s voxel extent (x, y, z order)."""
    idx = reference.physical_to_index(other.corners())
    return idx.min(axis=0), idx.max(axis=0)


def overlap_fraction(reference: Grid, other: Grid) -> float:
    """Fraction of the reference's voxel extent covered by ``other``'s bounding box (0: disjoint)."""
    lo, hi = index_box(reference, other)
    ref_lo = np.full(3, -0.5)
    ref_hi = np.asarray(reference.size) - 0.5
    inter = np.clip(np.minimum(hi, ref_hi) - np.maximum(lo, ref_lo), 0, None)
    return float(np.prod(inter) / np.prod(ref_hi - ref_lo))


def check_overlap(images: Sequence[sitk.Image], names: Optional[Sequence[str]] = None) -> None:
    """Raise InputError if any image does not overlap the first one in physical space."""
    names = list(names) if names is not None else [f"input {i + 1}" for i in range(len(images))]
    ref = Grid.of(images[0])
    for img, name in zip(images[1:], names[1:]):
        g = Grid.of(img)
        if overlap_fraction(ref, g) <= 0.0:
            lo_r, hi_r = ref.corners().min(0), ref.corners().max(0)
            lo_o, hi_o = g.corners().min(0), g.corners().max(0)
            raise InputError(
                f"{name}: does not overlap {names[0]} in physical space "
                f"({_fmt_box(lo_o, hi_o)} vs {_fmt_box(lo_r, hi_r)} mm); check origins and orientation")


def _fmt_box(lo, hi) -> str:
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi)) + "]"


def resample_to_grid(image: sitk.Image, grid: Grid, *, interpolator=sitk.sitkLinear,
                     default: Optional[float] = None, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """Resample ``image`` onto ``grid`` through physical space (identity transform).

    ``default`` fills voxels outside the image's field of view; None uses the image minimum
    (air for CT, no uptake for PET, background for MRI).
    """
    if default is None:
        default = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, [int(s) for s in grid.size], sitk.Transform(), interpolator, grid.origin,
                         grid.spacing, grid.direction, float(default), pixel_type)


def align_to_reference(images: Sequence[sitk.Image], names: Optional[Sequence[str]] = None, *,
                       interpolator=sitk.sitkLinear) -> List[sitk.Image]:
    """Resample every image onto the first image's grid (the first is returned as float32).

    Raises InputError when an image does not overlap the reference.
    """
    check_overlap(images, names)
    ref = Grid.of(images[0])
    out = [sitk.Cast(images[0], sitk.sitkFloat32)]
    for img in images[1:]:
        if Grid.of(img).same_as(ref):
            aligned = sitk.Cast(img, sitk.sitkFloat32)
            ref.stamp(aligned)
        else:
            aligned = resample_to_grid(img, ref, interpolator=interpolator)
        out.append(aligned)
    return out


def working_grid(grid: Grid, spacing: Optional[Sequence[float]], orientation: Optional[str], rtol: float):
    """The grid a network works on for ``grid`` (a reference image's grid, or its body box), as
    inference and training both lay it: ``(axes, work, resampled)``. ``spacing`` is per world axis
    (None keeps ``grid``'s); ``axes`` turns arrays on ``work`` to the bundle's ``orientation``
    (:mod:`.orientation`); ``work`` is ``grid`` itself where its spacing is within ``rtol`` of
    ``spacing`` on every axis."""
    from .orientation import AxisOrder

    axes = AxisOrder.for_plan(orientation, grid.direction)
    target = axes.stored_vector(spacing) if spacing is not None else None
    resampled = target is not None and not spacing_close(grid.spacing, target, rtol)
    return axes, (grid.with_spacing(target) if resampled else grid), resampled


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], *, interpolator=sitk.sitkLinear,
                        default: Optional[float] = None, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """Resample to a new spacing covering the same physical box (labels: sitkNearestNeighbor)."""
    return resample_to_grid(image, Grid.of(image).with_spacing(spacing), interpolator=interpolator,
                            default=default, pixel_type=pixel_type)


def spacing_close(a: Sequence[float], b: Sequence[float], rtol: float) -> bool:
    """True if every axis of spacing ``a`` is within relative tolerance ``rtol`` of ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return bool(np.all(np.abs(a - b) <= rtol * b))


__all__ = ["Grid", "index_box", "overlap_fraction", "check_overlap", "resample_to_grid", "align_to_reference",
           "resample_to_spacing", "spacing_close", "working_grid"]
