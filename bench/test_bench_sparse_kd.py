"""Benchmark of ``fastkd.sparse_kd_loss`` (KD from a teacher known at its top-k entries per row:
``values="logits"``, ``tail="renormalize"``) against the composite users write today, eager and
under ``torch.compile``. The timed body is ``bench.runner.run_case``; the suite, the providers
and the report are described in ``bench/common.py``.

    python -m pytest bench/ --benchmark-only [--bench-quick] [--bench-cases=sparse_kd]

Inputs: student logits ``[N, V]``, teacher values ``[N, k]`` and int64 indices ``[N, k]`` (the
top-k of a random dense teacher). The unit of memory and traffic is one N×V tensor of the
student dtype; the teacher's k columns add a small fraction of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import STANDARD_TARGETS, Case
from .runner import run_case

BENCH_OPS = ("sparse_kd",)
TOP_K = 64


def sparse_inputs(case: Case):
    """Student logits ~ N(0, 2²) ``[N, V]``; the top-k (values, int64 indices) of teacher logits
    ~ N(0, 2²), in the case's dtype."""
    k = min(dict(case.params).get("k", TOP_K), case.v)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype)
    dense = torch.randn(case.n, case.v, generator=g) * 2.0
    values, indices = dense.topk(k, dim=-1)
    return s, values.to(case.torch_dtype), indices.to(torch.int64)


def sparse_composite(s, values, indices, *, temperature: float, k: int = TOP_K) -> torch.Tensor:
    """KL(p || q) * T², batchmean: the student's full-vocabulary log-softmax gathered at the
    teacher's indices, the teacher's softmax over its k values."""
    log_q = F.log_softmax(s / temperature, dim=-1).gather(-1, indices)
    log_p = F.log_softmax(values / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature * temperature


def sparse_fused(s, values, indices, *, backend: str, temperature: float, k: int = TOP_K) -> torch.Tensor:
    import fastkd

    return fastkd.sparse_kd_loss(s, values, indices, temperature, values="logits", tail="renormalize", backend=backend)


def _traffic(case: Case) -> dict:
    k = min(dict(case.params).get("k", TOP_K), case.v)
    teacher = case.n * k * (case.itemsize + 8) / case.unit_bytes  # values + int64 indices
    return {"fwd": round(1 + teacher, 4), "bwd": 2, "fwdbwd": round(2 + teacher, 4)}


_PARAMS = (("temperature", 2.0), ("k", TOP_K))
_HEAD = Case("sparse_kd", 2048, 32000, "fp32", params=_PARAMS, headline=True, targets=STANDARD_TARGETS)

common.register_logits(
    common.Op(
        name="sparse_kd",
        title=f"sparse_kd_loss (top-{TOP_K} teacher logits, renormalised)",
        composite=sparse_composite,
        fused=sparse_fused,
        traffic=_traffic,
        traffic_note=(
            "fwd: read the student (N*V) and the teacher's values and int64 indices (N*k each); "
            "fwd+bwd: also write the gradient (N*V); bwd alone: read the saved gradient and write "
            "it scaled = 2 N*V"
        ),
        composite_text=(
            "F.kl_div(F.log_softmax(s/T, -1).gather(-1, idx), F.log_softmax(values/T, -1), "
            'log_target=True, reduction="batchmean") * T*T'
        ),
        inputs=sparse_inputs,
    ),
    _HEAD,
    quick=[Case("sparse_kd", 64, 1001, "fp32", params=_PARAMS, headline=True, targets=STANDARD_TARGETS)],
)


def test_sparse_kd(benchmark, bench_item, budget):
    run_case(benchmark, bench_item, budget)
