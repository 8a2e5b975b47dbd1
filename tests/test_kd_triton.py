"""kd_loss's Triton kernel against the reference. Without a GPU it runs in Triton's interpreter
on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), which is slow: shapes stay small,
but long enough (V > 256, the interpreter's block) that the blocked path runs."""

import math

import pytest
import torch

import fastkd
from fastkd.ops import kd as kd_ops
from backend_helpers import triton_module_device
from kd_helpers import check_against_reference, make_labels, make_logits

DEVICE = triton_module_device(kd_ops.TRITON_ERROR)
CASES = [
    # shape, dtype, labels mode, reduction, temperature
    ((3, 7), torch.float32, "none", "batchmean", 1.0),
    ((5, 300), torch.float32, "hard", "none", 2.5),
    ((2, 1100), torch.float32, "labels", "sum", 2.0),
    ((2, 3, 257), torch.bfloat16, "hard", "batchmean", 1.0),
    ((4, 600), torch.bfloat16, "none", "none", 4.0),
    ((3, 513), torch.float16, "hard", "sum", 2.0),
    ((1, 1), torch.float32, "none", "batchmean", 1.0),
]


@pytest.mark.parametrize("shape,dtype,mode,reduction,temperature", CASES)
def test_triton_matches_reference(shape, dtype, mode, reduction, temperature):
    s, t = make_logits(shape, dtype, device=DEVICE)
    kwargs = {}
    if mode != "none":
        rows = shape[:-1]
        kwargs = dict(labels=make_labels(rows, shape[-1], ignored=(0,) if math.prod(rows) > 1 else (), device=DEVICE))
        kwargs["hard_weight"] = 0.3 if mode == "hard" else 0.0
    check_against_reference("triton", s, t, temperature, reduction=reduction, **kwargs)


def test_triton_t2_scale_off_and_wide_logits():
    s, t = make_logits((3, 400), std=30.0, device=DEVICE)
    check_against_reference("triton", s, t, 3.0, t2_scale=False, labels=make_labels((3,), 400, device=DEVICE), hard_weight=0.5)


