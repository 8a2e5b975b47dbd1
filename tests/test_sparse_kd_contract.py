"""sparse_kd_loss's contract on every backend that can run here (reference and cpu; triton on a
GPU or in the interpreter; cuda on a GPU): second-order gradients, float64 precision, per-row
fp32 accuracy against the composite, the [B, T, V] batchmean convention, NaN (or broken indices)
in an ignored row, NumPy integers, extreme temperatures. Gradient penalties, retained graphs and a
teacher that requires grad: test_conformance.py."""

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import sparse_kd_loss_reference
from fastkd.ops import sparse_kd as sparse_ops
from backend_helpers import available_isas, backend_params, device_of, float64_backends, needs_ext
from kd_helpers import check_poison_in_an_ignored_row_influences_nothing, make_labels
from sparse_kd_helpers import TAILS, make_dense, make_sparse, top_k

BACKENDS = backend_params("sparse_kd_forward", sparse_ops.TRITON_ERROR)
FLOAT64_BACKENDS = float64_backends(BACKENDS)


def call(backend, x, vals, idx, temperature, values, tail, **kwargs):
    return fastkd.sparse_kd_loss(x, vals, idx, temperature, values=values, tail=tail, backend=backend, **kwargs)


# ------------------------------------------------------------------------------------------
# Second-order gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("reduction,values,tail", [("batchmean", *TAILS[0]), ("none", *TAILS[1])])
def test_gradgradcheck_float64(backend, reduction, values, tail):
    s, vals, idx = make_sparse((3, 7), 3, torch.float64, values, device=device_of(backend))
    y = torch.tensor([2, -100, 6], device=device_of(backend))

    def f(x):
        return call(backend, x, vals, idx, 1.7, values, tail, labels=y, hard_weight=0.3, reduction=reduction)

    assert torch.autograd.gradgradcheck(f, (s.clone().requires_grad_(True),))


