"""Benchmark of ``fastkd.dkd_loss`` (decoupled KD, Zhao et al. 2022) against mdistiller's
``dkd_loss`` (what users write today), eager and under ``torch.compile``. The timed body is
``bench.runner.run_case``; the suite, the providers and the report are described in
``bench/common.py``.

    python -m pytest bench/ --benchmark-only [--bench-quick] [--bench-cases=dkd-]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import STANDARD_TARGETS, Case
from .runner import run_case

BENCH_OPS = ("dkd",)


def dkd_inputs(case: Case):
    """Student and teacher logits ~ N(0, 2²) in the case's dtype, and int64 labels ``[N]``."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype)
    t = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype)
    y = torch.randint(0, case.v, (case.n,), generator=g, dtype=torch.int64)
    return s, t, y


def dkd_composite(logits_student, logits_teacher, target, *, temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """mdistiller's ``dkd_loss`` (mdistiller/distillers/DKD.py), written out: batchmean over
    ``target.shape[0]`` rows, T² scaling, the target class removed from the non-target softmax by
    subtracting 1000 from its logit."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def dkd_fused(s, t, y, *, backend: str, temperature: float, alpha: float, beta: float) -> torch.Tensor:
    import fastkd

    return fastkd.dkd_loss(s, t, y, temperature, alpha=alpha, beta=beta, backend=backend)


def _traffic(case: Case) -> dict:
    labels = case.n * 8 / case.unit_bytes  # int64 labels, in N*V units
    return {"fwd": round(2 + labels, 4), "bwd": 2, "fwdbwd": round(3 + labels, 4)}


_PARAMS = (("temperature", 2.0), ("alpha", 1.0), ("beta", 8.0))
_HEAD = Case("dkd", 2048, 32000, "fp32", params=_PARAMS, headline=True, targets=STANDARD_TARGETS)

common.register_logits(
    common.Op(
        name="dkd",
        title="dkd_loss (decoupled KD: target-class and non-target-class terms)",
        composite=dkd_composite,
        fused=dkd_fused,
        traffic=_traffic,
        traffic_note=(
            "fwd: read student + teacher = 2 N*V (+ the int64 labels, N*8 bytes); fwd+bwd: also "
            "write the gradient = 3 N*V (+ labels); bwd alone: read the saved gradient and write it "
            "scaled = 2 N*V"
        ),
        composite_text=(
            "mdistiller's dkd_loss: gt/other masks by scatter_, TCKD = kl_div(log(cat_mask(softmax(s/T))), "
            "cat_mask(softmax(t/T)), sum)·T²/N, NCKD = kl_div(log_softmax(s/T - 1000·gt), softmax(t/T - 1000·gt), sum)·T²/N, "
            "alpha·TCKD + beta·NCKD"
        ),
        inputs=dkd_inputs,
    ),
    _HEAD,
    quick=[Case("dkd", 64, 1001, "fp32", params=_PARAMS, headline=True, targets=STANDARD_TARGETS)],
)


def test_dkd(benchmark, bench_item, budget):
    run_case(benchmark, bench_item, budget)
