"""Several bundles as one model: the folds of a cross-validation averaged, as nnU-Net predicts.

``veloxseg predict -m fold0 fold1 fold2 fold3 fold4 ...`` (and ``Segmenter([a, b, ...])``) runs
the pipeline once: one read, one resampling and one normalization of the inputs, then every
sliding window goes through each member's network and the members' logits are averaged before
the windows are blended (nnU-Net averages its folds' logits the same way). Mirror TTA flips the
window once and averages every member's output for each flip. The cost is one network pass per
member and window; everything around the networks is paid once.

``veloxseg ensemble fold0 fold1 ... -o my-ensemble`` (:func:`pack_ensemble`) packs the bundles
into one bundle (``model.members`` N, member i's weights under ``members.<i>.``;
docs/bundle-format.md), as nnU-Net exports its folds as one model: it predicts the same as
``-m fold0 fold1 ...`` and goes wherever a bundle goes (``-m NAME``, the models folder, the Slicer
panel, the batch script, a zip).

Members must see the same inputs and give the same outputs: the same channels (name, modality,
normalization), labels, spacing, orientation and window size. Anything else refuses the
ensemble, naming both bundles and what differs. The inference settings (overlap, blending, TTA,
smallest component, body crop, PET border refinement) are the first member's; where another
member's differ, a warning names them.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Sequence

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

    @property
    def training_only_prefixes(self) -> tuple:
        """The members' training-only modules (teachers, deep-supervision heads) as key prefixes."""
        from ..bundle import _training_only_prefixes

        return tuple(f"members.{i}.{p}" for i, net in enumerate(self.members) for p in _training_only_prefixes(net))


def _channel_key(c: dict) -> tuple:
    return (str(c.get("name", "")), str(c.get("modality", "")).upper(), c.get("normalization") or {})


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
        if [_channel_key(c) for c in plan.channels] != [_channel_key(c) for c in first.channels]:
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


def pack_ensemble(members: Sequence, output, *, name: Optional[str] = None, description: Optional[str] = None,
                  overwrite: bool = False, command: Optional[str] = None, inference: Optional[dict] = None):
    """Write the bundles ``members`` (paths or names) as one ensemble bundle at ``output``.

    The members are checked as for prediction (:func:`check_members`) and must hold the same
    network (``model``: name, inputs, classes, window, overrides); an ensemble bundle is not a
    member. The new bundle takes the first member's channels, labels, spacing, orientation and
    inference settings (``inference`` replaces some of them, e.g. the smallest component that
    ``veloxseg crossval`` chose); its training record lists every member's. The members are only
    read. Returns the written bundle's path.
    """
    import datetime
    import json
    from pathlib import Path

    from .. import __version__
    from ..bundle import check_bundle_output, load_bundle, save_bundle
    from ..errors import InputError
    from .pipeline import InferencePlan

    members = list(members)
    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least 2 bundles, got {len(members)}")
    out = Path(output).expanduser()
    check_bundle_output(out, overwrite, "pass --overwrite to replace it")
    bundles = [load_bundle(m) for m in members]
    names = [f"'{b.path}'" for b in bundles]
    for b, shown in zip(bundles, names):
        if out.exists() and out.resolve() == Path(b.path).resolve():
            raise InputError(f"{out}: is one of the members, which are never modified; write the ensemble elsewhere")
        if b.members > 1:
            raise ConfigError(f"{shown} is itself an ensemble of {b.members} networks; give the bundles it was made "
                              f"from")
    check_members([InferencePlan.from_meta(b.meta) for b in bundles], names)
    first = bundles[0].meta
    for b, shown in zip(bundles[1:], names[1:]):
        if b.meta["model"] != first["model"]:
            raise ConfigError(f"cannot pack {shown} with {names[0]}: their networks differ "
                              f"({_model_text(first['model'])}; {_model_text(b.meta['model'])}); an ensemble bundle "
                              f"holds one network several times (predict -m A B ... averages any that fit)")
    weights = {}
    for i, b in enumerate(bundles):
        state = b.state_dict()
        b._build_network(state, "")  # every member's weights checked (strictly) before anything is written
        weights.update({f"members.{i}.{key}": t for key, t in state.items()})
    training = {"notes": json.dumps({"ensemble": [
        {"name": b.name, "path": str(Path(b.path).resolve()), "training": b.meta.get("training") or {}}
        for b in bundles]}), "date": datetime.date.today().isoformat(), "veloxseg_version": __version__}
    datasets = {(b.meta.get("training") or {}).get("dataset") for b in bundles}
    if len(datasets) == 1 and None not in datasets:
        training["dataset"] = datasets.pop()
    if command:
        training["command"] = command
    meta = {key: json.loads(json.dumps(first[key])) for key in ("format_version", "model", "spacing", "channels",
                                                                "labels", "inference") if key in first}
    if "orientation" in first:
        meta["orientation"] = first["orientation"]
    meta["model"]["members"] = len(bundles)
    if inference:
        meta["inference"] = {**meta.get("inference", {}), **inference}
    meta["name"] = name or f"{bundles[0].name}-ensemble"
    meta["description"] = description if description is not None else (
        f"Ensemble of {len(bundles)} bundles ({', '.join(b.name for b in bundles)}): the logits of their networks "
        f"are averaged in every window." + (f" {bundles[0].description}" if bundles[0].description else ""))
    meta["training"] = training
    return save_bundle(out, meta, weights, overwrite=overwrite)


def _model_text(model: dict) -> str:
    extra = f", {model['overrides']}" if model.get("overrides") else ""
    return (f"{model['name']}, {len(model['in_channels'])} input(s), {model['num_classes']} classes, window "
            f"{'x'.join(map(str, model['patch_size']))}{extra}")


__all__ = ["MeanOfNetworks", "check_members", "pack_ensemble", "SETTINGS"]
