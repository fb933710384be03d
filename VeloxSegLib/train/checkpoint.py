"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint ``NAME.safetensors`` holds

- tensors: ``model.<key>`` (the full training model, teachers included) and ``optim.<i>.<name>``
  (per-parameter optimizer state such as Adam moments);
- metadata ``veloxseg_checkpoint``: a JSON document with everything else: epoch and step,
  optimizer hyper-parameters, schedule, sampler and gradient-scaler state, the random generator
  states of every rank (Python, NumPy, torch CPU/CUDA; :func:`capture_rng`), running sums of
  the epoch in progress, the training history.

The JSON is also written beside it as ``NAME.json`` for people to read; the copy inside the
safetensors file is the one loaded, so a checkpoint is a single file replaced atomically
(temporary file, fsync, ``os.replace``): an interruption leaves either the old or the new one.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import InputError

CHECKPOINT_FORMAT = 1
META_KEY = "veloxseg_checkpoint"
SUFFIX = ".safetensors"


# --------------------------------------------------------------------------- random generators


def capture_rng() -> Dict[str, Any]:
    """Global generator states (Python, NumPy legacy, torch CPU and CUDA) as JSON data."""
    st = np.random.get_state()
    version, internal, gauss = random.getstate()
    out = {
        "python": [version, list(internal), gauss],
        "numpy_legacy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(js: Dict[str, Any]) -> None:
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy_legacy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(js["torch"], dtype=torch.uint8))
    cuda = js.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


# --------------------------------------------------------------------------- optimizer


def flatten_optimizer(optimizer: torch.optim.Optimizer):
    """(tensors, json) for ``optimizer.state_dict()``: tensors named ``optim.<i>.<name>``."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Dict[str, torch.Tensor], js: Dict[str, Any]) -> dict:
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in js.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": js["param_groups"]}


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state`` (the JSON document) and its ``tensors``."""

    path: Path
    state: Dict[str, Any]
    tensors: Dict[str, torch.Tensor]

    def model_state(self) -> Dict[str, torch.Tensor]:
        return {k[len("model."):]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def optimizer_state(self) -> dict:
        return unflatten_optimizer(self.tensors, self.state["optimizer"])


class CheckpointWriter:
    """Writes ``last``/``best`` (or any name) checkpoints into one folder, atomically."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, model_state: Dict[str, torch.Tensor], state: Dict[str, Any],
             optimizer: Optional[torch.optim.Optimizer] = None) -> Path:
        from safetensors.torch import save as st_save

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
        doc = dict(state, format=CHECKPOINT_FORMAT)
        if optimizer is not None:
            opt_tensors, opt_json = flatten_optimizer(optimizer)
            tensors.update(opt_tensors)
            doc["optimizer"] = opt_json
        text = json.dumps(doc, allow_nan=True)
        path = self.path(name)
        _write_atomic(path, st_save(tensors, metadata={META_KEY: text}))
        _write_atomic(path.with_suffix(".json"), (json.dumps(doc, indent=1, allow_nan=True) + "\n").encode())
        return path


def read_checkpoint(path) -> Checkpoint:
    """Load a checkpoint written by :class:`CheckpointWriter` (safetensors; nothing unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise InputError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if META_KEY not in meta:
        raise InputError(f"{path}: not a VeloxSeg training checkpoint (no '{META_KEY}' metadata)")
    state = json.loads(meta[META_KEY])
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint format {state.get('format')} is not supported")
    return Checkpoint(path, state, tensors)


__all__ = ["Checkpoint", "CheckpointWriter", "read_checkpoint", "capture_rng", "restore_rng",
           "flatten_optimizer", "unflatten_optimizer", "CHECKPOINT_FORMAT"]
