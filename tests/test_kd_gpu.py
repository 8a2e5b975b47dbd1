"""kd_loss's GPU backends (CUDA C++ and Triton, compiled) against the reference, on a CUDA device.
Skipped where none exists: these run, and must pass, wherever one does."""

import math

import pytest
import torch

import fastkd
from fastkd import _ext
from kd_helpers import check_against_reference, make_labels, make_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not _ext.has_kernel("kd_forward", "CUDA"), reason="built without CUDA")),
    "triton",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(41, 1271), (3, 131073), (2, 3, 257), (1, 1), (64, 32000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["none", "hard"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gpu_matches_reference(backend, shape, dtype, mode, reduction):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in float32 and refuses float64")
    s, t = make_logits(shape, dtype, device="cuda")
    kwargs = {}
    if mode == "hard":
        rows = shape[:-1]
        kwargs = dict(labels=make_labels(rows, shape[-1], ignored=(0,) if math.prod(rows) > 1 else (), device="cuda"), hard_weight=0.3)
    for T in (1.0, 2.5):
        check_against_reference(backend, s, t, T, reduction=reduction, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_awkward_inputs(backend):
    s, t = make_logits((64, 90), std=30.0, device="cuda")
    check_against_reference(backend, s.t()[::2], t.t()[1::2], 2.0)  # non-contiguous, wide
    big_s, big_t = make_logits((8, 1000), std=1.0, device="cuda")
    check_against_reference(backend, big_s * 1e4, big_t.sign() * 1e4 + big_t, 1.0)
    s = s.clone()
    t = t.clone()
    s[:, 80:] = -math.inf
    t[:, 80:] = -math.inf
    s.requires_grad_(True)
    loss = fastkd.kd_loss(s, t, 2.0, labels=torch.full((64,), -100, device="cuda"), backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(s.grad, torch.zeros_like(s))
    s.grad = None
    loss = fastkd.kd_loss(s, t, 2.0, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(s.grad[:, 80:], torch.zeros_like(s.grad[:, 80:]))
    t[3, 5] = math.nan
    assert torch.isnan(fastkd.kd_loss(s.detach(), t, 2.0, reduction="none", backend=backend)[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    s, t = make_logits((4, 6, 777), device="cuda")
    y = make_labels((4, 6), 777, ignored=(2,), device="cuda")

    def step(student):
        return fastkd.kd_loss(student, t, 2.0, labels=y, hard_weight=0.2, backend=backend) * 1.5

    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    step(a).backward()
    torch.compile(step, fullgraph=True)(b).backward()
    torch.testing.assert_close(b.grad, a.grad)


def test_gpu_opcheck():
    s, t = make_logits((5, 333), device="cuda")
    y = make_labels((5,), 333, ignored=(1,), device="cuda")
    args = (s.requires_grad_(True), t, y, None, "kl", 0.0, 2.0, 0.25, -100, "batchmean", True, True)
    if _ext.has_kernel("kd_forward", "CUDA"):
        torch.library.opcheck(torch.ops.fastkd.kd_forward.default, args)
    torch.library.opcheck(torch.ops.fastkd.kd_forward_triton.default, args)
