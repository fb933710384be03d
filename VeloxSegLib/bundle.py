"""Model bundles: load, validate, save and find them (format: ``docs/bundle-format.md``).

A bundle is a folder or a ``.zip`` holding exactly ``bundle.json`` (metadata, JSON) and
``model.safetensors`` (weights). Nothing in a bundle is executed or unpickled: the JSON is
validated field by field by :func:`validate_meta`, and the weights are parsed with
``safetensors`` only after their header has been checked here.

This module does not import torch at import time (the Slicer module lists bundles cheaply);
torch and safetensors are imported inside :meth:`Bundle.state_dict`, :meth:`Bundle.build_model`
and :func:`save_bundle`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import re
import shutil
import stat
import struct
import uuid
import zipfile
from typing import Any, Dict, List, Optional, Tuple

from .errors import BundleError, InputError
from .fsutil import swap_folder_into_place

__all__ = [
    "FORMAT_VERSION",
    "META_NAME",
    "WEIGHTS_NAME",
    "Bundle",
    "validate_meta",
    "load_bundle",
    "save_bundle",
    "embedded_bundles_dir",
    "user_models_dir",
    "list_bundles",
    "find_bundle",
]

FORMAT_VERSION = 1
META_NAME = "bundle.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLE_FILES = (META_NAME, WEIGHTS_NAME)

#: Largest ``bundle.json`` accepted (bytes).
MAX_META_BYTES = 1 << 20
#: Largest ``model.safetensors`` accepted (bytes); also caps a zip's total uncompressed size.
MAX_WEIGHTS_BYTES = 1 << 30
#: Largest safetensors JSON header accepted (bytes).
MAX_HEADER_BYTES = 16 << 20

#: Environment variable naming the user models folder.
MODELS_ENV = "VELOXSEG_MODELS"

NORMALIZATION_SCHEMES = ("ct", "pet_zscore_body", "pet_suv", "zscore_nonzero", "none")
BLENDING_MODES = ("uniform", "gaussian")
#: Image axes a bundle's mirror TTA may flip ("x", "y", "z": ITK/NIfTI index axes; "z" is the slice axis).
MIRROR_AXES = ("x", "y", "z")
INFERENCE_DEFAULTS = {
    "overlap": 0.25,
    "blending": "uniform",
    "tta": False,
    # The axes the network was mirrored along in training (what TTA may average over). A bundle
    # without the field was trained by our trainer, whose augmentation flips z only.
    "tta_axes": ["z"],
    "min_component_mm3": 0.0,
    "crop_to_body": True,
    # null, or the settings of the PET border refinement (VeloxSegLib/infer/petrefine.py); an
    # object fills the missing settings from PET_REFINE_DEFAULTS there
    "pet_refine": None,
}
TERMINOLOGY_KEYS = ("category", "type", "type_modifier", "region", "region_modifier")
#: The most networks an ensemble bundle may hold (model.members).
MAX_MEMBERS = 64

TRAINING_KEYS = ("dataset", "epochs", "seed", "command", "metrics", "parent", "date", "veloxseg_version", "notes")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".npy", ".npz", ".joblib")

# safetensors dtype name -> bytes per element
_ST_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


# --------------------------------------------------------------------------- validation


class _Checker:
    """Collects the source name and raises BundleError('<source>: <field> <problem>')."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str):
        raise BundleError(f"{self.source}: {field} {problem}" if field else f"{self.source}: {problem}")

    # type helpers --------------------------------------------------------------------
    def obj(self, value, field, required=(), optional=()):
        if not isinstance(value, dict):
            self.fail(field, "must be an object")
        allowed = set(required) | set(optional)
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                where = f"{field}.{key}" if field else str(key)
                self.fail(where, f"is not a known field (allowed: {', '.join(sorted(allowed))})")
        for key in required:
            if key not in value:
                self.fail(f"{field}.{key}" if field else key, "is missing")
        return value

    def string(self, value, field, nonempty=True, nullable=False):
        if value is None and nullable:
            return None
        if not isinstance(value, str) or (nonempty and not value.strip()):
            self.fail(field, "must be a non-empty string" if nonempty else "must be a string")
        return value

    def integer(self, value, field, lo=None, hi=None, nullable=False):
        if value is None and nullable:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON (and JSON Schema) do not distinguish 2 from 2.0
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and lo is not None and value < lo:
            ok = False
        if ok and hi is not None and value > hi:
            ok = False
        if not ok:
            if lo is not None and hi is not None:
                self.fail(field, f"must be an integer {lo}..{hi}")
            if lo is not None:
                self.fail(field, f"must be an integer >= {lo}")
            self.fail(field, "must be an integer")
        return value

    def number(self, value, field, lo=None, hi=None, lo_open=False, hi_open=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and lo is not None and (value <= lo if lo_open else value < lo):
            ok = False
        if ok and hi is not None and (value >= hi if hi_open else value > hi):
            ok = False
        if not ok:
            parts = []
            if lo is not None:
                parts.append(f"{'>' if lo_open else '>='} {lo}")
            if hi is not None:
                parts.append(f"{'<' if hi_open else '<='} {hi}")
            self.fail(field, "must be a finite number" + (f" {' and '.join(parts)}" if parts else ""))
        return float(value)

    def boolean(self, value, field):
        if not isinstance(value, bool):
            self.fail(field, "must be true or false")
        return value

    def array(self, value, field, length=None, min_length=None):
        if not isinstance(value, list):
            self.fail(field, "must be an array")
        if length is not None and len(value) != length:
            self.fail(field, f"must have {length} entries (has {len(value)})")
        if min_length is not None and len(value) < min_length:
            self.fail(field, f"must have at least {min_length} entr{'y' if min_length == 1 else 'ies'}")
        return value


def _check_json_value(ck: _Checker, value, field, depth=0):
    """Plain JSON data only (no NaN/Infinity), nested at most 32 levels."""
    if depth > 32:
        ck.fail(field, "is nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            ck.fail(field, "must be a finite number (NaN/Infinity are not JSON)")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_value(ck, v, f"{field}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                ck.fail(field, "must have string keys")
            _check_json_value(ck, v, f"{field}.{k}", depth + 1)
        return
    ck.fail(field, f"must be JSON data (got {type(value).__name__})")


def _validate_normalization(ck: _Checker, norm, field):
    if not isinstance(norm, dict):
        ck.fail(field, "must be an object")
    scheme = norm.get("scheme")
    if scheme not in NORMALIZATION_SCHEMES:
        if "scheme" not in norm:
            ck.fail(f"{field}.scheme", "is missing")
        ck.fail(f"{field}.scheme", f"must be one of {', '.join(NORMALIZATION_SCHEMES)}")
    if scheme == "ct":
        ck.obj(norm, field, required=("scheme", "clip", "mean", "std"))
        clip = ck.array(norm["clip"], f"{field}.clip", length=2)
        lo = ck.number(clip[0], f"{field}.clip[0]")
        hi = ck.number(clip[1], f"{field}.clip[1]")
        if not lo < hi:
            ck.fail(f"{field}.clip", "must be [low, high] with low < high")
        out = {"scheme": scheme, "clip": [lo, hi]}
    elif scheme == "pet_suv":
        ck.obj(norm, field, required=("scheme", "suv_factor", "mean", "std"))
        out = {"scheme": scheme, "suv_factor": ck.number(norm["suv_factor"], f"{field}.suv_factor", lo=0, lo_open=True)}
    else:
        ck.obj(norm, field, required=("scheme",))
        return {"scheme": scheme}
    out["mean"] = ck.number(norm["mean"], f"{field}.mean")
    out["std"] = ck.number(norm["std"], f"{field}.std", lo=0, lo_open=True)
    return out


def _validate_triplet(ck: _Checker, value, field):
    ck.array(value, field, length=3)
    for i, v in enumerate(value):
        if not isinstance(v, str):
            ck.fail(field, "must be 3 strings [coding scheme, code value, code meaning]")
        if i < 2 and not v.strip():
            ck.fail(field, "must be 3 strings [coding scheme, code value, code meaning] with a scheme and a code")
    return list(value)


def _validate_pet_refine(ck: _Checker, value, meta_out) -> dict:
    from .infer.petrefine import PET_REFINE_DEFAULTS, pet_refine_settings

    f = "inference.pet_refine"
    ref = ck.obj(value, f, optional=tuple(PET_REFINE_DEFAULTS))
    given = {}  # each given setting, checked; the defaults (and the rule for older bundles) after
    if "label" in ref:
        given["label"] = ck.integer(ref["label"], f"{f}.label", lo=1, hi=255)
    for key in ("fraction", "fraction_small", "lung_fraction"):
        if key in ref:
            given[key] = ck.number(ref[key], f"{f}.{key}", lo=0, hi=1, lo_open=True, hi_open=True)
    for key, lo, lo_open in (("small_mm3", 0, True), ("large_mm3", 0, True), ("weight", 0, False),
                             ("margin_mm", 0, False), ("shell_mm", 0, True), ("min_component_mm3", 0, False)):
        if key in ref:
            given[key] = ck.number(ref[key], f"{f}.{key}", lo=lo, lo_open=lo_open)
    if "lung_hu" in ref:
        given["lung_hu"] = None if ref["lung_hu"] is None else ck.number(ref["lung_hu"], f"{f}.lung_hu")
    if "lung_tissue_hu" in ref:
        given["lung_tissue_hu"] = ck.number(ref["lung_tissue_hu"], f"{f}.lung_tissue_hu")
    if "peak_voxels" in ref:
        given["peak_voxels"] = ck.integer(ref["peak_voxels"], f"{f}.peak_voxels", lo=1)
    out = pet_refine_settings(given)
    values = [lab["value"] for lab in meta_out["labels"]]
    if out["label"] not in values:
        ck.fail(f"{f}.label", f"is {out['label']}, not one of the bundle's label values ({', '.join(map(str, values))})")
    if not any(str(ch["modality"]).upper() == "PET" for ch in meta_out["channels"]):
        ck.fail(f, "needs a channel whose modality is PET")
    if not out["large_mm3"] > out["small_mm3"]:
        ck.fail(f"{f}.large_mm3", f"is {out['large_mm3']:g}, not above small_mm3 ({out['small_mm3']:g})")
    return out


def validate_meta(meta: dict, source: str = META_NAME) -> dict:
    """Strictly validate a ``bundle.json`` mapping; return a normalized deep copy.

    Unknown, missing or mistyped fields raise :class:`BundleError` naming the field path, e.g.
    ``"bundle.json: labels[1].color must be 3 integers 0..255"`` (``source`` is the prefix).
    The copy has ``description`` (default ``""``), ``model.overrides`` (``{}``), every
    ``inference`` field (defaults in ``INFERENCE_DEFAULTS``) and ``training`` (``{}``) filled in.
    """
    ck = _Checker(source)
    ck.obj(
        meta,
        "",
        required=("format_version", "name", "model", "spacing", "channels", "labels"),
        optional=("description", "orientation", "inference", "training"),
    )
    fv = meta["format_version"]
    if not isinstance(fv, int) or isinstance(fv, bool):
        ck.fail("format_version", "must be an integer")
    if fv != FORMAT_VERSION:
        if fv > FORMAT_VERSION:
            ck.fail("format_version", f"is {fv}, newer than this VeloxSeg supports ({FORMAT_VERSION}): update VeloxSeg")
        ck.fail("format_version", f"must be {FORMAT_VERSION}")
    out: Dict[str, Any] = {"format_version": fv}

    name = ck.string(meta["name"], "name")
    if not _NAME_RE.match(name):
        ck.fail("name", "must be 1-128 characters of letters, digits, '.', '_', '+', '-', starting with a letter or digit")
    out["name"] = name
    out["description"] = ck.string(meta.get("description", ""), "description", nonempty=False)

    # model -------------------------------------------------------------------------
    model = ck.obj(meta["model"], "model", required=("name", "in_channels", "num_classes", "patch_size"),
                   optional=("overrides", "members"))
    m_out: Dict[str, Any] = {"name": ck.string(model["name"], "model.name")}
    in_ch = ck.array(model["in_channels"], "model.in_channels", min_length=1)
    m_out["in_channels"] = [ck.integer(c, f"model.in_channels[{i}]", lo=1) for i, c in enumerate(in_ch)]
    m_out["num_classes"] = ck.integer(model["num_classes"], "model.num_classes", lo=2)
    patch = ck.array(model["patch_size"], "model.patch_size", length=3)
    m_out["patch_size"] = [ck.integer(p, f"model.patch_size[{i}]", lo=1) for i, p in enumerate(patch)]
    overrides = model.get("overrides", {})
    if not isinstance(overrides, dict):
        ck.fail("model.overrides", "must be an object")
    for key, value in overrides.items():
        if not _IDENT_RE.match(key):
            ck.fail(f"model.overrides.{key}", "is not a valid argument name")
        if key in ("name", "in_channels", "num_classes", "patch_size"):
            ck.fail(f"model.overrides.{key}", f"duplicates model.{key}")
        _check_json_value(ck, value, f"model.overrides.{key}")
    m_out["overrides"] = copy.deepcopy(overrides)
    if "members" in model:  # an ensemble: that many networks of this model, weights "members.<i>.<key>"
        m_out["members"] = ck.integer(model["members"], "model.members", lo=2, hi=MAX_MEMBERS)
    out["model"] = m_out

    # spacing -----------------------------------------------------------------------
    spacing = ck.array(meta["spacing"], "spacing", length=3)
    out["spacing"] = [ck.number(s, f"spacing[{i}]", lo=0, lo_open=True) for i, s in enumerate(spacing)]

    # orientation (absent in bundles that predate it: arrays as the files store them) ---
    if "orientation" in meta:
        from .data.orientation import ORIENTATIONS

        if meta["orientation"] not in ORIENTATIONS:
            ck.fail("orientation", f"must be one of {', '.join(ORIENTATIONS)}")
        out["orientation"] = meta["orientation"]

    # channels ----------------------------------------------------------------------
    channels = ck.array(meta["channels"], "channels", min_length=1)
    ch_out = []
    seen = set()
    for i, ch in enumerate(channels):
        f = f"channels[{i}]"
        ck.obj(ch, f, required=("name", "modality", "normalization"))
        cname = ck.string(ch["name"], f"{f}.name")
        if cname in seen:
            ck.fail(f"{f}.name", f"'{cname}' is used by another channel")
        seen.add(cname)
        ch_out.append({
            "name": cname,
            "modality": ck.string(ch["modality"], f"{f}.modality"),
            "normalization": _validate_normalization(ck, ch["normalization"], f"{f}.normalization"),
        })
    if sum(m_out["in_channels"]) != len(ch_out):
        ck.fail("model.in_channels", f"must add up to the number of channels ({len(ch_out)}), "
                f"not {sum(m_out['in_channels'])}")
    out["channels"] = ch_out

    # labels ------------------------------------------------------------------------
    labels = ck.array(meta["labels"], "labels", min_length=2)
    if len(labels) != m_out["num_classes"]:
        ck.fail("labels", f"must have model.num_classes ({m_out['num_classes']}) entries (has {len(labels)})")
    lab_out = []
    names = set()
    for i, lab in enumerate(labels):
        f = f"labels[{i}]"
        ck.obj(lab, f, required=("value", "name"), optional=("color", "terminology"))
        value = ck.integer(lab["value"], f"{f}.value", lo=0, hi=255)
        if value != i:
            ck.fail(f"{f}.value", f"must be {i} (label values are 0..num_classes-1 in order; 0 is background)")
        lname = ck.string(lab["name"], f"{f}.name")
        if lname in names:
            ck.fail(f"{f}.name", f"'{lname}' is used by another label")
        names.add(lname)
        entry: Dict[str, Any] = {"value": value, "name": lname}
        if "color" in lab:
            color = lab["color"]
            if (not isinstance(color, list) or len(color) != 3
                    or any(isinstance(c, bool) or not isinstance(c, (int, float))
                           or not (isinstance(c, int) or (math.isfinite(c) and c.is_integer()))
                           or not 0 <= c <= 255 for c in color)):
                ck.fail(f"{f}.color", "must be 3 integers 0..255")
            entry["color"] = [int(c) for c in color]
        if "terminology" in lab:
            term = ck.obj(lab["terminology"], f"{f}.terminology", required=("category", "type"),
                          optional=TERMINOLOGY_KEYS[2:])
            entry["terminology"] = {k: _validate_triplet(ck, term[k], f"{f}.terminology.{k}")
                                    for k in TERMINOLOGY_KEYS if k in term}
        lab_out.append(entry)
    out["labels"] = lab_out

    # inference ---------------------------------------------------------------------
    inf = ck.obj(meta.get("inference", {}), "inference", optional=tuple(INFERENCE_DEFAULTS))
    inf_out = dict(INFERENCE_DEFAULTS)
    if "overlap" in inf:
        inf_out["overlap"] = ck.number(inf["overlap"], "inference.overlap", lo=0, hi=1, hi_open=True)
    if "blending" in inf:
        if inf["blending"] not in BLENDING_MODES:
            ck.fail("inference.blending", f"must be one of {', '.join(BLENDING_MODES)}")
        inf_out["blending"] = inf["blending"]
    if "tta" in inf:
        inf_out["tta"] = ck.boolean(inf["tta"], "inference.tta")
    if "tta_axes" in inf:
        axes = ck.array(inf["tta_axes"], "inference.tta_axes")
        if any(a not in MIRROR_AXES for a in axes) or len(set(axes)) != len(axes):
            ck.fail("inference.tta_axes", f"must list distinct axes out of {', '.join(MIRROR_AXES)} "
                                          f"(got {json.dumps(axes)})")
        inf_out["tta_axes"] = sorted(axes, key=MIRROR_AXES.index)
    inf_out["tta_axes"] = list(inf_out["tta_axes"])
    if "min_component_mm3" in inf:
        inf_out["min_component_mm3"] = ck.number(inf["min_component_mm3"], "inference.min_component_mm3", lo=0)
    if "crop_to_body" in inf:
        inf_out["crop_to_body"] = ck.boolean(inf["crop_to_body"], "inference.crop_to_body")
    if inf.get("pet_refine") is not None:
        inf_out["pet_refine"] = _validate_pet_refine(ck, inf["pet_refine"], out)
    out["inference"] = inf_out

    # training (a free-form record with known keys) -------------------------------
    tr = ck.obj(meta.get("training", {}), "training", optional=TRAINING_KEYS)
    tr_out: Dict[str, Any] = {}
    for key in ("dataset", "command", "parent", "date", "veloxseg_version", "notes"):
        if key in tr:
            tr_out[key] = ck.string(tr[key], f"training.{key}", nonempty=False, nullable=True)
    for key in ("epochs", "seed"):
        if key in tr:
            tr_out[key] = ck.integer(tr[key], f"training.{key}", lo=0, nullable=True)
    if "metrics" in tr:
        if not isinstance(tr["metrics"], dict):
            ck.fail("training.metrics", "must be an object")
        _check_json_value(ck, tr["metrics"], "training.metrics")
        tr_out["metrics"] = copy.deepcopy(tr["metrics"])
    out["training"] = tr_out
    return out


# --------------------------------------------------------------------------- file checks


def training_notes(meta: dict) -> dict:
    """A bundle's ``training.notes`` (a JSON text: the recipe, fine-tuning parentage) as a dict;
    {} when absent or unreadable."""
    try:
        notes = json.loads((meta.get("training") or {}).get("notes") or "{}")
    except ValueError:
        return {}
    return notes if isinstance(notes, dict) else {}


def _looks_like_pickle(data: bytes) -> Optional[str]:
    """Describe ``data`` if it starts like a pickle or a torch.save checkpoint (else None).

    Only meaningful once ``data`` has failed to look like safetensors (whose 8-byte header
    length can start with any byte).
    """
    if len(data) >= 2 and data[0] == 0x80 and 1 <= data[1] <= 5:
        return "a Python pickle"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (a torch.save checkpoint?)"
    return None


def _refuse_non_safetensors(head: bytes, source: str):
    kind = _looks_like_pickle(head[:16])
    if kind:
        raise BundleError(f"{source}: is {kind}; pickled weights are refused (bundles must use safetensors)")
    raise BundleError(f"{source}: is not a safetensors file (bundles must use safetensors; pickles are refused)")


def _parse_safetensors_header(head: bytes, total_size: int, source: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Check a safetensors header (``head`` = at least its first 8 + N bytes) against the size.

    Returns ``{tensor name: (dtype, shape)}``. Raises BundleError naming ``source``: for a
    pickle (or torch.save zip) it says pickles are refused; for a short file, truncated.
    """
    if total_size < 8 or len(head) < 8:
        if _looks_like_pickle(head[:16]):
            _refuse_non_safetensors(head, source)
        raise BundleError(f"{source}: is empty or truncated (not a safetensors file)")
    (n,) = struct.unpack("<Q", head[:8])
    plausible = 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{"
    if not plausible:
        if n <= MAX_HEADER_BYTES and len(head) == 8 and total_size <= 8 + n:
            raise BundleError(f"{source}: is truncated (header runs past the end of the file)")
        _refuse_non_safetensors(head, source)
    if 8 + n > total_size or len(head) < 8 + n:
        raise BundleError(f"{source}: is truncated (header runs past the end of the file)")
    try:
        header = json.loads(head[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError(f"{source}: is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise BundleError(f"{source}: is not a safetensors file (header is not an object)")
    data_size = total_size - 8 - n
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in _ST_DTYPES
              and isinstance(info.get("shape"), list)
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"]))
        if not ok:
            raise BundleError(f"{source}: tensor '{key}' has a malformed header entry")
        begin, end = info["data_offsets"]
        numel = math.prod(info["shape"])
        if end < begin or end - begin != numel * _ST_DTYPES[info["dtype"]]:
            raise BundleError(f"{source}: tensor '{key}' has inconsistent data offsets")
        if end > data_size:
            raise BundleError(f"{source}: is truncated (tensor '{key}' runs past the end of the file)")
        end_max = max(end_max, end)
        tensors[key] = (info["dtype"], tuple(info["shape"]))
    if not tensors:
        raise BundleError(f"{source}: holds no tensors")
    if end_max != data_size:
        raise BundleError(f"{source}: has {data_size - end_max} bytes after its last tensor (corrupt)")
    return tensors


def _parse_meta_bytes(data: bytes, source: str) -> dict:
    if len(data) > MAX_META_BYTES:
        raise BundleError(f"{source}: is larger than {MAX_META_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BundleError(f"{source}: is not UTF-8 text") from None

    def _no_constants(c):
        raise ValueError(f"{c} is not valid JSON")

    try:
        meta = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        raise BundleError(f"{source}: is not valid JSON ({str(exc).splitlines()[0]})") from None
    return validate_meta(meta, source)


# --------------------------------------------------------------------------- the Bundle


class Bundle:
    """Immutable view of a loaded, validated bundle.

    Attributes: ``path`` (the folder or zip it came from), ``meta`` (a copy of the validated
    ``bundle.json``), ``name``, ``description``, ``model_name``, ``in_channels``,
    ``num_classes``, ``channel_names`` (input order), ``labels`` (list of dicts),
    ``patch_size`` and ``spacing`` (tuples, spacing in x, y, z mm), ``inference`` (dict),
    ``tensors`` ({name: (dtype, shape)} from the weights header), ``is_zip``.
    """

    __slots__ = ("_path", "_meta", "_weights_path", "_weights_bytes", "_tensors", "_is_zip")

    def __init__(self, path, meta, tensors, weights_path=None, weights_bytes=None, is_zip=False):
        object.__setattr__(self, "_path", pathlib.Path(path))
        object.__setattr__(self, "_meta", meta)
        object.__setattr__(self, "_tensors", dict(tensors))
        object.__setattr__(self, "_weights_path", weights_path)
        object.__setattr__(self, "_weights_bytes", weights_bytes)
        object.__setattr__(self, "_is_zip", is_zip)

    def __setattr__(self, key, value):
        raise AttributeError("Bundle is immutable")

    def __delattr__(self, key):
        raise AttributeError("Bundle is immutable")

    def __repr__(self):
        return f"Bundle(name={self.name!r}, path={str(self._path)!r})"

    # plain views -----------------------------------------------------------------------
    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def meta(self) -> dict:
        return copy.deepcopy(self._meta)

    @property
    def name(self) -> str:
        return self._meta["name"]

    @property
    def description(self) -> str:
        return self._meta["description"]

    @property
    def model_name(self) -> str:
        return self._meta["model"]["name"]

    @property
    def in_channels(self) -> tuple:
        return tuple(self._meta["model"]["in_channels"])

    @property
    def num_classes(self) -> int:
        return self._meta["model"]["num_classes"]

    @property
    def channel_names(self) -> List[str]:
        return [c["name"] for c in self._meta["channels"]]

    @property
    def channels(self) -> List[dict]:
        return copy.deepcopy(self._meta["channels"])

    @property
    def labels(self) -> List[dict]:
        return copy.deepcopy(self._meta["labels"])

    @property
    def patch_size(self) -> tuple:
        return tuple(self._meta["model"]["patch_size"])

    @property
    def spacing(self) -> tuple:
        return tuple(self._meta["spacing"])

    @property
    def inference(self) -> dict:
        return dict(self._meta["inference"])

    @property
    def tensors(self) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
        return dict(self._tensors)

    @property
    def is_zip(self) -> bool:
        return self._is_zip

    @property
    def weights_source(self) -> str:
        """Human-readable name of the weights file (used in error messages)."""
        if self._is_zip:
            return f"{self._path}!{WEIGHTS_NAME}"
        return str(self._weights_path)

    # weights ---------------------------------------------------------------------------
    def _weights(self) -> bytes:
        if self._weights_bytes is not None:
            return self._weights_bytes
        src = self.weights_source
        try:
            size = os.path.getsize(self._weights_path)
            if size > MAX_WEIGHTS_BYTES:
                raise BundleError(f"{src}: is larger than {MAX_WEIGHTS_BYTES} bytes")
            with open(self._weights_path, "rb") as fh:
                return fh.read(MAX_WEIGHTS_BYTES + 1)
        except OSError as exc:
            raise BundleError(f"{src}: cannot be read ({exc.strerror or exc})") from None

    def state_dict(self) -> Dict[str, "Any"]:
        """The weights as ``{name: torch.Tensor}`` (CPU), parsed by safetensors (no pickle)."""
        from safetensors.torch import load as st_load

        data = self._weights()
        src = self.weights_source
        tensors = _parse_safetensors_header(data[: 8 + MAX_HEADER_BYTES], len(data), src)
        if tensors != self._tensors:
            raise BundleError(f"{src}: changed on disk since the bundle was loaded")
        try:
            return st_load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise BundleError(f"{src}: cannot be parsed as safetensors ({str(exc).splitlines()[0]})") from None

    @property
    def members(self) -> int:
        """How many networks the bundle holds: 1, or an ensemble's ``model.members``."""
        return int(self._meta["model"].get("members", 1))

    def build_model(self, device="cpu"):
        """Build ``meta['model']`` with :func:`VeloxSegLib.build_model`, load the weights, eval().

        Key checking is strict: every model key must be in ``model.safetensors`` with the same
        shape, and the file may hold no other keys, except keys of the model's training-only
        modules (texture teachers, deep-supervision heads; see ``_training_only_prefixes``),
        which may be absent or present. Raises BundleError naming the weights file.

        An ensemble bundle (``model.members`` N) holds N networks of that model, member i's
        weights under ``members.<i>.``; it builds into one
        :class:`VeloxSegLib.infer.ensemble.MeanOfNetworks` (each member checked as strictly).
        """
        import torch

        state = self.state_dict()
        n = self.members
        if n == 1:
            model = self._build_network(state, "")
        else:
            from .infer.ensemble import MeanOfNetworks

            parts: List[dict] = [{} for _ in range(n)]
            stray = []
            for key, t in state.items():
                head, _, rest = key.partition(".")
                idx, _, sub = rest.partition(".")
                if head == "members" and idx.isdigit() and int(idx) < n and str(int(idx)) == idx and sub:
                    parts[int(idx)][sub] = t
                else:
                    stray.append(key)
            if stray:
                raise BundleError(f"{self.weights_source}: holds {len(stray)} tensor(s) outside the ensemble's "
                                  f"{n} members (e.g. {', '.join(stray[:3])})")
            model = MeanOfNetworks([self._build_network(part, f"member {i}: ") for i, part in enumerate(parts)])
        model = model.to(torch.device(device))
        model.eval()
        return model

    def _build_network(self, state: dict, what: str):
        from . import build_model as _build_model

        m = self._meta["model"]
        src = self.weights_source
        try:
            model = _build_model(m["name"], in_channels=tuple(m["in_channels"]), num_classes=m["num_classes"],
                                 patch_size=tuple(m["patch_size"]), **m["overrides"])
        except (TypeError, ValueError, KeyError) as exc:
            raise BundleError(f"{self._path}: model '{m['name']}' cannot be built from bundle.json "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        prefixes = _training_only_prefixes(model)

        def _training_only(key):
            return key.startswith(prefixes) if prefixes else False

        expected = model.state_dict()
        missing = [k for k in expected if k not in state and not _training_only(k)]
        unexpected = [k for k in state if k not in expected and not _training_only(k)]
        if missing:
            raise BundleError(f"{src}: {what}lacks {len(missing)} tensor(s) model '{m['name']}' needs "
                              f"(e.g. {', '.join(missing[:3])})")
        if unexpected:
            raise BundleError(f"{src}: {what}holds {len(unexpected)} tensor(s) model '{m['name']}' does not have "
                              f"(e.g. {', '.join(unexpected[:3])})")
        load = {}
        for key, ref in expected.items():
            if key not in state:
                continue
            t = state[key]
            if tuple(t.shape) != tuple(ref.shape):
                raise BundleError(f"{src}: {what}tensor '{key}' has shape {tuple(t.shape)} but model '{m['name']}' "
                                  f"expects {tuple(ref.shape)}")
            if t.dtype.is_floating_point != ref.dtype.is_floating_point:
                raise BundleError(f"{src}: {what}tensor '{key}' has dtype {t.dtype}, model expects {ref.dtype}")
            load[key] = t
        model.load_state_dict(load, strict=False)
        return model


def _training_only_prefixes(model) -> Tuple[str, ...]:
    """State-dict key prefixes of the model's training-only modules.

    ``model.training_only_prefixes`` (e.g. ``("teachers.", "ds_heads.")``) if it has one; else
    derived from ``model.inference_state_dict()``: the top-level module of every key that
    ``state_dict()`` has and ``inference_state_dict()`` lacks; else none (fully strict).
    """
    declared = getattr(model, "training_only_prefixes", None)
    if declared:
        return tuple(p if p.endswith(".") else p + "." for p in declared)
    if callable(getattr(model, "inference_state_dict", None)):
        kept = set(model.inference_state_dict())
        return tuple(sorted({k.split(".", 1)[0] + "." for k in model.state_dict() if k not in kept}))
    return ()


# --------------------------------------------------------------------------- loading


def _load_folder(folder: pathlib.Path) -> Bundle:
    meta_path = folder / META_NAME
    weights_path = folder / WEIGHTS_NAME
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: is missing (a bundle folder holds {META_NAME} and {WEIGHTS_NAME})")
    try:
        meta_bytes = meta_path.read_bytes() if meta_path.stat().st_size <= MAX_META_BYTES else b" " * (MAX_META_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"{meta_path}: cannot be read ({exc.strerror or exc})") from None
    meta = _parse_meta_bytes(meta_bytes, str(meta_path))
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise BundleError(f"{weights_path}: is missing and {pickles[0]} is not accepted: pickled weights are "
                              f"refused (bundles must use safetensors)")
        raise BundleError(f"{weights_path}: is missing")
    try:
        size = weights_path.stat().st_size
        if size > MAX_WEIGHTS_BYTES:
            raise BundleError(f"{weights_path}: is larger than {MAX_WEIGHTS_BYTES} bytes")
        with open(weights_path, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                head += fh.read(max(0, min(n, MAX_HEADER_BYTES, size - 8)))
    except OSError as exc:
        raise BundleError(f"{weights_path}: cannot be read ({exc.strerror or exc})") from None
    tensors = _parse_safetensors_header(head, size, str(weights_path))
    return Bundle(folder, meta, tensors, weights_path=weights_path, is_zip=False)


def _zip_member_name(info: zipfile.ZipInfo) -> str:
    return info.filename.replace("\\", "/")


def _check_zip_member(zpath, info: zipfile.ZipInfo):
    name = _zip_member_name(info)
    where = f"{zpath}: member '{info.filename}'"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"{where} has an absolute path; refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BundleError(f"{where} points outside the bundle ('..'); refused")
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise BundleError(f"{where} is a symbolic link; refused")
    if info.flag_bits & 0x1:
        raise BundleError(f"{where} is encrypted; refused")
    return parts


def _load_zip(zpath: pathlib.Path, header_only: bool = False) -> Bundle:
    """Load and check a bundle zip. ``header_only``: read ``bundle.json`` and only the
    safetensors header of the weights (checked against the member's size), not the tensor data
    (for listing; the returned Bundle holds no weights and is not for :meth:`Bundle.state_dict`)."""
    try:
        zf = zipfile.ZipFile(zpath)
    except zipfile.BadZipFile:
        raise BundleError(f"{zpath}: is not a valid zip file (corrupt or truncated)") from None
    except OSError as exc:
        raise BundleError(f"{zpath}: cannot be read ({exc.strerror or exc})") from None
    with zf:
        files: Dict[str, zipfile.ZipInfo] = {}
        tops = set()
        total = 0
        for info in zf.infolist():
            parts = _check_zip_member(zpath, info)
            if info.is_dir() or info.filename.endswith("/"):
                if len(parts) > 1:
                    raise BundleError(f"{zpath}: member '{info.filename}' is a nested folder; a bundle zip holds only "
                                      f"{META_NAME} and {WEIGHTS_NAME} (optionally under one top-level folder)")
                if parts:
                    tops.add(parts[0])
                continue
            if len(parts) > 2 or not parts:
                raise BundleError(f"{zpath}: member '{info.filename}' is not allowed; a bundle zip holds only "
                                  f"{META_NAME} and {WEIGHTS_NAME} (optionally under one top-level folder)")
            base = parts[-1]
            if base not in BUNDLE_FILES:
                if base.lower().endswith(_PICKLE_SUFFIXES):
                    raise BundleError(f"{zpath}: member '{info.filename}' looks like pickled weights; pickles are "
                                      f"refused (bundles must use safetensors)")
                raise BundleError(f"{zpath}: member '{info.filename}' is not allowed; a bundle zip holds only "
                                  f"{META_NAME} and {WEIGHTS_NAME} (optionally under one top-level folder)")
            if base in files:
                raise BundleError(f"{zpath}: holds {base} more than once")
            tops.add(parts[0] if len(parts) == 2 else "")
            files[base] = info
            total += info.file_size
        if len(tops) > 1:
            raise BundleError(f"{zpath}: files must be at the zip's root or under one top-level folder")
        for base in BUNDLE_FILES:
            if base not in files:
                raise BundleError(f"{zpath}: {base} is missing from the zip")
        if total > MAX_WEIGHTS_BYTES + MAX_META_BYTES:
            raise BundleError(f"{zpath}: uncompressed size {total} bytes exceeds the limit")

        def _read(base, limit, header_only=False):
            """A member's bytes, or with ``header_only`` just a safetensors file's header."""
            info = files[base]
            src = f"{zpath}!{base}"
            if info.file_size > limit:
                raise BundleError(f"{src}: is larger than {limit} bytes")
            try:
                with zf.open(info) as fh:
                    if header_only:
                        data = fh.read(8)
                        if len(data) == 8:
                            (n,) = struct.unpack("<Q", data)
                            data += fh.read(max(0, min(n, MAX_HEADER_BYTES, info.file_size - 8)))
                    else:
                        data = fh.read(limit + 1)
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
                raise BundleError(f"{src}: cannot be read from the zip ({str(exc).splitlines()[0]})") from None
            except Exception as exc:  # zlib.error on corrupt deflate data
                raise BundleError(f"{src}: cannot be read from the zip ({type(exc).__name__})") from None
            if len(data) > limit:
                raise BundleError(f"{src}: is larger than {limit} bytes")
            return data

        meta = _parse_meta_bytes(_read(META_NAME, MAX_META_BYTES), f"{zpath}!{META_NAME}")
        if header_only:
            head = _read(WEIGHTS_NAME, MAX_WEIGHTS_BYTES, header_only=True)
            tensors = _parse_safetensors_header(head, files[WEIGHTS_NAME].file_size, f"{zpath}!{WEIGHTS_NAME}")
            return Bundle(zpath, meta, tensors, is_zip=True)
        weights = _read(WEIGHTS_NAME, MAX_WEIGHTS_BYTES)
    tensors = _parse_safetensors_header(weights[: 8 + MAX_HEADER_BYTES], len(weights), f"{zpath}!{WEIGHTS_NAME}")
    return Bundle(zpath, meta, tensors, weights_bytes=weights, is_zip=True)


def _load_path(path: pathlib.Path, as_zip: Optional[bool] = None, header_only: bool = False) -> Bundle:
    """``header_only``: see :func:`_load_zip` (a folder bundle's weights are read lazily anyway)."""
    if as_zip is None:
        as_zip = path.is_file()
    if as_zip:
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise BundleError(f"{path}: pickled checkpoints are refused; a bundle is a folder or .zip with "
                              f"{META_NAME} and {WEIGHTS_NAME}")
        return _load_zip(path, header_only=header_only)
    return _load_folder(path)


def _looks_like_path(s: str) -> bool:
    return ("/" in s or "\\" in s or s.startswith(".") or s.startswith("~")
            or s.lower().endswith(".zip") or os.path.isabs(s))


def load_bundle(path_or_name) -> Bundle:
    """Load a bundle from a folder, a ``.zip``, or a name known to :func:`find_bundle`.

    Everything is validated before returning: ``bundle.json`` fields, the zip's members, and
    the safetensors header against the file size (truncation). The tensors themselves are
    parsed by :meth:`Bundle.state_dict`. Raises :class:`BundleError`.
    """
    if isinstance(path_or_name, Bundle):
        return path_or_name
    if isinstance(path_or_name, os.PathLike):
        path = pathlib.Path(path_or_name).expanduser()
    elif isinstance(path_or_name, str):
        if not path_or_name.strip():
            raise BundleError("empty bundle name or path")
        path = pathlib.Path(path_or_name).expanduser()
        if not path.exists() and not _looks_like_path(path_or_name):
            path = find_bundle(path_or_name)
    else:
        raise TypeError(f"load_bundle expects a path or a name, not {type(path_or_name).__name__}")
    if not path.exists():
        raise BundleError(f"{path}: no such bundle folder or .zip file")
    if path.is_dir():
        return _load_path(path, as_zip=False)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return _load_path(path, as_zip=True)
    if path.suffix.lower() != ".zip" and not zipfile.is_zipfile(path):
        raise BundleError(f"{path}: is not a bundle (expected a folder or a .zip file)")
    return _load_path(path, as_zip=True)


# --------------------------------------------------------------------------- saving


def _tensor_dict(state_dict) -> dict:
    import torch

    if not hasattr(state_dict, "items"):
        raise BundleError("state_dict must be a mapping of names to tensors")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key:
            raise BundleError(f"state_dict key {key!r} must be a non-empty string")
        if not isinstance(value, torch.Tensor):
            raise BundleError(f"state_dict['{key}'] is a {type(value).__name__}, not a tensor")
        # clone: safetensors refuses tensors sharing storage, and must not alias the caller's
        out[key] = value.detach().to("cpu").contiguous().clone()
    if not out:
        raise BundleError("state_dict holds no tensors")
    return out


def _is_bundle_like_dir(path: pathlib.Path) -> bool:
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return META_NAME in names and names <= set(BUNDLE_FILES)


def check_bundle_output(out: pathlib.Path, overwrite: bool, exists_hint: str = "use overwrite") -> None:
    """What :func:`save_bundle` requires of its output (trainers check it before the first step):
    the parent folder exists; an existing output needs ``overwrite`` and is only replaced when it
    is a file (``.zip``) or a folder holding nothing but a bundle's files."""
    out = pathlib.Path(out)
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"{out}: already exists ({exists_hint})")
        if out.suffix.lower() == ".zip":
            if not out.is_file():
                raise InputError(f"{out}: exists and is not a file; not replacing it")
        elif not (out.is_dir() and not out.is_symlink() and _is_bundle_like_dir(out)):
            raise InputError(f"{out}: exists and is not a bundle folder; not replacing it")
    if not parent.is_dir():
        raise InputError(f"{out}: the folder {parent} does not exist")


def save_bundle(out_dir, meta: dict, state_dict, *, overwrite: bool = False) -> pathlib.Path:
    """Validate ``meta``, write a bundle atomically, and return its path.

    ``out_dir`` ending in ``.zip`` writes a zip (files at its root); otherwise a folder. The
    bundle is first written to a hidden temporary name beside ``out_dir``, re-loaded to check
    it, then renamed into place, so a failure leaves nothing behind. An existing ``out_dir``
    raises :class:`InputError` unless ``overwrite``; even then a folder is only replaced if
    it holds nothing but a bundle's two files.
    """
    from safetensors.torch import save as st_save

    out = pathlib.Path(out_dir).expanduser()
    clean = validate_meta(meta, META_NAME)
    tensors = _tensor_dict(state_dict)
    check_bundle_output(out, overwrite)
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    as_zip = out.suffix.lower() == ".zip"

    meta_bytes = (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode("utf-8")
    weights_bytes = st_save(tensors, metadata={"format": "pt"})
    tmp = parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        if as_zip:
            with zipfile.ZipFile(tmp, "w") as zf:
                zf.writestr(zipfile.ZipInfo(META_NAME, date_time=(1980, 1, 1, 0, 0, 0)), meta_bytes,
                            compress_type=zipfile.ZIP_DEFLATED)
                zf.writestr(zipfile.ZipInfo(WEIGHTS_NAME, date_time=(1980, 1, 1, 0, 0, 0)), weights_bytes,
                            compress_type=zipfile.ZIP_STORED)
            _load_path(tmp, as_zip=True).state_dict()
            os.replace(tmp, out)
        else:
            tmp.mkdir()
            (tmp / META_NAME).write_bytes(meta_bytes)
            (tmp / WEIGHTS_NAME).write_bytes(weights_bytes)
            _load_path(tmp, as_zip=False).state_dict()
            if out.exists():
                swap_folder_into_place(tmp, out)
            else:
                os.replace(tmp, out)
    except OSError as exc:
        raise InputError(f"{out}: cannot be written ({exc.strerror or exc})") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return out


# --------------------------------------------------------------------------- discovery


def embedded_bundles_dir() -> pathlib.Path:
    """The bundles shipped with the package: ``VeloxSegLib/bundles`` (package data)."""
    return pathlib.Path(__file__).resolve().parent / "bundles"


def user_models_dir() -> pathlib.Path:
    """The user models folder: ``$VELOXSEG_MODELS`` if set, else ``~/.veloxseg/models``.

    The folder need not exist (then it holds no bundles).
    """
    env = os.environ.get(MODELS_ENV, "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".veloxseg" / "models"


def _candidates(folder: pathlib.Path) -> List[pathlib.Path]:
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    out = []
    for p in entries:
        if p.name.startswith((".", "_")) or p.name.endswith(".training"):
            continue  # hidden, temporary (save_bundle), __pycache__, or a training work folder
        if p.is_dir() or (p.is_file() and p.suffix.lower() == ".zip"):
            out.append(p)
    return out


def list_bundles() -> List[dict]:
    """Every bundle in the embedded folder and the user models folder, embedded first.

    Each entry: ``name``, ``path`` (str), ``source`` (``'embedded'`` or ``'user'``),
    ``description``, ``model``, ``channels`` (channel names), ``labels`` (label names,
    background included). A bundle that fails to load is listed with ``error`` (the one-line
    message) and its file name as ``name``; listing never raises for a broken bundle. A bundle
    that ``find_bundle(name)`` would not pick for its own name (another bundle of that name
    takes precedence: see :func:`find_bundle`) has ``shadowed_by``: that bundle's path.

    Only ``bundle.json`` and the safetensors header of each bundle are read (and checked
    against the weights file's size), never the tensor data.
    """
    out = []
    for source, folder in (("embedded", embedded_bundles_dir()), ("user", user_models_dir())):
        for p in _candidates(folder):
            entry: Dict[str, Any] = {"name": p.stem if p.is_file() else p.name, "path": str(p), "source": source,
                                     "description": "", "model": None, "channels": [], "labels": []}
            try:
                b = _load_path(p, as_zip=p.is_file(), header_only=True)
            except BundleError as exc:
                entry["error"] = str(exc)
            else:
                entry.update(name=b.name, description=b.description,
                             model=b.model_name + (f" x{b.members}" if b.members > 1 else ""),
                             channels=b.channel_names, labels=[lab["name"] for lab in b.labels])
            out.append(entry)
    for e in out:
        if "error" in e:
            continue
        chosen = _resolve(out, e["name"])
        if chosen is not e:
            e["shadowed_by"] = chosen["path"]
    return out


def _file_name_is(entry: dict, name: str) -> bool:
    p = pathlib.Path(entry["path"])
    return p.name == name or (p.suffix.lower() == ".zip" and p.stem == name)


def _resolve(listed: List[dict], name: str) -> Optional[dict]:
    """The entry of ``listed`` that ``name`` selects (may be a broken one), or None.

    Order: a broken user bundle whose folder/zip name is ``name`` (so that it is reported, not
    silently replaced); then the ``bundle.json`` name, user bundles before embedded ones; then
    the folder/zip name, user before embedded. Within a source, folders and zips in name order.
    """
    for e in listed:
        if e["source"] == "user" and "error" in e and _file_name_is(e, name):
            return e
    entries = [e for e in listed if "error" not in e]
    for source in ("user", "embedded"):
        for e in entries:
            if e["source"] == source and e["name"] == name:
                return e
    for source in ("user", "embedded"):
        for e in entries:
            if e["source"] == source and _file_name_is(e, name):
                return e
    for e in listed:  # a broken embedded bundle of that name: say why, not that it is missing
        if "error" in e and _file_name_is(e, name):
            return e
    return None


def find_bundle(name: str) -> pathlib.Path:
    """The path of the bundle called ``name`` (its ``bundle.json`` name, or its folder/zip name).

    User bundles (``$VELOXSEG_MODELS`` or ``~/.veloxseg/models``) take precedence over embedded
    ones with the same name; a ``bundle.json`` name before a folder/zip name. A user bundle whose
    folder/zip name is ``name`` but that does not load raises BundleError naming its path and
    its error (it is never silently replaced by another bundle of that name). Raises
    BundleError listing the available names when none matches.
    """
    listed = list_bundles()
    chosen = _resolve(listed, name)
    if chosen is not None:
        if "error" in chosen:
            raise BundleError(f"bundle '{name}' ({chosen['path']}) cannot be loaded: {chosen['error']}"
                              + (" (fix or remove it: a user bundle of that name is never replaced by another)"
                                 if chosen["source"] == "user" else ""))
        return pathlib.Path(chosen["path"])
    entries = [e for e in listed if "error" not in e]
    if entries:
        names = ", ".join(sorted({e["name"] for e in entries}))
        raise BundleError(f"no bundle named '{name}'; available: {names} (or give a bundle folder or .zip path)")
    raise BundleError(f"no bundle named '{name}' and no bundles are installed; put bundles in "
                      f"{user_models_dir()} (or set {MODELS_ENV}) or give a bundle folder or .zip path")
