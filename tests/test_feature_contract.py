"""The fused-loss contract for hint_loss and attention_transfer_loss on every backend that can run
here: second-order gradients, gradient penalties, repeated backward through a retained graph, a
constant teacher (said once), and bf16 through a whole backward. Backends: reference and cpu;
triton on a GPU or, without one, in the interpreter (TRITON_INTERPRET=1, set by conftest.py);
cuda on a GPU.
"""

import logging
import os

import pytest
import torch

import fastkd
from fastkd import _ext
from fastkd.ops import fused_autograd as _fused
from fastkd.ops import feature as feature_ops
from feature_helpers import make_features, make_maps

GPU = torch.cuda.is_available()
TRITON_RUNS = feature_ops.HINT_TRITON_ERROR is None and (GPU or os.environ.get("TRITON_INTERPRET") == "1")
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason=feature_ops.HINT_TRITON_ERROR or "no GPU, no interpreter")),
    pytest.param("cuda", marks=pytest.mark.skipif(not (GPU and _ext.has_kernel("hint_forward", "CUDA")), reason="no GPU or no CUDA build")),
]
# Triton computes in float32 and refuses float64.
FLOAT64_BACKENDS = [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "triton"]
KINDS = list(feature_ops.HINT_KINDS)


def dev(backend):
    return "cuda" if backend in ("triton", "cuda") and GPU else "cpu"


def hint(backend, kind, reduction="mean"):
    return lambda x, t: fastkd.hint_loss(x, t, kind=kind, reduction=reduction, backend=backend)


def attention(backend, p=2.0, reduction="mean"):
    return lambda x, t: fastkd.attention_transfer_loss(x, t, p=p, reduction=reduction, backend=backend)


def cases(backend, dtype):
    """(name, loss function, student, teacher): the ops' kinds and exponents, small."""
    s, t = make_features((3, 2, 5), dtype, device=dev(backend))
    ms, mt = make_maps((2, 3, 3, 4), 4, dtype, device=dev(backend))
    out = [(kind, hint(backend, kind, "none" if kind == "cosine" else "mean"), s, t) for kind in KINDS]
    out += [(f"at p={p}", attention(backend, p, "none" if p == 1.0 else "mean"), ms, mt) for p in (2.0, 1.0, 2.5)]
    return out


# ------------------------------------------------------------------------------------------
# 1. Second-order gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradgradcheck_float64(backend):
    for name, fn, s, t in cases(backend, torch.float64):
        assert torch.autograd.gradgradcheck(lambda x: fn(x, t), (s.clone().requires_grad_(True),)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_the_reference(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for (name, fn, s, t), (_, ref, _, _) in zip(cases(backend, dtype), cases("reference", dtype)):
        def penalised_grad(f):
            x = s.clone().requires_grad_(True)
            loss = f(x, t).sum()
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            assert g.requires_grad, f"{name}: the first-order gradient is a constant to autograd"
            (loss + 10 * g.pow(2).sum()).backward()
            return x.grad

        torch.testing.assert_close(penalised_grad(fn), penalised_grad(ref), **tol, msg=name)


# ------------------------------------------------------------------------------------------
# 2. Repeated backward through a retained graph
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", [1.0, 3.0, "per-row"])
def test_repeated_backward_through_a_retained_graph_accumulates(backend, weight):
    for name, fn, s, t in cases(backend, torch.float32):
        def total(inp):
            loss = fn(inp, t)
            if loss.dim() == 0:
                return loss * (1.0 if weight == "per-row" else weight)
            w = torch.arange(1.0, loss.shape[0] + 1, device=loss.device) if weight == "per-row" else weight
            return (loss * w).sum()

        once = s.clone().requires_grad_(True)
        total(once).backward()
        x = s.clone().requires_grad_(True)
        loss = total(x)
        for _ in range(3):
            loss.backward(retain_graph=True)
        torch.testing.assert_close(x.grad, 3 * once.grad, msg=name)


# ------------------------------------------------------------------------------------------
# 3. The teacher is a constant, said once per op
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_requiring_grad_is_constant_and_said_once(backend, caplog, monkeypatch):
    monkeypatch.setattr(_fused, "_said", set())
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        for name, fn, s, t in cases(backend, torch.float32):
            x, y = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
            fn(x, y).sum().backward()
            fn(x, y).sum().backward()
            assert y.grad is None and x.grad is not None, name
    said = [r.getMessage() for r in caplog.records if "teacher is treated as a constant" in r.getMessage()]
    assert len(said) == 2 and any("hint_loss" in m for m in said) and any("attention_transfer_loss" in m for m in said)


# ------------------------------------------------------------------------------------------
# 4. Low precision through a whole step, and no gradient when none is wanted
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_student_gets_a_gradient_in_its_dtype(backend, dtype):
    for name, fn, s, t in cases(backend, dtype):
        x = s.clone().requires_grad_(True)
        loss = fn(x, t)
        assert loss.dtype == torch.float32, name
        loss.sum().backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_gives_the_same_loss(backend):
    for name, fn, s, t in cases(backend, torch.float32):
        with torch.no_grad():
            a = fn(s, t)
        b = fn(s.clone().requires_grad_(True), t).detach()
        torch.testing.assert_close(a, b, msg=name)
