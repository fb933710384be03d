"""Per-channel intensity normalization, the schemes of ``docs/bundle-format.md``.

- ``ct``: clip to the stored ``clip`` range (training percentiles), then z-score with the stored
  ``mean``/``std``.
- ``pet_zscore_body``: z-score with mean/std over the body, the voxels above the image minimum.
- ``pet_suv``: multiply by ``suv_factor``, then z-score with the stored ``mean``/``std``.
- ``zscore_nonzero``: MRI; z-score over non-zero voxels, zeros stay 0.
- ``none``: unchanged.

Normalization is split in two so inference can be exact and cheap: :func:`fit_normalizer`
measures the image-dependent statistics on a channel's own voxels *as read* (before any
resampling or cropping, so they do not depend on the grid or on the body crop), and
:meth:`Normalizer.apply` maps any array of that channel's intensities (e.g. the resampled body
crop) in place. :func:`normalize` does both on one array (what training uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from ..errors import ConfigError

SCHEMES = ("ct", "pet_zscore_body", "pet_suv", "zscore_nonzero", "none")

_EPS = 1e-8
_CHUNK = 1 << 22  # voxels per chunk for float64 statistics without a full-size temporary


@dataclass(frozen=True)
class Normalizer:
    """An affine intensity map ``(clip(x * scale0) - mean) / std`` with the scheme's rules.

    background: the raw intensity of "outside the body / outside the field of view" for this
    channel (used as the resampling default and, normalized, as the padding value).
    """

    scheme: str
    mean: float = 0.0
    std: float = 1.0
    clip: Optional[tuple] = None
    factor: float = 1.0
    background: float = 0.0

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """Normalize a float32 array in place and return it."""
        if self.scheme == "none":
            return arr
        if arr.dtype != np.float32:
            raise TypeError("Normalizer.apply works in place on float32 arrays")
        zero = arr == 0 if self.scheme == "zscore_nonzero" else None
        if self.factor != 1.0:
            arr *= np.float32(self.factor)
        if self.clip is not None:
            np.clip(arr, np.float32(self.clip[0]), np.float32(self.clip[1]), out=arr)
        arr -= np.float32(self.mean)
        arr *= np.float32(1.0 / max(self.std, _EPS))
        if zero is not None:
            arr[zero] = 0.0
        return arr

    def value(self, x: float) -> float:
        """The normalized value of one raw intensity."""
        return float(self.apply(np.array([x], dtype=np.float32))[0])

    @property
    def normalized_background(self) -> float:
        return 0.0 if self.scheme == "zscore_nonzero" else self.value(self.background)


def _masked_stats(arr: np.ndarray, lower_exclusive: Optional[float] = None, nonzero: bool = False):
    """(count, mean, std) over voxels > lower_exclusive (or != 0), in float64, chunk by chunk."""
    flat = arr.reshape(-1)
    n = 0
    s = 0.0
    ss = 0.0
    for start in range(0, flat.size, _CHUNK):
        c = flat[start:start + _CHUNK]
        if lower_exclusive is not None:
            c = c[c > lower_exclusive]
        elif nonzero:
            c = c[c != 0]
        c = c.astype(np.float64)
        n += c.size
        s += float(c.sum())
        ss += float(np.dot(c, c))
    if n == 0:
        return 0, 0.0, 1.0
    mean = s / n
    var = max(ss / n - mean * mean, 0.0)
    return n, mean, float(np.sqrt(var))


def _spec_number(spec: Mapping, key: str, scheme: str) -> float:
    if key not in spec:
        raise ConfigError(f"normalization scheme '{scheme}' needs '{key}'")
    return float(spec[key])


def fit_normalizer(arr: np.ndarray, spec: Mapping) -> Normalizer:
    """Build the channel's :class:`Normalizer` from its normalization spec and its raw voxels.

    ``arr`` may be a read-only view of any numeric dtype; it is not modified.
    """
    scheme = spec.get("scheme") if isinstance(spec, Mapping) else None
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown normalization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    lo = float(arr.min()) if arr.size else 0.0
    if scheme == "none":
        return Normalizer("none", background=lo)
    if scheme == "ct":
        clip = spec.get("clip")
        if clip is None or len(clip) != 2 or float(clip[0]) > float(clip[1]):
            raise ConfigError("normalization scheme 'ct' needs 'clip': [low, high]")
        return Normalizer("ct", mean=_spec_number(spec, "mean", scheme), std=_spec_number(spec, "std", scheme),
                          clip=(float(clip[0]), float(clip[1])), background=lo)
    if scheme == "pet_suv":
        return Normalizer("pet_suv", mean=_spec_number(spec, "mean", scheme), std=_spec_number(spec, "std", scheme),
                          factor=_spec_number(spec, "suv_factor", scheme), background=lo)
    if scheme == "pet_zscore_body":
        _, mean, std = _masked_stats(arr, lower_exclusive=lo)
        return Normalizer("pet_zscore_body", mean=mean, std=std if std > _EPS else 1.0, background=lo)
    # zscore_nonzero
    _, mean, std = _masked_stats(arr, nonzero=True)
    return Normalizer("zscore_nonzero", mean=mean, std=std if std > _EPS else 1.0, background=0.0)


def normalize(arr: np.ndarray, spec: Mapping) -> np.ndarray:
    """Normalize one channel: statistics from ``arr`` itself; returns a new float32 array."""
    norm = fit_normalizer(arr, spec)
    return norm.apply(np.array(arr, dtype=np.float32, copy=True))


__all__ = ["SCHEMES", "Normalizer", "fit_normalizer", "normalize"]
