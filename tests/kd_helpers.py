"""Shared by the kd_loss tests of every backend: inputs, the float64 oracle, and the tolerance rule.

The tolerance rule (after FlashAttention's tests): a backend's error against the float64
reference may be at most FACTOR times the error PyTorch's own reference makes at the input's
precision, plus a small floor relative to the result's magnitude (the floor covers entries where
PyTorch happens to be exact).
"""

from __future__ import annotations

import torch

import fastkd
from fastkd.functional import kd_loss_reference

FACTOR = 4.0
# Relative floors, by the dtype the compared tensor is stored in.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_logits(shape, dtype=torch.float32, std=3.0, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    return student.to(device), teacher.to(device)


def make_labels(rows_shape, vocab, ignored=(), seed=1, ignore_index=-100, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, rows_shape, generator=gen)
    flat = labels.view(-1)
    for i in ignored:
        flat[i] = ignore_index
    return labels.to(device)


def grad_output_for(loss_shape, seed=2):
    """A grad_output that is not 1: a scalar 0.7, or distinct per-row weights."""
    if len(loss_shape) == 0:
        return torch.tensor(0.7, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(loss_shape, generator=gen, dtype=torch.float64) + 0.5


def loss_and_grad(fn, student, teacher, temperature, grad_output, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher, temperature, **kwargs)
    (loss * grad_output.to(device=loss.device, dtype=loss.dtype)).sum().backward()
    return loss.detach(), s.grad


def run_backend(backend, student, teacher, temperature, grad_output, **kwargs):
    return loss_and_grad(lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k), student, teacher, temperature, grad_output, **kwargs)


def references(student, teacher, temperature, grad_output, **kwargs):
    """(float64 loss, float64 grad) and PyTorch's at the input precision."""
    exact = loss_and_grad(kd_loss_reference, student.double(), teacher.double(), temperature, grad_output, **kwargs)
    lowp = loss_and_grad(kd_loss_reference, student, teacher, temperature, grad_output, **kwargs)
    return exact, lowp


def assert_within_tolerance(name, got, exact, lowp, dtype):
    got, exact, lowp = got.double().cpu(), exact.double().cpu(), lowp.double().cpu()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - exact).abs().max().item()
    ref_err = (lowp - exact).abs().max().item()
    bound = FACTOR * ref_err + FLOOR[dtype] * max(exact.abs().max().item(), 1e-30)
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (PyTorch's own error {ref_err:.3g})"


def check_against_reference(backend, student, teacher, temperature, **kwargs):
    loss_shape = () if kwargs.get("reduction", "batchmean") != "none" else student.shape[:-1]
    go = grad_output_for(loss_shape)
    loss, grad = run_backend(backend, student, teacher, temperature, go, **kwargs)
    cpu_kwargs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    exact, lowp = references(student.cpu(), teacher.cpu(), temperature, go, **cpu_kwargs)
    assert loss.dtype == torch.float32 or student.dtype == torch.float64, f"loss dtype {loss.dtype}"
    assert grad.dtype == student.dtype, f"grad dtype {grad.dtype} != student dtype {student.dtype}"
    assert_within_tolerance("loss", loss, exact[0], lowp[0], torch.float32 if student.dtype != torch.float64 else torch.float64)
    assert_within_tolerance("grad", grad, exact[1], lowp[1], student.dtype)
