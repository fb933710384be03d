"""Data-parallel training: ``torchrun --nproc_per_node=N -m VeloxSegLib.cli train ...``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and joins the process group (gloo on CPU, NCCL on CUDA).
Each rank draws its own patches (its sampler is seeded with the rank), DistributedDataParallel
averages gradients, so all ranks keep identical weights; rank 0 alone validates and writes
checkpoints, logs and the bundle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.nn as nn

from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True when started by torchrun (or an equivalent launcher) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by the environment; a single process otherwise."""
    if not launched_distributed():
        return DistInfo()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "mps":
        raise ConfigError("distributed training is not supported on Apple MPS; use --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, backend)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank's device: ``cuda:LOCAL_RANK`` on GPUs."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def wrap_model(module: nn.Module, info: DistInfo, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around ``module`` when distributed (it broadcasts rank 0's
    weights at construction), else ``module`` itself."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop request seen by one rank)."""
    if not info.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if info.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict, info: DistInfo) -> dict:
    """Average a dict of floats over ranks (epoch losses in the log cover every rank's patches)."""
    if not info.enabled or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if info.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj`` (JSON-like), in rank order; ``[obj]`` when not distributed."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["DistInfo", "launched_distributed", "init_distributed", "device_for", "wrap_model", "any_rank",
           "mean_over_ranks", "gather_objects", "broadcast_object", "barrier", "shutdown"]
