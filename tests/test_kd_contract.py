"""kd_loss's contract where outside test grids found it broken: second-order gradients, float64
precision, per-row fp32 accuracy, the [B, T, V] batchmean convention, repeated backward through a
retained graph, and the small ones (a teacher that requires grad, NaN in an ignored row, NumPy
integers, construction-time checks, huge temperatures).

Every backend that can run here is covered: reference and cpu; triton on a GPU or, without one,
in the interpreter (TRITON_INTERPRET=1, set by conftest.py); cuda on a GPU.
"""

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import _ext
from fastkd.functional import kd_loss_reference
from fastkd.ops import fused_autograd as _fused
from fastkd.ops import kd as kd_ops
from kd_helpers import make_labels, make_logits

needs_ext = pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))
GPU = torch.cuda.is_available()
TRITON_RUNS = kd_ops.TRITON_ERROR is None and (GPU or os.environ.get("TRITON_INTERPRET") == "1")
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=needs_ext),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason=kd_ops.TRITON_ERROR or "no GPU, no interpreter")),
    pytest.param("cuda", marks=pytest.mark.skipif(not (GPU and _ext.has_kernel("kd_forward", "CUDA")), reason="no GPU or no CUDA build")),
]
# Triton computes in float32 and refuses float64.
FLOAT64_BACKENDS = [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "triton"]


def dev(backend):
    return "cuda" if backend in ("triton", "cuda") and GPU else "cpu"
ISAS = ["avx512", "avx2", "scalar"]


def available_isas():
    if _ext.LOAD_ERROR is not None:
        return []
    os.environ.pop("FASTKD_CPU_ISA", None)
    best = torch.ops.fastkd.cpu_isa()
    return ISAS[ISAS.index(best):]


