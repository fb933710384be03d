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

Members must take the same inputs and give the same outputs: the same channels (name and
modality, in the same order) and labels. Anything else refuses the ensemble, naming both bundles
and what differs. Members that share a *configuration* (the channels' normalization, the
spacing, the array orientation and the window size: the folds of one cross-validation) are
averaged in every window as above. Members of different configurations (nnU-Net's ensemble of
``3d_fullres`` and ``3d_lowres``, or two of our plans with other spacings or windows) cannot share
windows: each configuration predicts the case on its own grid, its class probabilities are
brought back onto the first input's grid, and the configurations' probabilities are averaged
there, each configuration weighing the same, before the arg-max and the post-processing
(nnU-Net's order for ensembles of configurations). The inference settings (overlap, blending,
TTA, body crop) are the first member's within a configuration and each configuration's own
across them; the post-processing (smallest component, PET border refinement) is the first
member's. Where a member's settings differ from the ones used, a warning names them.
``veloxseg ensemble`` packs only members of one configuration (a bundle holds one).
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Sequence

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


def _input_key(c: dict) -> tuple:
    return (str(c.get("name", "")), str(c.get("modality", "")).upper())


def _configuration_difference(plan, first, name, fname) -> Optional[str]:
    """What keeps ``plan`` from sharing windows with ``first`` (None: the same configuration)."""
    if [_channel_key(c) for c in plan.channels] != [_channel_key(c) for c in first.channels]:
        return f"inputs differ ({fname}: {_describe_channels(first)}; {name}: {_describe_channels(plan)})"
    if not _close(plan.spacing, first.spacing):
        return f"spacings differ ({fname}: {first.spacing} mm; {name}: {plan.spacing} mm)"
    if plan.orientation != first.orientation:
        return f"array orientations differ ({fname}: {first.orientation}; {name}: {plan.orientation})"
    if tuple(plan.patch_size) != tuple(first.patch_size):
        return (f"window sizes differ ({fname}: {'x'.join(map(str, first.patch_size))}; "
                f"{name}: {'x'.join(map(str, plan.patch_size))})")
    return None


def group_configurations(plans: Sequence) -> List[List[int]]:
    """The members' indices grouped by configuration (normalization, spacing, orientation,
    window), each group in the members' order, the groups in order of their first member."""
    groups: List[List[int]] = []
    for i, plan in enumerate(plans):
        for g in groups:
            if _configuration_difference(plan, plans[g[0]], "", "") is None:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


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


#: Of those, the ones each configuration keeps as its own in an ensemble of configurations.
CONFIGURATION_SETTINGS = ("overlap", "blending", "tta", "tta_axes", "crop_to_body")


def check_members(plans: Sequence, names: Sequence[str], configurations: bool = False) -> List[str]:
    """Refuse members that cannot be averaged (ConfigError naming the first and the odd one and
    what differs); return the inference settings in which they differ from the ones used.

    ``configurations``: members of different configurations (normalization, spacing,
    orientation, window) are allowed and averaged on the output grid; only their inputs and
    labels must agree. Otherwise every member must share the first's configuration (the folds of
    one model; an ensemble bundle)."""
    first, fname = plans[0], names[0]
    differ: List[str] = []
    groups = group_configurations(plans) if configurations else [list(range(len(plans)))]
    head = {i: g[0] for g in groups for i in g}  # each member's configuration's first member
    for i, (plan, name) in enumerate(zip(plans[1:], names[1:]), start=1):
        what = None
        if [_input_key(c) for c in plan.channels] != [_input_key(c) for c in first.channels]:
            what = f"inputs differ ({fname}: {_describe_channels(first)}; {name}: {_describe_channels(plan)})"
        elif [(int(a["value"]), str(a.get("name", ""))) for a in plan.labels] != \
                [(int(a["value"]), str(a.get("name", ""))) for a in first.labels]:
            what = f"labels differ ({fname}: {_describe_labels(first)}; {name}: {_describe_labels(plan)})"
        elif not configurations:
            what = _configuration_difference(plan, first, name, fname)
        if what is not None:
            if configurations:
                raise ConfigError(f"cannot average {name} with {fname}: {what}. The models of an ensemble must "
                                  f"take the same inputs in the same order and give the same labels")
            raise ConfigError(f"cannot average {name} with {fname}: {what}. The models of one configuration must "
                              f"take the same inputs at the same spacing and window and give the same labels (the "
                              f"folds of one cross-validation do)")
        for key in SETTINGS:
            own = configurations and key in CONFIGURATION_SETTINGS
            ref, rname = (plans[head[i]], names[head[i]]) if own else (first, fname)
            if getattr(plan, key) != getattr(ref, key):
                differ.append(f"{key}: {_shown(getattr(ref, key))} in {rname}, {_shown(getattr(plan, key))} in {name}")
    if differ:
        whose = f"those of the first, {fname}" if len(groups) == 1 else (
            f"those of the first, {fname} (for {', '.join(CONFIGURATION_SETTINGS)}: of each configuration's first)")
        msg = f"the ensemble's members have different inference settings; using {whose}: " + "; ".join(differ)
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


__all__ = ["MeanOfNetworks", "check_members", "group_configurations", "pack_ensemble", "SETTINGS",
           "CONFIGURATION_SETTINGS"]