# ------------------------------------------------------------------------------------------
# float64 is float64-accurate; fp32 rows as accurate as the composite
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("temperature,hard_weight", [(1.1, 0.0), (0.3, 0.37), (2.7, 0.9)])
@pytest.mark.parametrize("values,tail", TAILS)
def test_cpu_float64_at_awkward_temperatures_and_weights(temperature, hard_weight, values, tail):
    s, vals, idx = make_sparse((7, 3001), 100, torch.float64, values)
    y = make_labels((7,), 3001, ignored=(2,))
    kwargs = dict(values=values, tail=tail, labels=y, hard_weight=hard_weight, reduction="none")
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = fastkd.sparse_kd_loss(a, vals, idx, temperature, backend="cpu", **kwargs)
    expected = sparse_kd_loss_reference(b, vals, idx, temperature, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (got * torch.arange(1.0, 8.0, dtype=torch.float64)).sum().backward()
    (expected * torch.arange(1.0, 8.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def _composite_rows(s, vals, idx, temperature, values, tail):
    """What users write today, in the input's precision, per row."""
    log_q = F.log_softmax(s / temperature, -1)
    if tail == "renormalize":
        log_p = F.log_softmax(vals / temperature, -1)
        return (log_p.exp() * (log_p - log_q.gather(-1, idx))).sum(-1) * temperature * temperature
    vocab, k = s.shape[-1], vals.shape[-1]
    fill = torch.log((1 - vals.exp().sum(-1)).clamp_min(0) / (vocab - k))
    dense = fill.unsqueeze(-1).expand(s.shape).contiguous().scatter(-1, idx, vals)
    log_p = F.log_softmax(dense / temperature, -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * temperature * temperature


@needs_ext
@pytest.mark.parametrize("values,tail", TAILS)
def test_cpu_per_row_losses_as_accurate_as_the_composite(values, tail, monkeypatch):
    s, t = make_dense((32, 32000), torch.float64)
    vals, idx = top_k(t, 64, values, torch.float64)
    for temperature in (1.0, 2.0):
        exact = sparse_kd_loss_reference(s, vals, idx, temperature, values=values, tail=tail, reduction="none")

        def rel_err(rows):
            return ((rows.double() - exact).abs() / exact.abs()).max().item()

        sf, vf = s.float(), vals.float()
        bound = rel_err(_composite_rows(sf, vf, idx, temperature, values, tail))
        for isa in available_isas():
            monkeypatch.setenv("FASTKD_CPU_ISA", isa)
            err = rel_err(fastkd.sparse_kd_loss(sf, vf, idx, temperature, values=values, tail=tail, reduction="none", backend="cpu"))
            assert err <= max(bound, 1e-7), f"{isa}: per-row relative error {err:.3g} > PyTorch composite's {bound:.3g}"
            assert err <= 1e-6, f"{isa}: per-row relative error {err:.3g} above Liger's 1e-6 tolerance"
        monkeypatch.delenv("FASTKD_CPU_ISA")


# ------------------------------------------------------------------------------------------
# [B, T, V] convention, retained graph
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchmean_divides_by_rows_and_sum_over_batch_gives_the_per_sequence_loss(backend):
    B, L, V, T = 3, 5, 50, 2.0
    s, vals, idx = make_sparse((B, L, V), 6, device=device_of(backend))
    log_q = F.log_softmax(s / T, -1).gather(-1, idx)
    log_p = F.log_softmax(vals / T, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1) * T * T  # [B, L]
    torch.testing.assert_close(fastkd.sparse_kd_loss(s, vals, idx, T, backend=backend), per_token.mean())
    torch.testing.assert_close(fastkd.sparse_kd_loss(s, vals, idx, T, reduction="sum", backend=backend) / B, per_token.sum() / B)
    torch.testing.assert_close(fastkd.sparse_kd_loss(s, vals, idx, T, reduction="none", backend=backend), per_token)


# ------------------------------------------------------------------------------------------
# The small ones
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("values,tail", TAILS)
@pytest.mark.parametrize("where", ["student", "values", "indices"])
def test_nan_or_broken_indices_in_an_ignored_row_influence_nothing(backend, values, tail, where):
    s, vals, idx = make_sparse((4, 30), 5, values=values, device=device_of(backend))
    y = torch.tensor([3, -100, 5, 7], device=device_of(backend))

    def poison():
        if where == "student":
            s[1, 4] = float("nan")
        elif where == "values":
            vals[1, 2] = float("nan")
        else:
            idx[1, 0] = idx[1, 1]
            idx[1, 2] = 30

    check_poison_in_an_ignored_row_influences_nothing(lambda x: call(backend, x, vals, idx, 2.0, values, tail, labels=y, hard_weight=0.3), s, poison)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e20, 1e30])
@pytest.mark.parametrize("values,tail", TAILS)
def test_huge_temperature_matches_the_composite(backend, temperature, values, tail):
    """T² overflows float32 from T ≈ 1.8e19; the scale is formed so that it never meets a 0.
    With the uniform tail p and q both tend to uniform over V and the loss stays finite;
    renormalised over k entries, KL tends to log(V/k) > 0 and the true loss T² log(V/k) is past
    float32's range: inf, as the composite's. The gradient, T (q - p), stays finite."""
    s, vals, idx = make_sparse((3, 50), 8, values=values, device=device_of(backend))
    x = s.clone().requires_grad_(True)
    loss = call(backend, x, vals, idx, temperature, values, tail)
    composite = _composite_rows(s, vals, idx, temperature, values, tail).mean()
    torch.testing.assert_close(loss, composite)
    assert torch.isfinite(loss) if tail == "uniform" else torch.isinf(loss)
    if backend != "reference":  # the composite's own backward meets T·T = inf in float32
        loss.backward()
        assert torch.isfinite(x.grad).all()
    s64, v64 = s.double(), vals.double()
    if backend != "triton":
        loss64 = call(backend, s64, v64, idx, temperature, values, tail)
        if tail == "renormalize":
            torch.testing.assert_close(loss64, _composite_rows(s64, v64, idx, temperature, values, tail).mean())
            assert torch.isfinite(loss64)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("values,tail", TAILS)
def test_tiny_temperature_is_finite(backend, values, tail):
    s, vals, idx = make_sparse((3, 50), 8, torch.float64, values, device=device_of(backend))
    loss = call(backend, s, vals, idx, 1e-30, values, tail)
    assert torch.isfinite(loss) and loss >= 0
