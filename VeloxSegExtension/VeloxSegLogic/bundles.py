"""Model bundles as the panel sees them: where they are, what inputs and labels they have.

Only ``bundle.json`` is read here (no torch, no weights). Finding and validating bundles is
VeloxSegLib's job (``VeloxSegLib.bundle``); this module adapts it for the panel.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import zipfile

from .errors import BundleError, InputError


@dataclasses.dataclass
class BundleInfo:
    name: str
    path: str
    source: str  # "embedded" or "user"
    description: str
    channels: list  # [{name, modality, normalization}]
    labels: list  # [{value, name, color?, terminology?}]
    spacing: list | None = None
    patch_size: list | None = None
    inference: dict | None = None

    @property
    def channel_names(self):
        return [str(c.get("name") or c.get("modality") or f"input {i}") for i, c in enumerate(self.channels)]

    @property
    def display_name(self):
        return self.name if self.source == "embedded" else f"{self.name} (user)"


def _read_json_from_bundle(path: str) -> dict:
    if os.path.isdir(path):
        candidate = os.path.join(path, "bundle.json")
        if not os.path.isfile(candidate):
            raise BundleError(f"{path}: no bundle.json")
        with open(candidate, encoding="utf-8") as f:
            return json.load(f)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.rstrip("/").split("/")[-1] == "bundle.json" and n.count("/") <= 1]
            if not names:
                raise BundleError(f"{path}: no bundle.json in the zip")
            return json.loads(zf.read(sorted(names, key=len)[0]).decode("utf-8"))
    raise BundleError(f"{path}: not a bundle folder or zip")


def read_bundle_info(path: str, source: str = "user") -> BundleInfo:
    """Metadata of a bundle folder or zip (``bundle.json`` only)."""
    try:
        meta = _read_json_from_bundle(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: unreadable bundle.json ({exc})") from exc
    for key in ("name", "channels", "labels"):
        if key not in meta:
            raise BundleError(f"{path}: bundle.json has no '{key}'")
    model = meta.get("model") or {}
    return BundleInfo(
        name=str(meta["name"]), path=os.path.abspath(path), source=source,
        description=str(meta.get("description", "")), channels=list(meta["channels"]),
        labels=sorted(meta["labels"], key=lambda lab: int(lab["value"])), spacing=meta.get("spacing"),
        patch_size=model.get("patch_size"), inference=meta.get("inference"))


def embedded_dir() -> str | None:
    try:
        from VeloxSegLib.bundle import embedded_bundles_dir
    except ImportError:
        return None
    return str(embedded_bundles_dir())


def user_dir() -> str:
    try:
        from VeloxSegLib.bundle import user_models_dir
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".veloxseg", "models")
    return str(user_models_dir())


def _scan(folder, source):
    found = []
    if not folder or not os.path.isdir(folder):
        return found
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "bundle.json")) or entry.endswith(".zip"):
            try:
                found.append(read_bundle_info(path, source))
            except BundleError:
                continue
    return found


def list_bundle_infos(extra_dirs=()) -> list:
    """Embedded bundles first, then the user's models folder, then ``extra_dirs``.

    Uses VeloxSegLib's listing (which validates); broken bundles are left out.
    """
    try:
        from VeloxSegLib.bundle import list_bundles
    except ImportError:
        infos = _scan(embedded_dir(), "embedded") + _scan(user_dir(), "user")
    else:
        infos = []
        for entry in list_bundles():
            if "error" in entry:
                continue
            try:
                infos.append(read_bundle_info(entry["path"], entry["source"]))
            except BundleError:
                continue
    for folder in extra_dirs:
        infos += _scan(folder, "user")
    return infos


def resolve_bundle(name_or_path: str, extra_dirs=()) -> BundleInfo:
    """A bundle by folder/zip path or by name (user bundles win over embedded ones)."""
    if os.path.exists(name_or_path):
        return read_bundle_info(name_or_path, "user")
    try:
        from VeloxSegLib.bundle import embedded_bundles_dir, find_bundle
    except ImportError:
        for info in list_bundle_infos(extra_dirs):
            if info.name == name_or_path or os.path.basename(info.path) == name_or_path:
                return info
        raise BundleError(f"no model named '{name_or_path}' (import it in the VeloxSeg panel)") from None
    path = str(find_bundle(name_or_path))
    source = "embedded" if os.path.dirname(os.path.abspath(path)) == os.path.abspath(str(embedded_bundles_dir())) else "user"
    return read_bundle_info(path, source)


def ensemble_mismatch(info: BundleInfo, other: BundleInfo) -> str | None:
    """Why ``other`` cannot predict together with ``info`` as one ensemble (``veloxseg predict -m
    A B``), or None: an ensemble's models take the same inputs (names, in order) and give the same
    labels. Everything else (spacing, window, normalization, folds) may differ: VeloxSegLib
    averages models of other configurations on the image's own grid."""
    if other.channel_names != info.channel_names:
        return (f"model '{other.name}' ({other.path}) takes {', '.join(other.channel_names)}, model "
                f"'{info.name}' ({info.path}) {', '.join(info.channel_names)}: an ensemble's models take the same "
                f"inputs")
    if [(int(a["value"]), a.get("name")) for a in other.labels] != [(int(a["value"]), a.get("name")) for a in info.labels]:
        return (f"model '{other.name}' ({other.path}) gives other labels than model '{info.name}' ({info.path}): an "
                f"ensemble's models give the same labels")
    return None


