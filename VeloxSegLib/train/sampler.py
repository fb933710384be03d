"""Training patches: cases held in memory, patches centred 1:1 on foreground and background.

Every other patch drawn is a foreground patch: a labelled class is chosen uniformly among
those present in a random case, then one of its voxels, and the patch is placed so that the
voxel lies at a random position inside it (as nnU-Net's oversampling does). The others are
background patches around a random voxel of label 0. Regions beyond the volume are padded with
the channel's normalized background and label 0. The sampler owns its random generator; its
state (and the count of patches drawn) is plain JSON, saved in checkpoints so a resumed run
draws exactly the patches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from .augment import AugmentParams, Augmenter

#: At most this many voxel indices are kept per class and case (a strided subset).
MAX_FG_INDICES = 200_000


@dataclass
class CaseData:
    """One preprocessed case: image (C, z, y, x) float32 normalized, label (z, y, x) uint8."""

    name: str
    image: np.ndarray
    label: np.ndarray
    pad_values: Tuple[float, ...] = ()
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    _fg: Optional[Dict[int, np.ndarray]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.image.ndim != 4 or self.label.shape != self.image.shape[1:]:
            raise ConfigError(f"case {self.name}: image {self.image.shape} and label {self.label.shape} do not match")
        if not self.pad_values:
            self.pad_values = tuple(float(self.image[c].min()) for c in range(self.image.shape[0]))

    @property
    def foreground(self) -> Dict[int, np.ndarray]:
        """Flat voxel indices of every label value > 0 present (strided to MAX_FG_INDICES)."""
        if self._fg is None:
            flat = self.label.reshape(-1)
            out = {}
            for v in np.unique(flat):
                if v == 0:
                    continue
                idx = np.flatnonzero(flat == v)
                step = max(1, len(idx) // MAX_FG_INDICES)
                out[int(v)] = idx[::step]
            self._fg = out
        return self._fg


def crop_padded(arr: np.ndarray, lo: Sequence[int], shape: Sequence[int], pad) -> np.ndarray:
    """``arr[..., lo:lo+shape]`` over the last three axes, padding outside the array.

    ``pad``: one value, or one per leading channel of a (C, z, y, x) array.
    """
    lead = arr.shape[:-3]
    out = np.empty(lead + tuple(shape), dtype=arr.dtype)
    if lead and np.ndim(pad):
        for c, v in enumerate(pad):
            out[c] = v
    else:
        out[...] = pad
    src, dst = [], []
    for a, (l0, n, size) in enumerate(zip(lo, shape, arr.shape[-3:])):
        s0, s1 = max(l0, 0), min(l0 + n, size)
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - l0, s1 - l0))
    out[(Ellipsis,) + tuple(dst)] = arr[(Ellipsis,) + tuple(src)]
    return out


class PatchSampler:
    """Draws batches ``(images (N, C, *patch), labels (N, *patch))`` as numpy arrays."""

    def __init__(self, cases: Sequence[CaseData], patch_size: Sequence[int], batch_size: int,
                 rng: np.random.Generator, augmenter: Optional[Augmenter] = None, fg_fraction: float = 0.5):
        if not cases:
            raise ConfigError("the sampler needs at least one training case")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.rng = rng
        self.augmenter = augmenter
        self.fg_fraction = float(fg_fraction)
        self.drawn = 0

    def _is_foreground_draw(self) -> bool:
        # 1:1 (fg_fraction 0.5) as a strict alternation starting with foreground; other fractions
        # by the running count (draw n is foreground when n * f crosses an integer)
        n, f = self.drawn, self.fg_fraction
        return math.floor(n * f + 1e-9) != math.floor((n - 1) * f + 1e-9)

    def _centre(self, case: CaseData, foreground: bool) -> np.ndarray:
        shape = case.label.shape
        fg = case.foreground if foreground else {}
        if fg:
            cls = sorted(fg)[int(self.rng.integers(len(fg)))]
            idx = fg[cls]
            flat = int(idx[int(self.rng.integers(len(idx)))])
            return np.array(np.unravel_index(flat, shape))
        for _ in range(10):  # a background voxel (label 0); any voxel if none found
            c = np.array([int(self.rng.integers(s)) for s in shape])
            if case.label[tuple(c)] == 0:
                break
        return c

    def draw_one(self) -> Tuple[np.ndarray, np.ndarray]:
        case = self.cases[int(self.rng.integers(len(self.cases)))]
        centre = self._centre(case, self._is_foreground_draw())
        self.drawn += 1
        params = self.augmenter.draw(self.rng) if self.augmenter else AugmentParams()
        src = params.source_shape(self.patch)
        # the centre voxel lands at a random place of the final patch, which is the source's middle
        offset = np.array([int(self.rng.integers(p)) for p in self.patch])
        lo = centre - offset - (np.array(src) - np.array(self.patch)) // 2
        img = crop_padded(case.image, lo, src, case.pad_values)
        lab = crop_padded(case.label, lo, src, 0)
        if self.augmenter:
            return self.augmenter.apply(img, lab, params, self.patch)
        return img, lab

    def sample(self) -> Tuple[np.ndarray, np.ndarray]:
        pairs = [self.draw_one() for _ in range(self.batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.drawn = int(state["drawn"])


def rank_generator(seed: int, rank: int = 0) -> np.random.Generator:
    """The sampler's generator for one data-parallel rank: ranks draw different patches."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 7919, int(rank)]))


__all__ = ["CaseData", "PatchSampler", "crop_padded", "rank_generator", "MAX_FG_INDICES"]
