"""Fine-tuning a bundle on local cases: ``veloxseg finetune -m BUNDLE DATASET -o NEW_BUNDLE``.

The new run starts from the bundle's weights and keeps everything the bundle fixed at planning time
(model, patch size, spacing, per-channel normalization with its stored statistics), so the network
keeps seeing inputs scaled as it was trained; only ``patch_size`` may be changed (the attention
windows follow it, and the position-bias tables are re-laid: ``adapt_to_patch_size``). When the
dataset's labels differ from the bundle's (other names or another number of classes), only the
segmentation heads (the pixel shuffle head and the deep-supervision heads) start afresh;
training-only modules absent from the bundle (bundles store inference weights: texture teachers,
deep-supervision heads) start afresh in any case. ``--freeze-encoder`` trains only decoder, heads
and teachers. With the bundle's own labels, the starting weights are validated before the first
step: their Dice is the figure to beat (a run in which no epoch beats it keeps them, and a
``--target-dice`` they already reach means nothing is trained), and the training record keeps it as
``start_val_dice``. The source bundle is only read; the new bundle's training record names it as
``parent`` and carries the ``lineage`` (every ancestor's name, command, dataset and date, nearest
first), so a chain of fine-tunes can be reproduced from the last bundle alone. The new bundle keeps
the parent's inference settings (overlap, blending, TTA, post-processing, the PET border
refinement unless the labels change), its TTA axes joined by the recipe's z flip.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..bundle import training_notes
from ..errors import ConfigError, InputError
from .trainer import HEAD_PREFIXES, RunSetup, TrainConfig, TrainResult, run_training

log = logging.getLogger(__name__)

#: Fine-tuning defaults (a short run at a lower learning rate than training from scratch).
from .defaults import FINETUNE_EPOCHS, FINETUNE_ITERATIONS, FINETUNE_LR  # noqa: F401


def _labels_for(dataset, bundle_labels: List[dict]):
    """(labels in bundle format, same_as_bundle) for the dataset's label set."""
    from .planner import _PALETTE  # the planner's label colours

    ds_labels = dataset.label_values()
    if [(v, n) for v, n in ds_labels] == [(int(lb["value"]), lb["name"]) for lb in bundle_labels]:
        return [dict(lb) for lb in bundle_labels], True
    if [v for v, _ in ds_labels] != list(range(len(ds_labels))):
        raise InputError(f"{dataset.root.name}: label values must be 0..K-1, got {[v for v, _ in ds_labels]}")
    by_name = {lb["name"]: lb for lb in bundle_labels}
    out = []
    for i, (v, name) in enumerate(ds_labels):
        entry = {"value": v, "name": name}
        old = by_name.get(name)
        if old is not None:
            entry.update({k: old[k] for k in ("color", "terminology") if k in old})
        elif v != 0:
            entry["color"] = list(_PALETTE[(i - 1) % len(_PALETTE)])
        out.append(entry)
    return out, False


def _warn_new_label_set(dataset, src, drops_pet_refine: bool) -> None:
    """Say, where it shows (a warning), what a label set other than the bundle's costs, and how
    to keep the trained heads when only the names differ (a dataset converted without
    ``--labels-map`` names its labels ``label_<v>``)."""
    ours = dataset.label_values()
    theirs = [(int(lb["value"]), lb["name"]) for lb in src.meta["labels"]]
    what = "its trained segmentation heads start afresh" + (
        " and its PET border refinement (inference.pet_refine) is dropped" if drops_pet_refine else "")
    msg = f"{dataset.root.name}: labels {[n for _, n in ours]} differ from bundle '{src.name}' {[n for _, n in theirs]}: {what}"
    if [v for v, _ in ours] == [v for v, _ in theirs]:
        names = ",".join(f"{n}={v}" for v, n in theirs)
        msg += (f". If they are the same structures, name them as the bundle does to keep both: \"labels\" in "
                f"{dataset.root.name}/dataset.json, or veloxseg convert --labels-map {names}")
    log.warning(msg)


def _weights_sha256(bundle) -> str:
    return hashlib.sha256(bundle._weights()).hexdigest()


