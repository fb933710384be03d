"""Small file-system steps shared by the writers of datasets and bundles (standard library only)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import List, Sequence

from .errors import InputError


def make_folders(folder: os.PathLike) -> List[Path]:
    """Create ``folder`` and its missing parents; return those this call created, deepest first
    (for :func:`remove_empty_folders` when the work that needed them fails)."""
    missing = []
    p = Path(folder).absolute()
    while not (p.exists() or p.is_symlink()) and p.parent != p:
        missing.append(p)
        p = p.parent
    created: List[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if d.is_dir():
                continue  # created meanwhile by someone else: not ours to remove
            remove_empty_folders(created)
            raise InputError(f"{d}: cannot create the folder (a file is in the way)") from None
        except OSError as exc:
            remove_empty_folders(created)
            raise InputError(f"{d}: cannot create the folder ({exc.strerror or exc})") from None
        created.insert(0, d)
    return created


def nearest_existing(path: os.PathLike) -> Path:
    """``path`` if it exists, else its nearest existing parent (where a folder would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for d in folders:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError:
            break  # not empty (someone else wrote there): keep it and its parents


def swap_folder_into_place(new: os.PathLike, target: os.PathLike) -> None:
    """Replace the existing folder ``target`` by the finished folder ``new`` (same parent folder).

    The old folder is moved aside under a hidden name, ``new`` is renamed onto ``target``, and only
    then is the old one removed; if that rename fails (or is interrupted) the old folder is put back,
    so ``target`` always holds a complete folder.
    """
    target = Path(target)
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
