"""dkd_loss: the reference against mdistiller's composite, the cpu backend against the reference
(the kd family's grid), the contract on every backend that can run here (double backward,
float64 at 1e-12, ignored rows with NaN, a dominating or vanishing target) and gradcheck. The
contract every op shares (opcheck, torch.compile, retained graph, bad input, ...):
test_conformance.py.

Triton (interpreter) and GPU-only tests of the same op: test_dkd_triton.py, test_dkd_gpu.py.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.functional import dkd_loss_reference
from fastkd.ops import fused_autograd as _fused
from fastkd.ops import dkd as dkd_ops
from backend_helpers import GPU, ISAS, available_isas, backend_params, device_of, float64_backends, force_isa, needs_ext
from bench.test_bench_dkd import dkd_composite as mdistiller_dkd
from dkd_helpers import check_against_reference
from kd_helpers import check_float64_matches_reference, check_poison_in_an_ignored_row_influences_nothing, make_labels, make_logits

BACKENDS = backend_params("dkd_forward", dkd_ops.TRITON_ERROR)
FUSED = BACKENDS[1:]
FLOAT64_BACKENDS = float64_backends(BACKENDS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(shape, dtype=torch.float32, ignored=(0,), seed=0, std=3.0, device="cpu"):
    s, t = make_logits(shape, dtype, std=std, seed=seed, device=device)
    return s, t, make_labels(shape[:-1], shape[-1], ignored=ignored, seed=seed + 1, device=device)


# ------------------------------------------------------------------------------------------
# The reference against mdistiller's composite (float64)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 1.0, 0.5), (2.5, 0.3, 2.0)])
def test_reference_matches_mdistiller(temperature, alpha, beta):
    s, t, y = inputs((9, 101), torch.float64, ignored=())
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = dkd_loss_reference(a, t, y, temperature, alpha=alpha, beta=beta)
    expected = mdistiller_dkd(b, t, y, temperature=temperature, alpha=alpha, beta=beta)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def test_reference_terms_match_their_definitions():
    """TCKD and NCKD apart (alpha or beta 0), from probabilities the long way round."""
    s, t, y = inputs((6, 23), torch.float64, ignored=())
    T = 2.0
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    py, qy = p.gather(1, y[:, None]).squeeze(1), q.gather(1, y[:, None]).squeeze(1)
    tckd = py * (py / qy).log() + (1 - py) * ((1 - py) / (1 - qy)).log()
    rest = F.one_hot(y, 23) == 0
    p_hat = p[rest].view(6, 22) / (1 - py)[:, None]
    q_hat = q[rest].view(6, 22) / (1 - qy)[:, None]
    nckd = (p_hat * (p_hat / q_hat).log()).sum(-1)
    torch.testing.assert_close(dkd_loss_reference(s, t, y, T, alpha=1.0, beta=0.0, reduction="none"), T * T * tckd)
    torch.testing.assert_close(dkd_loss_reference(s, t, y, T, alpha=0.0, beta=1.0, reduction="none"), T * T * nckd)


# ------------------------------------------------------------------------------------------
# cpu backend against the reference
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("shape", [(41, 1271), (3, 131073), (2, 3, 257), (5, 17), (1, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_reference(shape, dtype):
    s, t, y = inputs(shape, dtype, ignored=(0,) if math.prod(shape[:-1]) > 1 else ())
    check_against_reference("cpu", s, t, y, 4.0)
    reduction = "none" if len(shape) == 3 or shape[0] == 41 else "sum"
    check_against_reference("cpu", s, t, y, 1.0, alpha=0.5, beta=2.0, reduction=reduction)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_every_instruction_set(isa, dtype, monkeypatch):
    force_isa(monkeypatch, isa)
    for vocab in (1271, 70001, 5):
        # targets in the first vector, the last full one (of 16 and of 8 lanes) and the tail:
        # every path of the kernel's target masking
        s, t, _ = inputs((4, vocab), dtype, seed=vocab)
        y = torch.tensor([0, -100, max(0, 16 * (vocab // 16) - 1), vocab - 1])
        check_against_reference("cpu", s, t, y, 2.0)


@needs_ext
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16, torch.float64])
def test_cpu_mixed_student_and_teacher_dtypes(teacher_dtype):
    s, _, y = inputs((9, 300), torch.bfloat16)
    _, t, _ = inputs((9, 300), teacher_dtype)
    check_against_reference("cpu", s, t, y, 2.0)


@needs_ext
@pytest.mark.parametrize("temperature,alpha,beta", [(1.1, 1.0, 8.0), (0.3, 0.37, 2.9), (4.0, 2.7, 0.5)])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_cpu_float64_is_float64_accurate(temperature, alpha, beta, reduction):
    s, t, y = inputs((7, 3001), torch.float64, ignored=(2,))
    kwargs = dict(alpha=alpha, beta=beta, reduction=reduction)
    check_float64_matches_reference(lambda x: fastkd.dkd_loss(x, t, y, temperature, backend="cpu", **kwargs),
                                    lambda x: dkd_loss_reference(x, t, y, temperature, **kwargs), s)


@needs_ext
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cpu_per_row_losses_as_accurate_as_mdistiller(temperature, monkeypatch):
    s, t, y = inputs((16, 32000), torch.float64, ignored=())
    exact = dkd_loss_reference(s, t, y, temperature, reduction="none")
    sf, tf = s.float(), t.float()
    composite = torch.stack([mdistiller_dkd(sf[i : i + 1], tf[i : i + 1], y[i : i + 1], temperature=temperature, alpha=1.0, beta=8.0) for i in range(16)])

    def rel_err(rows):
        return ((rows.double() - exact).abs() / exact.abs()).max().item()

    bound = rel_err(composite)
    for isa in available_isas():
        monkeypatch.setenv("FASTKD_CPU_ISA", isa)
        err = rel_err(fastkd.dkd_loss(sf, tf, y, temperature, reduction="none", backend="cpu"))
        assert err <= bound, f"{isa}: per-row relative error {err:.3g} > mdistiller composite's {bound:.3g}"


# ------------------------------------------------------------------------------------------
# Awkward inputs, on every backend that runs here
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("margin", [50.0, -50.0, 200.0])
def test_target_dominating_or_vanishing_stays_finite_and_accurate(backend, margin):
    """The target logit +-50 above/below all others (q_y = 1 - 1e-20 or 1e-20 at T = 1): the
    binary probabilities come from log-space quantities, so nothing is lost to 1 - x."""
    s, t, y = inputs((6, 300), ignored=(), std=1.0, device=device_of(backend))
    rows = torch.arange(6, device=s.device)
    s[rows, y] = s.max() + margin if margin > 0 else s.min() + margin
    t[rows[:3], y[:3]] = t.max() + abs(margin)  # the teacher agrees on half the rows
    loss, grad = check_against_reference(backend, s, t, y, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    check_against_reference(backend, s, t, y, 4.0, reduction="none")


@pytest.mark.parametrize("backend", FUSED)
def test_wide_and_huge_logits(backend):
    interpreted = backend == "triton" and not GPU
    s, t, y = inputs((5, 700) if interpreted else (17, 3001), std=30.0, device=device_of(backend))
    check_against_reference(backend, s, t, y, 1.0)
    check_against_reference(backend, s.bfloat16(), t.bfloat16(), y, 4.0, reduction="none")
    s, t, y = inputs((4, 500) if interpreted else (8, 1000), std=1.0, device=device_of(backend))
    check_against_reference(backend, s * 1e4, t.sign() * 1e4 + t, y, 7.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_vocabulary_entries(backend, dtype):
    s, t, _ = inputs((6, 257), dtype, device=device_of(backend))
    mask = torch.zeros(6, 257, dtype=torch.bool, device=s.device)
    mask[:, 200:] = True
    mask[2, :100] = True
    s = s.masked_fill(mask, -math.inf).requires_grad_(True)
    t = t.masked_fill(mask, -math.inf)
    y = make_labels((6,), 100, device=s.device) + 100  # never a masked entry
    loss = fastkd.dkd_loss(s, t, y, 2.0, backend=backend)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[mask], torch.zeros_like(s.grad[mask]))
    # the same loss as on the unmasked entries alone, row by row
    rows = fastkd.dkd_loss(s.detach(), t, y, 2.0, reduction="none", backend=backend)
    for i in (0, 2):
        keep = ~mask[i]
        alone = dkd_loss_reference(s.detach()[i : i + 1, keep].double(), t[i : i + 1, keep].double(), y[i : i + 1] - (mask[i, : y[i]].sum()), 2.0)
        # The row loss is float32 whatever the input dtype (the float64 reference reads the same
        # input values): measured <= 4.3e-7 relative on every backend and dtype.
        torch.testing.assert_close(rows[i].double(), alone, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("at", ["target", "other"])
def test_nan_input_gives_nan_loss(backend, where, at):
    s, t, y = inputs((3, 40), ignored=(), device=device_of(backend))
    col = y[1] if at == "target" else (y[1] + 7) % 40
    (s if where == "student" else t)[1, col] = math.nan
    rows = fastkd.dkd_loss(s, t, y, 2.0, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    x = s.clone().requires_grad_(True)
    loss = fastkd.dkd_loss(x, t, y, 2.0, backend=backend)
    assert torch.isnan(loss)
    if backend != "reference":
        loss.backward()
        assert torch.isnan(x.grad[1]).any() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_an_ignored_row_influences_nothing(backend, where):
    s, t, _ = inputs((4, 30), device=device_of(backend))
    y = torch.tensor([3, -100, 5, 7], device=s.device)
    check_poison_in_an_ignored_row_influences_nothing(lambda x: fastkd.dkd_loss(x, t, y, 2.0, backend=backend), s,
                                                      lambda: (s if where == "student" else t)[1, 4].fill_(math.nan))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_gradient(backend, reduction):
    s, t, _ = inputs((4, 33), device=device_of(backend))
    s.requires_grad_(True)
    loss = fastkd.dkd_loss(s, t, torch.full((4,), -100, device=s.device), 2.0, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_count_in_nothing(backend):
    s, t, _ = inputs((6, 50), device=device_of(backend))
    s.requires_grad_(True)
    y = make_labels((6,), 50, ignored=(1, 4), device=s.device)
    loss = fastkd.dkd_loss(s, t, y, 2.0, backend=backend)
    loss.backward()
    assert torch.equal(s.grad[[1, 4]], torch.zeros(2, 50, device=s.device))
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(loss, fastkd.dkd_loss(s.detach()[keep], t[keep], y[keep], 2.0, backend=backend))
    # any ignore_index, including one that is a valid class
    y7 = torch.tensor([3, 7, 7, 1, 0, 9], device=s.device)
    check_against_reference(backend, s.detach(), t, y7, 2.0, ignore_index=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchmean_over_rows_of_a_3d_input(backend):
    """[B, T, V]: leading dims flatten into rows, batchmean divides by B*T valid rows, and for
    2-D logits without ignored rows that is mdistiller's value exactly."""
    B, L, V, T = 3, 5, 50, 4.0
    s, t, y = inputs((B, L, V), ignored=(), device=device_of(backend))
    expected = mdistiller_dkd(s.view(-1, V), t.view(-1, V), y.view(-1), temperature=T, alpha=1.0, beta=8.0)
    torch.testing.assert_close(fastkd.dkd_loss(s, t, y, T, backend=backend), expected, rtol=2e-5, atol=1e-5)
    assert fastkd.dkd_loss(s, t, y, T, reduction="none", backend=backend).shape == (B, L)
    torch.testing.assert_close(fastkd.dkd_loss(s, t, y.view(-1), T, reduction="sum", backend=backend), expected * B * L, rtol=2e-5, atol=1e-4)


