"""External peer networks from MONAI, for benchmarks and same-budget training comparisons only.

MONAI is a test/benchmark dependency, never a runtime one: it is imported only when a peer is
built, and a missing MONAI gives a ConfigError that says how to install it. A peer is wrapped so
that it speaks our interface: ``forward`` returns logits and ``forward_train`` a
:class:`TrainOutput` with the single full-resolution logits (no deep supervision, no teachers:
the peers are trained with CE + Dice only, as MONAI ships them).

Configurations (as in ``make bench`` and the literature's CPU comparisons):
``monai-unet`` UNet with channels 16..256, strides 2 and 2 residual units; ``monai-segresnet``
SegResNet with 16 initial filters; ``monai-swinunetr`` SwinUNETR with feature size 24.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .outputs import TrainOutput

PEERS = {
    "monai-unet": "MONAI UNet 16..256, 2 res units",
    "monai-segresnet": "MONAI SegResNet, 16 filters",
    "monai-swinunetr": "MONAI SwinUNETR, feature size 24",
}


class PeerNet(nn.Module):
    """A MONAI network behind our model interface (``forward`` / ``forward_train``)."""

    def __init__(self, name: str, net: nn.Module, in_channels: Sequence[int], num_classes: int, patch_size):
        super().__init__()
        self.name = name
        self.net = net
        self.in_channels = tuple(in_channels)
        self.num_classes = int(num_classes)
        self.patch_size = tuple(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        return TrainOutput(logits=[self.net(x)])


def build_peer(name: str, in_channels: Sequence[int] = (1, 1), num_classes: int = 2,
               patch_size=(96, 96, 96)) -> PeerNet:
    key = name.lower()
    if key not in PEERS:
        raise ConfigError(f"unknown peer '{name}'; available: {', '.join(PEERS)}")
    try:
        from monai.networks import nets
    except ImportError:
        raise ConfigError(f"'{name}' is a MONAI benchmark peer and needs MONAI: pip install monai "
                          f"(or the project's [bench] extra)") from None
    cin = int(sum(in_channels))
    if key == "monai-unet":
        net = nets.UNet(3, cin, num_classes, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    elif key == "monai-segresnet":
        net = nets.SegResNet(spatial_dims=3, init_filters=16, in_channels=cin, out_channels=num_classes)
    else:
        try:
            net = nets.SwinUNETR(in_channels=cin, out_channels=num_classes, feature_size=24, spatial_dims=3)
        except TypeError:  # older MONAI needs img_size
            net = nets.SwinUNETR(img_size=tuple(patch_size), in_channels=cin, out_channels=num_classes,
                                 feature_size=24)
    return PeerNet(key, net, in_channels, num_classes, patch_size)
