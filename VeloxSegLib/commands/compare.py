"""``veloxseg compare``: trained bundles side by side on the same held-out cases.

The same-budget comparison of docs/benchmarks.md: every bundle segments every case of a held-out
dataset through the normal inference pipeline, is evaluated against its labels, and its training
record (network, iterations, batch, patch, seconds) is read from the bundle. The result is a
JSON file (``make bench`` renders it into docs/benchmarks.md) and a markdown table on stdout.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from ..errors import InputError

#: Where ``make bench`` looks for the comparison (next to docs/benchmarks.md).
DEFAULT_OUTPUT = "docs/training-comparison.json"
#: The JSON of ``compare --crossval`` unless ``-o`` says otherwise.
DEFAULT_CROSSVAL_OUTPUT = "crossval-comparison.json"


def register(subparsers):
    p = subparsers.add_parser(
        "compare",
        help="evaluate trained bundles side by side on the same held-out dataset",
        description=(
            "Segment every case of a held-out dataset (nnU-Net raw format: imagesTr, labelsTr) with each "
            "bundle, evaluate against the labels and tabulate mean Dice per label (and --regions) next to "
            "each bundle's training record (network, parameters, iterations, batch, patch, training "
            "seconds). Writes JSON for docs/benchmarks.md and prints a markdown table."),
    )
    p.add_argument("bundles", nargs="+", metavar="BUNDLE",
                   help="bundle folders, .zip files or names (with --crossval: output folders of 'veloxseg crossval')")
    p.add_argument("--heldout", metavar="DATASET", help="held-out dataset folder (required unless --crossval)")
    p.add_argument("--crossval", action="store_true",
                   help="compare cross-validations instead: each argument is a 'veloxseg crossval' output folder "
                        "on the same dataset; their out-of-fold scores are compared case by case (nothing is "
                        "segmented again), nnU-Net's choice between configurations")
    p.add_argument("--regions", nargs="+", metavar="NAME=L,L",
                   help="also evaluate unions of labels, e.g. ET=3 TC=1,3 WT=1,2,3 (BraTS)")
    p.add_argument("--lesions", action="store_true",
                   help="also count each bundle's lesions found, missed and false-positive components and its "
                        "lesion-wise Dice (as 'veloxseg evaluate --lesions' with its defaults)")
    p.add_argument("--add-to", metavar="SAVED",
                   help="add the bundles as rows to a saved comparison JSON (from 'veloxseg compare' on the same "
                        "--heldout cases, with the same --regions; --lesions follows it), each compared case by "
                        "case with its first row; nothing of it is run again, and -o must name a new file")
    p.add_argument("--title", help="a line describing the comparison (data, budget)")
    p.add_argument("-o", "--output", help=f"JSON to write (default {DEFAULT_OUTPUT}; with --crossval "
                                          f"{DEFAULT_CROSSVAL_OUTPUT})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--threads", type=int, help="CPU threads for inference")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="default: cpu")
    p.set_defaults(func=run)
    return p


def _inference_params(bundle) -> float:
    """Parameters used at inference (training-only modules such as teachers and deep-supervision
    heads excluded, as in the network benchmark)."""
    from ..bundle import _training_only_prefixes

    net = bundle.build_model("cpu")
    skip = _training_only_prefixes(net)
    return sum(p.numel() for n, p in net.named_parameters() if not (skip and n.startswith(skip))) / 1e6


def _training_record(bundle) -> dict:
    from ..bundle import training_notes

    tr = bundle.meta.get("training") or {}
    recipe = training_notes(bundle.meta).get("recipe", {})
    metrics = tr.get("metrics") or {}
    steps = metrics.get("steps_run")  # older records: only the planned schedule
    return {"iterations": recipe.get("total_steps") if steps is None else steps, "batch_size": recipe.get("batch_size"),
            "epochs": tr.get("epochs"), "train_seconds": metrics.get("train_seconds"),
            "val_dice": metrics.get("val_dice"), "loss": recipe.get("loss"), "command": tr.get("command")}


def compare(bundles: Sequence[str], heldout, regions: Optional[Dict[str, List[int]]] = None,
            threads: Optional[int] = None, device: str = "cpu", progress=None, lesions: bool = False) -> dict:
    """Evaluate each bundle on ``heldout``; returns {"heldout", "cases", "scored", "rows": [...]}.

    Each row holds its mean Dice per label (and region), its per-case score (the mean Dice of
    ``scored``: the regions when given, else the labels) and, after the first row, how it
    compares with the first bundle case by case (:func:`VeloxSegLib.metrics.paired_comparison`).
    With ``lesions``, each row also holds ``lesions``: per label (and region) the lesion counts
    pooled over the cases, the mean lesion-wise Dice and the mean Dice budget (where the Dice is
    lost; :func:`VeloxSegLib.metrics.pool_lesions`, ``veloxseg evaluate --lesions`` with its
    default settings)."""
    import numpy as np

    from .. import metrics as M
    from ..bundle import load_bundle
    from ..infer.pipeline import predict_folder
    from .evaluate import evaluate, lesion_settings

    heldout = pathlib.Path(heldout)
    images, labels = heldout / "imagesTr", heldout / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(f"'{heldout}': no {folder.name} folder (expected an nnU-Net raw dataset)")
    loaded = [load_bundle(b) for b in bundles]
    label_sets = {tuple(lab["value"] for lab in b.labels) for b in loaded}
    if len(label_sets) > 1:
        raise InputError("the bundles have different label sets: " +
                         "; ".join(f"{b.name}: {[lab['value'] for lab in b.labels]}" for b in loaded))
    rows = []
    with tempfile.TemporaryDirectory(prefix="veloxseg-compare-") as tmp:
        for i, bundle in enumerate(loaded):
            if progress:
                progress(f"[compare] {bundle.name}: segmenting {heldout.name}")
            out = pathlib.Path(tmp) / f"b{i}"
            t0 = time.perf_counter()
            predicted = predict_folder(bundle, images, out, device=device, threads=threads)
            seconds = time.perf_counter() - t0
            names = {lab["value"]: lab["name"] for lab in bundle.labels if lab["value"] != 0}
            res = evaluate(out, labels, labels=sorted(names), label_names=names, regions=regions,
                           lesions=lesion_settings() if lesions else None)
            dice = {str(names.get(k, k)): v["dice"] for k, v in res["mean"].items()}
            scored = list(regions) if regions else sorted(names)  # the per-case figure compared
            per_case = {c["case"]: float(np.mean([c["metrics"][k]["dice"] for k in scored])) for c in res["cases"]}
            m = bundle.meta["model"]
            rows.append({"bundle": bundle.name, "model": m["name"], "in_channels": m["in_channels"],
                         "patch_size": m["patch_size"], "params_m": _inference_params(bundle),
                         **_training_record(bundle), "dice": dice, "per_case": per_case,
                         "predict_seconds_per_case": seconds / max(1, len(predicted))})
            if lesions:
                rows[-1]["lesions"] = {str(names.get(k, k)): {key: v[key] for key in (
                    "lesions", "found", "missed", "fp_components", "lesion_sensitivity", "lesionwise_dice",
                    "lesionwise_hd95_mm", "dice_budget")}
                    for k, v in res["lesion_mean"].items()}
    first = rows[0]["per_case"]
    for row in rows[1:]:  # each against the first bundle, case by case
        cases = sorted(first)
        row["versus_first"] = M.paired_comparison([first[c] for c in cases], [row["per_case"][c] for c in cases])
    scored_names = list(regions) if regions else [str(lab["name"]) for lab in loaded[0].labels if lab["value"] != 0]
    return {"heldout": heldout.name, "cases": len(res["cases"]), "scored": scored_names, "rows": rows}


def compare_crossvals(folders: Sequence) -> dict:
    """Cross-validations of one dataset side by side: each folder's ``crossval.json`` (written by
    ``veloxseg crossval``) gives the mean Dice over its out-of-fold predictions and each case's
    score (the mean Dice of its ``scored`` labels or regions, with the folds' own post-processing);
    every cross-validation after the first is compared with the first case by case
    (:func:`VeloxSegLib.metrics.paired_comparison`). Refuses (InputError) folders without a
    readable summary, and cross-validations of other datasets, cases or scored labels."""
    import json

    import numpy as np

    from .. import metrics as M
    from ..train.crossval import SUMMARY_NAME

    docs = []
    for folder in folders:
        path = pathlib.Path(folder) / SUMMARY_NAME
        if not path.is_file():
            raise InputError(f"'{folder}': no {SUMMARY_NAME}; give output folders of 'veloxseg crossval'")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            per_case = {str(c["case"]): float(np.mean([c["metrics"][k]["dice"] for k in doc["scored"]]))
                        for c in doc["per_case"]}
            dice = {str(k): v["dice"] for k, v in doc["mean"].items()}
            bundles = [str(f["bundle"]) for f in doc["folds"]]
            dataset = str(doc["dataset"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"'{path}': not a cross-validation summary ({exc!r})") from None
        docs.append({"crossval": pathlib.Path(folder).name, "path": str(pathlib.Path(folder).resolve()),
                     "dataset": dataset, "scored": list(doc["scored"]), "folds": len(bundles), "bundles": bundles,
                     "dice": dice, "per_case": per_case,
                     "postprocessing": (doc.get("postprocessing") or {}).get("best")})
    first = docs[0]
    for other in docs[1:]:
        for key, what in (("dataset", "datasets"), ("scored", "scored labels")):
            if other[key] != first[key]:
                raise InputError(f"'{first['path']}' and '{other['path']}' are cross-validations of different "
                                 f"{what} ({first[key]} against {other[key]}); only the same cases can be compared")
        if set(other["per_case"]) != set(first["per_case"]):
            only = sorted(set(first["per_case"]) ^ set(other["per_case"]))
            raise InputError(f"'{first['path']}' and '{other['path']}' predicted different cases ({len(only)} in only "
                             f"one of them, e.g. {', '.join(only[:3])}); compare cross-validations of the same folds' "
                             f"cases")
    cases = sorted(first["per_case"])
    for row in docs[1:]:
        row["versus_first"] = M.paired_comparison([first["per_case"][c] for c in cases],
                                                  [row["per_case"][c] for c in cases])
    return {"kind": "crossval", "dataset": first["dataset"], "cases": len(cases), "scored": first["scored"],
            "rows": docs}


def render_crossval_markdown(data: dict) -> str:
    rows = data["rows"]
    keys = list(rows[0]["dice"])
    head = ["cross-validation", "folds", "cases"] + [f"Dice {k}" for k in keys] + _paired_head(rows[0]["crossval"])
    lines = [f"Out-of-fold predictions on `{data['dataset']}`, {data['cases']} cases, mean Dice (`veloxseg compare "
             f"--crossval`; each cross-validation with its folds' own post-processing).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = r.get("versus_first")
        cells = [r["crossval"], str(r["folds"]), str(data["cases"])] + [_fmt(r["dice"].get(k)) for k in keys]
        lines.append("| " + " | ".join(cells + _paired_cells(v)) + " |")
    lines += ["", _paired_note(rows[0]["crossval"], data["scored"])]
    return "\n".join(lines)


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(data: dict) -> str:
    """The comparison table (used by ``make bench`` for docs/benchmarks.md)."""
    rows = data["rows"]
    keys = list(rows[0]["dice"]) if rows else []
    head = ["bundle", "network", "params (M)", "iterations x batch", "patch", "train s"] + \
           [f"Dice {k}" for k in keys] + ["val Dice", "predict s/case"]
    lines = []
    if data.get("title"):
        lines += [data["title"], ""]
    paired = any(r.get("versus_first") for r in rows)  # comparisons saved before it have none
    with_lesions = any(r.get("lesions") for r in rows)
    lesion_keys = [k for k in (data.get("scored") or keys) if k in keys]  # the compared labels or regions only
    if with_lesions:
        for k in lesion_keys:
            head += [f"lesions found {k}", f"FP components {k}", f"lesion-wise Dice {k}"]
    if paired:
        head += _paired_head(rows[0]["bundle"])
    lines += [f"Held-out: `{data['heldout']}`, {data['cases']} cases, mean Dice per label "
              "(`veloxseg compare`; training figures from each bundle's record).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        budget = f"{r['iterations']} x {r['batch_size']}" if r.get("iterations") else "-"
        patch = "x".join(str(v) for v in r["patch_size"])
        cells = [r["bundle"], r["model"], f"{r['params_m']:.3f}", budget, patch, _fmt(r.get("train_seconds"), 0)]
        cells += [_fmt(r["dice"].get(k)) for k in keys]
        cells += [_fmt(r.get("val_dice")), _fmt(r.get("predict_seconds_per_case"), 1)]
        if with_lesions:
            for k in lesion_keys:
                les = (r.get("lesions") or {}).get(k)
                cells += [f"{les['found']} / {les['lesions']}", str(les["fp_components"]),
                          _fmt(les["lesionwise_dice"])] if les else ["-", "-", "-"]
        if paired:
            cells += _paired_cells(r.get("versus_first"))
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines += ["", _paired_note(rows[0]["bundle"], data.get("scored") or keys)]
    return "\n".join(lines)


def _paired_head(first: str) -> List[str]:
    return [f"vs {first}: mean difference (95% CI)", "better / worse", "p"]


def _paired_cells(v: Optional[dict]) -> List[str]:
    """A row's ``versus_first`` as table cells (the first row: the reference)."""
    if not v:
        return ["(reference)", "", ""]
    p = v["p_value"]
    return [f"{v['mean_difference']:+.3f} ({v['ci_low']:+.3f} to {v['ci_high']:+.3f})", f"{v['better']} / {v['worse']}",
            "-" if p is None else (f"{p:.3f}" if p >= 0.001 else "< 0.001")]


def _paired_note(first: str, scored: Sequence[str]) -> str:
    return (f"Each against {first}, case by case on the mean Dice of {', '.join(scored)}: the mean difference with a "
            f"95% bootstrap interval over cases, the cases it scores higher / lower on, and the two-sided paired "
            f"sign-flip test's p (docs/metrics.md, \"Comparing two models\").")


def read_saved(path) -> dict:
    """A saved ``veloxseg compare`` JSON (InputError naming the file if it is not one)."""
    from .evaluate import read_json_file

    p = pathlib.Path(path)
    data = read_json_file(p)
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("per_case"), dict) and r["per_case"]
                           for r in rows) or "heldout" not in data:
        raise InputError(f"'{p}': not a saved 'veloxseg compare' result with per-case scores (comparisons saved "
                         f"before per-case scores were kept cannot take more rows)")
    return data


