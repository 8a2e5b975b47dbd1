"""Shared by the sparse_kd_loss tests of every backend: a sparse teacher (top-k of a dense one),
the float64 oracle, and the tolerance rule of kd_helpers (FlashAttention-style: at most FACTOR
times PyTorch's own low-precision error, plus a small floor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import sparse_kd_loss_reference
from kd_helpers import check_logits_loss, kd_gradient_scale

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


def check_against_reference(backend, student, vals, idx, temperature, **kwargs):
    """The backend's loss and gradient within the tolerance rule of the float64 reference, with a
    grad_output that is not 1."""
    return check_logits_loss(lambda *a, **k: fastkd.sparse_kd_loss(*a, backend=backend, **k), sparse_kd_loss_reference, student, vals, idx,
                             temperature, grad_scale=lambda go, **kw: kd_gradient_scale(student.shape, temperature, go, **kw), **kwargs)