def _inherit_loss_settings(config: TrainConfig, meta: dict) -> None:
    """Batch Dice, deep-supervision weights, the lesion-wise Dice weight and the patch sampling
    not given on the command line follow the parent's recorded recipe (the loss and the patches
    the weights were trained with)."""
    recipe = training_notes(meta).get("recipe")
    recipe = recipe if isinstance(recipe, dict) else {}
    loss = recipe.get("loss")
    loss = loss if isinstance(loss, dict) else {}
    if config.batch_dice is None:
        config.batch_dice = bool(loss.get("batch_dice", False))
    if config.lesion_dice is None:
        lesion = loss.get("lambda_lesion_dice", 0.0)
        config.lesion_dice = float(lesion) if isinstance(lesion, (int, float)) and lesion >= 0 else 0.0
    weights = loss.get("ds_weights")
    if config.ds_weights is None and isinstance(weights, list) and weights:
        config.ds_weights = tuple(float(w) for w in weights)
    if config.component_sampling is None:
        config.component_sampling = _recorded_component_sampling(recipe)


def _recorded_component_sampling(recipe: dict) -> float:
    """The fraction of lesion-centred foreground patches a recipe records: its
    ``component_sampling``, or, in bundles written before that field, the number its ``sampling``
    text begins with after "1:1 fg/bg; " (the trainer's own wording); 0 when neither is there."""
    value = recipe.get("component_sampling")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        match = re.fullmatch(r"1:1 fg/bg; ([0-9.eE+-]+) of fg patches centred on .*", str(recipe.get("sampling", "")))
        try:
            value = float(match.group(1)) if match else 0.0
        except ValueError:
            value = 0.0
    return float(value) if math.isfinite(value) and 0.0 <= value <= 1.0 else 0.0


def lineage_of(meta: dict) -> List[dict]:
    """The ancestry a child of the bundle ``meta`` records: this bundle's own training run first,
    then the lineage it recorded itself (a bundle trained from scratch has none)."""
    tr = meta.get("training") or {}
    earlier = training_notes(meta).get("lineage")
    entry = {"name": meta.get("name"), **{k: tr.get(k) for k in ("command", "dataset", "date", "parent")}}
    return [entry] + [e for e in (earlier if isinstance(earlier, list) else []) if isinstance(e, dict)]


