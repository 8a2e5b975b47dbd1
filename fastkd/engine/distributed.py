"""Data-parallel helpers: the same code runs alone or under ``torchrun``.

Under torchrun (``WORLD_SIZE > 1``) the process group uses gloo on CPU and nccl on GPU; models
are wrapped in ``DistributedDataParallel``, or sharded with FSDP2 (``fully_shard``) when
``train.shard`` is set; each rank trains on its own share of every batch; evaluation sets are
either evaluated whole on every rank (classification) or split across ranks and their sums
reduced (language models), so all ranks agree on the metrics; only rank 0 writes files.

Multi-node is torchrun's own business (``--nnodes``, ``--rdzv-endpoint``): nothing here
depends on the ranks sharing a machine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, List, Sequence

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


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (``t`` itself when alone)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of ``t`` over ranks (``t`` itself when alone)."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def wrap(module: nn.Module, device: torch.device, shard: bool = False, units: Sequence[nn.Module] = ()) -> nn.Module:
    """``DistributedDataParallel(module)`` when running distributed and it has trainable
    parameters; with ``shard``, FSDP2 instead: each of ``units`` (e.g. transformer blocks) is
    sharded on its own, then the rest with ``module`` (which becomes the returned wrapper
    itself). The module itself when alone or frozen."""
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    if shard:
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        return fully_shard(module)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def is_sharded(wrapped: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapped, FSDPModule)


def no_sync(wrapped: nn.Module):
    """A context in which backward accumulates gradients without reducing them across ranks."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if world_size() > 1 and is_sharded(wrapped):
        @contextlib.contextmanager
        def ctx():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return ctx()
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(wrapped: nn.Module):
    """Inside, a sharded model's parameters are whole, so that it can be run outside its
    training forward (evaluation reads the model and its lm_head directly)."""
    if not (world_size() > 1 and is_sharded(wrapped)):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()


def clip_grad_norm(wrapped: nn.Module, params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to ``max_norm``; returns that norm before clipping (on
    the device; a DTensor when sharded)."""
    # Sharded gradients are DTensors: clip_grad_norm_ computes their global norm itself.
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def full_state_dict(wrapped: nn.Module, module: nn.Module) -> dict:
    """``module.state_dict()`` with whole tensors (gathered when sharded: a collective, every
    rank calls it)."""
    if world_size() > 1 and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return module.state_dict()


def load_full_state_dict(wrapped: nn.Module, module: nn.Module, state: dict) -> None:
    if world_size() > 1 and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(wrapped, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


def full_optimizer_state_dict(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if world_size() > 1 and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


def load_full_optimizer_state_dict(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if world_size() > 1 and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def unwrap_model(wrapped: nn.Module, module: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module:
    """The trained model whole on every rank: ``module.model``, or, when sharded, a fresh
    model from ``rebuild()`` holding the gathered weights."""
    if not (world_size() > 1 and is_sharded(wrapped)):
        return module.model
    state = full_state_dict(wrapped, module)
    model = rebuild()
    model.load_state_dict({k[len("model."):]: v.detach().cpu() for k, v in state.items() if k.startswith("model.")})
    return model


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of an epoch's permutation: ``indices[rank::world]``, truncated so that
    every rank gets the same number of samples (ranks must take the same number of steps)."""
    w = world_size()
    if w == 1:
        return indices
    n = len(indices) // w
    return indices[rank() :: w][:n]