def add_rows(saved: dict, new: dict, where: str = "the saved comparison") -> dict:
    """``saved`` with the rows of ``new`` (a :func:`compare` result on the same held-out cases and
    scored labels or regions) appended, each compared case by case with the saved first row."""
    from .. import metrics as M

    first = saved["rows"][0]["per_case"]
    if new["heldout"] != saved["heldout"] or set(new["rows"][0]["per_case"]) != set(first):
        raise InputError(f"{where}: its held-out cases ('{saved['heldout']}', {len(first)} cases) are not the ones "
                         f"just segmented ('{new['heldout']}', {len(new['rows'][0]['per_case'])} cases)")
    if list(new.get("scored") or []) != list(saved.get("scored") or []):
        raise InputError(f"{where}: it scores {', '.join(map(str, saved.get('scored') or []))}, this run "
                         f"{', '.join(map(str, new.get('scored') or []))} (give the same --regions)")
    cases = sorted(first)
    rows = []
    for row in new["rows"]:
        row = dict(row)
        row["versus_first"] = M.paired_comparison([first[c] for c in cases], [row["per_case"][c] for c in cases])
        rows.append(row)
    return dict(saved, rows=list(saved["rows"]) + rows)


def run(args) -> int:
    from .. import metrics as M
    from ..infer.device import set_threads
    from .evaluate import parse_regions, write_json_atomic

    from ..data.io import check_output_file

    if args.crossval:
        if args.heldout:
            raise InputError("--crossval compares the out-of-fold predictions the cross-validations already "
                             "made; it takes no --heldout dataset")
        if args.regions:
            raise InputError("--crossval compares what each cross-validation scored; give --regions to "
                             "'veloxseg crossval' instead")
        if args.lesions:
            raise InputError("--crossval compares the cross-validations' saved scores, which hold no lesions; "
                             "run 'veloxseg evaluate --lesions' on their out-of-fold predictions instead")
        if args.add_to:
            raise InputError("--add-to adds bundles to a saved held-out comparison; it does not take --crossval")
        folders = [pathlib.Path(f) for f in args.bundles]
        out = check_output_file(args.output or DEFAULT_CROSSVAL_OUTPUT, overwrite=args.overwrite, inputs=folders,
                                sealed=[f for f in folders if f.is_dir()])
        data = M.json_safe(compare_crossvals(folders))
        if args.title:
            data["title"] = args.title
        write_json_atomic(data, out)
        print(render_crossval_markdown(data))
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if not args.heldout:
        raise InputError("give --heldout DATASET (the cases every bundle segments), or --crossval with "
                         "'veloxseg crossval' output folders")
    saved = None
    lesions = args.lesions
    if args.add_to:
        saved = read_saved(args.add_to)
        if saved["heldout"] != pathlib.Path(args.heldout).name:
            raise InputError(f"'{args.add_to}': a comparison on '{saved['heldout']}', not on "
                             f"'{pathlib.Path(args.heldout).name}'")
        saved_lesions = any(r.get("lesions") for r in saved["rows"])
        if lesions and not saved_lesions:
            raise InputError(f"'{args.add_to}': its rows hold no lesion counts; compare without --lesions")
        lesions = saved_lesions
        if not args.output:
            raise InputError("--add-to needs -o NEW.json (the saved comparison is left as it is)")
    args.output = args.output or DEFAULT_OUTPUT
    # before any bundle runs: never into a bundle, never onto the held-out cases or the saved comparison
    bundle_paths = [b for b in args.bundles if pathlib.Path(b).exists()]
    out = check_output_file(args.output, overwrite=args.overwrite,
                            inputs=[args.heldout, *bundle_paths, *([args.add_to] if args.add_to else [])],
                            sealed=[b for b in bundle_paths if pathlib.Path(b).is_dir()])
    if args.threads:
        set_threads(args.threads)
    data = compare(args.bundles, args.heldout, regions=parse_regions(args.regions), threads=args.threads,
                   device=args.device, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                   lesions=lesions)
    if saved is not None:
        data = add_rows(saved, M.json_safe(data), where=f"'{args.add_to}'")
    if args.title:
        data["title"] = args.title
    data = M.json_safe(data)
    write_json_atomic(data, out)
    print(render_markdown(data))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
