"""The C++ divergence rules (csrc/divergence.h: names, beta ranges, endpoint collapse, gradient
factor) agree with the Python table (fastkd/ops/divergences.py and the reference).

Every name and a grid of betas inside, at and outside each range go to the CPU op directly: it
must refuse exactly what the Python validation refuses, and where it accepts, its loss and
gradient must be the float64 reference's (which collapses the endpoints itself).
"""

import math
import re

import pytest
import torch

from fastkd import _ext
from fastkd.ops.divergences import DIVERGENCES, check
from fastkd.ops.kd import kd_loss_reference

pytestmark = pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))

BETAS = (-0.25, 0.0, 0.3, 1.0, 1.25, math.nan)


def _op(s, t, name, beta):
    return torch.ops.fastkd.kd_forward(s, t, None, None, name, beta, 2.0, 0.0, -100, "sum", True, True)


def _python_accepts(name, beta):
    try:
        check(name, beta)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_cpu_rules_agree_with_the_python_table(name):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 21, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 21, generator=g, dtype=torch.float64) * 2
    # A divergence without beta ignores the op's beta (Python refuses one given: nothing to compare).
    for beta in BETAS if DIVERGENCES[name].beta is not None else (0.0,):
        py_beta = beta if DIVERGENCES[name].beta is not None else None
        if not _python_accepts(name, py_beta):
            with pytest.raises(RuntimeError, match=f"beta must be in .* for divergence {name}, got"):
                _op(s, t, name, beta)
            continue
        loss, grad = _op(s, t, name, beta)
        s_ref = s.clone().requires_grad_()
        ref = kd_loss_reference(s_ref, t, 2.0, reduction="sum", divergence=name, beta=py_beta)
        ref.backward()
        where = f"{name} beta={beta}"
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-12, msg=where)
        torch.testing.assert_close(grad, s_ref.grad, rtol=1e-9, atol=1e-12, msg=where)


def test_cpu_knows_exactly_the_python_names():
    s = torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="divergence must be one of") as err:
        _op(s, s, "wasserstein", 0.0)
    listed = re.search(r"divergence must be one of ([a-z_, ]+), got", str(err.value)).group(1)
    assert set(listed.split(", ")) == set(DIVERGENCES)
