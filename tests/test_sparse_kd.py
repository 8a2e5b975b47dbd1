"""sparse_kd_loss: the reference against independent formulations (kd_loss on the dense teacher,
cross-entropy), the cpu backend against the reference (the kd family's grid), awkward inputs,
gradcheck and the top-k row check. The contract every op shares (opcheck, torch.compile, bad
input, ...): test_conformance.py.

Contract tests shared with the other backends: test_sparse_kd_contract.py; Triton (interpreter)
and GPU: test_sparse_kd_triton.py, test_sparse_kd_gpu.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import _ext
from fastkd.functional import kd_loss_reference, sparse_kd_loss_reference
from fastkd.ops import sparse_kd as sparse_ops
from backend_helpers import ISAS, force_isa, needs_ext
from kd_helpers import make_labels
from sparse_kd_helpers import TAILS, check_against_reference, make_dense, make_sparse, top_k

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (labels mode, reduction, temperature): every mode, reduction and CE path (T = 1: the CE
# softmax is q; T != 1: its own), without their full product.
MODES = [("none", "batchmean", 2.5), ("labels", "sum", 1.0), ("hard", "none", 2.5), ("hard", "batchmean", 1.0)]


def label_kwargs(mode, rows_shape, vocab, ignored=(0,)):
    if mode == "none":
        return {}
    labels = make_labels(rows_shape, vocab, ignored=ignored)
    return {"labels": labels, "hard_weight": 0.0 if mode == "labels" else 0.3}


def permutation_teacher(teacher, values):
    """k = V: every entry kept, in a random order per row."""
    vocab = teacher.shape[-1]
    return top_k(teacher, vocab, values, torch.float64)


# ------------------------------------------------------------------------------------------
# The reference against independent formulations, in float64
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values,tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reference_with_every_entry_kept_is_kd_loss(values, tail, temperature):
    s, t = make_dense((6, 37), torch.float64)
    vals, idx = permutation_teacher(t, values)
    y = make_labels((6,), 37, ignored=(2,))
    for kw in (dict(), dict(labels=y, hard_weight=0.3, reduction="none")):
        got = sparse_kd_loss_reference(s, vals, idx, temperature, values=values, tail=tail, **kw)
        torch.testing.assert_close(got, kd_loss_reference(s, t, temperature, **kw), rtol=1e-12, atol=1e-12)


def test_reference_renormalize_is_kd_loss_on_the_teacher_masked_outside_the_kept_set():
    s, t = make_dense((5, 50), torch.float64)
    vals, idx = top_k(t, 7, "logits", torch.float64)
    masked = torch.full_like(t, -math.inf).scatter(-1, idx, vals)
    for T in (1.0, 3.0):
        torch.testing.assert_close(sparse_kd_loss_reference(s, vals, idx, T), kd_loss_reference(s, masked, T), rtol=1e-12, atol=1e-12)
        # log-probabilities renormalise to the same teacher
        lp, lp_idx = top_k(t, 7, "logprobs", torch.float64)
        torch.testing.assert_close(
            sparse_kd_loss_reference(s, lp, lp_idx, T, values="logprobs"), kd_loss_reference(s, masked, T), rtol=1e-12, atol=1e-12
        )


def test_reference_uniform_is_kd_loss_on_the_reconstructed_teacher():
    """Written out independently: the dense log-probabilities row by row, then kd_loss."""
    s, t = make_dense((4, 30), torch.float64)
    vals, idx = top_k(t, 6, "logprobs", torch.float64)
    dense = torch.empty_like(t)
    for r in range(4):
        missing = 1 - sum(math.exp(x) for x in vals[r].tolist())
        dense[r] = math.log(missing / (30 - 6))
        for x, j in zip(vals[r].tolist(), idx[r].tolist()):
            dense[r, j] = x
    assert torch.allclose(dense.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    for T in (1.0, 0.7, 4.0):
        got = sparse_kd_loss_reference(s, vals, idx, T, values="logprobs", tail="uniform")
        torch.testing.assert_close(got, kd_loss_reference(s, dense, T), rtol=1e-12, atol=1e-12)


def test_reference_one_kept_entry_is_cross_entropy():
    s, t = make_dense((5, 40), torch.float64)
    vals, idx = top_k(t, 1, "logits", torch.float64)
    T = 2.0
    ce = F.cross_entropy(s / T, idx[:, 0], reduction="none") * T * T
    torch.testing.assert_close(sparse_kd_loss_reference(s, vals, idx, T, reduction="none"), ce, rtol=1e-12, atol=1e-12)


def test_reference_equals_the_usual_top_k_composite():
    """What users write today for a top-k teacher (the student over the full vocabulary)."""
    s, t = make_dense((6, 80), torch.float64)
    vals, idx = top_k(t, 9, "logits", torch.float64)
    T = 2.0
    log_q = F.log_softmax(s / T, -1).gather(-1, idx)
    log_p = F.log_softmax(vals / T, -1)
    composite = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T
    torch.testing.assert_close(sparse_kd_loss_reference(s, vals, idx, T), composite, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# cpu backend against the reference
# ------------------------------------------------------------------------------------------

SHAPES = [((41, 1271), 64), ((3, 131073), 64), ((2, 3, 257), 64), ((1, 1), 1), ((5, 17), 17)]


@needs_ext
@pytest.mark.parametrize("shape,k", SHAPES, ids=[f"{s}-k{k}" for s, k in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values,tail", TAILS)
def test_cpu_matches_reference(shape, k, dtype, values, tail):
    s, vals, idx = make_sparse(shape, k, dtype, values)
    rows = shape[:-1]
    for mode, reduction, T in MODES:
        kwargs = label_kwargs(mode, rows, shape[-1], ignored=(0,) if math.prod(rows) > 1 else ())
        check_against_reference("cpu", s, vals, idx, T, values=values, tail=tail, reduction=reduction, **kwargs)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_every_instruction_set(isa, dtype, monkeypatch):
    force_isa(monkeypatch, isa)
    for (shape, k), (values, tail) in zip([((41, 1271), 50), ((3, 70001), 64), ((4, 5), 3)], TAILS * 2):
        s, vals, idx = make_sparse(shape, k, dtype, values, seed=shape[1])
        kwargs = label_kwargs("hard", shape[:-1], shape[-1], ignored=(1,))
        check_against_reference("cpu", s, vals, idx, 2.0, values=values, tail=tail, **kwargs)
        check_against_reference("cpu", s, vals, idx, 1.0, values=values, tail=tail, t2_scale=False, reduction="none", **kwargs)


@needs_ext
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cpu_mixed_dtypes(values_dtype, index_dtype):
    s, t = make_dense((9, 300), torch.bfloat16)
    for values, tail in TAILS:
        vals, idx = top_k(t, 20, values, values_dtype, index_dtype)
        check_against_reference("cpu", s, vals, idx, 2.0, values=values, tail=tail)


@needs_ext
@pytest.mark.parametrize("values,tail", TAILS)
@pytest.mark.parametrize("k", [1, 64, 1000])
def test_cpu_with_every_entry_kept_equals_kd_loss_and_one_entry_equals_cross_entropy(values, tail, k):
    s, t = make_dense((7, 1000), torch.float64)
    vals, idx = top_k(t, k, values, torch.float64)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = fastkd.sparse_kd_loss(a, vals, idx, 2.0, values=values, tail=tail, backend="cpu")
    if k == 1000:
        expected = fastkd.kd_loss(b, t, 2.0, backend="cpu")
    else:
        expected = sparse_kd_loss_reference(b, vals, idx, 2.0, values=values, tail=tail)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


@needs_ext
def test_cpu_renormalize_equals_kd_loss_on_the_masked_teacher():
    s, t = make_dense((8, 700))
    vals, idx = top_k(t, 33, "logits", torch.float32)
    masked = torch.full_like(s, -math.inf).scatter(-1, idx, vals)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = fastkd.sparse_kd_loss(a, vals, idx, 2.0, backend="cpu")
    expected = fastkd.kd_loss(b, masked, 2.0, backend="cpu")
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------
# Ignored rows, awkward inputs, numerics
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("values,tail", TAILS)
def test_all_rows_ignored_gives_zero_loss_and_gradient(backend, reduction, values, tail):
    s, vals, idx = make_sparse((4, 33), 5, values=values)
    s.requires_grad_(True)
    y = torch.full((4,), -100)
    loss = fastkd.sparse_kd_loss(s, vals, idx, 2.0, values=values, tail=tail, labels=y, hard_weight=0.5, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@needs_ext
@pytest.mark.parametrize("values,tail", TAILS)
def test_ignored_rows_get_zero_gradient_and_do_not_count_in_the_mean(values, tail):
    s, vals, idx = make_sparse((6, 50), 8, values=values)
    s.requires_grad_(True)
    y = make_labels((6,), 50, ignored=(1, 4))
    loss = fastkd.sparse_kd_loss(s, vals, idx, 2.0, values=values, tail=tail, labels=y, backend="cpu")
    loss.backward()
    assert torch.equal(s.grad[[1, 4]], torch.zeros(2, 50))
    keep = [0, 2, 3, 5]
    expected = fastkd.sparse_kd_loss(s.detach()[keep], vals[keep], idx[keep], 2.0, values=values, tail=tail, backend="cpu")
    torch.testing.assert_close(loss, expected)


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ignored_rows_are_not_checked(backend):
    """A padded position of a teacher cache may hold anything: repeated or out-of-range indices,
    a kept mass above 1, NaN."""
    s, vals, idx = make_sparse((4, 40), 6, values="logprobs")
    y = torch.tensor([3, -100, 5, -100])
    clean = fastkd.sparse_kd_loss(s[[0, 2]], vals[[0, 2]], idx[[0, 2]], 2.0, values="logprobs", tail="uniform", backend=backend)
    idx, vals = idx.clone(), vals.clone()
    idx[1] = 0  # repeated
    idx[3, 0] = 40  # outside [0, V)
    vals[1] = 0.0  # mass 6
    vals[3, 2] = math.nan
    x = s.clone().requires_grad_(True)
    loss = fastkd.sparse_kd_loss(x, vals, idx, 2.0, values="logprobs", tail="uniform", labels=y, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, clean)
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[[1, 3]], torch.zeros(2, 40))


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("values,tail", TAILS)
@pytest.mark.parametrize("where", ["student", "values"])
def test_nan_input_gives_nan_loss(backend, values, tail, where):
    s, vals, idx = make_sparse((3, 40), 5, values=values)
    (s if where == "student" else vals)[1, 3] = math.nan
    rows = fastkd.sparse_kd_loss(s, vals, idx, 2.0, values=values, tail=tail, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(fastkd.sparse_kd_loss(s, vals, idx, 2.0, values=values, tail=tail, backend=backend))


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("values,tail", TAILS)
def test_minus_inf_values_at_kept_entries_carry_no_mass(backend, values, tail):
    """A kept entry with value -inf has no teacher mass: the same loss as without it (for the
    uniform tail, the teacher then simply has one more entry at zero probability), finite
    gradients."""
    s, t = make_dense((5, 60), torch.float64)
    vals, idx = top_k(t, 10, values, torch.float64)
    vals[:, 4] = -math.inf
    vals[2, :] = torch.where(torch.arange(10) < 9, -math.inf, vals[2, :])  # one entry left
    x = s.clone().requires_grad_(True)
    loss = fastkd.sparse_kd_loss(x, vals, idx, 2.0, values=values, tail=tail, reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    if tail == "renormalize":  # the -inf entries dropped altogether
        for r in (0, 2):
            keep = vals[r] > -math.inf
            alone = sparse_kd_loss_reference(s[r : r + 1], vals[r : r + 1, keep], idx[r : r + 1, keep], 2.0, reduction="none")
            torch.testing.assert_close(loss[r : r + 1].detach(), alone, rtol=1e-10, atol=1e-12)
    # a kept entry without teacher mass has the gradient of q alone: T (q - 0), for either tail
    q = F.softmax(s / 2.0, -1)
    rows = torch.arange(5).unsqueeze(-1)
    torch.testing.assert_close(x.grad[rows, idx][:, 4], 2.0 * q[rows, idx][:, 4], rtol=1e-10, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_vocabulary_entries(backend, dtype):
    """-inf student logits (masked vocabulary): finite where the teacher puts no mass on them
    (renormalize; uniform with masked entries kept at -inf, so that the tail avoids them), +inf
    where the tail does."""
    s, t = make_dense((6, 257), torch.float64)
    t[:, 200:] = -math.inf
    s[:, 200:] = -math.inf
    s = s.to(dtype)
    for values, tail in TAILS:
        vals, idx = top_k(t, 40, values, torch.float64)  # never a masked entry
        x = s.clone().requires_grad_(True)
        loss = fastkd.sparse_kd_loss(x, vals, idx, 2.0, values=values, tail=tail, reduction="none", backend=backend)
        if tail == "renormalize":
            loss.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
            assert torch.equal(x.grad[:, 200:], torch.zeros_like(x.grad[:, 200:]))
        else:  # the uniform tail gives the masked entries mass the student cannot match
            assert torch.isinf(loss).all() and (loss > 0).all()
    # uniform, with every masked entry kept at -inf: the tail is unmasked, the loss finite (the
    # kernel's sum over the tail then cannot subtract -inf from -inf)
    lp = F.log_softmax(t, -1)
    vals, idx = top_k(t, 20, "logprobs", torch.float64)
    idx = torch.cat([idx, torch.arange(200, 257).expand(6, 57)], -1)
    vals = torch.cat([vals, lp[:, 200:]], -1)
    x = s.clone().requires_grad_(True)
    loss = fastkd.sparse_kd_loss(x, vals, idx, 2.0, values="logprobs", tail="uniform", reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[:, 200:], torch.zeros_like(x.grad[:, 200:]))
    expected = sparse_kd_loss_reference(s.double(), vals, idx, 2.0, values="logprobs", tail="uniform", reduction="none")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss.detach().double(), expected, rtol=tol, atol=tol)


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_mass_of_one_is_an_empty_tail(backend, dtype):
    """A teacher whose top-k holds all its mass: the uniform tail is empty, so the loss is the
    renormalised one and nothing is NaN. Exactly 1 (one entry at log-probability 0, the others
    -inf), and a hair above 1 (within rounding), which counts as 1. (Just below 1 the tail is not
    empty: its mass m becomes about (m/n)^(1/T) n at temperature T, so a rounding-level m is no
    longer negligible at T > 1; the inputs decide, and these tests keep clear of it.)"""
    s, t = make_dense((5, 100), dtype)
    vals, idx = top_k(t, 12, "logits", torch.float64)
    lp = F.log_softmax(vals, -1)  # log-probabilities of a teacher with no mass elsewhere
    exact = torch.full_like(lp, -math.inf)
    exact[:, 3] = 0.0
    for v in (exact, lp + 1e-6):
        v = v.to(dtype)
        x = s.clone().requires_grad_(True)
        loss = fastkd.sparse_kd_loss(x, v, idx, 2.0, values="logprobs", tail="uniform", backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        y = s.clone().requires_grad_(True)
        expected = sparse_kd_loss_reference(y, v, idx, 2.0, values="logprobs", tail="renormalize")
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-9)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values,tail", TAILS)
def test_wide_logits(dtype, values, tail, request):
    if dtype == torch.float32 and tail == "uniform":
        # Measured under the per-entry rule, T = 4 with labels: float32 log-probabilities of a
        # peaked teacher leave a tail mass (1 - sum of the kept probabilities) that cancels, so
        # every float32 computation errs: PyTorch's composite by up to 40 % of a row's largest
        # gradient entry (rows 2, 5, 6, 8; loss 5.9 %), the CPU kernel by 3.9 % (row 1; loss
        # 0.45 %), Triton as PyTorch. Each is wrong in rows where the other is right, which a
        # per-row bound cannot accept; the input is ill-conditioned in float32. Strict: reported,
        # not hidden by a looser floor.
        request.applymarker(pytest.mark.xfail(strict=True, reason="ill-conditioned uniform tail in float32: CPU 3.9 %, PyTorch 40 % of row max, in different rows"))
    s, vals, idx = make_sparse((9, 3001), 64, dtype, values, std=30.0)
    check_against_reference("cpu", s, vals, idx, 1.0, values=values, tail=tail)
    check_against_reference("cpu", s, vals, idx, 4.0, values=values, tail=tail, labels=make_labels((9,), 3001), hard_weight=0.1)


@needs_ext
@pytest.mark.parametrize("values,tail", TAILS)
def test_logits_of_magnitude_1e4(values, tail):
    s, t = make_dense((8, 1000), std=1.0)
    s = s * 1e4
    t = t.sign() * 1e4 + t
    vals, idx = top_k(t, 64, values, torch.float32)
    check_against_reference("cpu", s, vals, idx, 1.0, values=values, tail=tail)
    check_against_reference("cpu", s, vals, idx, 7.0, values=values, tail=tail, labels=make_labels((8,), 1000), hard_weight=0.5)


@needs_ext
def test_non_contiguous_inputs():
    base_s, base_t = make_dense((64, 90))
    s = base_s.t()[::2]  # [45, 64], strided
    vals, idx = top_k(base_t.t()[1::2], 9)
    vals, idx = vals.t().contiguous().t(), idx.t().contiguous().t()
    assert not s.is_contiguous() and not vals.is_contiguous() and not idx.is_contiguous()
    y = make_labels((90,), 64, ignored=(5,))[::2]
    for values, tail in TAILS:
        v = vals if values == "logits" else F.log_softmax(base_t.t()[1::2], -1).gather(-1, idx).float()
        check_against_reference("cpu", s, v, idx, 2.0, values=values, tail=tail, labels=y, hard_weight=0.25)


@needs_ext
def test_gradient_is_written_in_the_student_dtype_and_shape():
    s, vals, idx = make_sparse((2, 3, 50), 7, torch.bfloat16)
    s.requires_grad_(True)
    fastkd.sparse_kd_loss(s, vals.float(), idx.int(), 2.0, backend="cpu").backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == (2, 3, 50)


@needs_ext
def test_flat_teacher_for_a_3d_student():
    s, vals, idx = make_sparse((2, 3, 50), 7)
    torch.testing.assert_close(
        fastkd.sparse_kd_loss(s, vals.reshape(6, 7), idx.reshape(6, 7), 2.0, backend="cpu"), fastkd.sparse_kd_loss(s, vals, idx, 2.0, backend="cpu")
    )


@needs_ext
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_bad_indices_reaching_the_kernel_give_a_nan_row_not_a_crash(index_dtype):
    s, vals, idx = make_sparse((5, 10), 3, index_dtype=index_dtype)
    idx = idx.clone()
    idx[1, 2] = 10  # outside [0, V)
    idx[2, 0] = -1
    idx[3, 1] = idx[3, 0]  # repeated
    for tail, kind in [("renormalize", "logits"), ("uniform", "logprobs")]:
        loss, grad = torch.ops.fastkd.sparse_kd_forward(s, vals.clamp_max(-3), idx, None, kind, tail, 1.0, 0.0, -100, "none", True, True)
        assert torch.isnan(loss[1:4]).all() and torch.isnan(grad[1:4]).all()
        assert torch.isfinite(loss[[0, 4]]).all() and torch.isfinite(grad[[0, 4]]).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1), "temperature must be a finite number > 0, got -1"),
        (dict(values="probs"), "values must be one of 'logits', 'logprobs', got 'probs'"),
        (dict(tail="zero"), "tail must be one of 'renormalize', 'uniform', got 'zero'"),
        (dict(tail="uniform"), "tail='uniform' needs values='logprobs'"),
        (dict(hard_weight=2.0), r"hard_weight must be in \[0, 1\], got 2.0"),
        (dict(reduction="mean"), "reduction must be one of"),
        (dict(backend="fast"), "backend='fast' is not a backend"),
    ],
)
def test_module_checks_its_options_at_construction(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fastkd.nn.SparseKDLoss(**kwargs)


# ------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------


@needs_ext
@settings(max_examples=20, deadline=None)
@given(
    vocab=st.integers(1, 300),
    rows=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    temperature=st.floats(0.25, 8.0),
    std=st.floats(0.0, 20.0),
    seed=st.integers(0, 2**16),
    uniform=st.booleans(),
)
def test_property_loss_nonnegative_and_gradient_rows_sum_to_zero(vocab, rows, k_frac, temperature, std, seed, uniform):
    k = max(1, round(k_frac * vocab))
    values, tail = TAILS[int(uniform)]
    s, vals, idx = make_sparse((rows, vocab), k, values=values, std=std, seed=seed)
    y = make_labels((rows,), vocab, seed=seed)
    s.requires_grad_(True)
    out = fastkd.sparse_kd_loss(s, vals, idx, temperature, values=values, tail=tail, labels=y, hard_weight=0.3, reduction="none", backend="cpu")
    assert (out >= 0).all()
    out.sum().backward()
    # q - p and softmax(s) - onehot both sum to zero over the full vocabulary (p sums to 1)
    assert torch.allclose(s.grad.sum(-1), torch.zeros(rows), atol=2e-5 * max(1.0, temperature))


@needs_ext
@settings(max_examples=15, deadline=None)
@given(vocab=st.integers(2, 300), k_frac=st.floats(0.0, 1.0), temperature=st.floats(0.5, 5.0), seed=st.integers(0, 2**16), uniform=st.booleans())
def test_property_cpu_agrees_with_reference(vocab, k_frac, temperature, seed, uniform):
    k = max(1, round(k_frac * vocab))
    values, tail = TAILS[int(uniform)]
    s, vals, idx = make_sparse((3, vocab), k, values=values, seed=seed)
    check_against_reference("cpu", s, vals, idx, temperature, values=values, tail=tail)


# ------------------------------------------------------------------------------------------
# PyTorch integration: gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction,values,tail", [("batchmean", *TAILS[0]), ("sum", *TAILS[1])])
def test_gradcheck_float64(backend, reduction, values, tail):
    s, vals, idx = make_sparse((3, 7), 3, torch.float64, values)
    y = torch.tensor([2, -100, 6])

    def f(x):
        return fastkd.sparse_kd_loss(x, vals, idx, 1.7, values=values, tail=tail, labels=y, hard_weight=0.3, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(f, (s.requires_grad_(True),))


# ------------------------------------------------------------------------------------------
# Backends and build
# ------------------------------------------------------------------------------------------


@needs_ext
def test_cuda_kernel_is_registered_when_built_with_cuda():
    assert _ext.has_kernel("sparse_kd_forward", "CPU")
    assert _ext.has_kernel("sparse_kd_forward", "CUDA") == torch.ops.fastkd.built_with_cuda()


# ------------------------------------------------------------------------------------------
# Top-k rows the kernels cannot take
# ------------------------------------------------------------------------------------------

VALS, IDX = make_sparse((4, 10), 3)[1:]
LP, LP_IDX = top_k(make_dense((4, 10))[1], 3, "logprobs")


def _with(t, pos, value):
    t = t.clone()
    t[pos] = value
    return t


@needs_ext
def test_the_row_check_without_the_extension_finds_the_same_problems():
    """fastkd::sparse_kd_check and its torch fallback (used where the extension is missing)."""
    y = torch.tensor([3, -100, 5, 7])
    cases = [
        (IDX, LP, "renormalize", None, None),
        (_with(IDX, (2, 1), 10), VALS, "renormalize", None, (0, 2, 10)),
        (_with(IDX, (0, 0), -3), VALS, "uniform", None, (0, 0, -3)),
        (_with(IDX, (3, 2), IDX[3, 0]), VALS, "renormalize", None, (1, 3, int(IDX[3, 0]))),
        (_with(IDX, (1, 2), IDX[1, 0]), VALS, "renormalize", y, None),  # an ignored row
        (LP_IDX, _with(LP, (2, 0), 0.0), "uniform", None, (2, 2, None)),
        (LP_IDX, _with(LP, (1, 0), 0.0), "uniform", y, None),
        (LP_IDX, _with(LP, (0, 0), math.nan), "uniform", None, None),  # NaN: a NaN row, no error
        (LP_IDX.int(), LP.to(torch.bfloat16), "uniform", None, None),
    ]
    for idx, vals, tail, labels, expected in cases:
        found = [sparse_ops._row_problem(vals, idx, 10, tail, labels, -100, use_extension=ext) for ext in (True, False)]
        for got in found:
            if expected is None:
                assert got is None, got
            else:
                assert got[:2] == expected[:2] and (expected[2] is None or got[3] == expected[2]), (got, expected)
        if expected is not None and expected[0] == 2:
            torch.testing.assert_close(torch.tensor(found[0][3:]), torch.tensor(found[1][3:]), rtol=1e-12, atol=0)


def test_kept_mass_within_rounding_is_accepted_on_cpu():
    """bf16 log-probabilities of a teacher whose top-k holds all its mass: rounding alone can put
    the kept mass above 1 (by far more than float32 rounding would), which must not be refused."""
    s, t = make_dense((64, 500))
    vals, idx = top_k(t, 8, "logits", torch.float64)
    lp = F.log_softmax(vals, -1)
    lp16 = lp.to(torch.bfloat16)
    assert (lp16.double().exp().sum(-1) > 1 + 1e-4).any()  # the case this test is about
    loss = fastkd.sparse_kd_loss(s, lp16, idx, 2.0, values="logprobs", tail="uniform")
    assert torch.isfinite(loss)
