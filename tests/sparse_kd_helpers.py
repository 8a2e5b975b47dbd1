"""Shared by the sparse_kd_loss tests of every backend: a sparse teacher (top-k of a dense one),
the float64 oracle, and the tolerance rule of kd_helpers (FlashAttention-style: at most FACTOR
times PyTorch's own low-precision error, plus a small floor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import sparse_kd_loss_reference
from kd_helpers import assert_within_tolerance, compute_dtype, grad_output_for, kd_gradient_scale, row_max

# (values, tail) pairs that make sense: "uniform" needs log-probabilities.
TAILS = [("logits", "renormalize"), ("logprobs", "uniform")]


def make_dense(shape, dtype=torch.float32, std=3.0, seed=0, device="cpu"):
    """Student logits in `dtype` and float64 teacher logits, both of `shape`."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    return student.to(dtype).to(device), teacher.to(device)


def top_k(teacher, k, values="logits", values_dtype=torch.float32, index_dtype=torch.int64, seed=3):
    """The teacher's top-k (values, indices) in a random order within each row; log-probabilities
    over the full row when values == "logprobs"."""
    src = F.log_softmax(teacher.double(), -1) if values == "logprobs" else teacher.double()
    vals, idx = src.topk(k, dim=-1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(idx.shape, generator=gen).argsort(-1).to(idx.device)
    return vals.gather(-1, order).to(values_dtype), idx.gather(-1, order).to(index_dtype)


def make_sparse(shape, k, dtype=torch.float32, values="logits", std=3.0, seed=0, device="cpu", values_dtype=None, index_dtype=torch.int64):
    """(student, teacher_values, teacher_indices): a student and the top-k of a random teacher."""
    student, teacher = make_dense(shape, dtype, std, seed, device)
    vals, idx = top_k(teacher, k, values, values_dtype or (dtype if dtype != torch.float64 else torch.float64), index_dtype, seed + 3)
    return student, vals, idx


def loss_and_grad(fn, student, vals, idx, temperature, grad_output, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, vals, idx, temperature, **kwargs)
    (loss * grad_output.to(device=loss.device, dtype=loss.dtype)).sum().backward()
    return loss.detach(), s.grad


def run_backend(backend, student, vals, idx, temperature, grad_output, **kwargs):
    return loss_and_grad(lambda *a, **k: fastkd.sparse_kd_loss(*a, backend=backend, **k), student, vals, idx, temperature, grad_output, **kwargs)


def check_against_reference(backend, student, vals, idx, temperature, **kwargs):
    """The backend's loss and gradient within the tolerance rule of the float64 reference, with a
    grad_output that is not 1."""
    loss_shape = () if kwargs.get("reduction", "batchmean") != "none" else student.shape[:-1]
    go = grad_output_for(loss_shape)
    loss, grad = run_backend(backend, student, vals, idx, temperature, go, **kwargs)
    cpu_kwargs = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    s, v, i = student.cpu(), vals.cpu(), idx.cpu()
    exact = loss_and_grad(sparse_kd_loss_reference, s.double(), v.double(), i, temperature, go, **cpu_kwargs)
    lowp = loss_and_grad(sparse_kd_loss_reference, s, v, i, temperature, go, **cpu_kwargs)
    compute = loss_and_grad(sparse_kd_loss_reference, s.to(compute_dtype(s.dtype)), v, i, temperature, go, **cpu_kwargs)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32), f"loss dtype {loss.dtype}"
    assert grad.dtype == student.dtype, f"grad dtype {grad.dtype} != student dtype {student.dtype}"
    assert_within_tolerance("loss", loss, exact[0], lowp[0], torch.float32 if student.dtype != torch.float64 else torch.float64)
    scale = torch.maximum(row_max(exact[1]), kd_gradient_scale(student.shape, temperature, go, **cpu_kwargs))
    assert_within_tolerance("grad", grad, exact[1], lowp[1], student.dtype, scale=scale, lowp_compute=compute[1])