@needs_ext
def test_non_contiguous_inputs():
    base_s, base_t = make_logits((64, 90))
    s, t = base_s.t()[::2], base_t.t()[1::2]  # [45, 64], strided
    assert not s.is_contiguous() and not t.is_contiguous()
    y = make_labels((90,), 64, ignored=(5,))[::2]
    check_against_reference("cpu", s, t, y, 2.0)


@needs_ext
def test_gradient_in_the_student_dtype_and_shape_and_none_for_the_teacher(caplog, monkeypatch):
    monkeypatch.setattr(_fused, "_said", set())
    s, t, y = inputs((2, 3, 50), torch.bfloat16)
    s.requires_grad_(True)
    t = t.float().requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        fastkd.dkd_loss(s, t, y, 2.0, backend="cpu").backward()
        fastkd.dkd_loss(s, t, y, 2.0, backend="cpu").backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == (2, 3, 50)
    assert t.grad is None
    assert len([r for r in caplog.records if "teacher is treated as a constant" in r.getMessage()]) == 1


@needs_ext
def test_out_of_range_label_is_an_error_on_cpu_and_a_nan_row_in_the_kernel():
    s, t, _ = inputs((3, 10))
    with pytest.raises(ValueError, match=r"labels holds 10, outside \[0, 10\)"):
        fastkd.dkd_loss(s, t, torch.tensor([1, 10, 2]), backend="cpu")
    loss, grad = torch.ops.fastkd.dkd_forward(s, t, torch.tensor([1, 10, -3]), 1.0, 1.0, 8.0, -100, "none", True)
    assert torch.isnan(loss[1:]).all() and torch.isnan(grad[1:]).all() and torch.isfinite(loss[0])


