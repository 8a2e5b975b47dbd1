"""Shared by the fused-head tests (fused_linear_kd_loss, fused_linear_sparse_kd_loss): inputs,
the loss-and-gradients of a call, and the check of a fused head against its float64 composite
under the kd tests' tolerance rule, with the GEMMs' error scales."""


import pytest
import torch

from fastkd.ops import fused_linear as fl
from kd_helpers import assert_within_tolerance, compute_dtype

STUDENT = ("student_hidden", "student_weight", "student_bias")


def make(lead, h, ht, v, dtype=torch.float32, bias=True, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    return dict(
        student_hidden=r(*lead, h, s=scale),
        student_weight=r(v, h, s=h**-0.5),
        student_bias=r(v, s=0.1) if bias else None,
        teacher_hidden=r(*lead, ht, s=scale),
        teacher_weight=r(v, ht, s=ht**-0.5 * 2),
        teacher_bias=r(v, s=0.1) if bias else None,
    )


def grad_output_for(shape):
    g = torch.Generator().manual_seed(3)
    return torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 if shape else torch.tensor(0.7, dtype=torch.float64)


def labels_for(lead, v, ignored=(1,), seed=5, device="cpu"):
    y = torch.randint(0, v, lead, generator=torch.Generator().manual_seed(seed))
    for i in ignored:
        y.view(-1)[i] = -100
    return y.to(device)


def run(fn, x, grad_output, positional, **kwargs):
    """Loss and the student gradients (hidden, weight, bias) of (loss * grad_output).sum(), for
    ``fn(*x[positional], 2.0, **rest of x, **kwargs)``."""
    leaves = {k: x[k].detach().clone().requires_grad_(True) for k in STUDENT if x.get(k) is not None}
    args = dict(x, **leaves)
    loss = fn(*(args.pop(k) for k in positional), 2.0, **args, **kwargs)
    (loss * grad_output.to(loss)).sum().backward()
    return [loss.detach()] + [leaves[k].grad for k in STUDENT if k in leaves]


def gemm_scales(x64, grad_output, logit_loss, **kwargs):
    """The scale of each student-gradient entry: the sum of the absolute terms it adds up,
    ``|g| @ |W_s|``, ``|g|ᵀ @ |h_s|`` and ``Σ_rows |g|``, with g the float64 gradient w.r.t. the
    student logits of ``logit_loss(logits, x64, **kwargs)`` (the bound of a matrix product's
    rounding is relative to that sum, not to the result, which may cancel to near 0)."""
    h, w, b = x64["student_hidden"], x64["student_weight"], x64["student_bias"]
    flat_h = h.reshape(-1, h.shape[-1])
    logits = flat_h @ w.t() + (0 if b is None else b)
    kw = dict(kwargs)
    if kw.get("labels") is not None:
        kw["labels"] = kw["labels"].reshape(-1)
    # A soft-capped student: g w.r.t. the capped logits. The cap's slope 1 - tanh² is computed from
    # a rounded tanh, so its error is absolute (~ulp(1)), not relative to a small slope: the
    # slope's own scale is its bound 1 (PyTorch's composite carries the same error).
    logits = fl.softcapped(logits, kw.pop("student_softcap", None)).detach().requires_grad_(True)
    loss = logit_loss(logits, x64, **kw)
    (g,) = torch.autograd.grad((loss * grad_output.reshape(loss.shape)).sum(), logits)
    g = g.abs()
    scales = [None, (g @ w.abs()).reshape(h.shape), g.t() @ flat_h.abs()]
    return scales + ([g.sum(0)] if b is not None else [])


def check(fused, reference, logit_loss, positional, x, **kwargs):
    """Every output of ``fused`` (a function of the inputs and kwargs, the backend bound) within
    the kd tests' rule (kd_helpers.assert_within_tolerance) of the float64 composite
    ``reference``: entry by entry, FACTOR x PyTorch's own error at the input precision, plus
    floors relative to the entry and to its scale (``gemm_scales`` with ``logit_loss``)."""
    lead = x["student_hidden"].shape[:-1]
    go = grad_output_for(lead if kwargs.get("reduction") == "none" else ())
    got = run(fused, x, go, positional, **kwargs)
    x64 = {k: (v.double().cpu() if v is not None and v.is_floating_point() else v.cpu() if v is not None else None) for k, v in x.items()}
    kw64 = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items() if k != "chunk_size"}
    exact = run(reference, x64, go, positional, **kw64)
    xcpu = {k: (v.cpu() if v is not None else None) for k, v in x.items()}
    lowp = run(reference, xcpu, go, positional, **kw64)
    # The composite's gradients before rounding to a 16-bit dtype: on the same values in float32.
    up = {k: (v.to(compute_dtype(v.dtype)) if v is not None and v.is_floating_point() else v) for k, v in xcpu.items()}
    compute = run(reference, up, go, positional, **kw64)
    scales = gemm_scales(x64, go, logit_loss, **kw64)
    names = ["loss", "d student_hidden", "d student_weight", "d student_bias"]
    for name, a, e, l, c, scale in zip(names, got, exact, lowp, compute, scales):
        dtype = torch.float32 if name == "loss" and x["student_hidden"].dtype != torch.float64 else x["student_hidden"].dtype
        assert_within_tolerance(name, a, e, l, dtype, scale=scale, lowp_compute=c)
