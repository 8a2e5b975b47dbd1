"""Shared by the dkd_loss tests of every backend: the FlashAttention-style check of a backend
against the float64 reference (the tolerance rule of kd_helpers.py). mdistiller's composite, the
formulation the op must agree with, is the benchmark's (bench/test_bench_dkd.py)."""

from __future__ import annotations

import fastkd
from fastkd.functional import dkd_loss_reference
from kd_helpers import check_logits_loss, gradient_scale


def check_against_reference(backend, student, teacher, labels, temperature, **kwargs):
    """``backend``'s loss and gradient (with a grad_output that is not 1) within the bound:
    at most 4x PyTorch's own error at the input precision, plus a floor."""
    # Each gradient term is T (alpha or beta) times a probability (or a difference of two).
    coefficient = temperature * (kwargs.get("alpha", 1.0) + kwargs.get("beta", 8.0))

    def grad_scale(go, **kw):
        keep = {k: v for k, v in kw.items() if k in ("ignore_index", "reduction")}
        return gradient_scale(student.shape, go, coefficient, labels=labels.cpu(), **keep)

    return check_logits_loss(lambda *a, **k: fastkd.dkd_loss(*a, backend=backend, **k), dkd_loss_reference, student, teacher, labels,
                             temperature, grad_scale=grad_scale, **kwargs)
