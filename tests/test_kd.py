"""kd_loss: the reference against float64 math, the cpu backend against the reference, gradcheck.
The contract every op shares (opcheck, torch.compile, bad input, ...): test_conformance.py; every
divergence and ensembles of teachers: test_kd_divergences.py.

Triton (interpreter) and GPU tests of the same op: test_kd_triton.py, test_kd_gpu.py. The backend
choice: test_backends.py; the cpu instruction sets: test_cpu_isa.py; the extension's build:
test_extension_build.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.functional import kd_loss_reference
from backend_helpers import needs_ext
from kd_helpers import check_against_reference, check_float64_matches_reference, make_labels, make_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LABEL_MODES = ["none", "labels", "hard"]


def label_kwargs(mode, rows_shape, vocab, ignored=(0,)):
    if mode == "none":
        return {}
    labels = make_labels(rows_shape, vocab, ignored=ignored)
    return {"labels": labels, "hard_weight": 0.0 if mode == "labels" else 0.3}


# ------------------------------------------------------------------------------------------
# The reference itself, against the formula written out in float64.
# ------------------------------------------------------------------------------------------


def test_reference_matches_hinton_formula():
    s, t = make_logits((7, 11), torch.float64)
    T = 2.0
    p = F.softmax(t / T, -1)
    expected = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(kd_loss_reference(s, t, T), expected)
    # hard term, ignored rows and the batchmean over valid rows only
    y = torch.tensor([1, -100, 3, 4, -100, 0, 2])
    rows = 0.6 * T * T * (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1) + 0.4 * F.cross_entropy(s, y, reduction="none", ignore_index=-100)
    valid = y != -100
    torch.testing.assert_close(kd_loss_reference(s, t, T, labels=y, hard_weight=0.4), rows[valid].sum() / valid.sum())


def test_reference_equals_pytorch_kl_div_composite():
    s, t = make_logits((5, 13), torch.float64)
    composite = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), log_target=True, reduction="batchmean") * 9
    torch.testing.assert_close(kd_loss_reference(s, t, 3.0), composite)


# ------------------------------------------------------------------------------------------
# cpu backend against the reference
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("shape", [(41, 1271), (3, 131073), (2, 3, 257), (1, 1), (5, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", LABEL_MODES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_cpu_matches_reference(shape, dtype, mode, reduction):
    s, t = make_logits(shape, dtype)
    kwargs = label_kwargs(mode, shape[:-1], shape[-1], ignored=(0,) if math.prod(shape[:-1]) > 1 else ())
    for T in (1.0, 2.5):
        check_against_reference("cpu", s, t, T, reduction=reduction, **kwargs)


@needs_ext
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_mixed_student_and_teacher_dtypes(teacher_dtype):
    s, _ = make_logits((9, 300), torch.bfloat16)
    _, t = make_logits((9, 300), teacher_dtype)
    check_against_reference("cpu", s, t, 2.0)


@needs_ext
def test_cpu_float64_is_computed_in_float64():
    s, t = make_logits((6, 1000), torch.float64)
    check_float64_matches_reference(lambda x: fastkd.kd_loss(x, t, 2.0, backend="cpu"), lambda x: kd_loss_reference(x, t, 2.0), s)


# ------------------------------------------------------------------------------------------
# Ignored rows, awkward inputs, numerics
# ------------------------------------------------------------------------------------------

FUSED = ["cpu"]


@needs_ext
def test_ignored_rows_get_zero_gradient_and_do_not_count_in_the_mean():
    s, t = make_logits((6, 50))
    s.requires_grad_(True)
    y = make_labels((6,), 50, ignored=(1, 4))
    loss = fastkd.kd_loss(s, t, 2.0, labels=y, backend="cpu")
    loss.backward()
    assert torch.equal(s.grad[[1, 4]], torch.zeros(2, 50))
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(loss, fastkd.kd_loss(s.detach()[keep], t[keep], 2.0, backend="cpu"))


@needs_ext
@pytest.mark.parametrize("mode", LABEL_MODES)
def test_cpu_rows_are_bit_identical_to_each_row_alone(mode):
    """The CPU kernel writes a row's gradient while it computes the thread's next live row, from
    scratch rows taken in turn: a row must get exactly what it gets alone (no scratch of its
    neighbour, nothing left unwritten at the end of a thread's rows or beside ignored rows).
    Enough rows for more than one thread's share."""
    n, v = 120, 300
    s, t = make_logits((n, v), torch.bfloat16)
    kwargs = label_kwargs(mode, (n,), v, ignored=(0, 5, 6, n - 1))

    def loss_and_grad(rows, T):
        x = s[rows].clone().requires_grad_(True)
        kw = {k: (w[rows] if k == "labels" else w) for k, w in kwargs.items()}
        loss = fastkd.kd_loss(x, t[rows], T, reduction="none", backend="cpu", **kw)
        return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]

    for T in (1.0, 2.0):
        loss, grad = loss_and_grad(slice(None), T)
        alone = [loss_and_grad(slice(i, i + 1), T) for i in range(n)]
        assert torch.equal(loss, torch.cat([l for l, _ in alone]))
        assert torch.equal(grad, torch.cat([g for _, g in alone]))


