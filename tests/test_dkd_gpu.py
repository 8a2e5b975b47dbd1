"""dkd_loss's GPU backends (CUDA C++ and Triton, compiled) against the reference, on a CUDA
device. Skipped where none exists: these run, and must pass, wherever one does. (The contract
tests of test_dkd.py also run on both GPU backends there.)"""

import math

import pytest
import torch

import fastkd
from backend_helpers import backend_params
from dkd_helpers import check_against_reference
from kd_helpers import make_labels, make_logits


BACKENDS = backend_params("dkd_forward", None, names=("cuda", "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(41, 1271), (3, 131073), (2, 3, 257), (1, 2), (64, 32000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gpu_matches_reference(backend, shape, dtype, reduction):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in float32 and refuses float64")
    s, t = make_logits(shape, dtype, device="cuda")
    rows = math.prod(shape[:-1])
    y = make_labels(shape[:-1], shape[-1], ignored=(0,) if rows > 1 else (), device="cuda")
    y.view(-1)[-1] = shape[-1] - 1  # a target in the last block
    for T, alpha, beta in ((1.0, 1.0, 8.0), (4.0, 0.5, 2.0)):
        check_against_reference(backend, s, t, y, T, alpha=alpha, beta=beta, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_awkward_inputs(backend):
    s, t = make_logits((64, 90), std=30.0, device="cuda")
    y = make_labels((90,), 64, device="cuda")[::2]
    check_against_reference(backend, s.t()[::2], t.t()[1::2], y, 2.0)  # non-contiguous, wide
    big_s, big_t = make_logits((8, 1000), std=1.0, device="cuda")
    y8 = make_labels((8,), 1000, device="cuda")
    check_against_reference(backend, big_s * 1e4, big_t.sign() * 1e4 + big_t, y8, 1.0)
    # the target 50 above / below every other logit
    rows = torch.arange(8, device="cuda")
    dom = big_s.clone()
    dom[rows[:4], y8[:4]] = 60.0
    dom[rows[4:], y8[4:]] = -60.0
    check_against_reference(backend, dom, big_t, y8, 1.0)
    # masked vocabulary, all rows ignored, NaN
    s = s.clone()
    t = t.clone()
    s[:, 80:] = -math.inf
    t[:, 80:] = -math.inf
    y64 = make_labels((64,), 80, device="cuda")
    s.requires_grad_(True)
    loss = fastkd.dkd_loss(s, t, torch.full((64,), -100, device="cuda"), 2.0, backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(s.grad, torch.zeros_like(s))
    s.grad = None
    loss = fastkd.dkd_loss(s, t, y64, 2.0, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(s.grad[:, 80:], torch.zeros_like(s.grad[:, 80:]))
    t[3, 5] = math.nan
    assert torch.isnan(fastkd.dkd_loss(s.detach(), t, y64, 2.0, reduction="none", backend=backend)[3])
    # an out-of-range label is a NaN row on the GPU (no host synchronisation to check it)
    bad = y64.clone()
    bad[7] = 90
    rows = fastkd.dkd_loss(s.detach(), t, bad, 2.0, reduction="none", backend=backend)
    assert torch.isnan(rows[7]) and torch.isfinite(rows[8])


