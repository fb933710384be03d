"""``veloxseg evaluate``: compare predicted label maps with reference label maps.

Per case and per label: Dice, HD95 (mm), precision, recall, and the autoPET false-positive and
false-negative volumes (ml); then per-label means. Definitions: ``docs/metrics.md``.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError

#: Volume bin edges (ml) of the detection-by-size table of ``--lesions``.
DEFAULT_LESION_SIZES_ML = (0.1, 0.5, 1.0, 5.0)
#: The lesion-wise HD95 of a missed lesion or FP component (mm): BraTS 2023's, the same as
#: ``VeloxSegLib.metrics.BRATS_HD95_PENALTY_MM`` (repeated so that building the parser imports no numpy).
DEFAULT_LESION_HD95_PENALTY_MM = 374.0

#: Label-map file endings accepted in folders (and for single files).
EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def register(subparsers):
    p = subparsers.add_parser(
        "evaluate",
        help="Dice, HD95, precision, recall and FP/FN volumes of predictions against references",
        description=(
            "Compare predicted label maps (--pred) with reference label maps (--ref): two files, or two "
            "folders whose cases are matched by file name (the name without its ending; "
            f"{', '.join(EXTENSIONS)}). Prints per-case and mean metrics per label. Labels in a "
            "reference or prediction that are not in --labels (or the --model bundle's labels) are an "
            "error. Empty-mask conventions are documented in docs/metrics.md."),
    )
    p.add_argument("--pred", required=True, metavar="P", help="predicted label map, or a folder of them")
    p.add_argument("--ref", required=True, metavar="R", help="reference label map, or a folder of them")
    p.add_argument("--labels", type=int, nargs="+", metavar="L",
                   help="label values to evaluate (default: the --model bundle's labels, else every non-zero "
                        "label found)")
    p.add_argument("-m", "--model", metavar="BUNDLE", help="take label values and names from this bundle "
                                                            "(folder, .zip or name)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': print JSON to "
                                                   "stdout instead of the table)")
    p.add_argument("--regions", nargs="+", metavar="NAME=L,L",
                   help="also evaluate unions of labels as one mask each, e.g. ET=3 TC=1,3 WT=1,2,3 (BraTS)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    g = p.add_argument_group("lesion-wise (each option implies --lesions)")
    g.add_argument("--lesions", action="store_true",
                   help="also score each lesion (connected component of the reference): lesions found and missed, "
                        "false-positive components, lesion sensitivity and F1, the BraTS 2023 lesion-wise Dice, "
                        "detection by lesion size, and the Dice with the borders, the missed lesions or the "
                        "false positives undone (where the Dice is lost)")
    g.add_argument("--lesion-dilation", type=int, metavar="N",
                   help="merge lesions closer than about 2N voxels and match predictions within N voxels of a "
                        "lesion (a (2N+1)^3 box dilation of the reference; BraTS 2023: 1; default 0)")
    g.add_argument("--lesion-min-voxels", type=int, metavar="N",
                   help="leave out lesions and false-positive components under N voxels (BraTS 2023: 50, "
                        "metastases 2; default 0: none)")
    g.add_argument("--lesion-hd95-penalty", type=float, metavar="MM",
                   help="the lesion-wise HD95 of a missed lesion or a false-positive component (BraTS 2023 and "
                        f"default: {DEFAULT_LESION_HD95_PENALTY_MM:g} mm)")
    g.add_argument("--visibility", metavar="FILE",
                   help="the `veloxseg visibility` JSON of the reference phantoms: each lesion gets its PET and CT "
                        "detectability d', and a table gives detection by PET d' (needs --lesion-dilation 0)")
    g.add_argument("--lesion-sizes", type=float, nargs="+", metavar="ML",
                   help=f"volume bin edges in ml of the detection-by-size table (default "
                        f"{' '.join(f'{v:g}' for v in DEFAULT_LESION_SIZES_ML)})")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------- inputs


def _case_name(path: pathlib.Path) -> Optional[str]:
    low = path.name.lower()
    for ext in EXTENSIONS:
        if low.endswith(ext) and len(low) > len(ext):
            return path.name[: -len(ext)]
    return None


def _folder_cases(folder: pathlib.Path, role: str) -> Dict[str, pathlib.Path]:
    cases: Dict[str, pathlib.Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"'{folder}': cannot list {role} folder ({exc.strerror or exc})") from None
    for p in entries:
        if p.name.startswith(".") or not p.is_file():
            continue
        name = _case_name(p)
        if name is None:
            continue
        if name in cases:
            raise InputError(f"'{folder}': {role} case '{name}' is there twice ({cases[name].name}, {p.name})")
        cases[name] = p
    if not cases:
        raise InputError(f"'{folder}': {role} folder holds no label maps ({', '.join(EXTENSIONS)})")
    return cases


def match_cases(pred, ref) -> List[Tuple[str, pathlib.Path, pathlib.Path]]:
    """``[(case, pred_path, ref_path)]`` for two files or two folders (matched by case name).

    A reference without a prediction is an error; predictions without a reference are ignored.
    """
    pred, ref = pathlib.Path(pred), pathlib.Path(ref)
    for role, p in (("prediction", pred), ("reference", ref)):
        if not p.exists():
            raise InputError(f"'{p}': {role} not found (no such file or folder)")
    if pred.is_dir() != ref.is_dir():
        raise InputError(f"--pred '{pred}' and --ref '{ref}' must both be files or both be folders")
    if not pred.is_dir():
        return [(_case_name(ref) or ref.name, pred, ref)]
    pred_cases = _folder_cases(pred, "prediction")
    ref_cases = _folder_cases(ref, "reference")
    missing = [c for c in ref_cases if c not in pred_cases]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"'{pred}': no prediction for {len(missing)} reference case(s): {shown}")
    return [(c, pred_cases[c], ref_cases[c]) for c in ref_cases]


def _label_array(image, path: pathlib.Path, role: str):
    """The voxels of a label-map image as a non-negative integer numpy array (z, y, x)."""
    import numpy as np
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"'{path}': {role} has non-integer voxel values; expected a label map")
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(f"'{path}': {role} has label values outside 0..65535")
        arr = arr.astype(np.int32)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"'{path}': {role} has pixel type {arr.dtype}; expected an integer label map")
    elif arr.size and arr.min() < 0:
        raise InputError(f"'{path}': {role} has negative label values; expected a label map")
    return arr


def _read(path: pathlib.Path, role: str):
    from ..data.io import read_image

    return read_image(path)


def _fmt_labels(values) -> str:
    return ", ".join(str(v) for v in values)


# --------------------------------------------------------------------------- evaluation


def parse_regions(items: Optional[Sequence[str]]) -> Dict[str, List[int]]:
    """``["ET=3", "TC=1,3", "WT=1,2,3"]`` -> ``{"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}``."""
    regions: Dict[str, List[int]] = {}
    for item in items or ():
        name, _, values = item.partition("=")
        try:
            labels = sorted({int(v) for v in values.split(",") if v.strip()})
        except ValueError:
            labels = []
        if not name.strip() or not labels or any(v < 1 for v in labels) or name.strip() in regions:
            raise InputError(f"--regions: '{item}' is not NAME=LABEL[,LABEL...] with positive label values "
                             f"and a new name (e.g. WT=1,2,3)")
        regions[name.strip()] = labels
    check_regions(regions, None)  # names that look like label values, before any work
    return regions


def check_regions(regions: Dict[str, Sequence[int]], labels: Optional[Sequence[int]],
                  label_names: Optional[Dict[int, str]] = None) -> None:
    """Refuse region names that clash with a label (value or name) and, when the label set is
    known (``labels``), region label values outside it. Raises InputError."""
    names = {str(n).strip().lower(): v for v, n in (label_names or {}).items()}
    for name, values in regions.items():
        if name.lstrip("+-").isdigit():
            raise InputError(f"--regions: region name '{name}' looks like a label value; give it a name that is "
                             f"not a number (e.g. WT=1,2,3)")
        if name.lower() in names:
            raise InputError(f"--regions: region name '{name}' is the name of label {names[name.lower()]}; "
                             f"give the region another name")
        if labels is not None:
            unknown = [v for v in values if v not in set(labels)]
            if unknown:
                raise InputError(f"--regions: region '{name}' uses label(s) {_fmt_labels(unknown)}, not in the "
                                 f"known labels ({_fmt_labels(sorted(set(labels)))})")


def evaluate(pred, ref, labels: Optional[Sequence[int]] = None, label_names: Optional[Dict[int, str]] = None,
             progress=None, regions: Optional[Dict[str, Sequence[int]]] = None, warn=None,
             lesions: Optional[dict] = None) -> dict:
    """Evaluate ``pred`` against ``ref`` (two label-map files or two folders); return a results dict.

    ``labels``: the label values to evaluate; any other non-zero label in a reference or a
    prediction raises InputError. ``None``: every non-zero label found in any case (a label
    absent from both masks of a case gets the both-empty values there). Raises InputError for
    unreadable files and grids that differ. Metric values may be ``inf`` (HD95 with one empty
    mask); :func:`VeloxSegLib.metrics.json_safe` turns them into ``None`` for JSON.
    ``regions``: named unions of labels evaluated as one mask each (BraTS: ET=3, TC=1,3, WT=1,2,3),
    reported after the labels under their names. A region name must not be a number or a label's
    name; with ``labels`` given, its label values must be among them (InputError). Without
    ``labels``, a region empty in both masks of every case is reported through ``warn`` (a
    callable taking one line; default: printed to stderr).
    ``lesions``: also score every lesion (``{"dilation": N, "min_voxels": N, "sizes_ml": [...]}``,
    see :func:`lesion_settings`): each case gets ``lesions`` (per label and region, the output of
    :func:`VeloxSegLib.metrics.lesion_metrics` with each lesion's ``centre_mm``, its centroid in
    the image's physical (LPS) coordinates), and the results ``lesion_mean`` (pooled counts) and
    ``lesion_sizes`` (detection by lesion volume).
    """
    import numpy as np

    from .. import metrics as M

    pairs = match_cases(pred, ref)
    known = None
    if labels is not None:
        known = sorted(set(int(v) for v in labels))
        bad = [v for v in known if not 1 <= v <= 65535]
        if bad:
            raise InputError(f"--labels: {_fmt_labels(bad)} not valid (label values are 1..65535; 0 is background)")
    check_regions(regions or {}, known, label_names)
    nonempty_regions = set()
    cases = []
    for i, (case, p_path, r_path) in enumerate(pairs):
        r_img = _read(r_path, "reference")
        p_img = _read(p_path, "prediction")
        problem = M.geometry_mismatch(p_img, r_img)
        if problem:
            raise InputError(f"prediction '{p_path}' and reference '{r_path}' are on different grids ({problem}); "
                             f"resample the prediction onto the reference first")
        r_arr = _label_array(r_img, r_path, "reference")
        p_arr = _label_array(p_img, p_path, "prediction")
        r_labels = [int(v) for v in np.unique(r_arr) if v != 0]
        p_labels = [int(v) for v in np.unique(p_arr) if v != 0]
        if known is not None:
            for role, path, found in (("reference", r_path, r_labels), ("prediction", p_path, p_labels)):
                unknown = [v for v in found if v not in known]
                if unknown:
                    raise InputError(f"'{path}': {role} holds label(s) {_fmt_labels(unknown)} not in the known labels "
                                     f"({_fmt_labels(known)}); pass --labels with every label value")
            case_labels = known
        else:
            case_labels = sorted(set(r_labels) | set(p_labels))
        spacing = tuple(reversed(r_img.GetSpacing()))
        per_label = M.evaluate_arrays(p_arr, r_arr, case_labels, spacing)
        per_lesion = {}
        if lesions is not None:
            for lab in case_labels:
                per_lesion[lab] = _lesions(p_arr == lab, r_arr == lab, spacing, r_img, lesions)
        for name, values in (regions or {}).items():
            p_mask, r_mask = np.isin(p_arr, values), np.isin(r_arr, values)
            if p_mask.any() or r_mask.any():
                nonempty_regions.add(name)
            per_label[name] = M.label_metrics(p_mask, r_mask, spacing)
            if lesions is not None:
                per_lesion[name] = _lesions(p_mask, r_mask, spacing, r_img, lesions)
            del p_mask, r_mask
        del r_arr, p_arr, r_img, p_img
        cases.append({"case": case, "pred": str(p_path), "ref": str(r_path),
                      "spacing": [float(s) for s in reversed(spacing)], "metrics": per_label})
        if lesions is not None:
            cases[-1]["lesions"] = per_lesion
        if progress:
            progress(i + 1, len(pairs))
    if known is None and cases:
        for name, values in (regions or {}).items():
            if name not in nonempty_regions:
                line = (f"warning: --regions: region '{name}' (label(s) {_fmt_labels(values)}) is empty in every "
                        f"prediction and reference; check its label values")
                if warn is None:
                    print(line, file=sys.stderr)
                else:
                    warn(line)
    all_labels = list(known if known is not None else
                      sorted({lab for c in cases for lab in c["metrics"] if isinstance(lab, int)}))
    all_labels += list(regions or {})
    both_empty = M.label_metrics(np.zeros(1, bool), np.zeros(1, bool), (1.0,))
    no_lesions = M.lesion_metrics(np.zeros(1, bool), np.zeros(1, bool), (1.0,))
    for c in cases:  # discovery mode: labels absent from both masks of a case
        for lab in all_labels:
            c["metrics"].setdefault(lab, dict(both_empty))
        c["metrics"] = {lab: c["metrics"][lab] for lab in all_labels}
        if lesions is not None:
            c["lesions"] = {lab: c["lesions"].get(lab, dict(no_lesions, per_lesion=[])) for lab in all_labels}
    names = {lab: (label_names or {}).get(lab, lab if isinstance(lab, str) else f"label {lab}")
             for lab in all_labels}
    out = {
        "pred": str(pred),
        "ref": str(ref),
        "labels": names,
        "metrics_doc": "docs/metrics.md",
        "cases": cases,
        "mean": M.mean_metrics([c["metrics"] for c in cases]),
    }
    if lesions is not None:
        out["lesion_settings"] = dict(lesions)
        out["lesion_mean"] = {lab: M.pool_lesions([c["lesions"][lab] for c in cases]) for lab in all_labels}
        out["lesion_sizes"] = {lab: M.lesions_by_size([c["lesions"][lab] for c in cases], lesions["sizes_ml"])
                               for lab in all_labels}
    return out


def lesion_settings(dilation: Optional[int] = None, min_voxels: Optional[int] = None,
                    sizes_ml: Optional[Sequence[float]] = None, hd95_penalty_mm: Optional[float] = None) -> dict:
    """The checked settings of the lesion-wise scores (None: the default). Raises InputError."""
    penalty = DEFAULT_LESION_HD95_PENALTY_MM if hd95_penalty_mm is None else float(hd95_penalty_mm)
    if not math.isfinite(penalty) or penalty < 0:
        raise InputError(f"--lesion-hd95-penalty must be a distance >= 0 in mm, got {penalty:g}")
    dilation = 0 if dilation is None else int(dilation)
    min_voxels = 0 if min_voxels is None else int(min_voxels)
    sizes = list(DEFAULT_LESION_SIZES_ML if sizes_ml is None else sizes_ml)
    if dilation < 0 or dilation > 20:
        raise InputError(f"--lesion-dilation must be 0..20 voxels, got {dilation}")
    if min_voxels < 0:
        raise InputError(f"--lesion-min-voxels must be >= 0, got {min_voxels}")
    if not sizes or any(not math.isfinite(v) or v <= 0 for v in sizes) or len(set(sizes)) != len(sizes):
        raise InputError(f"--lesion-sizes needs distinct positive volumes in ml, got "
                         f"{' '.join(f'{v:g}' for v in sizes) or 'none'}")
    return {"dilation": dilation, "min_voxels": min_voxels, "sizes_ml": sorted(float(v) for v in sizes),
            "hd95_penalty_mm": penalty}


def _lesions(p_mask, r_mask, spacing, ref_img, settings: dict) -> dict:
    from .. import metrics as M

    out = M.lesion_metrics(p_mask, r_mask, spacing, dilation=settings["dilation"],
                           min_voxels=settings["min_voxels"],
                           hd95_penalty_mm=settings.get("hd95_penalty_mm", M.BRATS_HD95_PENALTY_MM))
    for e in out["per_lesion"]:
        index = [float(v) for v in reversed(e.pop("centroid"))]  # x, y, z
        e["centre_mm"] = [float(v) for v in ref_img.TransformContinuousIndexToPhysicalPoint(index)]
    return out


# --------------------------------------------------------------------------- output


def _num(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}"


def format_table(results: dict) -> str:
    names = {lab: (name if isinstance(lab, str) else f"{lab} {name}") for lab, name in results["labels"].items()}
    header = ("case", "label", "Dice", "HD95_mm", "precision", "recall", "FP_ml", "FN_ml")
    rows = []
    for c in results["cases"]:
        for lab, m in c["metrics"].items():
            rows.append((c["case"], names[lab], _num(m["dice"]), _num(m["hd95_mm"], 2),
                         _num(m["precision"]), _num(m["recall"]), _num(m["fp_volume_ml"], 3),
                         _num(m["fn_volume_ml"], 3)))
    n = len(results["cases"])
    notes = []
    for lab, m in results["mean"].items():
        rows.append((f"mean ({n})", names[lab], _num(m["dice"]), _num(m["hd95_mm"], 2),
                     _num(m["precision"]), _num(m["recall"]), _num(m["fp_volume_ml"], 3),
                     _num(m["fn_volume_ml"], 3)))
        if m["hd95_cases"] < m["cases"]:
            notes.append(f"label {lab}: mean HD95 over the {m['hd95_cases']} of {m['cases']} cases where it is "
                         f"finite (inf: exactly one of prediction and reference is empty)")
    lines = _columns(header, rows, left=2)
    lines += notes
    if "lesion_mean" in results:
        lines += [""] + format_lesion_tables(results, names)
    return "\n".join(lines)


def _columns(header, rows, left: int) -> List[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        cells = [str(x).ljust(w) for x, w in zip(r[:left], widths[:left])]
        cells += [str(x).rjust(w) for x, w in zip(r[left:], widths[left:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def bin_span(lo: float, hi: float, unit: str = "") -> str:
    """A table row's bin [lo, hi): "under hi", "lo or more" (hi infinite) or "lo-hi", with ``unit``."""
    if lo == 0:
        return f"under {hi:g}{unit}"
    if math.isinf(hi):
        return f"{lo:g}{unit} or more"
    return f"{lo:g}-{hi:g}{unit}"


def format_lesion_tables(results: dict, names: Dict) -> List[str]:
    """The ``--lesions`` part of the table: per case and label, then detection by lesion volume."""
    st = results["lesion_settings"]
    lines = [f"lesions: 26-connected components of the reference, box dilation {st['dilation']} voxel(s), "
             f"lesions and FP components under {st['min_voxels']} voxel(s) left out (docs/metrics.md)"]
    header = ("case", "label", "lesions", "found", "missed", "FP_comp", "sensitivity", "F1", "lesion-wise_Dice",
              "lesion-wise_HD95")
    rows = []
    for c in results["cases"]:
        for lab, m in c["lesions"].items():
            rows.append((c["case"], names[lab], m["lesions"], m["found"], m["missed"], m["fp_components"],
                         _num(m["lesion_sensitivity"]), _num(m["lesion_f1"]), _num(m["lesionwise_dice"]),
                         _num(m.get("lesionwise_hd95_mm"), 2)))
    n = len(results["cases"])
    for lab, m in results["lesion_mean"].items():
        rows.append((f"all ({n})", names[lab], m.get("lesions", 0), m.get("found", 0), m.get("missed", 0),
                     m.get("fp_components", 0), _num(m.get("lesion_sensitivity")), _num(m.get("lesion_f1")),
                     _num(m.get("lesionwise_dice")), _num(m.get("lesionwise_hd95_mm"), 2)))
    lines += _columns(header, rows, left=2)
    penalty = st.get("hd95_penalty_mm", DEFAULT_LESION_HD95_PENALTY_MM)
    lines.append("all: counts summed over cases, sensitivity and F1 from the sums, lesion-wise Dice and HD95 (mm; "
                 f"{penalty:g} for each missed lesion and FP component) the means over cases")
    budget = [(names[lab], m["dice_budget"]) for lab, m in results["lesion_mean"].items() if "dice_budget" in m]
    if budget:
        lines += ["", "where the Dice is lost: the mean Dice over cases, and what it would be with one kind of error "
                      "undone (docs/metrics.md):"]
        rows = [(name, _num(b["dice"]), _num(b["borders_exact"]), _num(b["missed_added"]), _num(b["no_fp"]))
                for name, b in budget]
        lines += _columns(("label", "Dice", "borders_exact", "missed_added", "no_FP"), rows, left=1)
    for lab, bins in results["lesion_sizes"].items():
        lines += ["", f"detection by lesion volume, {names[lab]}:"]
        rows = []
        for b in bins:
            rows.append((bin_span(b["min_ml"], b["max_ml"], " ml"), b["lesions"], b["found"], _num(b["sensitivity"]),
                         _num(b["dice_found"])))
        lines += _columns(("volume", "lesions", "found", "sensitivity", "Dice_of_found"), rows, left=1)
    rose = (results.get("visibility") or {}).get("rose_dprime")
    for lab, bins in (results.get("lesion_visibility") or {}).items():
        lines += ["", f"detection by visibility (d', docs/metrics.md), {names[lab]}:"]
        rows = []
        for b in bins:
            rows.append((bin_span(b["min_dprime"], b["max_dprime"]), b["lesions"], b["found"], b["ct_visible"],
                         b["ct_visible_found"]))
        lines += _columns(("PET_d'", "lesions", "found", f"CT_d'>={rose:g}", "found_of_those"), rows, left=1)
    return lines


def read_json_file(path):
    """The JSON in a user-given file (InputError naming it if it cannot be read)."""
    p = pathlib.Path(path)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"'{p}': cannot read it as JSON ({exc})") from exc


def read_visibility(path) -> dict:
    """A ``veloxseg visibility`` JSON file (InputError naming it if it is not one)."""
    p = pathlib.Path(path)
    data = read_json_file(p)
    if not isinstance(data, dict) or not isinstance(data.get("cases"), dict) or "rose_dprime" not in data:
        raise InputError(f"'{p}': not a `veloxseg visibility` file (no cases and rose_dprime)")
    return data


def attach_visibility(results: dict, visibility: dict, path) -> None:
    """Give each scored lesion its ``pet_dprime``, ``ct_dprime`` and ``site`` from a ``veloxseg
    visibility`` file (the same lesion: the same voxel count and centre within 0.01 mm), and the
    results ``lesion_visibility``: per label, detection by PET d'
    (:func:`VeloxSegLib.data.visibility.detection_by_visibility`). InputError, naming the file and
    the case, for a case or lesion the file does not hold."""
    from ..data.visibility import detection_by_visibility

    for c in results["cases"]:
        known = visibility["cases"].get(c["case"])
        if known is None:
            raise InputError(f"'{path}': no case '{c['case']}' (a visibility file of another dataset?)")
        for lab, m in c["lesions"].items():
            for e in m["per_lesion"]:
                try:
                    match = [v for v in known if int(v["voxels"]) == e["voxels"] and
                             max(abs(float(a) - b) for a, b in zip(v["centre_mm"], e["centre_mm"])) < 0.01
                             and float(v["pet_dprime"]) >= 0 and float(v["ct_dprime"]) >= 0]
                except (KeyError, TypeError, ValueError) as exc:
                    raise InputError(f"'{path}': case '{c['case']}': a lesion entry without voxels, centre_mm, "
                                     f"pet_dprime and ct_dprime ({exc!r})") from exc
                if not match:
                    centre = ", ".join(f"{v:.1f}" for v in e["centre_mm"])
                    raise InputError(f"'{path}': case '{c['case']}' has no lesion of {e['voxels']} voxels at "
                                     f"({centre}) mm, as its reference does (a visibility file of other phantoms?)")
                e.update(pet_dprime=float(match[0]["pet_dprime"]), ct_dprime=float(match[0]["ct_dprime"]),
                         site=match[0].get("site"))
    results["visibility"] = {"file": str(path), "rose_dprime": visibility["rose_dprime"]}
    results["lesion_visibility"] = {
        lab: detection_by_visibility([e for c in results["cases"] for e in c["lesions"][lab]["per_lesion"]],
                                     rose=float(visibility["rose_dprime"]))
        for lab in results["lesion_mean"]}


def write_json_atomic(data, path: pathlib.Path) -> None:
    """Write ``data`` as JSON to a hidden temporary sibling, then rename it onto ``path``."""
    from ..data.io import write_text_atomic

    write_text_atomic(json.dumps(data, indent=2, allow_nan=False) + "\n", path)


def _dataset_label_names(ref) -> Dict[int, str]:
    """The label names of the nnU-Net dataset whose ``labelsTr``/``labelsTs`` folder is ``ref``
    (from its ``dataset.json``), for the table; {} for anything else. Only names: which labels
    are scored does not change."""
    folder = pathlib.Path(ref)
    meta = folder.parent / "dataset.json"
    if not folder.is_dir() or folder.name not in ("labelsTr", "labelsTs") or not meta.is_file():
        return {}
    from ..data.nnunet import Dataset

    try:
        labels = json.loads(meta.read_text(encoding="utf-8")).get("labels")
        values = Dataset(folder.parent, {}, labels, 0).label_values()  # the training's own naming rule
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        return {}
    return {v: n for v, n in values if v != 0 and n in labels}  # named in the file, not made up


def run(args) -> int:
    from .. import metrics as M

    lesions = None
    if args.lesions or any(v is not None for v in (args.lesion_dilation, args.lesion_min_voxels, args.lesion_sizes,
                                                   args.lesion_hd95_penalty, args.visibility)):
        lesions = lesion_settings(args.lesion_dilation, args.lesion_min_voxels, args.lesion_sizes,
                                  args.lesion_hd95_penalty)
    visibility = None
    if args.visibility:
        if lesions["dilation"] != 0:
            raise InputError("--visibility scores the reference's own lesions: use it with --lesion-dilation 0")
        visibility = read_visibility(args.visibility)
    json_path = None
    if args.json and args.json != "-":
        from ..data.io import check_output_file

        json_path = check_output_file(args.json, overwrite=args.overwrite, inputs=[args.pred, args.ref])
    labels = args.labels
    names: Dict[int, str] = {}
    if args.model:
        from ..bundle import load_bundle

        bundle = load_bundle(args.model)
        names = {lab["value"]: lab["name"] for lab in bundle.labels if lab["value"] != 0}
        if labels is None:
            labels = sorted(names)
        else:
            unknown = [v for v in labels if v not in names]
            if unknown:
                raise InputError(f"--labels {_fmt_labels(unknown)} not in bundle '{bundle.name}' "
                                 f"(labels: {_fmt_labels(sorted(names))})")
    else:
        names = _dataset_label_names(args.ref)
    results = evaluate(args.pred, args.ref, labels=labels, label_names=names, regions=parse_regions(args.regions),
                       lesions=lesions)
    if visibility is not None:
        attach_visibility(results, visibility, args.visibility)
    safe = M.json_safe(results)
    if args.json == "-":
        print(json.dumps(safe, indent=2, allow_nan=False))
        return 0
    if json_path is not None:
        write_json_atomic(safe, json_path)
    print(format_table(results))
    if json_path is not None:
        print(f"wrote {json_path}", file=sys.stderr)
    return 0
