"""Several bundles as one model: the folds of a cross-validation averaged, as nnU-Net predicts.

``veloxseg predict -m fold0 fold1 fold2 fold3 fold4 ...`` (and ``Segmenter([a, b, ...])``) runs
the pipeline once: one read, one resampling and one normalization of the inputs, then every
sliding window goes through each member's network and the members' logits are averaged before
the windows are blended (nnU-Net averages its folds' logits the same way). Mirror TTA flips the
window once and averages every member's output for each flip. The cost is one network pass per
member and window; everything around the networks is paid once.

Members must see the same inputs and give the same outputs: the same channels (name, modality,
normalization), labels, spacing, orientation and window size. Anything else refuses the
ensemble, naming both bundles and what differs. The inference settings (overlap, blending, TTA,
smallest component, body crop, PET border refinement) are the first member's; where another
member's differ, a warning names them.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Sequence

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)


class MeanOfNetworks(nn.Module):
    """Calls every member on the same batch; returns the mean of their main outputs (logits,
    float32). Deep-supervision heads and teachers, which inference never uses, are dropped."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)

    def forward(self, x):
        from .pipeline import _model_output

        total = None
        for net in self.members:
            y = _model_output(net(x)).float()
            total = y if total is None else total.add_(y)
        return total.div_(len(self.members))


def _channel_key(c: dict) -> tuple:
    return (str(c.get("name", "")), str(c.get("modality", "")).upper(), repr(_sorted(c.get("normalization") or {})))


def _sorted(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _sorted(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_sorted(v) for v in value)
    return value


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-6 * max(1.0, abs(float(x))) for x, y in zip(a, b))


def _describe_channels(plan) -> str:
    return "; ".join(f"{c.get('name', i)} ({(c.get('normalization') or {}).get('scheme', 'none')})"
                     for i, c in enumerate(plan.channels))


def _describe_labels(plan) -> str:
    return ", ".join(f"{int(lb['value'])}={lb.get('name', '')}" for lb in plan.labels)


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


#: Inference settings taken from the first member (a difference is warned about, not refused).
SETTINGS = ("overlap", "blending", "tta", "tta_axes", "min_component_mm3", "crop_to_body", "pet_refine")


def check_members(plans: Sequence, names: Sequence[str]) -> List[str]:
    """Refuse members that cannot be averaged (ConfigError naming the first and the odd one and
    what differs); return the inference settings in which they differ from the first."""
    first, fname = plans[0], names[0]
    differ: List[str] = []
    for plan, name in zip(plans[1:], names[1:]):
        what = None
        if len(plan.channels) != len(first.channels) or \
                [_channel_key(c) for c in plan.channels] != [_channel_key(c) for c in first.channels]:
            what = f"inputs differ ({fname}: {_describe_channels(first)}; {name}: {_describe_channels(plan)})"
        elif [(int(a["value"]), str(a.get("name", ""))) for a in plan.labels] != \
                [(int(a["value"]), str(a.get("name", ""))) for a in first.labels]:
            what = f"labels differ ({fname}: {_describe_labels(first)}; {name}: {_describe_labels(plan)})"
        elif not _close(plan.spacing, first.spacing):
            what = f"spacings differ ({fname}: {first.spacing} mm; {name}: {plan.spacing} mm)"
        elif plan.orientation != first.orientation:
            what = f"array orientations differ ({fname}: {first.orientation}; {name}: {plan.orientation})"
        elif tuple(plan.patch_size) != tuple(first.patch_size):
            what = (f"window sizes differ ({fname}: {'x'.join(map(str, first.patch_size))}; "
                    f"{name}: {'x'.join(map(str, plan.patch_size))})")
        if what is not None:
            raise ConfigError(f"cannot average {name} with {fname}: {what}. The models of an ensemble must "
                              f"take the same inputs at the same spacing and give the same labels (the folds of "
                              f"one cross-validation do)")
        for key in SETTINGS:
            if getattr(plan, key) != getattr(first, key):
                differ.append(f"{key}: {_shown(getattr(first, key))} in {fname}, {_shown(getattr(plan, key))} in {name}")
    if differ:
        msg = (f"the ensemble's members have different inference settings; using those of the first, {fname}: "
               + "; ".join(differ))
        warnings.warn(msg)
        log.warning(msg)
    return differ


__all__ = ["MeanOfNetworks", "check_members", "SETTINGS"]
