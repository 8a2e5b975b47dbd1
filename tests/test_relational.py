"""Relational losses (rkd_distance_loss, rkd_angle_loss, sp_loss, pkt_loss): the references against
torchdistill's and the papers' formulas, the cpu backend against the references, awkward inputs
(duplicate rows, all-equal batches, zero rows, NaN), the autograd contract, PyTorch integration
(opcheck, torch.compile, gradcheck) and bad input.

Triton (interpreter) and GPU tests of the same ops: test_relational_triton.py, test_relational_gpu.py.
"""

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import _ext
from fastkd.ops import fused_autograd as _fused
from fastkd.ops import relational as rel
from kd_helpers import assert_within_tolerance
from relational_helpers import (
    MIN_BATCH,
    OPS,
    THIN,
    THIN_IDS,
    check_against_reference,
    check_no_worse_than_composite,
    loss_and_grad,
    make_embeddings,
    public,
    reference,
)

needs_ext = pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEMA = {"rkd_distance": "rkd_distance_forward", "rkd_angle": "rkd_angle_forward", "sp": "sp_forward", "pkt": "pkt_forward"}


def op_args(op, s, t, compute_grad=True):
    return (s, t, 1e-7, compute_grad) if op == "pkt" else (s, t, compute_grad)


# ------------------------------------------------------------------------------------------
# The references against torchdistill's formulas (written out here from its source,
# torchdistill/losses/mid_level.py) and the papers'.
# ------------------------------------------------------------------------------------------


def torchdistill_pdist(e, eps=1e-12):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def torchdistill_rkd_distance(s, t):
    with torch.no_grad():
        t_d = torchdistill_pdist(t)
        t_d = t_d / t_d[t_d > 0].mean()
    d = torchdistill_pdist(s)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def torchdistill_rkd_angle(s, t):
    with torch.no_grad():
        td = t.unsqueeze(0) - t.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = s.unsqueeze(0) - s.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle)


def torchdistill_pkt(s, t, eps=1e-7):
    norm_s = torch.sqrt(torch.sum(s**2, dim=1, keepdim=True))
    s = s / (norm_s + eps)
    s = torch.where(s != s, torch.zeros_like(s), s)
    norm_t = torch.sqrt(torch.sum(t**2, dim=1, keepdim=True))
    t = t / (norm_t + eps)
    t = torch.where(t != t, torch.zeros_like(t), t)
    ss = (s @ s.t() + 1.0) / 2.0
    ts = (t @ t.t() + 1.0) / 2.0
    ss = ss / ss.sum(1, keepdim=True)
    ts = ts / ts.sum(1, keepdim=True)
    return torch.mean(ts * torch.log((ts + eps) / (ss + eps)))


def torchdistill_spkd(s, t):  # L1 row normalisation: normalize(x, 1) passes p=1
    g_t = F.normalize(t @ t.t(), 1)
    g_s = F.normalize(s @ s.t(), 1)
    return torch.norm(g_t - g_s) ** 2 / s.shape[0] ** 2


TORCHDISTILL = {"rkd_distance": torchdistill_rkd_distance, "rkd_angle": torchdistill_rkd_angle, "pkt": torchdistill_pkt}


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
    loss, grad = check_against_reference(op, "cpu", s, t)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if kind == "student_duplicates":
        # The duplicated rows' gradient explodes (the reference's: x / 1e-12 for a zero
        # difference); the other rows' must stay as accurate as on a clean batch.
        rows = list(range(2, 10))
        _, exact = loss_and_grad(reference(op), s.double(), t.double())
        _, lowp = loss_and_grad(reference(op), s, t)
        assert_within_tolerance(f"{op} grad of rows without a duplicate", grad[rows], exact[rows], lowp[rows], s.dtype)
    if kind == "all_equal" and op in ("rkd_distance", "rkd_angle"):
        # Every student distance is the clamped 1e-6 (distance) or every difference is zero
        # (angle): the reference's gradient is exactly 0, and so is ours.
        assert torch.equal(grad, torch.zeros_like(grad))


