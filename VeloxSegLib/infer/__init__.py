"""Inference: sliding window, TTA, post-processing, device choice, and the pipeline.

``from VeloxSegLib.infer import predict_case`` is the entry point; names are resolved lazily
so importing this package does not import torch.
"""
from __future__ import annotations

_EXPORTS = {
    "InferencePlan": "pipeline", "CasePrediction": "pipeline", "Segmenter": "pipeline",
    "predict_case": "pipeline", "predict_files": "pipeline", "predict_folder": "pipeline",
    "find_cases": "pipeline", "sliding_window": "sliding_window", "stream_windows": "sliding_window",
    "resolve_device": "device",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