def adapt_to_patch_size(weights: Dict[str, torch.Tensor], model_meta: dict, num_classes: int,
                        patch_size: Sequence[int]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The bundle weights ``weights`` (of the network ``model_meta`` describes) made to fit the
    same network built for ``patch_size`` (z, y, x). The attention windows follow the patch size,
    so only the relative-position bias tables can change shape: each is re-laid for the new
    window (:func:`~VeloxSegLib.model.pwa.resize_relative_position_bias_table`, every offset both
    windows share keeps its bias). Returns the new weights and the names of the tables resized."""
    from ..model import build_model
    from ..model.pwa import PairedWindowAttention, resize_relative_position_bias_table

    def windows(patch):
        try:
            net = build_model(model_meta["name"], in_channels=tuple(model_meta["in_channels"]),
                              num_classes=num_classes, patch_size=tuple(patch),
                              **dict(model_meta.get("overrides") or {}))
        except ValueError as exc:
            raise ConfigError(f"patch size {' '.join(str(v) for v in reversed(tuple(patch)))} (x y z): {exc}") from exc
        return {f"{name}.relative_position_bias_table": mod.tokens_per_axis
                for name, mod in net.named_modules() if isinstance(mod, PairedWindowAttention)}

    old, new = windows(model_meta["patch_size"]), windows(patch_size)
    out, resized = dict(weights), []
    for key, n_new in new.items():
        n_old = old.get(key)
        if key in out and n_old is not None and tuple(n_old) != tuple(n_new):
            out[key] = resize_relative_position_bias_table(out[key], n_old, n_new)
            resized.append(key)
    return out, resized


def run_finetune(bundle, dataset, output, config: Optional[TrainConfig] = None,
                 patch_size: Optional[Sequence[int]] = None, spacing: Optional[Sequence[float]] = None,
                 **kwargs) -> TrainResult:
    """Fine-tune ``bundle`` (path or name) on the nnU-Net raw ``dataset``; write ``output``.

    ``patch_size`` (z, y, x) trains at another patch size than the bundle's: the attention
    windows follow it and the position-bias tables are re-laid (:func:`adapt_to_patch_size`).
    ``spacing`` (x, y, z mm) trains, and makes the new bundle predict, at another voxel spacing
    than the bundle's (every weight is kept; the patch then covers another field of view).
    ``kwargs`` go to :func:`trainer.run_training` (progress, stop, resume, work_dir, command).
    """
    from ..bundle import load_bundle
    from ..data.nnunet import load_dataset

    config = config or TrainConfig(epochs=FINETUNE_EPOCHS, iterations_per_epoch=FINETUNE_ITERATIONS,
                                   lr=FINETUNE_LR, val_every=1)
    src = load_bundle(bundle)
    if src.members > 1:
        raise InputError(f"{src.path}: is an ensemble of {src.members} networks (veloxseg ensemble); fine-tune one "
                         f"of the bundles it was made from, or each of them")
    out = Path(output)
    if out.exists() and out.resolve() == Path(src.path).resolve():
        raise InputError(f"{out}: is the source bundle; fine-tuning writes a new bundle and never replaces its parent")
    source = Path(src.path).resolve()
    if source.is_dir():  # nothing goes inside the parent either: not the new bundle, not the checkpoints
        from .trainer import default_work_dir

        work = Path(kwargs.get("work_dir") or default_work_dir(out))
        for path, what in ((out, "the output"), (work, "the work folder")):
            if source in path.resolve().parents or path.resolve() == source:
                raise InputError(f"{path}: {what} is inside the source bundle {src.path}, which is never modified")
    meta = src.meta
    ds = load_dataset(dataset)
    if ds.num_channels != len(meta["channels"]):
        raise InputError(f"{ds.root.name}: has {ds.num_channels} channel(s) ({', '.join(ds.channel_list)}) but "
                         f"bundle '{src.name}' expects {len(meta['channels'])} "
                         f"({', '.join(c['name'] for c in meta['channels'])}), in that order")
    names = [c["name"] for c in meta["channels"]]
    if [n.lower() for n in ds.channel_list] != [n.lower() for n in names]:
        log.warning("dataset channels %s differ in name from the bundle's %s; using them in that order",
                    ds.channel_list, names)
    labels, same = _labels_for(ds, meta["labels"])
    _inherit_loss_settings(config, meta)
    m = meta["model"]
    patch = tuple(int(v) for v in (patch_size if patch_size is not None else m["patch_size"]))
    parent_spacing = tuple(float(v) for v in meta["spacing"])
    target = tuple(float(v) for v in spacing) if spacing is not None else parent_spacing
    if len(target) != 3 or not all(math.isfinite(v) and v > 0 for v in target):
        raise ConfigError(f"--spacing must be three positive sizes in mm (x y z), got {list(target)}")
    inference = dict(meta["inference"])
    if not same:
        _warn_new_label_set(ds, src, inference.get("pet_refine") is not None)
        inference["pet_refine"] = None  # the parent's PET border refinement was set for its own lesion label
    setup = RunSetup(model_name=m["name"], in_channels=tuple(m["in_channels"]), num_classes=len(labels),
                     patch_size=patch, spacing=target,
                     channels=[dict(c) for c in meta["channels"]], labels=labels,
                     batch_size=int(config.batch_size or 2), overrides=dict(m.get("overrides") or {}),
                     inference=inference, orientation=meta.get("orientation"))
    weights = src.state_dict()
    sha = _weights_sha256(src)
    notes = {"parent_path": str(Path(src.path).resolve()), "parent_weights_sha256": sha, "new_label_set": not same,
             "heads_reinitialized": not same, "parent_labels": [lb["name"] for lb in meta["labels"]],
             "lineage": lineage_of(meta)}
    if patch != tuple(m["patch_size"]):
        weights, resized = adapt_to_patch_size(weights, m, len(meta["labels"]), patch)
        notes.update({"parent_patch_size": list(m["patch_size"]), "bias_tables_resized": resized})
        log.info("patch size %s instead of the bundle's %s: %d position-bias table(s) re-laid for the new windows",
                 "x".join(map(str, patch)), "x".join(map(str, m["patch_size"])), len(resized))
    if target != parent_spacing:
        notes["parent_spacing"] = list(parent_spacing)
        log.info("spacing %s mm instead of the bundle's %s mm", "x".join(f"{v:g}" for v in target),
                 "x".join(f"{v:g}" for v in parent_spacing))
    if config.description is None:
        config.description = f"{src.name} fine-tuned on {ds.root.name}" + (
            f" (new labels: {', '.join(lb['name'] for lb in labels[1:])})" if not same else "")
    return run_training(ds.root, output, config, setup=setup, init_weights=weights,
                        reinit_prefixes=() if same else HEAD_PREFIXES, parent=src.name, notes=notes, **kwargs)


#: phantom draws of :func:`finetune_benchmark`: 5 training cases of seed S, 3 held-out of seed S + 1
#: (four consecutive draws of the eleven in docs/models.md: with the shipped model two meet the target
#: at the start, one after 25 steps, and one never does, about the sweep's 8 in 11)
FINETUNE_BENCH_DRAWS = (780, 790, 800, 810)


def finetune_benchmark(bundle: str = "petct-lesion-demo", draws: Sequence[int] = FINETUNE_BENCH_DRAWS,
                       threads: int = 2, target: float = 0.7, train_cases: int = 5, val_cases: int = 3,
                       size=None, extra: Sequence[str] = (), workdir=None, progress=None,
                       timeout: float = 3600) -> dict:
    """How long ``veloxseg finetune`` takes to reach ``target`` lesion Dice on ``val_cases`` held-out
    PET/CT phantoms after training on ``train_cases`` others, per draw: the command with its
    defaults and ``--target-dice``, in its own process on ``threads`` CPU threads; wall time and peak
    RSS of that process (Linux; None elsewhere), and the new bundle's record (starting Dice, best
    Dice, steps run).
    Returns ``{"rows": [...], "markdown": "..."}`` for ``veloxseg bench``'s fine-tuning section."""
    import subprocess
    import tempfile
    import time

    from ..bundle import load_bundle
    from ..data.phantom import write_phantom_dataset
    from ..infer.bench_wholebody import split_hwm, veloxseg_env, veloxseg_runner

    rows = []
    with tempfile.TemporaryDirectory(prefix="veloxseg-ft-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        for seed in draws:
            if progress:
                progress(f"[bench] fine-tuning {bundle}: draw {seed} ({train_cases} cases) / {seed + 1} "
                         f"({val_cases} held out), target Dice {target}, {threads} thread(s)")
            tr, va, out = root / f"train_{seed}", root / f"val_{seed}", root / f"ft_{seed}"
            write_phantom_dataset(tr, "petct", train_cases, seed=seed, size=size)
            write_phantom_dataset(va, "petct", val_cases, seed=seed + 1, size=size)
            cmd = [*veloxseg_runner(), "finetune", "-m", str(bundle), str(tr), "-o", str(out),
                   "--val-dataset", str(va), "--target-dice", str(target), "--threads", str(threads),
                   "--device", "cpu", "--progress", "none", *map(str, extra)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=veloxseg_env(threads))
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"fine-tuning benchmark, draw {seed}, failed:\n{proc.stderr[-2000:]}")
            peak_mb, _ = split_hwm(proc.stderr)
            m = load_bundle(out).meta["training"]["metrics"]
            rows.append({"draw": seed, "start_dice": m.get("start_val_dice"), "dice": m.get("val_dice"),
                         "reached": bool(m.get("target_met_at_start")) or m.get("reached_target_at_epoch") is not None,
                         "met_at_start": bool(m.get("target_met_at_start")),
                         "reached_at_epoch": m.get("reached_target_at_epoch"), "steps": m.get("steps_run"),
                         "train_seconds": m.get("train_seconds"), "wall_s": round(wall, 2),
                         "peak_rss_mb": round(peak_mb, 1) if peak_mb is not None else None})
    return {"rows": rows, "markdown": finetune_table(rows, bundle, target, threads, train_cases, val_cases)}


