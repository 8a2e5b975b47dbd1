"""Benchmark of ``fastkd.kd_loss`` (forward KL, Hinton) against the composite users write today,
eager and under ``torch.compile``. The timed body is ``bench.runner.run_case``; the suite, the
providers and the report are described in ``bench/common.py``.

    python -m pytest bench/ --benchmark-only [--bench-quick] [--bench-cases=kd-]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import STANDARD_TARGETS, Case
from .runner import run_case

BENCH_OPS = ("kd",)


def kd_composite(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD as users write it: KL(softmax(t/T) || softmax(s/T)) * T^2, batchmean."""
    return (
        F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), log_target=True, reduction="batchmean")
        * temperature
        * temperature
    )


def kd_fused(s: torch.Tensor, t: torch.Tensor, *, backend: str, temperature: float) -> torch.Tensor:
    import fastkd

    return fastkd.kd_loss(s, t, temperature, backend=backend)


HEADLINE = Case("kd", 2048, 32000, "fp32", headline=True, targets=STANDARD_TARGETS)

common.register_logits(
    common.Op(
        name="kd",
        title="kd_loss (forward KL, Hinton)",
        composite=kd_composite,
        fused=kd_fused,
        traffic=common.stream_traffic,
        traffic_note=(
            "fwd (loss only, no_grad): read student + teacher = 2 N*V; "
            "fwd+bwd: read student + teacher, write the gradient = 3 N*V; "
            "bwd alone: read the gradient saved by the fused forward and write it scaled by "
            "grad_output = 2 N*V (fastkd's backward scales in place; this is the bound for that "
            "design, not for every design: a backward that skipped the scale when grad_output "
            "is 1 would move nothing)"
        ),
        composite_text='F.kl_div(F.log_softmax(s/T, -1), F.log_softmax(t/T, -1), log_target=True, reduction="batchmean") * T*T',
    ),
    HEADLINE,
    # Tiny shapes for a smoke test: seconds, not minutes (odd V on purpose).
    quick=[
        Case("kd", 64, 1000, "fp32", headline=True, targets=STANDARD_TARGETS),
        Case("kd", 32, 517, "bf16"),
    ],
    # After the headline, these change the row/vocabulary balance and the dtype.
    more=[
        Case("kd", 4096, 8192, "fp32"),
        Case("kd", 512, 131072, "fp32"),
        Case("kd", 2048, 32000, "bf16", targets=(("fastkd-cpu", "pct_bound", ">=", 70.0, "bf16: ≥ 70 % of the memory-traffic bound"),)),
    ],
)


def test_kd(benchmark, bench_item, budget):
    run_case(benchmark, bench_item, budget)
