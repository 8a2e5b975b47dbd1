"""The fused-loss contract for hint_loss and attention_transfer_loss on every backend that can run
here: second-order gradients and bf16 through a whole backward (gradient penalties, retained
graphs and a constant teacher: test_conformance.py). Backends: reference and cpu;
triton on a GPU or, without one, in the interpreter (TRITON_INTERPRET=1, set by conftest.py);
cuda on a GPU.
"""

import pytest
import torch

import fastkd
from fastkd.ops import feature as feature_ops
from backend_helpers import backend_params, device_of, float64_backends
from feature_helpers import make_features, make_maps

BACKENDS = backend_params("hint_forward", feature_ops.HINT_TRITON_ERROR)
FLOAT64_BACKENDS = float64_backends(BACKENDS)
KINDS = list(feature_ops.HINT_KINDS)


def hint(backend, kind, reduction="mean"):
    return lambda x, t: fastkd.hint_loss(x, t, kind=kind, reduction=reduction, backend=backend)


def attention(backend, p=2.0, reduction="mean"):
    return lambda x, t: fastkd.attention_transfer_loss(x, t, p=p, reduction=reduction, backend=backend)


def cases(backend, dtype):
    """(name, loss function, student, teacher): the ops' kinds and exponents, small."""
    s, t = make_features((3, 2, 5), dtype, device=device_of(backend))
    ms, mt = make_maps((2, 3, 3, 4), 4, dtype, device=device_of(backend))
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


# ------------------------------------------------------------------------------------------
# 2. Repeated backward through a retained graph
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# 3. The teacher is a constant, said once per op
# ------------------------------------------------------------------------------------------


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
