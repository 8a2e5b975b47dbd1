"""Data-parallel helpers: the same code runs alone or under ``torchrun``.

Under torchrun (``WORLD_SIZE > 1``) the process group uses gloo on CPU and nccl on GPU; models
are wrapped in ``DistributedDataParallel``; each rank trains on its own share of every batch;
every rank evaluates the full (small) evaluation sets, so all ranks agree on the metrics; only
rank 0 writes files.
"""

from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun (no-op otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (a one-element list when alone)."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on some rank (so that all ranks take the same branch)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` when running distributed and it has trainable
    parameters; the module itself otherwise."""
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of an epoch's permutation: ``indices[rank::world]``, truncated so that
    every rank gets the same number of samples (ranks must take the same number of steps)."""
    w = world_size()
    if w == 1:
        return indices
    n = len(indices) // w
    return indices[rank() :: w][:n]
