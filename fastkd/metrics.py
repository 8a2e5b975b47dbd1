"""Evaluation metrics for classifiers and for distillation fidelity.

Accuracy, negative log-likelihood and expected calibration error describe one model against the
labels; top-1 agreement and predictive KL describe a student against its teacher (Stanton et
al. 2021, "Does knowledge distillation really work?"). Everything here takes *log-probabilities*
``[N, C]`` (so that an ensemble's averaged probabilities can be passed as ``log(mean p)``) and
returns Python floats, computed in float64.

A row with a NaN (or a log-probability of +inf) is a model output that is no distribution: it has
no top-1 class and no divergence, so every metric over a set holding such a row is NaN. A
diverged model is thus reported as non-finite, never as agreeing with a diverged teacher (the
argmax of two NaN rows is the same index) or as at KL 0 from it.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

ECE_BINS = 15


def _logp(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected log-probabilities of shape [N, C], got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def undefined_rows(logp: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: rows of log-probabilities that are no distribution (a NaN or a +inf)."""
    return (torch.isnan(logp) | torch.isposinf(logp)).any(-1)


def _mean(values: torch.Tensor, undefined: torch.Tensor) -> float:
    """The mean of per-row ``values``, NaN if a row is ``undefined``."""
    return float(torch.where(undefined, torch.nan, values.to(torch.float64)).mean())


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)`` in float64: the input every metric here expects."""
    return torch.log_softmax(logits.detach().to(torch.float64), dim=-1)


def ensemble_log_probs(members: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the averaged probabilities of ensemble members, each ``[N, C]`` log-probs.

    Averages probabilities (not logits): ``log mean_m exp(lp_m)``, computed with logsumexp.
    """
    stacked = torch.stack([_logp(m) for m in members])
    return torch.logsumexp(stacked, dim=0) - math.log(len(members))


def accuracy(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    lp = _logp(logp)
    return _mean(lp.argmax(-1) == labels, undefined_rows(lp))


def nll(logp: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels, ``-mean_i log p_i[y_i]`` (natural log)."""
    lp = _logp(logp)
    return _mean(-lp.gather(1, labels.view(-1, 1).long()).squeeze(1), undefined_rows(lp))


def ece(logp: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins on (0, 1].

    ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` where the confidence is the top probability and
    a row with confidence c falls in bin ``ceil(c * bins) - 1`` (bins are right-closed).
    """
    lp = _logp(logp)
    if undefined_rows(lp).any():
        return math.nan
    conf, pred = lp.exp().max(-1)
    correct = (pred == labels).to(torch.float64)
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    total = torch.zeros(bins, dtype=torch.float64)
    n = lp.shape[0]
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total[b] = mask.sum() / n * (correct[mask].mean() - conf[mask].mean()).abs()
    return float(total.sum())


def agreement(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """Top-1 agreement ``mean[argmax s = argmax t]``."""
    ls, lt = _logp(student_logp), _logp(teacher_logp)
    return _mean(ls.argmax(-1) == lt.argmax(-1), undefined_rows(ls) | undefined_rows(lt))


def predictive_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """``mean_i KL(p_t,i || p_s,i)`` at temperature 1 (zero-probability teacher entries add 0)."""
    ls, lt = _logp(student_logp), _logp(teacher_logp)
    pt = lt.exp()
    terms = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt))
    return _mean(terms.sum(-1), undefined_rows(ls) | undefined_rows(lt))


def classification_metrics(
    logp: torch.Tensor, labels: torch.Tensor, teacher_logp: Optional[torch.Tensor] = None
) -> Dict[str, float]:
    """``accuracy``, ``nll``, ``ece`` and, given a teacher, ``agreement`` and ``predictive_kl``."""
    out = {"accuracy": accuracy(logp, labels), "nll": nll(logp, labels), "ece": ece(logp, labels)}
    if teacher_logp is not None:
        out["agreement"] = agreement(logp, teacher_logp)
        out["predictive_kl"] = predictive_kl(logp, teacher_logp)
    return out
