"""Cross-validation results of the folds of one training, as nnU-Net's ``find_best_configuration``.

After ``veloxseg train DATASET --fold K`` (or ``finetune --fold K``) for K = 0..4, every case of
the dataset was left out of exactly one fold's training. :func:`cross_validate` segments each
case with the fold that did not train on it (its *out-of-fold* prediction, nnU-Net's
``cv_niftis``), through the normal inference pipeline with the fold's own settings, and scores
the predictions against the dataset's labels: per case, per fold and over every case. That
pooled figure is the honest estimate of how the model does on cases like the dataset's (each
fold's own validation figure rests on a fifth of them).

It then chooses the post-processing on the same predictions, as nnU-Net's
``determine_postprocessing`` does: the smallest connected component kept
(``inference.min_component_mm3``) is scored over a ladder of volumes, each applied to the
predictions made without any removal (the pipeline removes small components last, so this is
exactly what predicting with that setting gives). Where the folds take PET, every case is also
scored with the PET border refinement off and on (its settings, tuned on phantoms, are the
part of the pipeline most worth checking on a user's own scans), and each volume is scored with
both. The best pair replaces the folds' own settings only when it gains more than ``MIN_GAIN``
mean Dice: less is within the noise of a few dozen cases. ``veloxseg crossval --pack`` writes the
folds as one ensemble bundle with it.

The folds are read from each bundle's training record (``training.metrics.val_cases``). Folds
whose validation cases overlap, or that validated on their training cases or on another
dataset, are refused before any case runs. With ``ensemble`` (``--ensemble``) the folds of
several configurations trained on the same splits are given together: the bundles holding out
the same cases form one fold, averaged as ``predict -m`` averages (every fold needs the same
number of them); bundles holding out overlapping but different cases are still refused.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError, InputError

#: The smallest-component volumes (mm^3) tried by default, besides each fold's own.
DEFAULT_CANDIDATES_MM3 = (0.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
#: The least mean-Dice gain for which the sweep's best smallest component replaces the folds' own.
MIN_GAIN = 0.001
#: The summary written into the output folder.
SUMMARY_NAME = "crossval.json"
#: The out-of-fold label maps, one per validated case.
PREDICTIONS_DIR = "predictions"

ProgressFn = Callable[[dict], None]


def fold_cases(bundle, shown: str) -> List[str]:
    """The validation cases of a fold bundle's training record (ConfigError when the bundle is
    not one fold of a cross-validation)."""
    if getattr(bundle, "members", 1) > 1:
        raise ConfigError(f"{shown} is an ensemble of {bundle.members} networks; give the fold bundles it was "
                          f"packed from")
    metrics = ((bundle.meta.get("training") or {}).get("metrics")) or {}
    cases = metrics.get("val_cases")
    if not cases:
        raise ConfigError(f"{shown}: its training record names no validation cases; cross-validation takes "
                          f"bundles written by 'veloxseg train --fold K' or 'veloxseg finetune --fold K'")
    if metrics.get("val_dataset"):
        raise ConfigError(f"{shown}: validated on another dataset ({metrics['val_dataset']}), not on a fold of "
                          f"its own cases; it is not part of a cross-validation")
    if metrics.get("validated_on") != "held-out":
        raise ConfigError(f"{shown}: validated on its own training cases (too few cases to hold any out); it has "
                          f"no out-of-fold cases")
    return [str(c) for c in cases]


def _check_output(output: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """The output is a new folder, or with ``overwrite`` an earlier cross-validation's folder;
    never an input, inside one, or holding one."""
    real = Path(os.path.realpath(output))
    for src in inputs:
        src_real = Path(os.path.realpath(src))
        if real == src_real or src_real in real.parents or real in src_real.parents:
            raise InputError(f"{output}: is, holds or lies inside '{src}', which is only read; choose another "
                             f"output folder")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise InputError(f"{output}: already exists (pass --overwrite to replace it)")
        if output.is_symlink() or not output.is_dir() or not (output / SUMMARY_NAME).is_file() or \
                any(p.name not in (SUMMARY_NAME, PREDICTIONS_DIR) for p in output.iterdir()):
            raise InputError(f"{output}: exists and is not the folder of an earlier cross-validation; not "
                             f"replacing it")


def _candidates(extra: Optional[Sequence[float]], own: Sequence[float]) -> List[float]:
    values = list(DEFAULT_CANDIDATES_MM3 if extra is None else extra) + [0.0] + list(own)
    for v in values:
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise ConfigError(f"smallest-component candidates must be volumes >= 0 mm^3, got {v}")
    return sorted({float(v) for v in values})


def _mask(arr: np.ndarray, key, regions) -> np.ndarray:
    return np.isin(arr, regions[key]) if isinstance(key, str) else arr == key


def _score_case(raws: Dict[object, np.ndarray], own: object, ref: np.ndarray, spacing_xyz,
                labels: Sequence[int], regions, ladder, own_mm3: float):
    """One out-of-fold case: the fold's own segmentation (``raws[own]``, the segmentation with
    the fold's own PET refinement, with its smallest component removed), all its metrics, and the
    Dice of every label and region for each candidate ``(variant, volume)``."""
    from .. import metrics as M
    from ..infer.postprocess import remove_small_components

    keys = list(labels) + list(regions or {})
    masks_ref = {k: _mask(ref, k, regions) for k in keys}

    def removed(raw, volume):
        return remove_small_components(raw.copy(), spacing_xyz, volume) if volume > 0 else raw

    final = removed(raws[own], own_mm3)
    sweep = {}
    for variant, raw in raws.items():
        for c in ladder:
            arr = final if (variant, c) == (own, own_mm3) else removed(raw, c)
            sweep[variant, c] = {k: M.dice_score(_mask(arr, k, regions), masks_ref[k]) for k in keys}
    spacing_zyx = tuple(reversed(spacing_xyz))
    metrics = M.evaluate_arrays(final, ref, labels, spacing_zyx)
    for name in regions or {}:
        metrics[name] = M.label_metrics(_mask(final, name, regions), masks_ref[name], spacing_zyx)
    return final, metrics, sweep


def _inference_of(choice: dict, plan) -> dict:
    """The bundle ``inference`` fields that make a choice: the smallest component, and where the
    PET refinement was chosen, its settings (the folds' own, else the defaults) or null (off)."""
    out = {"min_component_mm3": choice["min_component_mm3"]}
    if choice["pet_refine"] is not None:
        out["pet_refine"] = plan.pet_refine_settings(plan.pet_refine) if choice["pet_refine"] else None
    return out


def _group_folds(folds: List[List[str]], shown: List[str], ensemble: bool) -> List[List[int]]:
    """Bundle indices per fold: one bundle each; with ``ensemble``, the bundles holding out the
    same cases (the same fold of several configurations) together. Two bundles holding out
    overlapping but different cases, or (without ``ensemble``) the same case, are refused."""
    groups: Dict[frozenset, List[int]] = {}
    owner: Dict[str, int] = {}
    for i, cases in enumerate(folds):
        key = frozenset(cases)
        if len(key) != len(cases):
            dup = next(c for c in cases if cases.count(c) > 1)
            raise ConfigError(f"{shown[i]} lists case '{dup}' twice among its validation cases")
        if ensemble and key in groups:
            groups[key].append(i)
            continue
        for case in cases:
            if case in owner:
                j = owner[case]
                how = ("hold out overlapping but different cases: they are not the same fold of configurations "
                       "trained on the same splits" if ensemble else
                       "both validate on case '" + case + "': they are not folds of one cross-validation (with "
                       "--ensemble, the folds of several configurations trained on the same splits are averaged)")
                raise ConfigError(f"{shown[j]} and {shown[i]} {how}")
            owner[case] = i
        groups[key] = [i]
    out = list(groups.values())
    sizes = sorted({len(g) for g in out})
    if ensemble and len(sizes) > 1:  # one configuration's fold missing: that fold would not be an ensemble
        small = next(g for g in out if len(g) == sizes[0])
        raise ConfigError(f"--ensemble: the fold of {shown[small[0]]} has {sizes[0]} bundle(s) holding out its cases, "
                          f"other folds {sizes[-1]}; give fold K of every configuration")
    return out


def cross_validate(dataset, bundles: Sequence, output, *, regions: Optional[Dict[str, Sequence[int]]] = None,
                   candidates_mm3: Optional[Sequence[float]] = None, device: str = "cpu",
                   threads: Optional[int] = None, overwrite: bool = False, progress: Optional[ProgressFn] = None,
                   cancel=None, min_gain: float = MIN_GAIN, ensemble: bool = False) -> dict:
    """Out-of-fold predictions of ``bundles`` (the folds, paths or names) on ``dataset`` (an
    nnU-Net raw dataset), their scores and the post-processing choice; see the module docstring.

    ``ensemble``: the bundles that hold out the same cases (the same fold of several
    configurations, trained on the same splits) predict their cases together, their outputs
    averaged as ``predict -m`` averages an ensemble's networks: the cross-validation of the
    configurations' ensemble, which ``veloxseg compare --crossval`` can set against each one's.

    Writes ``output/predictions/CASE<ending>`` (each fold's own settings) and
    ``output/crossval.json`` atomically (a temporary folder renamed at the end: a failed or
    cancelled run leaves nothing). ``regions``: named unions of labels also scored (BraTS).
    ``progress`` receives one dict per finished case. Returns the summary.
    """
    import SimpleITK as sitk

    from .. import metrics as M
    from ..bundle import load_bundle
    from ..commands.evaluate import check_regions
    from ..data.io import read_image, write_image
    from ..data.nnunet import atomic_directory, load_dataset, write_json_atomic
    from ..infer.ensemble import check_members
    from ..infer.pipeline import InferencePlan, Segmenter, _check_cancel

    ds = load_dataset(dataset)
    loaded = [load_bundle(b) for b in bundles]
    if not loaded:
        raise ConfigError("cross-validation needs the fold bundles")
    shown = [f"'{b.path}'" for b in loaded]
    plans = [InferencePlan.from_meta(b.meta) for b in loaded]
    folds = [fold_cases(b, s) for b, s in zip(loaded, shown)]
    paths = [os.path.realpath(b.path) if getattr(b, "path", None) else None for b in loaded]
    for i, p in enumerate(paths):
        if p is not None and p in paths[:i]:
            raise ConfigError(f"{shown[i]} is given twice")
    groups = _group_folds(folds, shown, ensemble)
    owner = {case: g for g, members in enumerate(groups) for case in folds[members[0]]}
    for i, cases in enumerate(folds):
        missing = [c for c in cases if c not in set(ds.cases)]
        if missing:
            raise InputError(f"{shown[i]}: its validation case(s) {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''} are not in the dataset '{ds.root}'; give the "
                             f"dataset the folds were trained on")
    if len(loaded) > 1:
        # the folds of one model: same inputs, labels, spacing and window; with ``ensemble`` the
        # configurations may differ (each fold's bundles average their probabilities on the case's grid)
        check_members(plans, shown, configurations=ensemble)
    plan = plans[0]
    if ds.num_channels != len(plan.channels):
        raise InputError(f"'{ds.root}': {ds.num_channels} channel(s) per case, the folds take "
                         f"{len(plan.channels)} ({plan.expected_inputs()})")
    names = {int(lb["value"]): str(lb["name"]) for lb in plan.labels if int(lb["value"]) != 0}
    check_regions(regions or {}, sorted(names), names)
    keys: List[object] = sorted(names) + list(regions or {})
    shown_key = {k: (names[k] if not isinstance(k, str) else k) for k in keys}
    scored = list(regions) if regions else sorted(names)  # the foreground figure: regions when given
    ladder = _candidates(candidates_mm3, [p.min_component_mm3 for p in plans])
    # the PET border refinement is tried off and on where the folds take PET (None: no such choice)
    variants = [None]
    if plan.pet_channel is not None:
        try:
            plan.pet_refine_settings(plan.pet_refine)  # its default label may not be one of the model's
            variants = [False, True]
        except ConfigError:
            pass

    def own_variant(p):
        return None if variants == [None] else p.pet_refine is not None

    output = Path(output).expanduser()
    sources = [ds.root] + [Path(b.path) for b in loaded if getattr(b, "path", None)]
    validated = [c for c in ds.cases if c in owner]
    not_validated = [c for c in ds.cases if c not in owner]

    with atomic_directory(output, overwrite, sources, check=_check_output) as tmp:
        (tmp / PREDICTIONS_DIR).mkdir()
        per_case: List[dict] = []
        sweep: Dict[tuple, Dict[object, List[float]]] = {(v, c): {k: [] for k in keys} for v in variants
                                                         for c in ladder}
        done = 0
        for i, members in enumerate(groups):
            fold_plan, cases = plans[members[0]], folds[members[0]]  # an ensemble's settings are its first's
            seg = Segmenter([loaded[j] for j in members] if len(members) > 1 else loaded[members[0]],
                            device=device, threads=threads)
            for case in sorted(cases):
                _check_cancel(cancel)
                # one network pass gives both variants: the refined labels and those it started from
                result = seg.predict(ds.image_paths(case), min_component_mm3=0.0, cancel=cancel,
                                     pet_refine=None if variants == [None] else (fold_plan.pet_refine or True),
                                     keep_unrefined=True)
                label_path = ds.label_path(case)
                ref_img = read_image(label_path)
                problem = M.geometry_mismatch(result.labels, ref_img)
                if problem:
                    raise InputError(f"'{label_path}': the label map is not on the grid of the case's first image "
                                     f"({problem})")
                ref = sitk.GetArrayFromImage(ref_img)
                unknown = sorted(int(v) for v in np.unique(ref) if int(v) != 0 and int(v) not in names)
                if unknown:
                    raise InputError(f"'{label_path}': holds label(s) {unknown} that the folds do not predict "
                                     f"(they predict {sorted(names)})")
                raws = {variants[-1]: sitk.GetArrayFromImage(result.labels)}
                if variants == [False, True]:  # without unrefined labels no refinement ran (no body found)
                    unrefined = result.labels if result.unrefined_labels is None else result.unrefined_labels
                    raws[False] = sitk.GetArrayFromImage(unrefined)
                final, metrics, case_sweep = _score_case(raws, own_variant(fold_plan), ref, ref_img.GetSpacing(),
                                                         sorted(names), regions, ladder, fold_plan.min_component_mm3)
                for key, dice in case_sweep.items():
                    for k in keys:
                        sweep[key][k].append(dice[k])
                img = sitk.GetImageFromArray(final)
                img.CopyInformation(result.labels)
                write_image(img, tmp / PREDICTIONS_DIR / f"{case}{ds.file_ending}")
                per_case.append({"case": case, "fold": i, "metrics": metrics})
                done += 1
                if progress:
                    progress({"stage": "crossval", "fold": i, "case": case, "done": done, "total": len(validated),
                              "dice": {shown_key[k]: metrics[k]["dice"] for k in keys}})
        _check_cancel(cancel)

        def named(mean):
            return {shown_key[k]: mean[k] for k in keys}

        fold_rows = []
        for i, members in enumerate(groups):
            mine = [c["metrics"] for c in per_case if c["fold"] == i]
            recs = [(loaded[j].meta.get("training") or {}).get("metrics") or {} for j in members]
            row = {"bundle": " + ".join(loaded[j].name for j in members),
                   "path": str(Path(loaded[members[0]].path).resolve()), "fold": recs[0].get("fold"),
                   "cases": sorted(folds[members[0]]), "mean": named(M.mean_metrics(mine)),
                   "recorded_val_dice": recs[0].get("val_dice") if len(members) == 1 else None,
                   "min_component_mm3": plans[members[0]].min_component_mm3,
                   "pet_refine": own_variant(plans[members[0]])}
            if len(members) > 1:
                row["members"] = [{"bundle": loaded[j].name, "path": str(Path(loaded[j].path).resolve()),
                                   "recorded_val_dice": r.get("val_dice")} for j, r in zip(members, recs)]
            fold_rows.append(row)
        rows = []
        for (v, c), values in sweep.items():
            dice = {shown_key[k]: float(np.mean(values[k])) for k in keys}
            rows.append({"pet_refine": v, "min_component_mm3": c, "dice": dice,
                         "foreground_dice": float(np.mean([dice[shown_key[k]] for k in scored]))})
        current = {"pet_refine": own_variant(plan), "min_component_mm3": plan.min_component_mm3}

        def setting(r):
            return {"pet_refine": r["pet_refine"], "min_component_mm3": r["min_component_mm3"]}

        base = next(r for r in rows if setting(r) == current)
        best = max(rows, key=lambda r: (r["foreground_dice"], setting(r) == current,
                                        r["pet_refine"] == current["pet_refine"], -r["min_component_mm3"]))
        top = best  # the best candidate, kept or not: how sure the gain is, case by case
        if best["foreground_dice"] - base["foreground_dice"] <= min_gain:
            best = base

        def case_scores(r):
            values = sweep[r["pet_refine"], r["min_component_mm3"]]
            return [float(np.mean([values[k][i] for k in scored])) for i in range(len(per_case))]

        versus = M.paired_comparison(case_scores(base), case_scores(top)) if per_case else None
        summary = {
            "dataset": str(ds.root.resolve()), "cases": len(ds.cases), "validated_cases": len(validated),
            "cases_not_validated": not_validated,
            "labels": {str(k): v for k, v in names.items()}, "regions": {k: list(v) for k, v in (regions or {}).items()},
            "scored": [shown_key[k] for k in scored],
            "mean": named(M.mean_metrics([c["metrics"] for c in per_case])),
            "folds": fold_rows,
            "postprocessing": {"current": current, "best": setting(best), "candidates": rows,
                               "gain": best["foreground_dice"] - base["foreground_dice"],
                               "top_candidate": setting(top), "top_versus_current": versus,
                               "inference": _inference_of(setting(best), plan)},
            "per_case": [{"case": c["case"], "fold": c["fold"], "metrics": named(c["metrics"])} for c in per_case],
        }
        summary = M.json_safe(summary)
        write_json_atomic(tmp / SUMMARY_NAME, summary)
    return summary


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_markdown(summary: dict) -> str:
    """Per-fold and pooled Dice, then the post-processing sweep."""
    scored = list(summary["scored"])
    keys = list(summary["mean"])
    head = ["fold bundle", "cases"] + [f"Dice {k}" for k in keys] + ["recorded val Dice"]
    lines = [f"Out-of-fold predictions of {len(summary['folds'])} fold(s) on `{summary['dataset']}`: "
             f"{summary['validated_cases']} of {summary['cases']} cases.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in summary["folds"]:
        cells = [f["bundle"] + (f" (fold {f['fold']})" if f.get("fold") is not None else ""), str(len(f["cases"]))]
        cells += [_fmt(f["mean"][k]["dice"]) for k in keys] + [_fmt(f.get("recorded_val_dice"))]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**all folds**", str(summary["validated_cases"])]
    cells += [f"**{_fmt(summary['mean'][k]['dice'])}**" for k in keys] + [""]
    lines.append("| " + " | ".join(cells) + " |")
    per_case = sorted(summary["per_case"], key=lambda c: np.mean([c["metrics"][k]["dice"] for k in scored]))
    if per_case:
        worst = ", ".join(f"{c['case']} ({summary['folds'][c['fold']]['bundle']}): "
                          f"{np.mean([c['metrics'][k]['dice'] for k in scored]):.3f}" for c in per_case[:5])
        lines += ["", f"Lowest-scoring cases (mean Dice of {', '.join(scored)}; worth a look for label errors): "
                      f"{worst}"]
    if summary["cases_not_validated"]:
        lines += ["", f"{len(summary['cases_not_validated'])} case(s) are in no given fold's validation set "
                      f"(not predicted): {', '.join(summary['cases_not_validated'][:5])}"
                      f"{' ...' if len(summary['cases_not_validated']) > 5 else ''}"]
    pp = summary["postprocessing"]
    pet = pp["current"]["pet_refine"] is not None
    lines += ["", f"Post-processing, mean Dice of {', '.join(scored)} over the out-of-fold predictions:", "",
              "| " + ("PET refinement | " if pet else "") + "smallest component (mm^3) | " + " | ".join(scored)
              + " | mean |", "|---|" + ("---|" if pet else "") + "---|" * (len(scored) + 1)]
    for r in pp["candidates"]:
        mine = {"pet_refine": r["pet_refine"], "min_component_mm3": r["min_component_mm3"]}
        mark = " (the folds')" if mine == pp["current"] else ""
        mark += " **chosen**" if mine == pp["best"] else ""
        lines.append("| " + (("on" if r["pet_refine"] else "off") + " | " if pet else "")
                     + f"{r['min_component_mm3']:g}{mark} | " + " | ".join(_fmt(r["dice"][k], 4) for k in scored)
                     + f" | {_fmt(r['foreground_dice'], 4)} |")
    v = pp.get("top_versus_current")
    if v and pp.get("top_candidate") != pp["current"]:
        lines += ["", f"The best candidate ({describe_setting(pp['top_candidate'])}) against the folds' own, case by "
                      f"case: {v['mean_difference']:+.4f} (95% CI {v['ci_low']:+.4f} to {v['ci_high']:+.4f}), "
                      f"{v['better']} cases better and {v['worse']} worse, paired p = "
                      f"{v['p_value']:.3f} (docs/metrics.md, \"Comparing two models\")."]
    return "\n".join(lines)


__all__ = ["cross_validate", "fold_cases", "render_markdown", "describe_setting", "DEFAULT_CANDIDATES_MM3", "SUMMARY_NAME",
           "PREDICTIONS_DIR", "MIN_GAIN"]


def describe_setting(setting: dict) -> str:
    """``{"pet_refine": True, "min_component_mm3": 50}`` -> ``"PET refinement on, smallest component 50 mm^3"``."""
    text = f"smallest component {setting['min_component_mm3']:g} mm^3"
    if setting["pet_refine"] is not None:
        text = f"PET refinement {'on' if setting['pet_refine'] else 'off'}, " + text
    return text
