"""Reading and writing volumes with SimpleITK.

Every reader keeps the image's origin, spacing and direction (ITK/LPS physical space) and
rejects, with an :class:`~VeloxSegLib.errors.InputError` naming the file, anything the
pipeline cannot segment: a missing, unreadable, corrupt or truncated file, a 2D or 4D image, a
multi-component (RGB/vector) image, or NaN/infinite voxels.

Writers never leave a partial file: they write to a hidden temporary name in the destination
folder and move it into place with :func:`os.replace`.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import secrets
import struct
import sys
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: File endings SimpleITK reads as one volume (lower case, longest first).
IMAGE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Endings we write (single-file formats only, so the atomic rename moves everything).
WRITE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")

_SINGLE_FILE_HINT = "use .nii.gz, .nii, .nrrd or .mha"


def split_extension(path: PathLike) -> tuple:
    """``("dir/case", ".nii.gz")`` for ``dir/case.nii.gz``; the ending is matched case-insensitively."""
    s = os.fspath(path)
    low = s.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext):
            return s[: -len(ext)], s[-len(ext):]
    root, ext = os.path.splitext(s)
    return root, ext


# --------------------------------------------------------------------------- reading


def _describe(path: Path) -> str:
    return f"'{path}'"


def _dicom_series_files(folder: Path) -> List[str]:
    reader = sitk.ImageSeriesReader
    # GDCM warns at length on stderr about a folder without a series: our one line says it
    with _native_stderr_held():
        try:
            series = reader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError as exc:  # pragma: no cover - GDCM failure on an unreadable folder
            raise InputError(f"{_describe(folder)}: cannot scan folder for DICOM series ({_first_line(exc)})") from None
        if not series:
            raise InputError(f"{_describe(folder)}: folder holds no DICOM series (pass an image file or a DICOM series folder)")
        if len(series) > 1:
            raise InputError(
                f"{_describe(folder)}: folder holds {len(series)} DICOM series ({', '.join(series)}); "
                "put each series in its own folder")
        files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) < 2:
        raise InputError(f"{_describe(folder)}: DICOM series has a single slice (a 2D image); a 3D volume is needed")
    return list(files)


def _first_line(exc: BaseException) -> str:
    """SimpleITK errors are multi-line ITK dumps; keep the informative line, shortened."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    picked = next((ln for ln in lines if "ERROR" in ln), lines[-1])
    picked = re.sub(r"^.*?ERROR:\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", picked)
    return picked[:200] or lines[-1][:200]


_STDERR_LOCK = threading.RLock()


@contextlib.contextmanager
def _native_stderr_held():
    """Hold back what ITK/niftilib/MetaIO print on the C-level stderr during the block.

    Their multi-line messages about a broken file would bury our one-line error: if the block
    raises, they go to the debug log; if it succeeds, they are written out afterwards.
    (While held, anything else written to file descriptor 2 is held back too.)
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. embedded): nothing to do
        yield
        return
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass
        saved = os.dup(fd)
        ok = False
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), fd)
            try:
                yield
                ok = True
            finally:
                os.dup2(saved, fd)
                os.close(saved)
                tmp.seek(0)
                data = tmp.read()
                if data and ok:
                    os.write(fd, data)
                elif data:
                    log.debug("native messages: %s", data.decode("utf-8", "replace").strip())


_NIFTI_DTYPE_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8,
                      1280: 8, 1536: 16, 1792: 16, 2048: 32, 2304: 4}
_NIFTI_FLOAT = {16: "f4", 64: "f8"}


def _nifti_layout(header: bytes):
    """(data offset, data bytes, numpy float dtype or None) from a NIfTI-1/2 header, or None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            dtype = struct.unpack(endian + "h", header[70:72])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            dtype = struct.unpack(endian + "h", header[12:14])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or dtype not in _NIFTI_DTYPE_BYTES:
        return None
    n = 1
    for d in dims[1:ndim + 1]:
        n *= max(int(d), 1)
    offset = max(offset, 348)
    fdt = np.dtype(endian + _NIFTI_FLOAT[dtype]) if dtype in _NIFTI_FLOAT else None
    return offset, n * _NIFTI_DTYPE_BYTES[dtype], fdt