def test_triton_all_rows_ignored():
    s, t = make_logits((3, 300), device=DEVICE)
    s.requires_grad_(True)
    loss = fastkd.kd_loss(s, t, 2.0, labels=torch.full((3,), -100, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_triton_masked_vocabulary_and_nan():
    s, t = make_logits((3, 300), device=DEVICE)
    s[:, 250:] = -math.inf
    t[:, 250:] = -math.inf
    s.requires_grad_(True)
    loss = fastkd.kd_loss(s, t, 2.0, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(s.grad[:, 250:], torch.zeros(3, 50, device=DEVICE))
    t2 = t.clone()
    t2[1, 3] = math.nan
    rows = fastkd.kd_loss(s.detach(), t2, 2.0, reduction="none", backend="triton")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_triton_out_of_range_label_gives_nan():
    s, t = make_logits((3, 20), device=DEVICE)
    loss, grad = torch.ops.fastkd.kd_forward_triton(s, t, torch.tensor([1, 20, 2], device=DEVICE), None, "kl", 0.0, 1.0, 0.5, -100, "none", True, True)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all() and torch.isfinite(loss[[0, 2]]).all()


# ------------------------------------------------------------------------------------------
# The other divergences and ensembles (_kd_div_kernel)
# ------------------------------------------------------------------------------------------

DIV_CASES = [
    # divergence, beta, shape, dtype, teachers (0: one), labels mode, reduction, temperature
    ("reverse_kl", None, (3, 300), torch.float32, 0, "hard", "batchmean", 2.0),
    ("jsd", None, (2, 3, 257), torch.bfloat16, 0, "labels", "none", 1.0),
    ("jsd", 0.2, (4, 600), torch.float32, 3, "hard", "sum", 2.5),
    ("tvd", None, (3, 513), torch.float16, 0, "none", "batchmean", 2.0),
    ("skew_kl", None, (5, 300), torch.float32, 0, "hard", "none", 1.0),
    ("skew_kl", 0.6, (3, 260), torch.bfloat16, 2, "none", "sum", 3.0),
    ("skew_reverse_kl", None, (3, 400), torch.float32, 0, "labels", "batchmean", 2.0),
    ("skew_reverse_kl", 0.3, (2, 2, 300), torch.float16, 4, "hard", "batchmean", 1.0),
    ("kl", None, (3, 300), torch.float32, 3, "hard", "none", 2.0),
    ("tvd", None, (1, 1), torch.float32, 2, "none", "batchmean", 1.0),
    ("hellinger", None, (3, 300), torch.bfloat16, 3, "hard", "sum", 2.0),
]


@pytest.mark.parametrize("div,beta,shape,dtype,teachers,mode,reduction,temperature", DIV_CASES, ids=[f"{c[0]}-{c[4]}" for c in DIV_CASES])
def test_triton_divergences_and_ensembles_match_reference(div, beta, shape, dtype, teachers, mode, reduction, temperature):
    s, t = make_logits(shape, dtype, device=DEVICE)
    kwargs = dict(divergence=div, beta=beta, reduction=reduction)
    if teachers:
        t = torch.stack([t] + [make_logits(shape, dtype, seed=10 + i, device=DEVICE)[1] for i in range(teachers - 1)])
        if teachers == 3:
            kwargs["teacher_weights"] = torch.tensor([0.5, 0.2, 0.3], device=DEVICE)
    if mode != "none":
        rows = shape[:-1]
        kwargs["labels"] = make_labels(rows, shape[-1], ignored=(0,) if math.prod(rows) > 1 else (), device=DEVICE)
        kwargs["hard_weight"] = 0.3 if mode == "hard" else 0.0
    check_against_reference("triton", s, t, temperature, **kwargs)


@pytest.mark.parametrize("div", list(kd_ops.divergences.DIVERGENCES))
def test_triton_divergences_awkward_rows(div):
    """Masked vocabulary, log-probabilities below float32's underflow, NaN, all rows ignored."""
    beta = None  # the divergence's default
    s, t = make_logits((3, 300), std=30.0, device=DEVICE)
    te = torch.stack([t, t.roll(5, -1)])
    for teacher in ((t, te) if div != "kl" else (te,)):
        check_against_reference("triton", s, teacher, 3.0, divergence=div, beta=beta)  # std-30 logits
        masked_s, masked_t = s.clone(), teacher.clone()
        masked_s[:, 250:] = -math.inf
        masked_t[..., 250:] = -math.inf
        x = masked_s.clone().requires_grad_(True)
        loss = fastkd.kd_loss(x, masked_t, 2.0, divergence=div, beta=beta, backend="triton")
        loss.backward()
        expected = fastkd.kd_loss(masked_s[:, :250], masked_t[..., :250], 2.0, divergence=div, beta=beta, backend="reference")
        assert torch.isfinite(loss) and torch.equal(x.grad[:, 250:], torch.zeros(3, 50, device=DEVICE))
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        if div != "kl":  # q = 0 < p, where every other divergence is finite (hellinger: x = -inf)
            check_against_reference("triton", masked_s, teacher, 2.0, divergence=div, beta=beta, reduction="none")
        low_s, low_t = s.double().clone(), teacher.double().clone()
        low_s[:, :150] -= 300.0
        low_t[..., 100:200] -= 300.0
        got = fastkd.kd_loss(low_s.float(), low_t.float(), 1.0, divergence=div, beta=beta, reduction="none", backend="triton")
        exact = fastkd.kd_loss(low_s, low_t, 1.0, divergence=div, beta=beta, reduction="none", backend="reference")
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)
        nan_t = teacher.clone()
        nan_t[..., 1, 3] = math.nan
        rows = fastkd.kd_loss(s, nan_t, 2.0, divergence=div, beta=beta, reduction="none", backend="triton")
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
        x = s.clone().requires_grad_(True)
        loss = fastkd.kd_loss(x, nan_t, 2.0, labels=torch.tensor([-100, -100, -100], device=DEVICE), hard_weight=0.5, divergence=div, beta=beta, backend="triton")
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("div,beta,teachers", [("jsd", 0.3, 0), ("skew_reverse_kl", 0.2, 3)])
def test_triton_divergence_opcheck(div, beta, teachers):
    s, t = make_logits((3, 300), device=DEVICE)
    if teachers:
        t = torch.stack([t, t.flip(-1), t.roll(1, -1)])
    weights = torch.tensor([0.2, 0.2, 0.6], device=DEVICE) if teachers else None
    y = make_labels((3,), 300, ignored=(1,), device=DEVICE)
    args = (s.requires_grad_(True), t, y, weights, div, beta, 2.0, 0.25, -100, "batchmean", True, True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.fastkd.kd_forward_triton.default, args, test_utils=utils)


@pytest.mark.parametrize("div,beta,message", [
    ("jsd", 0.0, r"beta=0.0 for divergence 'jsd' must be inside \(0, 1\); an endpoint is another divergence"),
    ("jsd", 1.0, r"beta=1.0 for divergence 'jsd' must be inside \(0, 1\)"),
    ("skew_reverse_kl", 0.0, r"beta=0.0 for divergence 'skew_reverse_kl' must be inside \(0, 1\)"),
    ("skew_kl", 1.5, r"beta=1.5 for divergence 'skew_kl'"),
    ("kld", 0.0, f"divergence must be one of {', '.join(kd_ops.divergences.DIVERGENCES)}, got 'kld'"),
])
def test_triton_launcher_takes_only_resolved_divergences(div, beta, message):
    """The launcher decides no divergence rule: the op layer resolves an endpoint to the divergence
    it equals, and a pair the kernels cannot take is refused before any launch, naming it."""
    from fastkd.kernels import kd as kernels

    s, t = make_logits((2, 5), device=DEVICE)
    with pytest.raises(ValueError, match=message):
        kernels.kd_forward(s, t, None, None, div, beta, 1.0, 0.0, -100, "sum", True, False)
