"""Shared by the dkd_loss tests of every backend: mdistiller's composite (what users write today,
the formulation the op must agree with), and the FlashAttention-style check of a backend
against the float64 reference (the tolerance rule of kd_helpers.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import dkd_loss_reference
from kd_helpers import assert_within_tolerance, compute_dtype, gradient_scale, grad_output_for, row_max


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's ``dkd_loss`` (mdistiller/distillers/DKD.py), written out here: no runtime
    dependency. Divides by the batch size (``target.shape[0]``), i.e. batchmean."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def _loss_and_grad(fn, student, teacher, labels, temperature, grad_output, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher, labels, temperature, **kwargs)
    (loss * grad_output.to(device=loss.device, dtype=loss.dtype)).sum().backward()
    return loss.detach(), s.grad


def check_against_reference(backend, student, teacher, labels, temperature, **kwargs):
    """``backend``'s loss and gradient (with a grad_output that is not 1) within the bound:
    at most 4x PyTorch's own error at the input precision, plus a floor."""
    loss_shape = () if kwargs.get("reduction", "batchmean") != "none" else student.shape[:-1]
    go = grad_output_for(loss_shape)
    loss, grad = _loss_and_grad(
        lambda *a, **k: fastkd.dkd_loss(*a, backend=backend, **k), student, teacher, labels, temperature, go, **kwargs
    )
    s, t, y = student.cpu(), teacher.cpu(), labels.cpu()
    exact = _loss_and_grad(dkd_loss_reference, s.double(), t.double(), y, temperature, go, **kwargs)
    lowp = _loss_and_grad(dkd_loss_reference, s, t, y, temperature, go, **kwargs)
    compute = _loss_and_grad(dkd_loss_reference, s.to(compute_dtype(s.dtype)), t, y, temperature, go, **kwargs)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32), f"loss dtype {loss.dtype}"
    assert grad.dtype == student.dtype, f"grad dtype {grad.dtype} != student dtype {student.dtype}"
    assert_within_tolerance("loss", loss, exact[0], lowp[0], torch.float64 if student.dtype == torch.float64 else torch.float32)
    # Each gradient term is T (alpha or beta) times a probability (or a difference of two).
    coefficient = temperature * (kwargs.get("alpha", 1.0) + kwargs.get("beta", 8.0))
    keep = {k: v for k, v in kwargs.items() if k in ("ignore_index", "reduction")}
    scale = torch.maximum(row_max(exact[1]), gradient_scale(student.shape, go, coefficient, labels=y, **keep))
    assert_within_tolerance("grad", grad, exact[1], lowp[1], student.dtype, scale=scale, lowp_compute=compute[1])
    return loss, grad