@needs_ext
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", DEGENERATE)
def test_cpu_degenerate_batches_float64(op, kind):
    """The same in float64, where the rule above has no more precise oracle: agreement to 1e-9
    relative, or 1e-15 absolute for gradients that are rounding residues of cancelling terms (an
    all-equal batch's PKT gradient is O(eps) ~ 1e-12, from terms of size 1e-5)."""
    s, t = make_embeddings(11, 17, 9, torch.float64, kind=kind, seed=5)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got, expected = public(op)(a, t, backend="cpu"), reference(op)(b, t)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    got.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-15)


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
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_angle_every_instruction_set(isa, dtype, monkeypatch):
    """The triplet loop is the one per-ISA kernel of the family; B spans several row blocks and
    k-tiles with tails (kJ = 16, kK = 128)."""
    order = ["scalar", "avx2", "avx512"]
    monkeypatch.delenv("FASTKD_CPU_ISA", raising=False)
    if order.index(isa) > order.index(torch.ops.fastkd.cpu_isa()):
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("FASTKD_CPU_ISA", isa)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_teacher_requiring_grad_is_constant_and_said_once(backend, op, caplog, monkeypatch):
    monkeypatch.setattr(_fused, "_said", set())
    s, t = make_embeddings(5, 6, 4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        public(op)(s, t, backend=backend).backward()
        public(op)(s, t, backend=backend).backward()
    assert t.grad is None and s.grad is not None
    assert len([r for r in caplog.records if "teacher is treated as a constant" in r.getMessage()]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_repeated_backward_through_a_retained_graph_accumulates(backend, op):
    s, t = make_embeddings(7, 5, 6)
    once, x = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    (public(op)(once, t, backend=backend) * 3.0).backward()
    loss = public(op)(x, t, backend=backend) * 3.0
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3 * once.grad)


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_gradient_penalty_matches_the_reference(op):
    s, t = make_embeddings(6, 5, 4, torch.float64, seed=9)

    def penalised(backend):
        x = s.clone().requires_grad_(True)
        loss = public(op)(x, t, backend=backend)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        assert g.requires_grad
        (loss + 10 * g.pow(2).sum()).backward()
        return x.grad

    torch.testing.assert_close(penalised("cpu"), penalised("reference"), rtol=1e-10, atol=1e-14)


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_no_gradient_wanted_skips_the_gradient(op):
    s, t = make_embeddings(5, 6, 4)
    with torch.no_grad():
        loss = public(op)(s, t, backend="cpu")
    torch.testing.assert_close(loss, reference(op)(s, t))
    out = getattr(torch.ops.fastkd, SCHEMA[op])(*op_args(op, s, t, compute_grad=False))
    assert out[1].numel() == 0


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


@needs_ext
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(op, dtype, compute_grad):
    s, t = make_embeddings(5, 7, 4, dtype)
    s.requires_grad_(compute_grad)
    torch.library.opcheck(getattr(torch.ops.fastkd, SCHEMA[op]).default, op_args(op, s, t, compute_grad))


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph_matches_eager(op):
    torch._dynamo.reset()
    s, t = make_embeddings(6, (2, 5), 7, seed=12)

    def step(student, teacher):
        return public(op)(student, teacher) * 1.5 + student.sum() * 0.0

    compiled = torch.compile(step, fullgraph=True)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    eager = step(a, t)
    eager.backward()
    got = compiled(b, t)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(b.grad, a.grad)


@needs_ext
def test_auto_backend_on_cpu_is_the_cpu_kernel():
    from fastkd.ops import table

    s, t = make_embeddings(3, 4, 4)
    for op in table.all_ops("relational"):
        assert op.choose(None, s, t) == "cpu"


@needs_ext
def test_cuda_kernels_are_registered_when_built_with_cuda():
    for op in OPS:
        assert _ext.has_kernel(SCHEMA[op], "CPU")
        assert _ext.has_kernel(SCHEMA[op], "CUDA") == torch.ops.fastkd.built_with_cuda()


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_module_matches_function(op):
    s, t = make_embeddings(5, 6, 4)
    module = {"rkd_distance": fastkd.nn.RKDDistanceLoss, "rkd_angle": fastkd.nn.RKDAngleLoss, "sp": fastkd.nn.SPLoss, "pkt": fastkd.nn.PKTLoss}[op](
        backend="cpu"
    )
    torch.testing.assert_close(module(s, t), public(op)(s, t, backend="cpu"))
    assert "backend='cpu'" in repr(module)


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
BAD = [
    (dict(student=[[1.0]]), TypeError, "student must be a torch.Tensor"),
    (dict(student=torch.ones(4, 6, dtype=torch.int64)), TypeError, "student must be a floating-point tensor"),
    (dict(teacher=torch.ones(4, 5, dtype=torch.int32)), TypeError, "teacher must be a floating-point tensor"),
    (dict(teacher=torch.ones(5, 5)), ValueError, r"teacher has batch size 5 but student has 4"),
    (dict(student=torch.ones(4)), ValueError, r"student must have at least 2 dimensions \[B, D\]"),
    (dict(teacher=torch.ones(4)), ValueError, r"teacher must have at least 2 dimensions \[B, D\]"),
    (dict(student=torch.tensor(1.0)), ValueError, "student must have at least one dimension"),
    (dict(student=torch.ones(0, 6), teacher=torch.ones(0, 5)), ValueError, "empty batch: student"),
    (dict(student=torch.ones(4, 0)), ValueError, r"student of shape \(4, 0\) has no features"),
    (dict(teacher=torch.ones(4, 3, 0)), ValueError, r"teacher of shape \(4, 3, 0\) has no features"),
    (dict(teacher=T_.to("meta")), ValueError, "teacher is on meta but student is on cpu"),
    (dict(backend="fast"), ValueError, "backend='fast' is not a backend"),
    (dict(backend="cuda"), RuntimeError, r"backend 'cuda' cannot run this call: .*CUDA tensors, got a cpu tensor"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("override,exc,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_is_a_clear_error(op, override, exc, message):
    kwargs = dict(student=S, teacher=T_)
    kwargs.update(override)
    with pytest.raises(exc, match=message):
        public(op)(kwargs.pop("student"), kwargs.pop("teacher"), **kwargs)


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
