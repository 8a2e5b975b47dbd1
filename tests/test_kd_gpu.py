"""kd_loss's GPU backends (CUDA C++ and Triton, compiled) against the reference, on a CUDA device.
Skipped where none exists: these run, and must pass, wherever one does."""

import math

import pytest
import torch

import fastkd
from fastkd import _ext
from backend_helpers import backend_params
from kd_helpers import check_against_reference, make_labels, make_logits


BACKENDS = backend_params("kd_forward", None, names=("cuda", "triton"))


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


# ------------------------------------------------------------------------------------------
# The other divergences and ensembles
# ------------------------------------------------------------------------------------------

DIVS = [("reverse_kl", None), ("jsd", None), ("jsd", 0.9), ("tvd", None), ("skew_kl", None), ("skew_reverse_kl", 0.3), ("kl", None)]
DIV_SHAPES = [(41, 1271), (3, 131073), (2, 3, 257), (64, 32000), (1, 1)]
DIV_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _teachers(shape, dtype, m, seed=20):
    return torch.stack([make_logits(shape, dtype, seed=seed + i, device="cuda")[1] for i in range(m)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", DIVS, ids=[f"{d}-{b}" for d, b in DIVS])
@pytest.mark.parametrize("shape", DIV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_divergences_and_ensembles_match_reference(backend, div, beta, shape):
    for k, dtype in enumerate(DIV_DTYPES):
        if backend == "triton" and dtype == torch.float64:
            continue
        s, t = make_logits(shape, dtype, device="cuda")
        rows = shape[:-1]
        labels = make_labels(rows, shape[-1], ignored=(0,) if math.prod(rows) > 1 else (), device="cuda")
        ens = _teachers(shape, dtype, 3)
        weights = torch.tensor([0.25, 0.6, 0.15], device="cuda")
        reduction = ("batchmean", "none", "sum")[k % 3]
        if div != "kl":
            check_against_reference(backend, s, t, 2.0, divergence=div, beta=beta, reduction=reduction, labels=labels, hard_weight=0.3 * (k % 2))
        check_against_reference(backend, s, ens, 1.0, divergence=div, beta=beta, reduction=reduction, teacher_weights=weights if k % 2 else None, labels=labels, hard_weight=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", DIVS, ids=[f"{d}-{b}" for d, b in DIVS])
def test_gpu_divergences_awkward_rows(backend, div, beta):
    s, t = make_logits((8, 3000), std=30.0, device="cuda")
    ens = torch.stack([t, t.roll(11, -1), t.flip(-1)])
    for teacher in ((t, ens) if div != "kl" else (ens,)):
        check_against_reference(backend, s, teacher, 4.0, divergence=div, beta=beta)
        ms, mt = s.clone(), teacher.clone()
        ms[:, 2500:] = -math.inf
        mt[..., 2500:] = -math.inf
        x = ms.clone().requires_grad_(True)
        loss = fastkd.kd_loss(x, mt, 2.0, divergence=div, beta=beta, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.equal(x.grad[:, 2500:], torch.zeros_like(x.grad[:, 2500:]))
        torch.testing.assert_close(loss, fastkd.kd_loss(ms[:, :2500], mt[..., :2500], 2.0, divergence=div, beta=beta, backend="reference"), rtol=1e-4, atol=1e-5)
        low_s, low_t = s.double().clone(), teacher.double().clone()
        low_s[:, :1000] -= 500.0
        low_t[..., 700:1900] -= 500.0
        got = fastkd.kd_loss(low_s.float(), low_t.float(), 1.0, divergence=div, beta=beta, reduction="none", backend=backend)
        exact = fastkd.kd_loss(low_s.cpu(), low_t.cpu(), 1.0, divergence=div, beta=beta, reduction="none", backend="reference")
        torch.testing.assert_close(got.double().cpu(), exact, rtol=1e-4, atol=1e-4)
        nan_t = teacher.clone()
        nan_t[..., 3, 5] = math.nan
        rows = fastkd.kd_loss(s, nan_t, 2.0, divergence=div, beta=beta, reduction="none", backend=backend)
        assert torch.isnan(rows[3]) and torch.isfinite(rows[[0, 1, 2, 4, 5, 6, 7]]).all()
        y = torch.full((8,), -100, device="cuda")
        y[0] = 1
        clean = s.clone().requires_grad_(True)
        fastkd.kd_loss(clean, teacher, 2.0, labels=y, hard_weight=0.5, divergence=div, beta=beta, backend=backend).backward()
        x = s.clone().requires_grad_(True)
        loss = fastkd.kd_loss(x, nan_t, 2.0, labels=y, hard_weight=0.5, divergence=div, beta=beta, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.equal(x.grad[1:], torch.zeros_like(x.grad[1:]))
        torch.testing.assert_close(x.grad, clean.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_divergence_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("the Triton kernel computes in float32 and refuses float64")
    s, t = make_logits((4, 9), torch.float64, device="cuda")
    ens = _teachers((4, 9), torch.float64, 2)
    y = torch.tensor([2, -100, 0, 8], device="cuda")
    for div, beta in DIVS:
        for teacher in ((t, ens) if div != "kl" else (ens,)):

            def f(x):
                return fastkd.kd_loss(x, teacher, 1.7, labels=y, hard_weight=0.3, reduction="none", divergence=div, beta=beta, backend=backend)

            assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(True),))
            assert torch.autograd.gradgradcheck(f, (s.clone().requires_grad_(True),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_divergence_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    s, _ = make_logits((4, 6, 777), device="cuda")
    ens = _teachers((4, 6, 777), torch.float32, 3)
    y = make_labels((4, 6), 777, ignored=(2,), device="cuda")
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")

    def step(student):
        return fastkd.kd_loss(student, ens, 2.0, labels=y, hard_weight=0.2, divergence="skew_reverse_kl", teacher_weights=w, backend=backend) * 1.5

    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    step(a).backward()
    torch.compile(step, fullgraph=True)(b).backward()
    torch.testing.assert_close(b.grad, a.grad)


def test_gpu_divergence_opcheck():
    s, t = make_logits((5, 333), device="cuda")
    ens = _teachers((5, 333), torch.float32, 3)
    y = make_labels((5,), 333, ignored=(1,), device="cuda")
    w = torch.tensor([0.2, 0.3, 0.5], device="cuda")
    for teacher, weights, div in ((t, None, "jsd"), (ens, w, "tvd"), (ens, None, "kl")):
        args = (s.clone().requires_grad_(True), teacher, y, weights, div, 0.5 if div == "jsd" else 0.0, 2.0, 0.25, -100, "batchmean", True, True)
        if _ext.has_kernel("kd_forward", "CUDA"):
            torch.library.opcheck(torch.ops.fastkd.kd_forward.default, args)
        torch.library.opcheck(torch.ops.fastkd.kd_forward_triton.default, args)
