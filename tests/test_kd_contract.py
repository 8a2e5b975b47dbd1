"""kd_loss's contract where outside test grids found it broken: second-order gradients, float64
precision, per-row fp32 accuracy, the [B, T, V] batchmean convention, and the small ones (NaN in an
ignored row, NumPy integers, construction-time checks, huge temperatures). Gradient penalties,
retained graphs and a teacher that requires grad: test_conformance.py.

Every backend that can run here is covered: reference and cpu; triton on a GPU or, without one,
in the interpreter (TRITON_INTERPRET=1, set by conftest.py); cuda on a GPU.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import kd_loss_reference
from fastkd.ops import kd as kd_ops
from backend_helpers import available_isas, backend_params, device_of, float64_backends, needs_ext
from kd_helpers import check_float64_matches_reference, check_poison_in_an_ignored_row_influences_nothing, make_labels, make_logits

BACKENDS = backend_params("kd_forward", kd_ops.TRITON_ERROR)
FLOAT64_BACKENDS = float64_backends(BACKENDS)


# ------------------------------------------------------------------------------------------
# 1. Second-order gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradgradcheck_float64(backend, reduction):
    s, t = make_logits((4, 9), torch.float64, device=device_of(backend))
    y = torch.tensor([2, -100, 0, 8], device=device_of(backend))

    def f(x):
        return fastkd.kd_loss(x, t, 1.7, labels=y, hard_weight=0.3, reduction=reduction, backend=backend)

    assert torch.autograd.gradgradcheck(f, (s.clone().requires_grad_(True),))


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
    check_float64_matches_reference(lambda x: fastkd.kd_loss(x, t, temperature, backend="cpu", **kwargs),
                                    lambda x: kd_loss_reference(x, t, temperature, **kwargs), s)


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
    s, t = make_logits((B, L, V), device=device_of(backend))
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    per_row = F.kl_div(log_q.view(-1, V), log_p.view(-1, V), log_target=True, reduction="batchmean") * T * T
    per_sequence = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * T * T
    torch.testing.assert_close(fastkd.kd_loss(s, t, T, backend=backend), per_row)
    torch.testing.assert_close(fastkd.kd_loss(s, t, T, reduction="sum", backend=backend) / B, per_sequence)


# ------------------------------------------------------------------------------------------
# 5. Repeated backward through a retained graph
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# 6. The small ones
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_an_ignored_row_influences_nothing(backend, where):
    s, t = make_logits((4, 30), device=device_of(backend))
    y = torch.tensor([3, -100, 5, 7], device=device_of(backend))
    check_poison_in_an_ignored_row_influences_nothing(lambda x: fastkd.kd_loss(x, t, 2.0, labels=y, hard_weight=0.3, backend=backend), s,
                                                      lambda: (s if where == "student" else t)[1, 4].fill_(float("nan")))


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
    s, t = make_logits((3, 50), device=device_of(backend))
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
    s, t = make_logits((3, 50), torch.float64, device=device_of(backend))
    loss = fastkd.kd_loss(s, t, 1e-30, backend=backend)
    assert torch.isfinite(loss) and loss >= 0
