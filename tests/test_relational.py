"""Relational losses (rkd_distance_loss, rkd_angle_loss, sp_loss, pkt_loss): the references against
torchdistill's and the papers' formulas, the cpu backend against the references, awkward inputs
(duplicate rows, all-equal batches, zero rows, NaN), gradcheck and the kernels' own checks. The
contract every op shares (opcheck, torch.compile, retained graph, bad input, ...):
test_conformance.py.

Triton (interpreter) and GPU tests of the same ops: test_relational_triton.py, test_relational_gpu.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from bench import test_bench_relational as bench_relational
from fastkd import _ext
from fastkd.ops import relational as rel
from backend_helpers import ISAS, force_isa, needs_ext
from kd_helpers import check_float64_matches_reference
from relational_helpers import (
    MIN_BATCH,
    OPS,
    THIN,
    THIN_IDS,
    check_against_reference,
    check_degenerate_batch,
    check_no_worse_than_composite,
    make_embeddings,
    public,
    reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEMA = {"rkd_distance": "rkd_distance_forward", "rkd_angle": "rkd_angle_forward", "sp": "sp_forward", "pkt": "pkt_forward"}


def op_args(op, s, t, compute_grad=True):
    return (s, t, 1e-7, compute_grad) if op == "pkt" else (s, t, compute_grad)


# ------------------------------------------------------------------------------------------
# The references against torchdistill's formulas (its source, torchdistill/losses/mid_level.py,
# written out in bench/test_bench_relational.py's composites; its SP variant here) and the papers'.
# ------------------------------------------------------------------------------------------


def torchdistill_spkd(s, t):  # L1 row normalisation: normalize(x, 1) passes p=1
    g_t = F.normalize(t @ t.t(), 1)
    g_s = F.normalize(s @ s.t(), 1)
    return torch.norm(g_t - g_s) ** 2 / s.shape[0] ** 2


def torchdistill_pkt(s, t, eps=1e-7):
    return bench_relational.pkt_composite(s, t, Dt=t.shape[1], eps=eps)


# torchdistill's composites, as the benchmark times them (what users write today)
TORCHDISTILL = {
    "rkd_distance": lambda s, t: bench_relational.rkd_distance_composite(s, t, Dt=t.shape[1]),
    "rkd_angle": lambda s, t: bench_relational.rkd_angle_composite(s, t, Dt=t.shape[1]),
    "pkt": torchdistill_pkt,
}


@pytest.mark.parametrize("op", ["rkd_distance", "rkd_angle", "pkt"])
@pytest.mark.parametrize("kind", ["random", "duplicates", "zero_row"])
def test_reference_matches_torchdistill(op, kind):
    s, t = make_embeddings(9, 7, 5, torch.float64, kind=kind, seed=3)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours, theirs = reference(op)(a, t), TORCHDISTILL[op](b, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    ours.backward()
    theirs.backward()
    if op == "pkt" and kind == "zero_row":
        # torchdistill's sqrt(sum(x**2)) has a NaN gradient at a zero row; the reference uses the
        # norm's subgradient 0 there, and agrees everywhere else.
        assert torch.isnan(b.grad[1]).all() and torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad[[0, *range(2, 9)]], b.grad[[0, *range(2, 9)]], rtol=1e-8, atol=1e-14)
    else:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-14)


def test_sp_reference_is_the_papers_l2_not_torchdistills_l1():
    s, t = make_embeddings(6, 5, 4, torch.float64, seed=1)
    gs = s @ s.t()
    gt = t @ t.t()
    gs = gs / gs.norm(dim=1, keepdim=True)
    gt = gt / gt.norm(dim=1, keepdim=True)
    paper = ((gt - gs) ** 2).sum() / 36  # Tung & Mori, Eq. 2-4
    torch.testing.assert_close(rel.sp_loss_reference(s, t), paper)
    assert abs(float(torchdistill_spkd(s, t)) - float(paper)) > 1e-3 * float(paper)


def test_rkd_distance_reference_is_translation_invariant_and_matches_park_et_al():
    s, t = make_embeddings(7, 4, 3, torch.float64, seed=2)
    d_s, d_t = torch.cdist(s, s), torch.cdist(t, t)
    off = ~torch.eye(7, dtype=torch.bool)
    psi_s, psi_t = d_s / d_s[off].mean(), d_t / d_t[off].mean()
    expected = F.smooth_l1_loss(psi_s, psi_t)
    torch.testing.assert_close(rel.rkd_distance_loss_reference(s, t), expected)
    torch.testing.assert_close(rel.rkd_distance_loss_reference(s + 1e3, t - 7), expected)


# ------------------------------------------------------------------------------------------
# cpu backend against the reference
# ------------------------------------------------------------------------------------------

SHAPES = [(2, 1, 3), (5, 3, 3), (37, 513, 200), (6, (2, 3, 4), (5,))]


@needs_ext
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_reference(op, shape, dtype):
    b, ds, dt = shape
    s, t = make_embeddings(b, ds, dt, dtype, seed=b)
    check_against_reference(op, "cpu", s, t)


@needs_ext
@pytest.mark.parametrize("op", ["sp", "pkt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_batch_of_one(op, dtype):
    s, t = make_embeddings(1, 6, 4, dtype)
    loss, grad = check_against_reference(op, "cpu", s, t)
    assert loss == 0 and torch.equal(grad, torch.zeros_like(grad))


DEGENERATE = ["duplicates", "student_duplicates", "all_equal", "zero_row"]


@needs_ext
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", DEGENERATE)
def test_cpu_degenerate_batches(op, kind):
    """Zero difference vectors and zero rows: the references' values and gradients (F.normalize
    and clamp kinks included), never NaN."""
    s, t = make_embeddings(11, 17, 9, kind=kind, seed=5)
    check_degenerate_batch(op, "cpu", s, t, kind)


@needs_ext
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", DEGENERATE)
def test_cpu_degenerate_batches_float64(op, kind):
    """The same in float64, where the rule above has no more precise oracle: agreement to 1e-9
    relative, or 1e-15 absolute for gradients that are rounding residues of cancelling terms (an
    all-equal batch's PKT gradient is O(eps) ~ 1e-12, from terms of size 1e-5)."""
    s, t = make_embeddings(11, 17, 9, torch.float64, kind=kind, seed=5)
    check_float64_matches_reference(lambda x: public(op)(x, t, backend="cpu"), lambda x: reference(op)(x, t), s,
                                    loss_tol=(1e-12, 1e-15), grad_tol=(1e-9, 1e-15))


@needs_ext
@pytest.mark.parametrize("op", ["rkd_angle", "rkd_distance"])
@pytest.mark.parametrize("kind,b,d", THIN, ids=THIN_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_thin_batches_no_worse_than_the_float32_composite(op, kind, b, d, dtype):
    """The Gram identity cancels on thin triangles and close pairs, and M·E cancels where a
    difference is short: the cpu backend takes exact paths there (relational_kernel.h,
    "Precision"; relational_cpu.cpp, "Close pairs") and must be no worse than PyTorch's float32
    composite, which forms every difference directly."""
    for seed in range(3):
        s, t = make_embeddings(b, d, 9, dtype, kind=kind, seed=seed)
        check_no_worse_than_composite(op, "cpu", s, t)


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_cpu_wide_and_offset_embeddings(op):
    s, t = make_embeddings(23, 64, 48, torch.float32, std=30.0, offset=100.0, seed=7)
    check_against_reference(op, "cpu", s, t)


@needs_ext
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_mixed_student_and_teacher_dtypes(op, teacher_dtype):
    s, _ = make_embeddings(9, 20, 12, torch.bfloat16)
    _, t = make_embeddings(9, 20, 12, teacher_dtype)
    check_against_reference(op, "cpu", s, t)


@needs_ext
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", ["random", "duplicates", "student_duplicates"])
def test_cpu_float64_is_computed_in_float64(op, kind):
    s, t = make_embeddings(13, 33, 21, torch.float64, kind=kind, seed=11)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = public(op)(a, t, backend="cpu")
    expected = reference(op)(b, t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    (got * 0.7).backward()
    (expected * 0.7).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12 * float(b.grad.abs().max()))


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_angle_every_instruction_set(isa, dtype, monkeypatch):
    """The triplet loop is the one per-ISA kernel of the family; B spans several row blocks and
    k-tiles with tails (kJ = 16, kK = 128)."""
    force_isa(monkeypatch, isa)
    kind = "random" if dtype == torch.float32 else "student_duplicates"
    s, t = make_embeddings(150, 12, 9, dtype, kind=kind, seed=13)
    check_against_reference("rkd_angle", "cpu", s, t)


@needs_ext
def test_cpu_angle_is_deterministic():
    """Threads add S + Sᵀ into one matrix with atomics: two adds onto zero per entry, so the
    result does not depend on their order."""
    s, t = make_embeddings(70, 30, 20, seed=4)
    results = []
    for _ in range(3):
        x = s.clone().requires_grad_(True)
        loss = fastkd.rkd_angle_loss(x, t, backend="cpu")
        loss.backward()
        results.append((loss, x.grad))
    assert all(torch.equal(l, results[0][0]) and torch.equal(g, results[0][1]) for l, g in results)


# ------------------------------------------------------------------------------------------
# NaN, teacher, autograd contract
# ------------------------------------------------------------------------------------------

BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_input_gives_nan_loss(backend, op, where):
    s, t = make_embeddings(6, 5, 4)
    (s if where == "student" else t)[2, 1] = math.nan
    assert torch.isnan(public(op)(s, t, backend=backend))


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_gradient_comes_back_in_the_student_dtype_and_shape(op):
    s, t = make_embeddings(4, (3, 2, 2), (7,), torch.bfloat16)
    s.requires_grad_(True)
    public(op)(s, t.float(), backend="cpu").backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == (4, 3, 2, 2)


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op):
    base_s, base_t = make_embeddings(20, 9, 12, seed=6)
    s, t = base_s[::2], base_t.t()[:, 1::2].t()  # [10, 9] and [10, 12], strided
    assert not s.is_contiguous() and not t.is_contiguous()
    check_against_reference(op, "cpu", s, t)


# ------------------------------------------------------------------------------------------
# PyTorch integration: gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_and_gradgradcheck_float64(backend, op):
    s, t = make_embeddings(4, 3, 5, torch.float64, seed=8)

    def f(x):
        return public(op)(x, t, backend=backend)

    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_pkt_module_checks_eps_at_construction():
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]"):
        fastkd.nn.PKTLoss(eps=0.0)
    with pytest.raises(ValueError, match="backend='fast' is not a backend"):
        fastkd.nn.SPLoss(backend="fast")
    assert "eps=0.001" in repr(fastkd.nn.PKTLoss(eps=1e-3))


