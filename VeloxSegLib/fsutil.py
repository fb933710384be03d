"""Small file-system steps shared by the writers of datasets and bundles (standard library only)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


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
