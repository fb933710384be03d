"""nnU-Net v2 raw datasets: the on-disk dataset format of VeloxSeg.

Layout (``file_ending`` is usually ``.nii.gz``)::

    DATASET/
      dataset.json                  channel_names, labels, numTraining, file_ending
      imagesTr/{case}_{0000..}{file_ending}
      labelsTr/{case}{file_ending}

Channel ``k`` of a case is ``imagesTr/{case}_{k:04d}{file_ending}``. Existing nnU-Net datasets
work unchanged; extra keys in ``dataset.json`` are kept.

Geometry vectors (size, spacing, origin) are in ITK order x, y, z throughout.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import InputError
from ..fsutil import make_folders, remove_empty_folders, swap_folder_into_place
from .io import read_image, write_image  # noqa: F401  (re-exported for dataset code)

PathLike = Union[str, os.PathLike]

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
DEFAULT_FILE_ENDING = ".nii.gz"

# Tolerances for "the same voxel grid" (labels vs images). Converted DICOM often differs in the last
# float digits; a spacing error of 1e-4 accumulates to 0.05 voxel over 512 voxels.
SPACING_RTOL = 1e-4
ORIGIN_TOL_FRACTION = 1e-2  # of the smallest spacing
DIRECTION_ATOL = 1e-4

# --------------------------------------------------------------------------- geometry


def grid_differences(a, b) -> List[str]:
    """How grid ``b`` differs from grid ``a`` (``alignment.Grid``), in words; empty when they are
    the same voxel grid."""
    out = []
    if tuple(a.size) != tuple(b.size):
        out.append(f"size {_fmt(a.size)} vs {_fmt(b.size)}")
    if any(abs(x - y) > SPACING_RTOL * max(abs(x), abs(y)) for x, y in zip(a.spacing, b.spacing)):
        out.append(f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)}")
    tol = ORIGIN_TOL_FRACTION * min(min(a.spacing), min(b.spacing))
    if any(abs(x - y) > tol for x, y in zip(a.origin, b.origin)):
        out.append(f"origin {_fmt(a.origin)} vs {_fmt(b.origin)}")
    if any(abs(x - y) > DIRECTION_ATOL for x, y in zip(a.direction, b.direction)):
        out.append("direction differs")
    return out


def _fmt(values) -> str:
    return "x".join(f"{float(v):g}" if isinstance(v, float) else str(v) for v in values)


def read_grid(path: PathLike):
    """The voxel grid (``alignment.Grid``) of an image file, from its header only."""
    import SimpleITK as sitk

    from .alignment import Grid

    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}': no such file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"'{path}': not a readable image ({_first_line(exc)})") from None
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"'{path}': expected a scalar image, got {reader.GetNumberOfComponents()} components")
    if reader.GetDimension() == 4 and size[3] == 1:
        d = reader.GetDirection()
        return Grid(tuple(int(v) for v in size[:3]), tuple(reader.GetOrigin()[:3]), tuple(reader.GetSpacing()[:3]),
                    tuple(d[0:3] + d[4:7] + d[8:11]))
    if reader.GetDimension() != 3 or min(size) == 1:
        raise InputError(f"'{path}': expected a 3D volume, got size {tuple(size)}")
    return Grid.of(reader)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


# --------------------------------------------------------------------------- dataset.json


@dataclass
class Dataset:
    """An nnU-Net v2 raw dataset on disk."""

    root: Path
    channel_names: Dict[str, str]
    labels: Dict[str, object]
    num_training: int
    file_ending: str = DEFAULT_FILE_ENDING
    cases: List[str] = field(default_factory=list)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def channel_list(self) -> List[str]:
        """Channel names in channel order."""
        return [self.channel_names[str(i)] for i in range(self.num_channels)]

    def image_path(self, case: str, channel: int) -> Path:
        return self.root / IMAGES_DIR / image_file_name(case, channel, self.file_ending)

    def image_paths(self, case: str) -> List[Path]:
        return [self.image_path(case, c) for c in range(self.num_channels)]

    def label_path(self, case: str) -> Path:
        return self.root / LABELS_DIR / f"{case}{self.file_ending}"

    def label_values(self) -> List[Tuple[int, str]]:
        """``(value, name)`` of every plain label value, sorted by value.

        Region-based datasets (a label mapping to a list of values) are reduced to the values
        they use; a value named by a single-valued entry keeps that name.
        """
        named: Dict[int, str] = {}
        used = set()
        for name, value in self.labels.items():
            if isinstance(value, (list, tuple)):
                used.update(int(v) for v in value)
            else:
                named[int(value)] = name
                used.add(int(value))
        return [(v, named.get(v, "background" if v == 0 else f"label_{v}")) for v in sorted(used)]


def image_file_name(case: str, channel: int, file_ending: str = DEFAULT_FILE_ENDING) -> str:
    return f"{case}_{channel:04d}{file_ending}"


def parse_dataset_json(data: dict, where: str) -> Tuple[Dict[str, str], Dict[str, object], int, str]:
    """Validate the required keys of a dataset.json dict. Errors name ``where``."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object")
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in data:
            if key == "channel_names" and "modality" in data:
                raise InputError(f"{where}: nnU-Net v1 'modality' found; convert to v2 'channel_names'")
            raise InputError(f"{where}: missing key {key!r}")
    channels = data["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise InputError(f"{where}: 'channel_names' must be a non-empty object")
    if sorted(channels) != [str(i) for i in range(len(channels))]:
        raise InputError(f"{where}: 'channel_names' keys must be \"0\"..\"{len(channels) - 1}\"")
    if not all(isinstance(v, str) and v for v in channels.values()):
        raise InputError(f"{where}: 'channel_names' values must be non-empty strings")
    labels = data["labels"]
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{where}: 'labels' must be a non-empty object")
    values = []
    for name, value in labels.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
            raise InputError(f"{where}: label {name!r} must be a non-negative integer (or a list of them)")
        if not isinstance(value, (list, tuple)):
            values.append(value)
    background = labels.get("background")
    if background != 0:  # (bools were refused above)
        got = "it lacks 'background'" if "background" not in labels else f"got {background!r}"
        raise InputError(f"{where}: 'labels' must map 'background' to 0, as nnU-Net requires ({got})")
    if len(set(values)) != len(values):
        raise InputError(f"{where}: two labels share a value")
    plain = sorted(set(values))
    if not any(isinstance(v, (list, tuple)) for v in labels.values()) and plain != list(range(len(plain))):
        raise InputError(f"{where}: label values must be consecutive 0..{len(plain) - 1}, got {plain}")
    num = data["numTraining"]
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        raise InputError(f"{where}: 'numTraining' must be a non-negative integer")
    ending = data["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputError(f"{where}: 'file_ending' must be a string like '.nii.gz'")
    return dict(channels), dict(labels), num, ending


def read_dataset_json(root: PathLike) -> dict:
    path = Path(root) / DATASET_JSON
    if not Path(root).is_dir():
        raise InputError(f"{root}: not a directory")
    if not path.is_file():
        raise InputError(f"{path}: missing (not an nnU-Net raw dataset)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from None


def make_dataset_json(
    channel_names: Union[Sequence[str], Dict[str, str]],
    labels: Dict[str, object],
    num_training: int,
    file_ending: str = DEFAULT_FILE_ENDING,
    **extra,
) -> dict:
    """Build a dataset.json dict (validated). ``channel_names`` may be a list in channel order."""
    if not isinstance(channel_names, dict):
        channel_names = {str(i): str(n) for i, n in enumerate(channel_names)}
    data = {
        "channel_names": dict(channel_names),
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    data.update(extra)
    parse_dataset_json(data, DATASET_JSON)
    return data


def write_dataset_json(root: PathLike, data: dict) -> Path:
    """Validate and write ``dataset.json`` atomically."""
    parse_dataset_json(data, DATASET_JSON)
    path = Path(root) / DATASET_JSON
    write_json_atomic(path, data)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: PathLike, data) -> None:
    """Write JSON to a temporary sibling, then rename it into place (usual file permissions)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- listing and validation


def list_cases(root: PathLike, file_ending: Optional[str] = None) -> List[str]:
    """Case identifiers of a dataset: the label files in ``labelsTr`` (sorted)."""
    root = Path(root)
    if file_ending is None:
        file_ending = parse_dataset_json(read_dataset_json(root), str(root / DATASET_JSON))[3]
    labels_dir = root / LABELS_DIR
    if not labels_dir.is_dir():
        raise InputError(f"{labels_dir}: missing")
    return sorted(
        p.name[: -len(file_ending)]
        for p in labels_dir.iterdir()
        if p.name.endswith(file_ending) and not p.name.startswith(".")
    )


def load_dataset(root: PathLike) -> Dataset:
    """Read ``dataset.json`` and check the file layout: every labelled case has every channel,
    no image lacks a label, ``numTraining`` matches. Reads no image data."""
    root = Path(root)
    raw = read_dataset_json(root)
    channels, labels, num, ending = parse_dataset_json(raw, str(root / DATASET_JSON))
    extra = {k: v for k, v in raw.items() if k not in ("channel_names", "labels", "numTraining", "file_ending")}
    images_dir = root / IMAGES_DIR
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: missing")
    cases = list_cases(root, ending)
    if not cases:
        raise InputError(f"{root / LABELS_DIR}: no label files ending in {ending!r}")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    found: Dict[str, set] = {}
    for p in images_dir.iterdir():
        if p.name.startswith("."):
            continue
        m = pattern.match(p.name)
        if m:
            found.setdefault(m.group("case"), set()).add(int(m.group("ch")))
    wanted = set(range(len(channels)))
    for case in cases:
        have = found.get(case, set())
        missing = sorted(wanted - have)
        if missing:
            names = ", ".join(f"{channels[str(c)]} ({image_file_name(case, c, ending)})" for c in missing)
            raise InputError(f"{root.name}: case {case!r} lacks channel {names}")
        unexpected = sorted(have - wanted)
        if unexpected:
            raise InputError(
                f"{root.name}: case {case!r} has image {image_file_name(case, unexpected[0], ending)} "
                f"but dataset.json declares {len(channels)} channel(s)"
            )
    orphans = sorted(set(found) - set(cases))
    if orphans:
        raise InputError(f"{root.name}: case {orphans[0]!r} has images in {IMAGES_DIR} but no label in {LABELS_DIR}")
    if num != len(cases):
        raise InputError(f"{root / DATASET_JSON}: numTraining is {num} but {LABELS_DIR} holds {len(cases)} case(s)")
    return Dataset(root, channels, labels, num, ending, cases, extra)


def case_geometry_problems(image_paths: Sequence[Path], label_path: Optional[Path] = None, channel_names=None,
                           same_grid: bool = False) -> List[str]:
    """Problems with one case's grids (reads headers only).

    Every channel must share channel 0's physical space: overlap it (``same_grid=False``; a PET
    on its own coarser grid is fine and is aligned when loaded) or lie on exactly its voxel grid
    (``same_grid=True``, what nnU-Net itself requires). The label must lie on channel 0's grid.
    """
    from .alignment import overlap_fraction

    problems = []
    names = list(channel_names) if channel_names else [f"channel {i}" for i in range(len(image_paths))]
    ref = read_grid(image_paths[0])
    for name, path in zip(names[1:], image_paths[1:]):
        grid = read_grid(path)
        if same_grid:
            diff = grid_differences(ref, grid)
            if diff:
                problems.append(f"{name} is not on {names[0]}'s voxel grid ({'; '.join(diff)})")
        elif overlap_fraction(ref, grid) <= 0.0:
            problems.append(f"{name} does not overlap {names[0]} in physical space (origin {_fmt(grid.origin)} "
                            f"vs {_fmt(ref.origin)}); check origins and orientation")
    if label_path is not None:
        diff = grid_differences(ref, read_grid(label_path))
        if diff:
            problems.append(f"label does not match the image grid of {names[0]} ({'; '.join(diff)})")
    return problems


def validate_dataset(root: PathLike, check_geometry: bool = True, same_grid: bool = False) -> Dataset:
    """``load_dataset`` plus, per case, the checks of ``case_geometry_problems``.

    Raises ``InputError`` naming the first inconsistent case.
    """
    ds = load_dataset(root)
    if check_geometry:
        for case in ds.cases:
            problems = case_geometry_problems(ds.image_paths(case), ds.label_path(case), ds.channel_list, same_grid)
            if problems:
                raise InputError(f"{ds.root.name}: case {case!r}: {problems[0]}")
    return ds


# --------------------------------------------------------------------------- atomic output


# What a raw dataset folder may hold for ``overwrite`` to replace it: what this tool (convert,
# phantom, plan) or nnU-Net puts there. Anything else means the folder is not a dataset.
DATASET_ENTRIES = frozenset({DATASET_JSON, IMAGES_DIR, LABELS_DIR, "imagesTs", "labelsTs", "plans.json"})


def _is_dataset_like_dir(path: Path) -> bool:
    """``path`` looks like an nnU-Net raw dataset this tool could have written: a real folder
    holding ``dataset.json`` and nothing but dataset entries (``DATASET_ENTRIES``)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return DATASET_JSON in names and (path / DATASET_JSON).is_file() and names <= DATASET_ENTRIES


def check_output_folder(output: PathLike, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> None:
    """Refuse an output folder that would clobber something: one that is, contains or is inside an
    input folder (symlinks resolved), an existing non-folder, a non-empty folder without
    ``overwrite``, and with ``overwrite`` a non-empty folder that is not a dataset folder."""
    output = Path(output)
    real = Path(os.path.realpath(output))
    for src in inputs:
        src_real = Path(os.path.realpath(src))
        if real == src_real:
            raise InputError(f"{output}: is the input folder '{src}'; choose another output folder")
        if src_real in real.parents:
            raise InputError(f"{output}: is inside the input folder '{src}'; choose another output folder")
        if real in src_real.parents:
            raise InputError(f"{output}: contains the input folder '{src}'; not replacing it")
    if output.is_symlink() or output.exists():
        if output.is_symlink() or not output.is_dir():
            what = "a symbolic link" if output.is_symlink() else "not a directory"
            raise InputError(f"{output}: exists and is {what}; not replacing it")
        try:
            empty = not any(output.iterdir())
        except OSError as exc:
            raise InputError(f"{output}: cannot be read ({exc.strerror or exc})") from None
        if not empty:
            if not overwrite:
                raise InputError(f"{output}: exists and is not empty (use --overwrite to replace it)")
            if not _is_dataset_like_dir(output):
                raise InputError(f"{output}: exists and is not a dataset folder; not replacing it")


@contextlib.contextmanager
def atomic_directory(output: PathLike, overwrite: bool = False,
                     inputs: Sequence[PathLike] = (), check=None) -> Iterator[Path]:
    """Yield a temporary directory next to ``output``; on success it is renamed to ``output``,
    on any error (or Ctrl-C) it is removed, so a failed run leaves nothing behind: missing parent
    folders are created, and removed again (if still empty) when the run fails.

    ``check_output_folder`` decides first: ``output`` must not be, contain or lie inside one of
    ``inputs``; an existing non-empty ``output`` is refused unless ``overwrite``, and even then
    only a dataset folder is replaced (after the new content is complete). ``check`` replaces
    that rule (same arguments) for outputs of another kind.
    """
    check = check or check_output_folder
    check(output, overwrite, inputs)
    output = Path(output).absolute()
    parent = output.parent
    created = make_folders(parent)
    try:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=str(parent)))
        except OSError as exc:
            raise InputError(f"{parent}: cannot write here ({exc.strerror or exc})") from None
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
            if output.exists() or output.is_symlink():
                check(output, overwrite, inputs)  # it may have changed meanwhile
                swap_folder_into_place(tmp, output)
            else:
                os.rename(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        remove_empty_folders(created)
        raise