def finetune_table(rows: Sequence[dict], bundle: str = "petct-lesion-demo", target: float = 0.7, threads: int = 2,
                   train_cases: int = 5, val_cases: int = 3) -> str:
    """The markdown of :func:`finetune_benchmark`'s rows."""
    lr = f"{FINETUNE_LR:.0e}".replace("e-0", "e-")  # 1e-4
    lines = [f"`veloxseg finetune -m {bundle} TRAIN -o OUT --val-dataset HELD_OUT --target-dice {target} "
             f"--threads {threads}` with its defaults (up to {FINETUNE_EPOCHS} epochs of {FINETUNE_ITERATIONS} steps, "
             f"lr {lr}, validation after each epoch), TRAIN = `veloxseg phantom --kind petct -n {train_cases} "
             f"--seed S`, HELD_OUT = `-n {val_cases} --seed S+1`; wall time (process start to exit, including the "
             f"validation of the starting weights) and peak RSS of that process. More draws: docs/models.md.", "",
             f"| draw S | starting Dice | new bundle's Dice | reached {target:.2f} | steps | wall (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    for r in rows:
        if r["met_at_start"]:
            when = "yes, at the start (nothing trained)"
        elif r["reached"]:
            when = f"yes, after epoch {int(r['reached_at_epoch']) + 1}"
        else:
            when = "no"
        lines.append(f"| {r['draw']} | {fmt(r['start_dice'])} | {fmt(r['dice'])} | {when} | {r['steps']} | "
                     f"{r['wall_s']:.1f} | {r['peak_rss_mb'] if r['peak_rss_mb'] is not None else '-'} |")
    return "\n".join(lines)


__all__ = ["run_finetune", "finetune_benchmark", "finetune_table", "FINETUNE_BENCH_DRAWS", "adapt_to_patch_size",
           "lineage_of", "FINETUNE_EPOCHS", "FINETUNE_ITERATIONS", "FINETUNE_LR"]