@needs_ext
def test_ignore_index_can_be_any_value():
    s, t = make_logits((5, 20))
    y = torch.tensor([3, 7, 7, 1, 0])
    check_against_reference("cpu", s, t, 2.0, labels=y, hard_weight=0.2, ignore_index=7)


@needs_ext
@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend):
    base_s, base_t = make_logits((64, 90))
    s = base_s.t()[::2]  # [45, 64], strided
    t = base_t.t()[1::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    y = make_labels((90,), 64, ignored=(5,))[::2]
    check_against_reference(backend, s, t, 2.0, labels=y, hard_weight=0.25)


@needs_ext
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("std", [30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_logits(backend, std, dtype):
    s, t = make_logits((17, 3001), dtype, std=std)
    check_against_reference(backend, s, t, 1.0)
    check_against_reference(backend, s, t, 4.0, labels=make_labels((17,), 3001), hard_weight=0.1)


@needs_ext
@pytest.mark.parametrize("backend", FUSED)
def test_logits_of_magnitude_1e4(backend):
    s, t = make_logits((8, 1000), std=1.0)
    s = s * 1e4
    t = t.sign() * 1e4 + t
    check_against_reference(backend, s, t, 1.0)
    check_against_reference(backend, s, t, 7.0, labels=make_labels((8,), 1000), hard_weight=0.5)


@needs_ext
@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_vocabulary_entries(backend, dtype):
    s, t = make_logits((6, 257), dtype)
    mask = torch.zeros(6, 257, dtype=torch.bool)
    mask[:, 200:] = True
    mask[2, :100] = True
    s = s.masked_fill(mask, -math.inf).requires_grad_(True)
    t = t.masked_fill(mask, -math.inf)
    labels = make_labels((6,), 100) + 100  # never a masked entry
    loss = fastkd.kd_loss(s, t, 2.0, labels=labels, hard_weight=0.2, backend=backend)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[mask], torch.zeros_like(s.grad[mask]))
    # and the same loss as on the unmasked entries alone, row by row
    rows = [fastkd.kd_loss(s.detach()[i : i + 1, ~mask[i]], t[i : i + 1, ~mask[i]], 2.0, backend="reference") for i in (0, 2)]
    ref_rows = fastkd.kd_loss(s.detach(), t, 2.0, reduction="none", backend=backend)
    torch.testing.assert_close(ref_rows[[0, 2]], torch.stack(rows), rtol=2e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_input_gives_nan_loss(backend, where):
    s, t = make_logits((3, 40))
    (s if where == "student" else t)[1, 7] = math.nan
    rows = fastkd.kd_loss(s, t, 2.0, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(fastkd.kd_loss(s, t, 2.0, backend=backend))


@needs_ext
def test_gradient_is_written_in_the_student_dtype_and_shape():
    s, t = make_logits((2, 3, 50), torch.bfloat16)
    s.requires_grad_(True)
    fastkd.kd_loss(s, t.float(), 2.0, backend="cpu").backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == (2, 3, 50)


@needs_ext
def test_cpu_gradient_buffer_is_reused_only_when_nobody_holds_it():
    shape = (64, 32768)  # 8 MiB of fp32: large enough for the CPU kernels' buffer cache
    (s1, t1), (s2, t2) = make_logits(shape, seed=1), make_logits(shape, seed=2)
    expected = {}
    for name, (s, t) in {"1": (s1, t1), "2": (s2, t2)}.items():
        x = s.clone().requires_grad_(True)
        kd_loss_reference(x, t, 2.0).backward()
        expected[name] = x.grad
    fastkd.empty_cache()
    a, b = s1.clone().requires_grad_(True), s2.clone().requires_grad_(True)
    loss_a, loss_b = fastkd.kd_loss(a, t1, 2.0), fastkd.kd_loss(b, t2, 2.0)  # both alive at once
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(a.grad, expected["1"], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(b.grad, expected["2"], rtol=1e-4, atol=1e-9)
    # A gradient still referenced (here through a view) is never handed out again.
    kept_view = a.grad[3]
    kept = kept_view.clone()
    a.grad = None
    b.grad = None
    fastkd.kd_loss(b, t2, 2.0).backward()
    assert torch.equal(kept_view, kept)
    torch.testing.assert_close(b.grad, expected["2"], rtol=1e-4, atol=1e-9)
    # Once nobody holds it, the next call of the same shape gets the same memory back.
    del kept_view
    b.grad = None
    fastkd.kd_loss(b, t2, 2.0).backward()
    first = b.grad.data_ptr()
    b.grad = None
    fastkd.kd_loss(b, t2, 2.0).backward()
    assert b.grad.data_ptr() == first
    torch.testing.assert_close(b.grad, expected["2"], rtol=1e-4, atol=1e-9)
    assert fastkd.empty_cache() == 64 * 32768 * 4


@needs_ext
def test_out_of_range_label_is_an_error_on_cpu():
    s, t = make_logits((3, 10))
    with pytest.raises(ValueError, match=r"labels holds 10, outside \[0, 10\)"):
        fastkd.kd_loss(s, t, labels=torch.tensor([1, 10, 2]), backend="cpu")


@needs_ext
def test_out_of_range_label_reaching_the_kernel_gives_nan_not_a_number():
    s, t = make_logits((3, 10))
    loss, grad = torch.ops.fastkd.kd_forward(s, t, torch.tensor([1, 10, 2]), None, "kl", 0.0, 1.0, 0.5, -100, "none", True, True)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all()


# ------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 6), st.integers(1, 300))


@needs_ext
@settings(max_examples=40, deadline=None)
@given(shape=shapes, temperature=st.floats(0.25, 8.0), std=st.floats(0.0, 20.0), seed=st.integers(0, 2**16))
def test_property_loss_nonnegative_and_gradient_rows_sum_to_zero(shape, temperature, std, seed):
    s, t = make_logits(shape, std=std, seed=seed)
    y = make_labels(shape[:1], shape[1], seed=seed)
    s.requires_grad_(True)
    rows = fastkd.kd_loss(s, t, temperature, labels=y, hard_weight=0.3, reduction="none", backend="cpu")
    assert (rows >= 0).all()
    rows.sum().backward()
    # softmax(s) - p and softmax(s) - onehot both sum to zero over the vocabulary
    assert torch.allclose(s.grad.sum(-1), torch.zeros(shape[0]), atol=1e-5 * max(1.0, temperature))


@needs_ext
@settings(max_examples=40, deadline=None)
@given(shape=shapes, temperature=st.floats(0.25, 8.0), std=st.floats(0.0, 20.0), seed=st.integers(0, 2**16))
def test_property_zero_when_student_equals_teacher(shape, temperature, std, seed):
    s, _ = make_logits(shape, std=std, seed=seed)
    s.requires_grad_(True)
    loss = fastkd.kd_loss(s, s.detach(), temperature, backend="cpu")
    assert abs(loss.item()) <= 1e-5 * temperature**2
    loss.backward()
    assert s.grad.abs().max() <= 1e-6 * temperature


@needs_ext
@settings(max_examples=30, deadline=None)
@given(shape=shapes, temperature=st.floats(0.5, 5.0), seed=st.integers(0, 2**16))
def test_property_cpu_agrees_with_reference(shape, temperature, seed):
    s, t = make_logits(shape, seed=seed)
    check_against_reference("cpu", s, t, temperature)


# ------------------------------------------------------------------------------------------
# PyTorch integration: gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_gradcheck_float64(backend, reduction):
    s, t = make_logits((4, 9), torch.float64)
    y = torch.tensor([2, -100, 0, 8])

    def f(x):
        return fastkd.kd_loss(x, t, 1.7, labels=y, hard_weight=0.3, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(f, (s.requires_grad_(True),))


def test_gradcheck_float64_per_row_reference():
    s, t = make_logits((3, 7), torch.float64)
    assert torch.autograd.gradcheck(lambda x: kd_loss_reference(x, t, 2.0, reduction="none"), (s.requires_grad_(True),))
