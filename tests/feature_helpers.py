"""Shared by the feature-loss tests (hint_loss, attention_transfer_loss) of every backend: inputs,
the float64 oracle, and the tolerance rule of kd_helpers (a backend's error against the float64
reference at most FACTOR times PyTorch's own error at the input's precision, plus a floor)."""

from __future__ import annotations

import torch

import fastkd
from fastkd.functional import attention_transfer_loss_reference, hint_loss_reference
from kd_helpers import assert_within_tolerance, compute_dtype, grad_output_for, row_max


def make_features(shape, dtype=torch.float32, std=1.0, seed=0, device="cpu", relu=False):
    """A student-like and a teacher-like feature of ``shape``, correlated (the teacher is the
    student plus as much noise) so that the losses are neither trivial nor all noise."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    t = s + torch.randn(shape, generator=gen, dtype=torch.float64) * std
    if relu:  # post-activation maps: many exact zeros
        s, t = s.clamp_min(0), t.clamp_min(0)
    return s.to(dtype).to(device), t.to(dtype).to(device)


def make_maps(student_shape, teacher_channels, dtype=torch.float32, seed=0, device="cpu", relu=False):
    """A student map ``student_shape`` = [B, C_s, ...] and a teacher map with C_t channels."""
    gen = torch.Generator().manual_seed(seed)
    t_shape = (student_shape[0], teacher_channels) + tuple(student_shape[2:])
    s = torch.randn(student_shape, generator=gen, dtype=torch.float64)
    t = torch.randn(t_shape, generator=gen, dtype=torch.float64) + s.mean(1, keepdim=True)
    if relu:
        s, t = s.clamp_min(0), t.clamp_min(0)
    return s.to(dtype).to(device), t.to(dtype).to(device)


def loss_and_grads(fn, students, teachers, grad_output):
    xs = [s.detach().clone().requires_grad_(True) for s in students]
    loss = fn(xs, teachers)
    (loss * grad_output.to(device=loss.device, dtype=loss.dtype)).sum().backward()
    return loss.detach(), [x.grad for x in xs]


def check_fn_against_reference(backend_fn, reference_fn, students, teachers, per_row):
    """``backend_fn(students, teachers)`` and ``reference_fn`` (same signature) give a loss; the
    gradients w.r.t. every student tensor are compared too, with a grad_output that is not 1."""
    go = grad_output_for((students[0].shape[0],) if per_row else ())
    loss, grads = loss_and_grads(backend_fn, students, teachers, go)
    cpu = lambda xs, f=lambda x: x: [f(x.cpu()) for x in xs]  # noqa: E731
    exact = loss_and_grads(reference_fn, cpu(students, torch.Tensor.double), cpu(teachers, torch.Tensor.double), go)
    lowp = loss_and_grads(reference_fn, cpu(students), cpu(teachers), go)
    compute = loss_and_grads(reference_fn, cpu(students, lambda x: x.to(compute_dtype(x.dtype))), cpu(teachers), go)
    # Each sample's gradient scale is that of its terms, which cancel where the teacher is zero
    # or equals the student (exactly 0 in theory, rounding noise in float64): the same student
    # against its neighbour's teacher shows the size those terms have.
    rolled = loss_and_grads(reference_fn, cpu(students, torch.Tensor.double),
                            [t.roll(1, 0) for t in cpu(teachers, torch.Tensor.double)], go)
    dtype = students[0].dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"loss dtype {loss.dtype}"
    assert_within_tolerance("loss", loss, exact[0], lowp[0], torch.float64 if dtype == torch.float64 else torch.float32)
    for i, (g, ge, gl, gc, gr, s) in enumerate(zip(grads, exact[1], lowp[1], compute[1], rolled[1], students)):
        assert g.dtype == s.dtype and g.shape == s.shape, f"grad {i}: {g.dtype} {tuple(g.shape)} for a {s.dtype} {tuple(s.shape)} input"
        # A feature gradient's rows are samples: every entry of a sample shares its norms and means.
        flat = [x.reshape(x.shape[0], -1) for x in (g, ge, gl, gc, gr)]
        scale = torch.maximum(row_max(flat[1]), row_max(flat[4]))
        assert_within_tolerance(f"grad {i}", *flat[:3], s.dtype, scale=scale, lowp_compute=flat[3])


def check_hint(backend, s, t, kind="mse", reduction="mean"):
    check_fn_against_reference(
        lambda ss, ts: fastkd.hint_loss(ss[0], ts[0], kind=kind, reduction=reduction, backend=backend),
        lambda ss, ts: hint_loss_reference(ss[0], ts[0], kind=kind, reduction=reduction),
        [s], [t], reduction == "none",
    )


def check_at(backend, students, teachers, p=2.0, reduction="mean"):
    """One pair (tensors) or several (lists)."""
    if isinstance(students, torch.Tensor):
        students, teachers = [students], [teachers]
    check_fn_against_reference(
        lambda ss, ts: fastkd.attention_transfer_loss(ss, ts, p=p, reduction=reduction, backend=backend),
        lambda ss, ts: attention_transfer_loss_reference(ss, ts, p=p, reduction=reduction),
        list(students), list(teachers), reduction == "none",
    )