def _count_non_finite(buf: bytes, dtype) -> int:
    a = np.frombuffer(buf, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(a, dtype=np.float64)):
            return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def _scan_nifti(path: Path) -> None:
    """Checks ITK cannot do for NIfTI: ITK reads a truncated .nii/.nii.gz without complaint
    (missing voxels become zeros) and silently replaces NaN/inf voxels by 0. So: the file must
    hold every byte its header announces, and float data must be finite.

    Integer data in .nii.gz: the gzip trailer's length field is compared (no decompression); a
    mismatch (or float data) streams the decompressed bytes once, chunk by chunk.
    """
    name = path.name.lower()
    gz = name.endswith(".nii.gz")
    if not (gz or name.endswith(".nii")):
        return
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
        if layout is None:
            return
        offset, nbytes, fdt = layout
        expected = offset + nbytes
        if not gz:
            size = path.stat().st_size
            if size < expected:
                raise InputError(f"{_describe(path)}: truncated image file ({size} of {expected} bytes)")
            bad = 0
            if fdt is not None:
                data = np.memmap(path, dtype=fdt, mode="r", offset=offset, shape=(nbytes // fdt.itemsize,))
                step = 1 << 22
                for i in range(0, data.size, step):
                    bad += _count_non_finite(data[i:i + step], fdt)
                del data
        else:
            if fdt is None:
                with open(path, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    if struct.unpack("<I", f.read(4))[0] == expected % 2 ** 32:
                        return
            total, bad, pending = 0, 0, b""
            with gzip.open(path, "rb") as f:
                while True:
                    chunk = f.read(1 << 23)
                    if not chunk:
                        break
                    start = total
                    total += len(chunk)
                    if fdt is None or total <= offset or start >= expected:
                        continue
                    chunk = chunk[max(offset - start, 0):expected - start]
                    chunk = pending + chunk
                    keep = len(chunk) - len(chunk) % fdt.itemsize
                    bad += _count_non_finite(chunk[:keep], fdt)
                    pending = chunk[keep:]
            if total < expected:
                raise InputError(f"{_describe(path)}: truncated image file ({total} of {expected} bytes)")
        if bad:
            raise InputError(f"{_describe(path)}: image holds {bad} NaN or infinite voxel(s); "
                             "fix or mask them first")
    except (EOFError, OSError, zlib.error, struct.error) as exc:
        raise InputError(f"{_describe(path)}: corrupt or truncated image ({exc})") from None


def _check_header(path: Path, dim: int, size: Sequence[int], components: int) -> None:
    if components != 1:
        raise InputError(f"{_describe(path)}: image has {components} components per voxel (RGB/vector); "
                         "a scalar 3D volume is needed")
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise InputError(f"{_describe(path)}: is a 2D image (size {tuple(size)}); a 3D volume is needed")
    if dim == 4 and size[3] > 1:
        raise InputError(f"{_describe(path)}: is a 4D image ({size[3]} volumes of {tuple(size[:3])}); "
                         "pass one 3D volume per file")
    if dim not in (3, 4):
        raise InputError(f"{_describe(path)}: is a {dim}D image; a 3D volume is needed")


def _reduce_4d(image: sitk.Image) -> sitk.Image:
    """A 4D image with a single time point becomes the 3D volume it holds."""
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return image


def check_finite(image: sitk.Image, name: str) -> None:
    """Raise InputError if a floating-point image holds NaN or infinite voxels.

    A float32 sum is finite exactly when every voxel is finite (barring overflow of real data,
    which is re-checked), so the common case costs one pass and no temporary array.
    """
    arr = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(arr.dtype, np.floating):
        return
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(arr, axis=None)
    if np.isfinite(total):
        return
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        what = []
        if n_nan:
            what.append(f"{n_nan} NaN")
        if bad - n_nan:
            what.append(f"{bad - n_nan} infinite")
        raise InputError(f"{name}: image holds {' and '.join(what)} voxel(s); fix or mask them first")


def check_image(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Validate an in-memory image as :func:`read_image` validates a file; returns a 3D image."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name}: expected a SimpleITK image, got {type(image).__name__}")
    _check_header(Path(name), image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    image = _reduce_4d(image)
    check_finite(image, name)
    return image


def read_image(path: PathLike) -> sitk.Image:
    """Read one 3D scalar volume (NIfTI, NRRD, MHA/MHD, or a folder with one DICOM series).

    The pixel type is kept as stored (an int16 CT stays int16: half the memory of float32);
    origin, spacing and direction are those of the file. Raises InputError naming the file for
    a missing, unreadable, corrupt or truncated file, a 2D/4D/vector image, or NaN/inf voxels.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise InputError(f"{_describe(p)}: no such file or folder")
    if p.is_dir():
        files = _dicom_series_files(p)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
    else:
        reader = _checked_file_reader(p)
        _scan_nifti(p)
    try:
        with _native_stderr_held():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{_describe(p)}: corrupt or truncated image ({_first_line(exc)})") from None
    _check_header(p, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    image = _reduce_4d(image)
    check_finite(image, _describe(p))
    return image


def _checked_file_reader(p: Path) -> sitk.ImageFileReader:
    """A reader for the image file ``p`` whose header has been read and checked: the file is
    readable and not empty, and holds a 3D scalar volume (or one 4D volume)."""
    if not os.access(p, os.R_OK):
        raise InputError(f"{_describe(p)}: file is not readable (permission denied)")
    if p.stat().st_size == 0:
        raise InputError(f"{_describe(p)}: file is empty")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with _native_stderr_held():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{_describe(p)}: not a readable image ({_first_line(exc)})") from None
    _check_header(p, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
    return reader


def check_image_header(path: PathLike) -> None:
    """What :func:`read_image` checks without reading the voxels (for checking a whole folder of
    cases before the first one runs). A DICOM folder is only checked to exist."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise InputError(f"{_describe(p)}: no such file or folder")
    if not p.is_dir():
        _checked_file_reader(p)


def read_images(paths: Iterable[PathLike]) -> List[sitk.Image]:
    return [read_image(p) for p in paths]


_PIXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8, sitk.sitkUInt64: 8, sitk.sitkInt64: 8}


class PrefetchedImage:
    """An image file being read by :func:`prefetch_images` in a background thread.

    ``result()`` waits and returns the image, or raises what :func:`read_image` raised. It is
    path-like (``os.fspath`` gives the file), so it can stand in for the path anywhere.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self._done = threading.Event()
        self._image: Optional[sitk.Image] = None
        self._error: Optional[BaseException] = None

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"PrefetchedImage({self.path!r})"

    def result(self) -> sitk.Image:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._image

    def take(self) -> sitk.Image:
        """Like ``result()``, but forget the image: the caller becomes its only owner (so it
        is freed as soon as the caller drops it)."""
        image = self.result()
        self._image = None
        return image

    def nbytes_hint(self) -> int:
        """Voxel bytes announced by the file's header (0 if unknown); read before reading."""
        try:
            if os.path.isdir(self.path):
                return 0
            reader = sitk.ImageFileReader()
            reader.SetFileName(self.path)
            with _native_stderr_held():
                reader.ReadImageInformation()
            n = 1
            for s in reader.GetSize():
                n *= int(s)
            return n * reader.GetNumberOfComponents() * _PIXEL_BYTES.get(reader.GetPixelID(), 4)
        except Exception:  # noqa: BLE001 - the real read reports the problem
            return 0

    def _run(self) -> None:
        try:
            self._image = read_image(self.path)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of result()
            self._error = exc
        finally:
            self._done.set()


def wait_prefetched(items: Iterable) -> None:
    """Block until every :class:`PrefetchedImage` in ``items`` is finished (errors ignored)."""
    for item in items:
        if isinstance(item, PrefetchedImage):
            item._done.wait()


def prefetch_images(paths: Iterable[PathLike]) -> List[PrefetchedImage]:
    """Start reading (and validating) files in one background daemon thread, in order.

    SimpleITK releases the GIL while it reads, so a command line can read its inputs while it
    imports torch and builds the network. Errors surface when ``result()`` is called.
    """
    items = [PrefetchedImage(p) for p in paths]

    def work():
        # largest first: its reading transient (ITK holds the file's voxels twice while reading)
        # then falls while less else is loaded
        order = sorted(items, key=lambda it: -it.nbytes_hint())
        for item in order:
            item._run()

    threading.Thread(target=work, name="veloxseg-prefetch", daemon=True).start()
    return items


# --------------------------------------------------------------------------- geometry


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True if both images sample the same voxel grid (size, and origin/spacing/direction within tol)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol * max(1.0, max(a.GetSpacing())))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def copy_geometry(target: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Set origin, spacing and direction of ``target`` to exactly those of ``reference``."""
    target.SetOrigin(reference.GetOrigin())
    target.SetSpacing(reference.GetSpacing())
    target.SetDirection(reference.GetDirection())
    return target


# --------------------------------------------------------------------------- writing


def check_output_path(path: PathLike, *, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> Path:
    """Validate an output file path before any work is done; returns it as a Path.

    Errors: the folder does not exist, the path is a folder, the file exists and ``overwrite``
    is false, the ending is not a single-file image format, or it names one of the inputs.
    """
    p = Path(os.fspath(path))
    ext = split_extension(p)[1].lower()
    if ext not in WRITE_EXTENSIONS:
        raise InputError(f"'{p}': unsupported output file ending '{ext or '(none)'}'; {_SINGLE_FILE_HINT}")
    return check_output_file(p, overwrite=overwrite, inputs=inputs, what="an output file")


#: Files a folder input is made of besides images: never an output's target.
_INPUT_FOLDER_FILES = ("dataset.json", "bundle.json", "model.safetensors")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_output_file(path: PathLike, *, overwrite: bool = False, inputs: Sequence[PathLike] = (),
                      sealed: Sequence[PathLike] = (), what: str = "a JSON file") -> Path:
    """Validate an output file before any work is done; returns it as a Path (images go through
    :func:`check_output_path`, which checks their ending first).

    Refused: a missing parent folder, a folder, an existing file without ``overwrite``, one of
    ``inputs`` (files or folders; inside a folder input, its images and its dataset.json,
    bundle.json or weights), and anything inside a ``sealed`` folder (a source bundle).
    """
    p = Path(os.fspath(path))
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"'{p}': output folder '{parent}' does not exist")
    if p.is_dir():
        raise InputError(f"'{p}': is a folder, expected {what} name")
    target = p.resolve()
    for i in inputs:
        q = Path(os.fspath(i)).resolve()
        if target == q:
            raise InputError(f"'{p}': output would overwrite an input")
        if q.is_dir() and _inside(target, q) and (
                split_extension(target.name)[1].lower() in IMAGE_EXTENSIONS or target.name in _INPUT_FOLDER_FILES):
            raise InputError(f"'{p}': output would overwrite a file of the input folder '{i}'")
    for folder in sealed:
        q = Path(os.fspath(folder)).resolve()
        if q.is_dir() and _inside(target, q):
            raise InputError(f"'{p}': is inside the bundle '{folder}', which is never modified")
    if p.exists() and not overwrite:
        raise InputError(f"'{p}': output exists (pass --overwrite to replace it)")
    return p


def write_text_atomic(text: str, path: PathLike) -> None:
    """Write ``text`` to a hidden temporary sibling of ``path``, then rename it onto ``path``."""
    path = Path(os.fspath(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"'{path}': cannot be written ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def check_writable_folder(folder: PathLike) -> None:
    """Fail now, not after the work, when nothing can be created in ``folder``."""
    folder = Path(os.fspath(folder)) if str(folder) else Path(".")
    probe = folder / f".veloxseg-write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        raise InputError(f"'{folder}': cannot write here ({exc.strerror or exc})") from None
    try:
        probe.unlink()
    except OSError:
        pass


def temporary_path_for(path: PathLike) -> Path:
    """A hidden, unique sibling of ``path`` with the same ending (so the right writer is chosen)."""
    p = Path(os.fspath(path))
    root, ext = split_extension(p.name)
    return p.with_name(f".{root}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ext}")


def write_image(image: sitk.Image, path: PathLike, *, overwrite: bool = False, compress: bool = True,
                cancel=None) -> Path:
    """Write ``image`` to ``path`` atomically (temporary sibling, then :func:`os.replace`).

    ``cancel``: optional callable returning True to abort; checked after writing, before the
    rename, so a cancelled run leaves nothing behind.
    """
    p = check_output_path(path, overwrite=overwrite)
    tmp = temporary_path_for(p)
    try:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            raise InputError(f"'{p}': cannot write image ({_first_line(exc)})") from None
        if cancel is not None and cancel():
            from ..errors import Cancelled

            raise Cancelled("cancelled")
        if p.exists() and not overwrite:  # appeared while we were working
            raise InputError(f"'{p}': output exists (pass --overwrite to replace it)")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:  # pragma: no cover
                log.warning("could not remove temporary file %s", tmp)
    return p


__all__ = [
    "IMAGE_EXTENSIONS", "WRITE_EXTENSIONS", "split_extension", "read_image", "read_images", "check_image",
    "check_finite", "check_image_header", "PrefetchedImage", "prefetch_images", "wait_prefetched", "same_geometry", "copy_geometry", "check_output_path", "check_output_file", "write_text_atomic", "check_writable_folder", "temporary_path_for", "write_image",
]