def test_pkt_eps_changes_the_loss_as_torchdistills():
    s, t = make_embeddings(6, 2, 3, torch.float64, seed=4)
    for eps in (1e-7, 1e-2):
        torch.testing.assert_close(fastkd.pkt_loss(s, t, eps=eps, backend="reference"), torchdistill_pkt(s, t, eps))
        if _ext.LOAD_ERROR is None:
            torch.testing.assert_close(fastkd.pkt_loss(s, t, eps=eps, backend="cpu"), torchdistill_pkt(s, t, eps), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------

S, T_ = make_embeddings(4, 6, 5)
@pytest.mark.parametrize("op", ["rkd_distance", "rkd_angle"])
def test_rkd_needs_two_samples(op):
    s, t = make_embeddings(1, 6, 5)
    with pytest.raises(ValueError, match="student has batch size 1: this relational loss needs at least 2 samples"):
        public(op)(s, t)


@pytest.mark.parametrize("eps,exc,message", [(0.0, ValueError, r"eps must be in \(0, 1\]"), (-1e-7, ValueError, "eps must be in"), ("1e-7", TypeError, "eps must be a real number"), (math.nan, ValueError, "eps must be a number")])
def test_pkt_eps_is_checked(eps, exc, message):
    with pytest.raises(exc, match=message):
        fastkd.pkt_loss(S, T_, eps=eps)


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_kernels_check_their_arguments(op):
    schema = getattr(torch.ops.fastkd, SCHEMA[op])
    with pytest.raises(RuntimeError, match="teacher has 5 rows but student has 4"):
        schema(*op_args(op, S, torch.ones(5, 5)))
    with pytest.raises(RuntimeError, match="student must be contiguous"):
        schema(*op_args(op, S.t(), T_[:6]))
    if MIN_BATCH[op] == 2:
        with pytest.raises(RuntimeError, match="needs a batch of at least 2"):
            schema(*op_args(op, S[:1], T_[:1]))
