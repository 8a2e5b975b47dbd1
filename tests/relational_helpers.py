"""Shared by the relational-loss tests of every backend: inputs, the float64 oracle, and the
FlashAttention-style tolerance rule of kd_helpers (a backend's error against the float64 reference
at most 4x PyTorch's own error at the input precision, plus a floor)."""

from __future__ import annotations

import torch

import fastkd
from fastkd.ops import relational as rel
from kd_helpers import assert_within_tolerance

OPS = ("rkd_distance", "rkd_angle", "sp", "pkt")
# The smallest batch each op accepts.
MIN_BATCH = {"rkd_distance": 2, "rkd_angle": 2, "sp": 1, "pkt": 1}
GRAD_OUTPUT = 0.7


def public(op):
    return getattr(fastkd, f"{op}_loss")


def reference(op):
    return getattr(rel, f"{op}_loss_reference")


def make_embeddings(b, ds, dt, dtype=torch.float32, *, kind="random", std=1.0, offset=0.0, seed=0, device="cpu"):
    """Student ``[b, *ds]`` and teacher ``[b, *dt]`` (``ds``, ``dt``: an int or a shape).

    ``kind``: ``random``; ``duplicates`` (rows 1 and b-1 repeat row 0 in student and teacher: the
    same sample twice); ``student_duplicates`` (only the student's rows repeat: zero difference
    vectors the teacher does not have); ``all_equal`` (every student row the same); ``zero_row``
    (row 1 of the student and row 0 of the teacher are zero)."""
    ds = (ds,) if isinstance(ds, int) else tuple(ds)
    dt = (dt,) if isinstance(dt, int) else tuple(dt)
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn((b,) + ds, generator=gen, dtype=torch.float64) * std + offset
    t = torch.randn((b,) + dt, generator=gen, dtype=torch.float64) * std + offset
    if kind in ("duplicates", "student_duplicates") and b >= 2:
        s[1] = s[0]
        s[-1] = s[0]
        if kind == "duplicates":
            t[1] = t[0]
            t[-1] = t[0]
    elif kind == "all_equal":
        s[:] = s[0]
    elif kind == "zero_row":
        s[min(1, b - 1)] = 0
        t[0] = 0
    elif kind != "random":
        raise ValueError(kind)
    return s.to(dtype).to(device), t.to(dtype).to(device)


def loss_and_grad(fn, student, teacher, grad_output=GRAD_OUTPUT, **kwargs):
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x, teacher, **kwargs)
    (loss * grad_output).backward()
    return loss.detach(), x.grad


def check_against_reference(op, backend, student, teacher, **kwargs):
    """The backend's loss and gradient against the float64 reference, within the bound."""
    loss, grad = loss_and_grad(lambda *a, **k: public(op)(*a, backend=backend, **k), student, teacher, **kwargs)
    s, t = student.cpu(), teacher.cpu()
    exact = loss_and_grad(reference(op), s.double(), t.double(), **kwargs)
    lowp = loss_and_grad(reference(op), s, t, **kwargs)
    want = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == want, f"loss dtype {loss.dtype}, expected {want}"
    assert loss.shape == (), f"loss shape {tuple(loss.shape)}"
    assert grad.dtype == student.dtype and grad.shape == student.shape, f"grad {grad.dtype} {tuple(grad.shape)}"
    assert_within_tolerance(f"{op} loss", loss, exact[0], lowp[0], want)
    assert_within_tolerance(f"{op} grad", grad, exact[1], lowp[1], student.dtype)
    return loss, grad