def ensemble_partners(infos, info: BundleInfo) -> list:
    """The bundles of ``infos`` (the model list) that can predict together with ``info``: every
    other bundle (by path) with the same inputs and labels, in list order."""
    here = os.path.abspath(info.path)
    return [b for b in infos if os.path.abspath(b.path) != here and ensemble_mismatch(info, b) is None]


def bundle_index(infos, name: str = "", path: str | None = None) -> int:
    """Which of ``infos`` (the model list) a saved name or a path means, or -1.

    A path picks that bundle. Among bundles sharing a name, a user bundle wins over an embedded
    one, as it does for ``veloxseg predict -m NAME`` (VeloxSegLib.bundle.find_bundle)."""
    if path:
        wanted = os.path.abspath(path)
        return next((i for i, b in enumerate(infos) if os.path.abspath(b.path) == wanted), -1)
    matches = [i for i, b in enumerate(infos) if b.name == name]
    users = [i for i in matches if infos[i].source == "user"]
    return (users or matches or [-1])[0]


#: The library's rule for bundle names (VeloxSegLib.bundle), also a safe folder name everywhere.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_model_name(name: str) -> str:
    """A new model name: a bundle name the library accepts and lists (letters, digits, . _ + -)."""
    name = (name or "").strip()
    if not _SAFE_NAME.match(name):
        raise InputError(f"model name '{name}' must be 1-128 characters, start with a letter or digit and use only "
                         "letters, digits, '.', '_', '+' or '-'")
    if name.endswith(".training"):  # a training work folder: never listed as a model
        raise InputError(f"model name '{name}' may not end in '.training' (the name of training work folders)")
    return name


def _validate_with_library(source: str) -> None:
    """The library's full check of a bundle (metadata, weights header), where it is importable:
    a bundle the model list would show as broken is refused at import, not copied."""
    try:
        from VeloxSegLib.bundle import load_bundle
        from VeloxSegLib.errors import VeloxSegError as LibraryError
    except ImportError:  # a stripped install: the metadata checks of read_bundle_info only
        return
    try:
        load_bundle(os.path.abspath(source))
    except LibraryError as exc:
        raise BundleError(str(exc)) from None


def import_bundle(source: str, models_dir: str | None = None) -> BundleInfo:
    """Copy a bundle folder or zip into the user models folder; the bundle is not modified."""
    info = read_bundle_info(source, "user")
    _validate_with_library(source)
    models_dir = models_dir or user_dir()
    target = os.path.join(models_dir, check_model_name(info.name))
    if os.path.exists(target):
        raise InputError(f"a model named '{info.name}' already exists in {models_dir}")
    os.makedirs(models_dir, exist_ok=True)
    if os.path.isdir(source):
        shutil.copytree(source, target)
    else:  # staged under a hidden name: a crash mid-import leaves nothing the model list shows
        staging = tempfile.mkdtemp(prefix=".veloxseg-import-", dir=models_dir)
        try:
            with zipfile.ZipFile(source) as zf:
                for member in zf.namelist():
                    resolved = os.path.realpath(os.path.join(staging, member))
                    if not resolved.startswith(os.path.realpath(staging) + os.sep):
                        raise BundleError(f"{source}: unsafe path in zip: {member}")
                zf.extractall(staging)
            root = staging
            entries = os.listdir(staging)
            if "bundle.json" not in entries and len(entries) == 1 and os.path.isdir(os.path.join(staging, entries[0])):
                root = os.path.join(staging, entries[0])
            shutil.move(root, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        shutil.rmtree(target, ignore_errors=True)
        raise BundleError(f"{source}: no model.safetensors")
    return read_bundle_info(target, "user")


# ----------------------------------------------------------------------------------------------
# Guessing which volume is which input, from names

_KEYWORDS = {
    "ct": ["ct", "hu", "cta", "ctac"],
    "pet": ["pet", "pt", "suv", "fdg", "psma"],
    "t1ce": ["t1ce", "t1c", "t1gd", "t1post", "gd", "contrast", "ce"],
    "t1": ["t1", "t1w", "t1pre", "mprage"],
    "t2": ["t2", "t2w"],
    "flair": ["flair", "t2flair"],
}


def _tokens(name: str):
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def _score(channel: dict, volume_name: str) -> int:
    tokens = _tokens(volume_name)
    joined = "".join(tokens)
    keys = []
    for field in ("name", "modality"):
        value = str(channel.get(field) or "").lower()
        if value:
            keys.append(value)
    score = 0
    for key in keys:
        words = _KEYWORDS.get(key, [key])
        if key in tokens:
            score = max(score, 3)
        elif any(w in tokens for w in words):
            score = max(score, 2)
        elif len(key) > 2 and key in joined:
            score = max(score, 1)
    # "t1" must not claim a "t1ce" volume
    if str(channel.get("name", "")).lower() == "t1" and any(w in tokens for w in _KEYWORDS["t1ce"]):
        score = 0
    return score


def guess_inputs(channels: list, volume_names: list) -> list:
    """For each channel, the index into ``volume_names`` of the best-named volume, or None.

    Each volume is used once; best scores are assigned first; when nothing matches, volumes are
    assigned in order so a single-input model still gets a volume.
    """
    pairs = sorted(((-_score(ch, name), ci, vi) for ci, ch in enumerate(channels) for vi, name in enumerate(volume_names)))
    result = [None] * len(channels)
    used = set()
    for neg, ci, vi in pairs:
        if neg == 0:
            break
        if result[ci] is None and vi not in used:
            result[ci] = vi
            used.add(vi)
    free = [vi for vi in range(len(volume_names)) if vi not in used]
    for ci in range(len(channels)):
        if result[ci] is None and free:
            result[ci] = free.pop(0)
    return result
