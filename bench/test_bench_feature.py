"""Benchmark of the feature losses, ``fastkd.hint_loss`` (FitNets, ``kind="mse"``) and
``fastkd.attention_transfer_loss`` (``p=2``), against the composites users write today, eager and
under ``torch.compile``. The timed body is ``bench.runner.run_case``; the suite, the providers
and the report are described in ``bench/common.py``.

    python -m pytest bench/ --benchmark-only [--bench-quick] [--bench-cases=hint-,attention_transfer-]

The inputs are feature maps ``[B, C, H, W]``: ``Case.n`` is B, ``Case.v`` is C·H·W (one sample's
feature), and the params ``C``, ``H``, ``W`` give the shape; student and teacher have the same
shape. The unit of memory and traffic is one student feature map ``[B, C, H, W]`` (= N×V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import Case
from .runner import run_case

BENCH_OPS = ("hint", "attention_transfer")

SPEEDUP_COMPILE_2 = (("fastkd-cpu", "speedup_compile", ">=", 2.0, "≥ 2× faster than torch.compile"),)


def _shape(case: Case):
    p = dict(case.params)
    c, h, w = p["C"], p["H"], p["W"]
    if c * h * w == case.v:
        return (case.n, c, h, w)
    # A case resized for the availability probe (common.Case.with_size): one channel, V positions.
    return (case.n, 1, case.v)


def resize(case: Case, n: int, v: int) -> Case:
    """The case at B = n, C·H·W = v (``--bench-shapes``): the headline's C channels of v / C
    positions where C divides v, else one channel."""
    c = dict(case.params)["C"]
    c = c if v % c == 0 else 1
    return Case(case.op, n, v, case.dtype, (("C", c), ("H", 1), ("W", v // c)), False, case.device)


def feature_inputs(case: Case):
    """Student and teacher feature maps ~ N(0, 1), same shape, in the case's dtype."""
    g = torch.Generator().manual_seed(0)
    shape = _shape(case)
    s = torch.randn(shape, generator=g).to(case.torch_dtype)
    t = torch.randn(shape, generator=g).to(case.torch_dtype)
    return s, t


def hint_composite(s, t, *, C: int, H: int, W: int) -> torch.Tensor:
    """FitNets hint (RepDistiller's and torchdistill's HintLoss): the MSE over all entries."""
    return F.mse_loss(s, t)


def hint_fused(s, t, *, backend: str, C: int, H: int, W: int) -> torch.Tensor:
    import fastkd

    return fastkd.hint_loss(s, t, kind="mse", backend=backend)


def _at(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.pow(2).mean(1).flatten(1))


def at_composite(s, t, *, C: int, H: int, W: int) -> torch.Tensor:
    """Attention transfer as the authors' code, RepDistiller and torchdistill write it (p = 2)."""
    return (_at(s) - _at(t)).pow(2).mean()


def at_fused(s, t, *, backend: str, C: int, H: int, W: int) -> torch.Tensor:
    import fastkd

    return fastkd.attention_transfer_loss([s], [t], p=2, backend=backend)


# Headline cases; the sweep varies the batch B at the headline's C, H, W.
_HINT = Case("hint", 64, 512 * 16 * 16, "fp32", params=(("C", 512), ("H", 16), ("W", 16)), headline=True, targets=SPEEDUP_COMPILE_2)
_AT = Case("attention_transfer", 64, 256 * 32 * 32, "fp32", params=(("C", 256), ("H", 32), ("W", 32)), headline=True, targets=SPEEDUP_COMPILE_2)
FEATURE_SWEEP_B = (16, 64, 128, 256)

_NOTE = (
    "fwd: read student + teacher feature maps = 2 units; fwd+bwd: also write the gradient = 3 "
    "units; bwd alone: read the saved gradient and write it scaled = 2 units (unit: one student "
    "map [B, C, H, W])"
)


def _register(name: str, title: str, composite, fused, composite_text: str, head: Case, quick: Case) -> None:
    """A feature loss with the family's traffic, inputs and sizes: the headline case in the full
    run and along FEATURE_SWEEP_B, and a tiny map for the smoke test."""
    op = common.Op(name=name, title=title, composite=composite, fused=fused, traffic=common.stream_traffic, traffic_note=_NOTE,
                   composite_text=composite_text, inputs=feature_inputs, resize=resize)
    common.register(op, full=[head], quick=[quick], sweep=common.sweep(head, [(b, head.v) for b in FEATURE_SWEEP_B]))


_register("hint", 'hint_loss(kind="mse") (FitNets)', hint_composite, hint_fused, "F.mse_loss(s, t)", _HINT,
          Case("hint", 8, 24 * 7 * 9, "fp32", params=(("C", 24), ("H", 7), ("W", 9)), headline=True, targets=SPEEDUP_COMPILE_2))
_register("attention_transfer", "attention_transfer_loss(p=2)", at_composite, at_fused,
          "at = lambda x: F.normalize(x.pow(2).mean(1).flatten(1)); (at(s) - at(t)).pow(2).mean()", _AT,
          Case("attention_transfer", 8, 16 * 9 * 11, "fp32", params=(("C", 16), ("H", 9), ("W", 11)), headline=True, targets=SPEEDUP_COMPILE_2))


def test_feature(benchmark, bench_item, budget):
    run_case(benchmark, bench_item, budget)
