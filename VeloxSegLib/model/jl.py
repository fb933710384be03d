"""Johnson-Lindenstrauss guided group size (paper Sec. 3.2, Eq. 14).

The JL lemma bounds the channels a group needs to preserve pairwise distances of the
patterns it must separate: ``C_group >= c_JL * eps^-2 * log N``. The paper approximates the
covering number of a stage's receptive patterns by ``N = (M * v) ** alpha`` with M the number of
modalities and v the volume ratio between the input and the stage's feature map
(4^3, 8^3, 16^3, 32^3 for a patch factor of 4). With ``c_JL * eps^-2 = 1`` this gives
{4.2, 6.2, 8.3, 10.4} alpha for M = 1, {4.9, 6.9, 9.0, 11.1} alpha for M = 2 and
{5.5, 7.6, 9.7, 11.8} alpha for M = 4 (Eq. 14).
"""
from __future__ import annotations

import math
from typing import List, Sequence


def c_group(M: int, v: float, alpha: float = 1.0, c_jl: float = 1.0) -> float:
    """Lower bound on the channels per group (Eq. 14): ``c_jl * alpha * ln(M * v)``.

    ``c_jl`` stands for ``c_JL * eps^-2``.
    """
    if M < 1 or v < 1:
        raise ValueError(f"c_group needs M >= 1 and v >= 1, got M={M}, v={v}")
    return c_jl * alpha * math.log(M * v)


def stage_volume_ratios(patch_factor: int = 4, num_stages: int = 4, spatial_dims: int = 3) -> List[int]:
    """Input/feature volume ratio per stage: (p * 2^k) ** dims, i.e. 4^3, 8^3, 16^3, 32^3."""
    return [(patch_factor * 2 ** k) ** spatial_dims for k in range(num_stages)]


def round_to_divisor(value: float, width: int) -> int:
    """Smallest divisor of ``width`` that is >= value (the bound is a minimum)."""
    for d in range(1, width + 1):
        if width % d == 0 and d >= value - 1e-9:
            return d
    return width


def jl_group_sizes(
    M: int,
    widths: Sequence[int],
    n: int = 4,
    alpha: float | None = None,
    patch_factor: int = 4,
    spatial_dims: int = 3,
) -> List[int]:
    """Channels per group for each stage, from the JL bound rounded to divisors of the width.

    ``alpha`` is calibrated so that the first stage's bound equals ``n`` (the paper chose n = 4
    on AutoPET-II) unless given. For M = 1, 2 or 4 and widths 16..128 this yields the published
    {4, 8, 8, 16}, i.e. {n, 2n, 2n, 4n}.
    """
    ratios = stage_volume_ratios(patch_factor, len(widths), spatial_dims)
    if alpha is None:
        alpha = n / c_group(M, ratios[0])
    return [round_to_divisor(c_group(M, v, alpha), w) for v, w in zip(ratios, widths)]
