"""Build an nnU-Net v2 raw dataset from folders of images with per-channel glob patterns.

Each channel (and the labels) is found with a glob pattern relative to a folder; a file's case
identifier comes from ``case_regex`` (its ``case`` group, else its first group, else the whole
match) or, by default, from the text the pattern's ``*`` wildcards matched (equal pieces once).
Nothing is written unless every case is complete and consistent; the output folder appears
only at the end (temporary folder renamed), so a refused or failed run leaves nothing behind.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, InputError
from . import nnunet

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 3


# --------------------------------------------------------------------------- argument parsing


def parse_channel_spec(spec: str) -> Tuple[str, str]:
    """``"CT=*_CT.nii.gz"`` -> ``("CT", "*_CT.nii.gz")``."""
    name, sep, pattern = spec.partition("=")
    if not sep or not name.strip() or not pattern.strip():
        raise ConfigError(f"--channel {spec!r}: expected NAME=GLOB, e.g. CT='*_CT.nii.gz'")
    return name.strip(), pattern.strip()


def parse_labels_map(spec: str) -> Dict[str, int]:
    """``"background=0,lesion=1"`` -> ``{"background": 0, "lesion": 1}`` (output label values)."""
    out: Dict[str, int] = {}
    for item in [s for s in spec.split(",") if s.strip()]:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            v = int(value)
        except ValueError:
            v = -1
        if not sep or not name or v < 0:
            raise ConfigError(f"--labels-map: {item.strip()!r} is not NAME=VALUE with a non-negative integer")
        if name in out:
            raise ConfigError(f"--labels-map: label {name!r} given twice")
        out[name] = v
    return check_labels_map(out)


def check_labels_map(out: Dict[str, int]) -> Dict[str, int]:
    """Output labels must be consecutive from 0, with 0 named ``background`` (nnU-Net's rule)."""
    if not out:
        raise ConfigError("--labels-map: no labels given (e.g. background=0,lesion=1)")
    values = sorted(out.values())
    if len(set(values)) != len(values):
        raise ConfigError("--labels-map: two labels share a value")
    if values != list(range(len(values))):
        raise ConfigError(f"--labels-map: values must be consecutive 0..{len(values) - 1} (use --remap), got {values}")
    if out.get("background") != 0:
        zero = next(name for name, v in out.items() if v == 0)
        raise ConfigError(f"--labels-map: value 0 must be named 'background', as nnU-Net requires "
                          f"(got {zero}=0, e.g. background=0,lesion=1)")
    return out


def parse_remap(spec: str) -> Dict[int, int]:
    """``"4=3"`` or ``"4=3,5=0"`` -> ``{4: 3, 5: 0}`` (input value -> output value)."""
    out: Dict[int, int] = {}
    for item in [s for s in spec.split(",") if s.strip()]:
        src, sep, dst = item.partition("=")
        try:
            a, b = int(src), int(dst)
        except ValueError:
            a = b = -1
        if not sep or a < 0 or b < 0:
            raise ConfigError(f"--remap: {item.strip()!r} is not FROM=TO with non-negative integers")
        out[a] = b
    return out


# --------------------------------------------------------------------------- case discovery


def _glob_to_regex(pattern: str) -> "re.Pattern":
    """A regex matching what ``Path.glob(pattern)`` matches, one group per ``*``/``?``."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("([^/]*)")
        elif c == "?":
            out.append("([^/])")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def sanitize_case_id(raw: str) -> str:
    """Make a raw identifier usable in nnU-Net file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_.-")


def _case_id(rel: str, glob_re, case_re) -> Optional[str]:
    if case_re is not None:
        m = case_re.search(rel)
        if not m:
            return None
        if "case" in case_re.groupindex:
            raw = m.group("case")
        elif case_re.groups:
            raw = m.group(1)
        else:
            raw = m.group(0)
    else:
        m = glob_re.match(rel)
        if not m:
            return None
        pieces: List[str] = []
        for g in m.groups():
            if g and g not in pieces:
                pieces.append(g)
        raw = "_".join(pieces)
    return sanitize_case_id(raw or "") or None


def find_files(folder: Path, pattern: str, case_re=None, what: str = "files") -> Dict[str, Path]:
    """``{case: file}`` for the files under ``folder`` matching ``pattern``."""
    if not folder.is_dir():
        raise InputError(f"'{folder}': no such folder")
    if os.path.isabs(pattern) or ".." in Path(pattern).parts:
        raise ConfigError(f"{what} pattern {pattern!r} must be relative to '{folder}'")
    glob_re = _glob_to_regex(pattern)
    found: Dict[str, Path] = {}
    for path in sorted(folder.glob(pattern)):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = path.relative_to(folder).as_posix()
        case = _case_id(rel, glob_re, case_re)
        if case is None:
            raise InputError(f"'{path}': no case identifier found (matched {what} pattern {pattern!r}; "
                             f"check --case-regex)")
        if case in found:
            raise InputError(f"case {case!r}: two {what} files, '{found[case]}' and '{path}' "
                             f"(narrow the pattern or use --case-regex)")
        found[case] = path
    return found


# --------------------------------------------------------------------------- conversion


def read_image(path):
    """``io.read_image`` (imported late: the converter's module loads without SimpleITK work)."""
    from .io import read_image as _read

    return _read(path)


def _summarize(problems: List[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    return shown + (f"; and {more} more problem(s)" if more > 0 else "")


def convert_dataset(
    images_dir,
    channels: Sequence[Tuple[str, str]],
    labels: str,
    output,
    *,
    labels_dir=None,
    case_regex: Optional[str] = None,
    labels_map: Optional[Dict[str, int]] = None,
    remap: Optional[Dict[int, int]] = None,
    align: bool = False,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Convert to an nnU-Net raw dataset at ``output``; returns the dataset.json written.

    ``channels``: ``(name, glob)`` in channel order (channel 0 is the reference grid).
    ``labels``: glob for the label files (under ``labels_dir``, default ``images_dir``).
    ``labels_map``: output label names -> values (consecutive from 0); default: ``label_<v>``
    for the values found. ``remap``: input label value -> output value, applied first.
    ``align``: resample other channels onto channel 0's grid (linear, through physical space);
    without it every channel must already lie on channel 0's grid. Labels must always lie on
    channel 0's grid.

    Refuses (``InputError`` naming the cases) a case missing a channel or its label, channels
    that do not share a physical space, a label off the image grid, or label values outside
    ``labels_map``.
    """
    import SimpleITK as sitk

    from .alignment import Grid, resample_to_grid

    images_dir = Path(images_dir)
    labels_dir = Path(labels_dir) if labels_dir is not None else images_dir
    if not channels:
        raise ConfigError("at least one --channel NAME=GLOB is needed")
    names = [n for n, _ in channels]
    if len(set(names)) != len(names):
        raise ConfigError(f"channel names must be unique, got {names}")
    try:
        case_re = re.compile(case_regex) if case_regex else None
    except re.error as exc:
        raise ConfigError(f"--case-regex {case_regex!r}: {exc}") from None
    remap = dict(remap or {})
    if labels_map is not None:
        labels_map = check_labels_map(dict(labels_map))
    inputs = (images_dir, labels_dir)
    nnunet.check_output_folder(output, overwrite, inputs)  # again when writing: fail before any reading

    per_channel = [find_files(images_dir, pattern, case_re, f"{name} image") for name, pattern in channels]
    label_files = find_files(labels_dir, labels, case_re, "label")
    cases = sorted(set(label_files).union(*[set(f) for f in per_channel]))
    if not cases:
        raise InputError(f"no files match the patterns under '{images_dir}'")

    # pass 1: completeness and geometry from headers only
    problems: List[str] = []
    for case in cases:
        missing = [f"{name} ({pattern})" for (name, pattern), files in zip(channels, per_channel) if case not in files]
        if missing:
            problems.append(f"case {case!r} has no {', '.join(missing)} image")
            continue
        if case not in label_files:
            problems.append(f"case {case!r} has no label ({labels})")
            continue
        for p in nnunet.case_geometry_problems([f[case] for f in per_channel], label_files[case], names,
                                               same_grid=not align):
            hint = " (use --align to resample it)" if "voxel grid" in p else ""
            problems.append(f"case {case!r}: {p}{hint}")
    if problems:
        raise InputError(_summarize(problems))

    # pass 2: read, check label values, write into a temporary folder
    found_values: set = set()
    sources: Dict[str, Dict[str, str]] = {}
    with nnunet.atomic_directory(output, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / nnunet.IMAGES_DIR).mkdir()
        (tmp / nnunet.LABELS_DIR).mkdir()
        for k, case in enumerate(cases):
            label_img = read_image(label_files[case])
            arr = sitk.GetArrayFromImage(label_img)
            if not np.issubdtype(arr.dtype, np.integer):
                if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                    problems.append(f"case {case!r}: label '{label_files[case].name}' holds non-integer values")
                    continue
            values = np.unique(arr).astype(np.int64)
            if values.size and values[0] < 0:
                problems.append(f"case {case!r}: label holds negative values")
                continue
            out_arr = arr.astype(np.int64)
            if remap:
                lut = np.arange(int(values.max()) + 1 if values.size else 1, dtype=np.int64)
                for a, b in remap.items():
                    if a < lut.size:
                        lut[a] = b
                out_arr = lut[out_arr]
                values = np.unique(lut[values])
            if labels_map is not None:
                unknown = sorted(set(values.tolist()) - set(labels_map.values()))
                if unknown:
                    problems.append(f"case {case!r}: label values {unknown} are not in --labels-map"
                                    + ("" if remap else " (use --remap FROM=TO)"))
                    continue
            found_values.update(values.tolist())
            if problems:
                continue  # keep checking the rest, write nothing more
            out_label = sitk.GetImageFromArray(out_arr.astype(np.uint8 if out_arr.max(initial=0) < 256 else np.uint16))
            out_label.CopyInformation(label_img)
            ref = None
            for c, files in enumerate(per_channel):
                img = read_image(files[case])
                if c == 0:
                    ref = Grid.of(img)
                elif align and nnunet.grid_differences(ref, Grid.of(img)):
                    img = resample_to_grid(img, ref, pixel_type=img.GetPixelID())
                nnunet.write_image(img, tmp / nnunet.IMAGES_DIR / nnunet.image_file_name(case, c))
            nnunet.write_image(out_label, tmp / nnunet.LABELS_DIR / f"{case}{nnunet.DEFAULT_FILE_ENDING}")
            sources[case] = {name: str(files[case]) for name, files in zip(names, per_channel)}
            sources[case]["label"] = str(label_files[case])
            if progress is not None:
                progress(k + 1, len(cases))
        if problems:
            raise InputError(_summarize(problems))
        if labels_map is None:
            values = sorted(found_values | {0})
            if values != list(range(len(values))):
                raise InputError(f"label values {values} are not consecutive from 0; give --labels-map "
                                 f"and --remap FROM=TO")
            labels_map = {("background" if v == 0 else f"label_{v}"): v for v in values}
        data = nnunet.make_dataset_json(
            names, labels_map, len(cases),
            name=Path(output).name,
            veloxseg_convert={
                "images_dir": str(images_dir.absolute()),
                "labels_dir": str(labels_dir.absolute()),
                "channels": {n: p for n, p in channels},
                "labels": labels,
                "case_regex": case_regex,
                "remap": {str(a): b for a, b in remap.items()},
                "aligned_to": names[0] if align else None,
                "sources": sources,
            },
        )
        nnunet.write_dataset_json(tmp, data)
    log.info("converted %d cases to %s", len(cases), output)
    return data
