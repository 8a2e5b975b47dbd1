"""Compression applied to a student while it is distilled: pruning and quantization-aware
training. Both act on the weights of every ``nn.Linear`` and ``nn.Conv2d`` and leave the model's
code unchanged (``torch.nn.utils.prune`` masks and ``torch.nn.utils.parametrize``).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

LAYERS = (nn.Linear, nn.Conv2d)


def _layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LAYERS)]


# ---------------------------------------------------------------------------------------------
# Pruning: gradual magnitude (L1, unstructured) pruning
# ---------------------------------------------------------------------------------------------


def prepare_pruning(model: nn.Module) -> None:
    """Attach an all-ones mask to every layer's weight (``weight_orig`` + ``weight_mask``).

    Done before the optimizer is built: later pruning steps only update the mask, so the
    optimized parameter (``weight_orig``) stays the same object.
    """
    for m in _layers(model):
        prune.identity(m, "weight")


def prune_to(model: nn.Module, sparsity: float) -> None:
    """Raise every layer's weight sparsity to ``sparsity`` by zeroing the smallest-magnitude
    weights still alive (pruned weights stay pruned)."""
    for m in _layers(model):
        mask = m.weight_mask
        target = int(round(sparsity * mask.numel()))
        extra = target - int((mask == 0).sum())
        if extra > 0:
            # An integer amount counts among the entries not yet pruned (PruningContainer).
            prune.l1_unstructured(m, "weight", amount=extra)


def pruning_schedule(amount: float, epochs: int, ramp: int) -> dict:
    """Sparsity to reach at the start of given epochs: ``{epoch: sparsity}``.

    Gradual: after one epoch of dense training, ``amount`` is reached in ``ramp`` equal steps
    (default half the epochs); with a single epoch, everything is pruned at the start.
    """
    if amount <= 0:
        return {}
    start = 1 if epochs > 1 else 0
    ramp = max(1, min(ramp or max(1, epochs // 2), epochs - start))
    return {start + j: amount * (j + 1) / ramp for j in range(ramp)}


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over all Linear/Conv layers."""
    zeros = total = 0
    for m in _layers(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(1, total)


# ---------------------------------------------------------------------------------------------
# Quantization-aware training: symmetric per-tensor fake quantization of weights
# ---------------------------------------------------------------------------------------------


class FakeQuant(nn.Module):
    """Rounds a weight to ``2**(bits-1) - 1`` symmetric levels of a per-tensor scale
    ``max|w| / (2**(bits-1) - 1)``; the straight-through estimator passes the gradient to the
    full-precision weight unchanged."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        qmax = 2 ** (self.bits - 1) - 1
        scale = w.detach().abs().max().clamp_min(1e-12) / qmax
        q = torch.round(w / scale).clamp(-qmax, qmax) * scale
        return w + (q - w).detach()


def prepare_qat(model: nn.Module, bits: int) -> None:
    """Fake-quantize every layer's weight to ``bits`` bits in the forward pass."""
    for m in _layers(model):
        parametrize.register_parametrization(m, "weight", FakeQuant(bits))


def quant_levels(model: nn.Module) -> int:
    """The largest number of distinct values in one layer's weight."""
    return max(int(torch.unique(m.weight.detach()).numel()) for m in _layers(model))


# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------


def prepare(model: nn.Module, spec: dict) -> None:
    """Attach the compression named in a ``[student]`` table (no-op when none)."""
    if spec.get("prune_amount", 0.0) > 0:
        prepare_pruning(model)
    elif spec.get("quant_bits", 0) > 0:
        prepare_qat(model, spec["quant_bits"])


def finalize(model: nn.Module) -> None:
    """Bake masks and fake quantization into plain weights (the state dict then loads into an
    uncompressed model of the same architecture)."""
    for m in _layers(model):
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