# ------------------------------------------------------------------------------------------
# 1. Second-order gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradgradcheck_float64(backend, reduction):
    s, t = make_logits((4, 9), torch.float64, device=dev(backend))
    y = torch.tensor([2, -100, 0, 8], device=dev(backend))

    def f(x):
        return fastkd.kd_loss(x, t, 1.7, labels=y, hard_weight=0.3, reduction=reduction, backend=backend)

    assert torch.autograd.gradgradcheck(f, (s.clone().requires_grad_(True),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_the_reference(backend):
    """The issue's case: a penalty on the gradient must contribute, on every backend."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    s, t = make_logits((5, 40), dtype, device=dev(backend))

    def penalised_grad(name):
        x = s.clone().requires_grad_(True)
        loss = fastkd.kd_loss(x, t, 2.0, backend=name)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        assert g.requires_grad, f"{name}: the first-order gradient is a constant to autograd"
        (loss + 10 * g.pow(2).sum()).backward()
        return x.grad

    expected = penalised_grad("reference")
    plain = s.clone().requires_grad_(True)
    fastkd.kd_loss(plain, t, 2.0, backend="reference").backward()
    assert (expected - plain.grad).abs().max() > 1e-3, "the penalty term should change the gradient"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(penalised_grad(backend), expected, **tol)


# ------------------------------------------------------------------------------------------
# 2. float64 is float64-accurate
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("temperature,hard_weight", [(1.1, 0.0), (2.0, 0.1), (0.3, 0.37), (2.7, 0.9)])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_cpu_float64_at_awkward_temperatures_and_weights(temperature, hard_weight, reduction):
    s, t = make_logits((7, 3001), torch.float64)
    y = make_labels((7,), 3001, ignored=(2,))
    kwargs = dict(labels=y, hard_weight=hard_weight, reduction=reduction)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = fastkd.kd_loss(a, t, temperature, backend="cpu", **kwargs)
    expected = kd_loss_reference(b, t, temperature, **kwargs)
    # 1e-12 is out of reach of any float32 step: a float32 coefficient alone is off by ~3e-8.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# 3. Per-row fp32 losses at least as accurate as PyTorch's composite
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cpu_per_row_losses_as_accurate_as_the_composite(temperature, monkeypatch):
    s, t = make_logits((64, 32000), torch.float64)
    exact = kd_loss_reference(s, t, temperature, reduction="none")
    sf, tf = s.float(), t.float()
    composite = F.kl_div(F.log_softmax(sf / temperature, -1), F.log_softmax(tf / temperature, -1), log_target=True, reduction="none")
    composite = composite.sum(-1) * temperature * temperature

    def rel_err(rows):
        return ((rows.double() - exact).abs() / exact.abs()).max().item()

    bound = rel_err(composite)
    for isa in available_isas():
        monkeypatch.setenv("FASTKD_CPU_ISA", isa)
        err = rel_err(fastkd.kd_loss(sf, tf, temperature, reduction="none", backend="cpu"))
        assert err <= bound, f"{isa}: per-row relative error {err:.3g} > PyTorch composite's {bound:.3g}"
        assert err <= 1e-6, f"{isa}: per-row relative error {err:.3g} above Liger's 1e-6 tolerance"


# ------------------------------------------------------------------------------------------
# 4. The [B, T, V] convention the docstring and README state
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchmean_divides_by_rows_and_sum_over_batch_gives_the_per_sequence_loss(backend):
    B, L, V, T = 3, 5, 50, 2.0
    s, t = make_logits((B, L, V), device=dev(backend))
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    per_row = F.kl_div(log_q.view(-1, V), log_p.view(-1, V), log_target=True, reduction="batchmean") * T * T
    per_sequence = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * T * T
    torch.testing.assert_close(fastkd.kd_loss(s, t, T, backend=backend), per_row)
    torch.testing.assert_close(fastkd.kd_loss(s, t, T, reduction="sum", backend=backend) / B, per_sequence)


# ------------------------------------------------------------------------------------------
# 5. Repeated backward through a retained graph
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", [1.0, 3.0, "per-row"])
def test_repeated_backward_through_a_retained_graph_accumulates(backend, weight):
    s, t = make_logits((4, 30), device=dev(backend))
    y = make_labels((4,), 30, ignored=(1,), device=dev(backend))
    once = s.clone().requires_grad_(True)
    x = s.clone().requires_grad_(True)

    def total(inp):
        reduction = "none" if weight == "per-row" else "batchmean"
        loss = fastkd.kd_loss(inp, t, 2.0, labels=y, hard_weight=0.2, reduction=reduction, backend=backend)
        return (loss * torch.arange(1.0, 5.0, device=loss.device)).sum() if weight == "per-row" else loss * weight

    total(once).backward()
    loss = total(x)
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3 * once.grad)


# ------------------------------------------------------------------------------------------
# 6. The small ones
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_requiring_grad_is_constant_and_said_once(backend, caplog, monkeypatch):
    monkeypatch.setattr(_fused, "_said", set())
    s, t = make_logits((4, 30), device=dev(backend))
    s.requires_grad_(True)
    t.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        fastkd.kd_loss(s, t, 2.0, backend=backend).backward()
        fastkd.kd_loss(s, t, 2.0, backend=backend).backward()
    assert t.grad is None and s.grad is not None
    said = [r for r in caplog.records if "teacher is treated as a constant" in r.getMessage()]
    assert len(said) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_an_ignored_row_influences_nothing(backend, where):
    s, t = make_logits((4, 30), device=dev(backend))
    y = torch.tensor([3, -100, 5, 7], device=dev(backend))
    clean = s.clone().requires_grad_(True)
    fastkd.kd_loss(clean, t, 2.0, labels=y, hard_weight=0.3, backend=backend).backward()
    (s if where == "student" else t)[1, 4] = float("nan")
    x = s.clone().requires_grad_(True)
    loss = fastkd.kd_loss(x, t, 2.0, labels=y, hard_weight=0.3, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    torch.testing.assert_close(x.grad, clean.grad)


@pytest.mark.parametrize("ignore_index", [np.int64(2), np.int32(2), 2, torch.tensor(2)])
def test_ignore_index_accepts_any_integral_number(ignore_index):
    # The value is a class (2), not -100: only a call that receives it skips row 1, whose loss
    # is then the one of rows 0 and 2 alone.
    s, t = make_logits((3, 10))
    y = torch.tensor([1, 2, 3])
    got = fastkd.kd_loss(s, t, np.float32(2), labels=y, hard_weight=0.5, ignore_index=ignore_index)
    torch.testing.assert_close(got, kd_loss_reference(s[[0, 2]], t[[0, 2]], 2.0, labels=y[[0, 2]], hard_weight=0.5))


@pytest.mark.parametrize("bad", [1.5, np.float64(-100.0), True, "-100"])
def test_ignore_index_refuses_non_integers(bad):
    s, t = make_logits((3, 10))
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        fastkd.kd_loss(s, t, labels=torch.tensor([1, 2, 3]), ignore_index=bad)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1), "temperature must be a finite number > 0, got -1"),
        (dict(temperature=1e31), r"temperature must be in \[1e-30, 1e\+30\]"),
        (dict(hard_weight=2.0), r"hard_weight must be in \[0, 1\], got 2.0"),
        (dict(ignore_index=0.5), "ignore_index must be an integer"),
        (dict(reduction="mean"), "reduction must be one of"),
        (dict(t2_scale=1), "t2_scale must be a bool"),
        (dict(backend="fast"), "backend='fast' is not a backend"),
    ],
)
def test_module_checks_its_options_at_construction(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fastkd.nn.KDLoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e20, 1e30])
def test_huge_temperature_is_finite_like_the_composite(backend, temperature):
    """T² overflows float32 from T ≈ 1.8e19; the scale is formed so that it never meets a 0."""
    s, t = make_logits((3, 50), device=dev(backend))
    x = s.clone().requires_grad_(True)
    loss = fastkd.kd_loss(x, t, temperature, backend=backend)
    composite = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean")
    composite = composite * temperature * temperature
    assert torch.isfinite(composite)
    torch.testing.assert_close(loss, composite)
    if backend != "reference":  # the composites' own backward meets T·T = inf in float32
        loss.backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_tiny_temperature_is_finite(backend):
    s, t = make_logits((3, 50), torch.float64, device=dev(backend))
    loss = fastkd.kd_loss(s, t, 1e-30, backend=backend)
    assert torch.isfinite(loss) and loss >= 0
