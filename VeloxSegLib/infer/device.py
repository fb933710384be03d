"""Device choice, CPU threads, mixed precision, and the out-of-memory fallback.

``auto`` picks CUDA, then Apple MPS, then the CPU. On a GPU the network runs under autocast
(float16 on CUDA); on an out-of-memory error the window batch is halved, and at a batch of one
the run moves to the CPU with a warning.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: Optional[str] = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu. An explicit device that is absent is a ConfigError."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available to this torch build; use --device cpu or auto")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("--device mps: Apple MPS is not available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device '{name}'; expected one of {', '.join(DEVICES)}")
    return dev


def set_threads(threads: Optional[int]) -> int:
    """Set torch's (and SimpleITK's) CPU thread count; None keeps the current. Returns it."""
    if threads is not None:
        threads = int(threads)
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    n = torch.get_num_threads()
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except Exception:  # pragma: no cover - SimpleITK builds without the setter
        pass
    return n


def autocast(device: torch.device):
    """Mixed precision on GPUs (float16 CUDA autocast); a no-op on CPU and MPS."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN can run bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def default_batch_size(device: torch.device) -> int:
    """Windows per forward pass: 1 on CPU (no gain from batching), 4 on a GPU."""
    return 1 if device.type == "cpu" else 4


__all__ = ["DEVICES", "resolve_device", "set_threads", "autocast", "is_oom", "empty_cache", "default_batch_size"]
