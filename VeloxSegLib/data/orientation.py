"""Which way a volume's array axes run, and turning arrays to one orientation for the network.

A file may store the same scan with its axes in any order and either sense: DICOM series read by
ITK usually run left, posterior, superior (LPS, the identity direction matrix); NIfTI files from
nibabel or MONAI pipelines often run right, anterior, superior (the first two axes reversed);
dcm2niix often reverses only the second. A network sees arrays, not world coordinates, so the
same patient stored two ways looks mirrored to it unless the arrays are turned first. A bundle
whose ``orientation`` is ``"LPS"`` was trained on arrays whose axes run nearest to L, P and S, and
the inference pipeline and the trainer turn every volume that way (a transpose and flips of the
array: exact, no interpolation). Oblique directions get the nearest such order; the resampling
through physical space is unchanged.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

#: The orientations a bundle may record (``bundle.json`` ``orientation``). A bundle without the
#: field predates it: its network saw arrays as the files stored them, and it is used that way.
ORIENTATIONS = ("LPS",)


@dataclass(frozen=True)
class AxisOrder:
    """How a grid's stored axes map onto the world axes L, P, S (ITK's x, y, z).

    ``perm[k]`` is the stored axis (0 x, 1 y, 2 z) that runs nearest to world axis k; ``flip[k]``
    says it runs against it. Arrays are numpy/torch arrays whose last three axes are z, y, x.
    """

    perm: Tuple[int, int, int] = (0, 1, 2)
    flip: Tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def of_direction(cls, direction: Sequence[float]) -> "AxisOrder":
        """The axis order of a direction matrix (ITK's, row-major 3x3: column a is stored axis a)."""
        d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        # the assignment of stored axes to world axes with the largest total alignment
        perm = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[k, p[k]]) for k in range(3)))
        return cls(tuple(int(a) for a in perm), tuple(bool(d[k, perm[k]] < 0) for k in range(3)))

    @classmethod
    def for_plan(cls, orientation, direction: Sequence[float]) -> "AxisOrder":
        """The order that turns a grid of ``direction`` into a bundle's ``orientation`` (None: as stored)."""
        return cls() if orientation is None else cls.of_direction(direction)

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def canonical_vector(self, stored: Sequence) -> tuple:
        """A per-axis vector (x, y, z order: spacing, size) of the stored axes, in world-axis order."""
        return tuple(stored[self.perm[k]] for k in range(3))

    def stored_vector(self, canonical: Sequence) -> tuple:
        """The inverse of :meth:`canonical_vector`: a world-axis vector onto the stored axes."""
        out = [None] * 3
        for k in range(3):
            out[self.perm[k]] = canonical[k]
        return tuple(out)

    def canonical_shape(self, stored_shape: Sequence[int]) -> Tuple[int, int, int]:
        """The (z, y, x) shape an array of ``stored_shape`` (z, y, x) has once turned."""
        return tuple(reversed(self.canonical_vector(tuple(reversed(tuple(stored_shape))))))

    def _dims(self, ndim: int):
        lead = ndim - 3
        # canonical array axis lead + j holds world axis 2 - j, i.e. stored axis perm[2 - j],
        # which is array axis lead + 2 - perm[2 - j]
        order = list(range(lead)) + [lead + 2 - self.perm[2 - j] for j in range(3)]
        flips = [lead + 2 - k for k in range(3) if self.flip[k]]
        return order, flips

    def to_canonical(self, arr):
        """``arr`` (..., z, y, x) as stored -> turned to world-axis order (a view where possible)."""
        if self.is_identity:
            return arr
        order, flips = self._dims(arr.ndim)
        if isinstance(arr, np.ndarray):
            out = np.transpose(arr, order)
            return np.flip(out, flips) if flips else out
        out = arr.permute(*order)
        return out.flip(flips) if flips else out

    def to_stored(self, arr):
        """The inverse of :meth:`to_canonical`."""
        if self.is_identity:
            return arr
        order, flips = self._dims(arr.ndim)
        inverse = [order.index(i) for i in range(arr.ndim)]
        if isinstance(arr, np.ndarray):
            out = np.flip(arr, flips) if flips else arr
            return np.transpose(out, inverse)
        out = arr.flip(flips) if flips else arr
        return out.permute(*inverse)


__all__ = ["AxisOrder", "ORIENTATIONS"]
