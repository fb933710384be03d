"""Device choice, CPU threads, mixed precision, and the out-of-memory fallback.

``auto`` picks CUDA, then Apple MPS, then the CPU. On a GPU the network runs under autocast
(float16 on CUDA); on an out-of-memory error the window batch is halved, and at a batch of one
the run moves to the CPU with a warning.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(mmap_mb: int = 32, trim_mb: int = 64) -> bool:
    """Let glibc's malloc keep freed blocks of up to ``mmap_mb`` MB in the heap instead of
    handing them back to the system (process-wide; Linux with glibc only; returns whether it was
    applied).

    Every sliding window frees and re-allocates the same activations (up to 7 MB for VeloxSeg-B
    at 96^3). glibc's default returns many of them to the system, so the next window takes a
    page fault for every 4 KB it touches again: 580-2,500 per 96^3 forward pass (measured over
    20 passes), kernel page zeroing that costs most in slow spells (median pass time 5% higher).
    With these limits (the ceilings glibc's own adaptive limits grow to) about 100 remain. The
    cost: up to ``trim_mb`` MB of freed memory stays with the process. The ``veloxseg`` command
    sets this for itself (the Slicer panel runs it); library users may call it. Skipped when
    ``VELOXSEG_MALLOC=default`` or when the user tuned malloc through ``MALLOC_*`` or
    ``GLIBC_TUNABLES``.
    """
    if not sys.platform.startswith("linux") or os.environ.get("VELOXSEG_MALLOC", "").lower() == "default":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (AttributeError unless glibc, e.g. on musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_mb << 20))


__all__ = ["DEVICES", "resolve_device", "set_threads", "autocast", "cpu_has_native_bf16", "is_oom", "empty_cache",
           "default_batch_size", "keep_freed_memory"]
