"""sparse_kd_loss's Triton kernel against the reference. Without a GPU it runs in Triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), which is slow: shapes stay
small, but longer than the interpreter's blocks (V > 256, k > 16) so that the blocked loops run."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.ops import sparse_kd as sparse_ops
from backend_helpers import triton_module_device
from kd_helpers import make_labels
from sparse_kd_helpers import TAILS, check_against_reference, make_dense, make_sparse, top_k

DEVICE = triton_module_device(sparse_ops.TRITON_ERROR)
CASES = [
    # shape, k, dtype, labels mode, reduction, temperature, index dtype
    ((3, 7), 3, torch.float32, "none", "batchmean", 1.0, torch.int64),
    ((5, 300), 40, torch.float32, "hard", "none", 2.5, torch.int32),
    ((2, 1100), 64, torch.float32, "labels", "sum", 2.0, torch.int64),
    ((2, 3, 257), 20, torch.bfloat16, "hard", "batchmean", 1.0, torch.int64),
    ((3, 513), 33, torch.float16, "hard", "sum", 2.0, torch.int32),
    ((1, 1), 1, torch.float32, "none", "batchmean", 1.0, torch.int64),
    ((4, 19), 19, torch.float32, "hard", "none", 2.0, torch.int64),  # k = V
]


@pytest.mark.parametrize("shape,k,dtype,mode,reduction,temperature,index_dtype", CASES)
@pytest.mark.parametrize("values,tail", TAILS)
def test_triton_matches_reference(shape, k, dtype, mode, reduction, temperature, index_dtype, values, tail):
    s, vals, idx = make_sparse(shape, k, dtype, values, device=DEVICE, index_dtype=index_dtype)
    kwargs = {}
    if mode != "none":
        rows = shape[:-1]
        kwargs = dict(labels=make_labels(rows, shape[-1], ignored=(0,) if math.prod(rows) > 1 else (), device=DEVICE))
        kwargs["hard_weight"] = 0.3 if mode == "hard" else 0.0
    check_against_reference("triton", s, vals, idx, temperature, values=values, tail=tail, reduction=reduction, **kwargs)


@pytest.mark.parametrize("values,tail", TAILS)
def test_triton_t2_scale_off_and_wide_logits(values, tail):
    s, vals, idx = make_sparse((3, 400), 30, values=values, std=30.0, device=DEVICE)
    y = make_labels((3,), 400, device=DEVICE)
    check_against_reference("triton", s, vals, idx, 3.0, values=values, tail=tail, t2_scale=False, labels=y, hard_weight=0.5)


@pytest.mark.parametrize("values,tail", TAILS)
def test_triton_all_rows_ignored(values, tail):
    s, vals, idx = make_sparse((3, 300), 20, values=values, device=DEVICE)
    s.requires_grad_(True)
    y = torch.full((3,), -100, device=DEVICE)
    loss = fastkd.sparse_kd_loss(s, vals, idx, 2.0, values=values, tail=tail, labels=y, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_triton_masked_vocabulary_minus_inf_values_and_nan():
    s, t = make_dense((3, 300), device=DEVICE)
    t = t.float()
    s[:, 250:] = -math.inf
    t[:, 250:] = -math.inf
    vals, idx = top_k(t, 20, "logits", torch.float32)
    vals[:, 3] = -math.inf  # a kept entry without teacher mass
    x = s.clone().requires_grad_(True)
    loss = fastkd.sparse_kd_loss(x, vals, idx, 2.0, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(x.grad[:, 250:], torch.zeros(3, 50, device=DEVICE))
    check_against_reference("triton", s, vals, idx, 2.0)
    # uniform: the masked entries kept at -inf keep the tail unmasked (finite, and the gradient
    # exactly 0 there); left in the tail they make the loss +inf
    lp = F.log_softmax(t.double(), -1).float()
    lvals, lidx = top_k(t, 20, "logprobs", torch.float32)
    lidx = torch.cat([lidx, torch.arange(250, 300, device=DEVICE).expand(3, 50)], -1)
    lvals = torch.cat([lvals, lp[:, 250:]], -1)
    x = s.clone().requires_grad_(True)
    loss = fastkd.sparse_kd_loss(x, lvals, lidx, 2.0, values="logprobs", tail="uniform", backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(x.grad[:, 250:], torch.zeros(3, 50, device=DEVICE))
    check_against_reference("triton", s, lvals, lidx, 2.0, values="logprobs", tail="uniform")
    lvals, lidx = top_k(t, 20, "logprobs", torch.float32)
    rows = fastkd.sparse_kd_loss(s, lvals, lidx, 2.0, values="logprobs", tail="uniform", reduction="none", backend="triton")
    assert torch.isinf(rows).all() and (rows > 0).all()
    v2 = vals.clone()
    v2[1, 3] = math.nan
    rows = fastkd.sparse_kd_loss(s, v2, idx, 2.0, reduction="none", backend="triton")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_triton_kept_mass_of_one_is_an_empty_tail():
    """Exactly 1 (one entry at log-probability 0, the others -inf), and a hair above (within
    rounding): an empty tail, the renormalised loss, nothing NaN."""
    s, t = make_dense((4, 300), device=DEVICE)
    vals, idx = top_k(t, 12, "logits", torch.float64)
    lp = F.log_softmax(vals, -1)
    exact = torch.full_like(lp, -math.inf)
    exact[:, 5] = 0.0
    for v in (exact.float(), (lp + 1e-6).float()):
        x = s.clone().requires_grad_(True)
        loss = fastkd.sparse_kd_loss(x, v, idx, 2.0, values="logprobs", tail="uniform", backend="triton")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        check_against_reference("triton", s, v, idx, 2.0, values="logprobs", tail="uniform")
        torch.testing.assert_close(loss, fastkd.sparse_kd_loss(s, v, idx, 2.0, values="logprobs", backend="reference"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values,tail", TAILS)
def test_triton_every_entry_kept_equals_kd_loss(values, tail):
    s, t = make_dense((3, 70), device=DEVICE)
    vals, idx = top_k(t, 70, values, torch.float32)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = fastkd.sparse_kd_loss(a, vals, idx, 2.0, values=values, tail=tail, backend="triton")
    expected = fastkd.kd_loss(b, t.float(), 2.0, backend="reference")
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_triton_broken_indices_or_label_give_a_nan_row(index_dtype):
    s, vals, idx = make_sparse((6, 20), 4, device=DEVICE, index_dtype=index_dtype)
    idx = idx.clone()
    idx[1, 2] = 20  # outside [0, V)
    idx[2, 0] = -1
    idx[3, 1] = idx[3, 0]  # repeated
    y = torch.tensor([1, 2, 3, 4, 20, 5], device=DEVICE)  # row 4: label outside [0, V)
    for tail, kind in [("renormalize", "logits"), ("uniform", "logprobs")]:
        v = vals.clamp_max(-3.0)
        loss, grad = torch.ops.fastkd.sparse_kd_forward_triton(s, v, idx, y, kind, tail, 1.0, 0.5, -100, "none", True, True)
        assert torch.isnan(loss[1:5]).all() and torch.isnan(grad[1:5]).all()
        assert torch.isfinite(loss[[0, 5]]).all() and torch.isfinite(grad[[0, 5]]).all()