def test_module_defaults_are_mdistillers():
    # (the module against the function: test_conformance.py)
    assert fastkd.nn.DKDLoss().temperature == 4.0 and fastkd.nn.DKDLoss().beta == 8.0


# ------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------


@needs_ext
@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 5), vocab=st.integers(2, 300), temperature=st.floats(0.25, 8.0), std=st.floats(0.0, 20.0),
    alpha=st.floats(0.0, 4.0), beta=st.floats(0.0, 10.0), seed=st.integers(0, 2**16),
)
def test_property_nonnegative_rows_gradient_sums_to_zero_zero_at_equality(rows, vocab, temperature, std, alpha, beta, seed):
    s, t, y = inputs((rows, vocab), ignored=(), std=std, seed=seed)
    x = s.clone().requires_grad_(True)
    losses = fastkd.dkd_loss(x, t, y, temperature, alpha=alpha, beta=beta, reduction="none", backend="cpu")
    assert (losses >= 0).all()
    losses.sum().backward()
    scale = max(1.0, temperature) * (alpha + beta + 1)
    assert torch.allclose(x.grad.sum(-1), torch.zeros(rows), atol=1e-5 * scale)
    x.grad = None
    same = fastkd.dkd_loss(x, s, y, temperature, alpha=alpha, beta=beta, backend="cpu")
    assert abs(same.item()) <= 1e-5 * temperature**2 * (alpha + beta)
    same.backward()
    assert x.grad.abs().max() <= 1e-6 * scale


# ------------------------------------------------------------------------------------------
# Autograd contract: gradcheck, double backward, retained graph
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_and_gradgradcheck_float64(backend, reduction):
    s, t, _ = inputs((4, 9), torch.float64, device=device_of(backend))
    y = torch.tensor([2, -100, 0, 8], device=s.device)

    def f(x):
        return fastkd.dkd_loss(x, t, y, 1.7, alpha=0.7, beta=2.0, reduction=reduction, backend=backend)

    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


# ------------------------------------------------------------------------------------------
# PyTorch integration: opcheck, torch.compile
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Bad input (the public functions' cases: test_conformance.py)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1), "temperature must be a finite number > 0, got -1"),
        (dict(alpha=-1.0), r"alpha must be in \[0, inf\]"),
        (dict(beta=math.inf), "beta must be a finite number"),
        (dict(ignore_index=0.5), "ignore_index must be an integer"),
        (dict(reduction="mean"), "reduction must be one of"),
        (dict(backend="fast"), "backend='fast' is not a backend"),
    ],
)
def test_module_checks_its_options_at_construction(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fastkd.nn.DKDLoss(**kwargs)
