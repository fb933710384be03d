"""Networks and the preset registry (timm-style: each name fills a config, one constructor)."""
from __future__ import annotations

from typing import Dict, List

from ..errors import ConfigError
from .jl import c_group, jl_group_sizes
from .outputs import TrainOutput

WIDTHS = (16, 32, 64, 128)


def _veloxseg_config(in_channels, **kw):
    """Preset B with JL-guided group sizes; keyword arguments override."""
    base = kw.get("base_ch", 16)
    cfg = dict(
        base_ch=16, attn_ch=16, conv_depths=(1, 1, 1, 1), attn_depths=(1, 1, 1, 1), kernel_sizes=(1, 3, 5),
        group_sizes=tuple(jl_group_sizes(len(in_channels), [base * 2 ** k for k in range(4)], n=4)),
        conv_expansion=(3, 3, 2, 2), ffn_expansion=(3, 3, 2, 2), num_heads=(1, 2, 2, 4), head_dims=(4, 8, 8, 16),
    )
    cfg.update(kw)
    return cfg


PRESETS: Dict[str, dict] = {
    "veloxseg-s": dict(arch="veloxseg", kernel_sizes=(3,)),
    "veloxseg-b": dict(arch="veloxseg"),
    "veloxseg-b+": dict(arch="veloxseg", base_ch=32, attn_ch=32),
    "veloxseg-l": dict(arch="veloxseg", conv_depths=(2, 2, 2, 2), attn_depths=(2, 2, 2, 2)),
    "lightmedseg": dict(arch="lightmedseg"),
}


def set_fast_path(model, enabled: bool = True):
    """Switch the CPU inference fast paths on or off for every block of ``model`` (same function;
    used only when no gradient is needed). Returns the model."""
    for module in model.modules():
        if hasattr(type(module), "fast"):
            module.fast = bool(enabled)
    return model


def list_models() -> List[str]:
    return list(PRESETS)


def build_model(name: str = "veloxseg-b", in_channels=(1, 1), num_classes: int = 2,
                patch_size=(96, 96, 96), **overrides):
    """Build a network by preset name (or one of the MONAI benchmark peers of ``peers.PEERS``,
    which need MONAI installed and are for benchmarks and training comparisons only).

    in_channels has one entry per modality (channels of that modality): (1, 1) is PET/CT with
    cross-modal attention, (2,) PET and CT stacked (early fusion), (4,) BraTS ("VeloxSeg-C").
    """
    key = name.lower()
    if isinstance(in_channels, int):
        in_channels = (in_channels,)
    if key not in PRESETS:
        from .peers import PEERS, build_peer

        if key in PEERS and not overrides:
            return build_peer(key, in_channels, num_classes, patch_size)
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(PRESETS)} "
                          f"(benchmark peers, with MONAI installed: {', '.join(PEERS)})")
    in_channels = tuple(int(c) for c in in_channels)
    if isinstance(patch_size, int):
        patch_size = (patch_size,) * 3
    preset = dict(PRESETS[key])
    arch = preset.pop("arch")
    if arch == "lightmedseg":
        from .lightmedseg import LightMedSeg

        return LightMedSeg(in_channels=in_channels, num_classes=num_classes, patch_size=tuple(patch_size),
                           **{**preset, **overrides})
    from .veloxseg import VeloxSeg

    cfg = _veloxseg_config(in_channels, **{**preset, **overrides})
    return VeloxSeg(in_channels=in_channels, num_classes=num_classes, patch_size=tuple(patch_size), **cfg)


__all__ = ["build_model", "list_models", "set_fast_path", "PRESETS", "TrainOutput", "c_group", "jl_group_sizes"]
