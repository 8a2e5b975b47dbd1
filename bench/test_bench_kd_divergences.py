"""Benchmark of ``fastkd.kd_loss`` with its other divergences (reverse KL, generalized JSD, TVD,
DistiLLM's skew KLs, Hellinger) and with an ensemble of teachers, against the composites users
write today, eager and under ``torch.compile``. The timed body is ``bench.runner.run_case``; the
suite, the providers and the report are described in ``bench/common.py``.

    python -m pytest bench/ --benchmark-only [--bench-quick] [--bench-cases=kd_]

Each composite follows ``kd_loss``'s conventions (``fastkd/ops/kd.py``): teacher ``p =
softmax(t/T)``, student ``q = softmax(s/T)``, the divergence times T², ``batchmean`` (sum over
rows / N). Ensemble: ``t`` is ``[M, N, V]`` and ``p`` the mean of the M teachers' softmaxes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import common
from .common import STANDARD_TARGETS, Case
from .runner import run_case

# (op name, divergence, beta or None, the composite as the report shows it)
DIVERGENCES = (
    ("kd_reverse_kl", "reverse_kl", None,
     'F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * T*T with log_q = log_softmax(s/T), log_p = log_softmax(t/T)'),
    ("kd_jsd", "jsd", 0.5,
     "TRL's generalized_jsd_loss: log_m = logsumexp(stack([log_p + log β, log_q + log(1-β)]), 0); "
     "(β·kl_div(log_m, log_p) + (1-β)·kl_div(log_m, log_q)) summed / N · T²"),
    ("kd_tvd", "tvd", None, "0.5 * (softmax(t/T) - softmax(s/T)).abs().sum() / N * T*T"),
    ("kd_skew_kl", "skew_kl", 0.1,
     "DistiLLM-style: log_m = log(β·softmax(t/T) + (1-β)·softmax(s/T)); kl_div(log_m, log_p, log_target=True, batchmean) · T²"),
    ("kd_skew_reverse_kl", "skew_reverse_kl", 0.1,
     "DistiLLM-style: log_m = log((1-β)·softmax(t/T) + β·softmax(s/T)); kl_div(log_m, log_q, log_target=True, batchmean) · T²"),
    ("kd_hellinger", "hellinger", None, "0.5 * (softmax(t/T).sqrt() - softmax(s/T).sqrt()).square().sum() / N * T*T"),
)
N_TEACHERS = 4

BENCH_OPS = tuple(name for name, *_ in DIVERGENCES) + ("kd_ensemble",)


# ----------------------------------------------------------------------------------------------
# Composites: what users write today.
# ----------------------------------------------------------------------------------------------


def reverse_kl_composite(s, t, *, temperature: float) -> torch.Tensor:
    """KL(q || p) (MiniLLM's reverse KL): kl_div(input=log p, target=log q) = sum q (log q - log p)."""
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature * temperature


def jsd_composite(s, t, *, temperature: float, beta: float) -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` (``beta`` weighting the teacher's KL to the mixture
    ``m = beta p + (1 - beta) q``), reduction batchmean, times T² as kd_loss documents."""
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum() / s.shape[0] * temperature * temperature


def tvd_composite(s, t, *, temperature: float) -> torch.Tensor:
    """Total variation distance, 0.5 * sum |p - q| per row, batchmean, times T²."""
    p = F.softmax(t / temperature, dim=-1)
    q = F.softmax(s / temperature, dim=-1)
    return 0.5 * (p - q).abs().sum() / s.shape[0] * temperature * temperature


def skew_kl_composite(s, t, *, temperature: float, beta: float) -> torch.Tensor:
    """DistiLLM's skew KL, KL(p || beta p + (1 - beta) q), its mixture formed in probability
    space as DistiLLM does. (DistiLLM's own loss drops the teacher's entropy, i.e. it is the
    cross-entropy -sum p log m: the same gradient, a value lower by H(p); this is the KL, as
    kd_loss defines it.)"""
    p = F.softmax(t / temperature, dim=-1)
    q = F.softmax(s / temperature, dim=-1)
    log_m = torch.log(beta * p + (1 - beta) * q)
    log_p = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_m, log_p, log_target=True, reduction="batchmean") * temperature * temperature


def skew_reverse_kl_composite(s, t, *, temperature: float, beta: float) -> torch.Tensor:
    """DistiLLM's skew reverse KL, KL(q || (1 - beta) p + beta q), as DistiLLM writes it."""
    p = F.softmax(t / temperature, dim=-1)
    q = F.softmax(s / temperature, dim=-1)
    log_m = torch.log((1 - beta) * p + beta * q)
    log_q = F.log_softmax(s / temperature, dim=-1)
    return F.kl_div(log_m, log_q, log_target=True, reduction="batchmean") * temperature * temperature


def hellinger_composite(s, t, *, temperature: float) -> torch.Tensor:
    """The squared Hellinger distance, 0.5 * sum (sqrt p - sqrt q)^2 per row, batchmean, times T²."""
    p = F.softmax(t / temperature, dim=-1)
    q = F.softmax(s / temperature, dim=-1)
    return 0.5 * (p.sqrt() - q.sqrt()).square().sum() / s.shape[0] * temperature * temperature


COMPOSITES = {
    "reverse_kl": reverse_kl_composite,
    "jsd": jsd_composite,
    "tvd": tvd_composite,
    "skew_kl": skew_kl_composite,
    "skew_reverse_kl": skew_reverse_kl_composite,
    "hellinger": hellinger_composite,
}


def _fused_for(divergence: str):
    def fused(s, t, *, backend: str, temperature: float, beta=None) -> torch.Tensor:
        import fastkd

        return fastkd.kd_loss(s, t, temperature, divergence=divergence, beta=beta, backend=backend)

    fused.__name__ = f"kd_{divergence}_fused"
    return fused


def _params(beta):
    return (("temperature", 2.0),) + ((("beta", beta),) if beta is not None else ())


_TRAFFIC_NOTE = (
    "fwd (loss only, no_grad): read student + teacher = 2 N*V; fwd+bwd: read student + teacher, "
    "write the gradient = 3 N*V; bwd alone: read the saved gradient and write it scaled = 2 N*V "
    "(as kd)"
)

for _name, _div, _beta, _text in DIVERGENCES:
    _head = Case(_name, 2048, 32000, "fp32", params=_params(_beta), headline=True, targets=STANDARD_TARGETS)
    common.register_logits(
        common.Op(
            name=_name,
            title=f"kd_loss(divergence=\"{_div}\")" + (f", beta={_beta:g}" if _beta is not None else ""),
            composite=COMPOSITES[_div],
            fused=_fused_for(_div),
            traffic=common.stream_traffic,
            traffic_note=_TRAFFIC_NOTE,
            composite_text=_text,
        ),
        _head,
        quick=[Case(_name, 64, 1001, "fp32", params=_params(_beta), headline=True, targets=STANDARD_TARGETS)],
    )


# ----------------------------------------------------------------------------------------------
# Ensemble of M teachers
# ----------------------------------------------------------------------------------------------


def ensemble_inputs(case: Case):
    """Student ``[N, V]`` and M teachers ``[M, N, V]``, logits ~ N(0, 2²) in the case's dtype."""
    m = dict(case.params).get("M", N_TEACHERS)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype)
    t = (torch.randn(m, case.n, case.v, generator=g) * 2.0).to(case.torch_dtype)
    return s, t


def ensemble_composite(s, t, *, temperature: float, M: int = N_TEACHERS) -> torch.Tensor:
    """KL(p || q) * T², batchmean, with p the mean of the teachers' softmaxes, its log as a
    log-sum-exp of their log-softmaxes (averaged probabilities, not logits)."""
    log_p = torch.logsumexp(F.log_softmax(t / temperature, dim=-1), dim=0) - math.log(t.shape[0])
    log_q = F.log_softmax(s / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature * temperature


def ensemble_fused(s, t, *, backend: str, temperature: float, M: int = N_TEACHERS) -> torch.Tensor:
    import fastkd

    return fastkd.kd_loss(s, t, temperature, backend=backend)


def _ensemble_traffic(case: Case) -> dict:
    m = dict(case.params).get("M", N_TEACHERS)
    return {"fwd": m + 1, "bwd": 2, "fwdbwd": m + 2}


_ENSEMBLE_PARAMS = (("temperature", 2.0), ("M", N_TEACHERS))
_ENSEMBLE_HEAD = Case("kd_ensemble", 2048, 32000, "fp32", params=_ENSEMBLE_PARAMS, headline=True, targets=STANDARD_TARGETS)

common.register_logits(
    common.Op(
        name="kd_ensemble",
        title=f"kd_loss with an ensemble of {N_TEACHERS} teachers (forward KL to the mean of their softmaxes)",
        composite=ensemble_composite,
        fused=ensemble_fused,
        traffic=_ensemble_traffic,
        traffic_note=(
            "teachers [M, N, V]: fwd: read student + M teachers = (M+1) N*V; fwd+bwd: also write "
            "the gradient = (M+2) N*V; bwd alone: read the saved gradient and write it scaled = 2 N*V"
        ),
        composite_text=(
            "log_p = logsumexp(F.log_softmax(t/T, -1), 0) - log M; "
            'F.kl_div(F.log_softmax(s/T, -1), log_p, log_target=True, reduction="batchmean") * T*T'
        ),
        inputs=ensemble_inputs,
    ),
    _ENSEMBLE_HEAD,
    quick=[Case("kd_ensemble", 33, 517, "fp32", params=_ENSEMBLE_PARAMS, headline=True, targets=STANDARD_TARGETS)],
)


def test_kd_divergences(benchmark, bench_item, budget):
    run_case(benchmark, bench_item, budget)
