"""hint_loss and attention_transfer_loss: the references against the formulas (and the peer
libraries' formulations), the cpu backend against the references and gradcheck. The contract
every op shares (opcheck, torch.compile, backend choice, bad input, ...): test_conformance.py.

Contract tests across every backend: test_feature_contract.py; Triton (interpreter) and GPU:
test_feature_triton.py, test_feature_gpu.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.functional import attention_transfer_loss_reference, hint_loss_reference
from fastkd.ops import feature as feature_ops
from backend_helpers import ISAS, force_isa, needs_ext
from feature_helpers import check_at, check_hint, make_features, make_maps
from kd_helpers import check_float64_matches_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = list(feature_ops.HINT_KINDS)
REDUCTIONS = ["mean", "sum", "none"]


# ------------------------------------------------------------------------------------------
# The references, against the formulas written out in float64 and the peer libraries' code
# ------------------------------------------------------------------------------------------


def test_hint_reference_matches_the_formulas():
    s, t = make_features((5, 3, 4), torch.float64)
    fs, ft = s.flatten(1), t.flatten(1)
    e = fs - ft
    huber = torch.where(e.abs() < 1, 0.5 * e * e, e.abs() - 0.5)
    cos = (fs * ft).sum(1) / (fs.norm(dim=1) * ft.norm(dim=1))
    nd = fs / fs.norm(dim=1, keepdim=True) - ft / ft.norm(dim=1, keepdim=True)
    per_entry = {"mse": e * e, "l1": e.abs(), "smooth_l1": huber, "normalized_mse": nd * nd}
    for kind, terms in per_entry.items():
        torch.testing.assert_close(hint_loss_reference(s, t, kind=kind), terms.mean())
        torch.testing.assert_close(hint_loss_reference(s, t, kind=kind, reduction="sum"), terms.sum())
        torch.testing.assert_close(hint_loss_reference(s, t, kind=kind, reduction="none"), terms.mean(1))
    torch.testing.assert_close(hint_loss_reference(s, t, kind="cosine"), (1 - cos).mean())
    torch.testing.assert_close(hint_loss_reference(s, t, kind="cosine", reduction="sum"), (1 - cos).sum())
    torch.testing.assert_close(hint_loss_reference(s, t, kind="cosine", reduction="none"), 1 - cos)
    # normalized_mse is (2 - 2 cos) / D per sample
    torch.testing.assert_close(hint_loss_reference(s, t, kind="normalized_mse", reduction="none"), (2 - 2 * cos) / 12)


def test_attention_reference_matches_the_paper_formula():
    s, t = make_maps((3, 4, 5, 6), 7, torch.float64)
    for p in (1.0, 2.0, 3.0):
        def at(x):
            q = x.abs().pow(p).sum(1).flatten(1)  # the paper's sum over channels: the norm cancels 1/C
            return q / q.norm(dim=1, keepdim=True)

        d = (at(s) - at(t)) ** 2
        torch.testing.assert_close(attention_transfer_loss_reference(s, t, p=p), d.mean())
        torch.testing.assert_close(attention_transfer_loss_reference(s, t, p=p, reduction="none"), d.mean(1))
        torch.testing.assert_close(attention_transfer_loss_reference(s, t, p=p, reduction="sum"), d.sum())


def _torchdistill_at_code_mode(student_maps, teacher_maps):
    """torchdistill's ATLoss(mode="code") (= the authors' at_loss, RepDistiller's Attention),
    transcribed from its formula: sum over pairs of (at(s) - at(t)).pow(2).mean() with
    at(x) = normalize(x.pow(2).mean(1).flatten(1))."""
    def at(x):
        return F.normalize(x.pow(2).mean(1).flatten(1))

    return sum((at(s) - at(t)).pow(2).mean() for s, t in zip(student_maps, teacher_maps))


def test_attention_reference_agrees_with_torchdistill_for_p_2():
    pairs = [make_maps((4, 8, 6, 6), 16, torch.float64, seed=1), make_maps((4, 16, 3, 3), 32, torch.float64, seed=2)]
    students, teachers = [p[0] for p in pairs], [p[1] for p in pairs]
    torch.testing.assert_close(attention_transfer_loss_reference(students, teachers), _torchdistill_at_code_mode(students, teachers))


def test_attention_uses_the_absolute_value_for_odd_p():
    """x.pow(3) (the peer libraries) and |x|^3 (the paper, fastkd) differ on negative maps."""
    s, t = make_maps((2, 3, 4, 4), 3, torch.float64)
    q = s.abs().pow(3).mean(1).flatten(1)
    expected = F.normalize(q, dim=1)
    got = feature_ops.attention_map_reference(s, 3.0)
    torch.testing.assert_close(got, expected)
    assert (got >= 0).all()
    assert not torch.allclose(got, F.normalize(s.pow(3).mean(1).flatten(1), dim=1))


# ------------------------------------------------------------------------------------------
# cpu backend against the reference
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("shape", [(41, 1271), (3, 131073), (2, 3, 257), (1, 1), (2, 16, 7, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_hint_matches_reference(shape, dtype, kind):
    s, t = make_features(shape, dtype, seed=shape[-1])
    # The reductions differ only by a scale, checked on every shape but the largest one, where
    # the per-sample losses are (keeping the grid fast).
    for reduction in REDUCTIONS if s.numel() < 100_000 else ["none"]:
        check_hint("cpu", s, t, kind, reduction)


AT_SHAPES = [
    ((2, 3, 5, 7), 6),  # C_t > C_s
    ((4, 16, 9, 9), 8),  # C_t < C_s, HW = 81 (not a vector multiple)
    ((3, 5, 33), 2),  # [B, C, L]: one spatial dimension
    ((1, 1, 1, 1), 1),
    ((2, 24, 17, 19), 40),
]


@needs_ext
@pytest.mark.parametrize("shape,teacher_channels", AT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 4.0, 2.5])
def test_cpu_attention_matches_reference(shape, teacher_channels, dtype, p):
    s, t = make_maps(shape, teacher_channels, dtype, seed=shape[1], relu=p == 1.0)
    for reduction in REDUCTIONS:
        check_at("cpu", s, t, p, reduction)


@needs_ext
def test_cpu_attention_list_of_pairs_is_summed():
    pairs = [make_maps((3, 8, 8, 8), 4, seed=1), make_maps((3, 16, 4, 4), 32, seed=2), make_maps((3, 2, 2, 3), 2, seed=3)]
    students, teachers = [p[0] for p in pairs], [p[1] for p in pairs]
    for reduction in REDUCTIONS:
        check_at("cpu", students, teachers, 2.0, reduction)
    separate = sum(fastkd.attention_transfer_loss(s, t, backend="cpu") for s, t in pairs)
    torch.testing.assert_close(fastkd.attention_transfer_loss(tuple(students), tuple(teachers), backend="cpu"), separate)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_every_instruction_set(isa, dtype, monkeypatch):
    force_isa(monkeypatch, isa)
    for shape in [(5, 40001), (7, 3, 5)]:
        s, t = make_features(shape, dtype, seed=shape[1])
        for kind in KINDS:
            check_hint("cpu", s, t, kind, "none")
    for p in (1.0, 2.0, 3.0, 4.0, 1.5):
        s, t = make_maps((3, 6, 7, 5), 4, dtype, seed=int(p * 2))
        check_at("cpu", s, t, p, "mean")


@needs_ext
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_mixed_student_and_teacher_dtypes(teacher_dtype):
    s, _ = make_features((9, 300), torch.bfloat16)
    _, t = make_features((9, 300), teacher_dtype)
    for kind in KINDS:
        check_hint("cpu", s, t, kind)
    s, _ = make_maps((3, 4, 6, 6), 5, torch.bfloat16)
    _, t = make_maps((3, 4, 6, 6), 5, teacher_dtype)
    check_at("cpu", s, t)


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_hint_float64_is_computed_in_float64(kind):
    s, t = make_features((6, 1000), torch.float64)
    for reduction in REDUCTIONS:
        check_float64_matches_reference(lambda x: fastkd.hint_loss(x, t, kind=kind, reduction=reduction, backend="cpu"),
                                        lambda x: hint_loss_reference(x, t, kind=kind, reduction=reduction), s, loss_tol=(1e-12, 1e-14))


@needs_ext
@pytest.mark.parametrize("p", [2.0, 1.0, 2.5])
def test_cpu_attention_float64_is_computed_in_float64(p):
    s, t = make_maps((3, 7, 9, 11), 5, torch.float64)
    for reduction in REDUCTIONS:
        check_float64_matches_reference(lambda x: fastkd.attention_transfer_loss(x, t, p=p, reduction=reduction, backend="cpu"),
                                        lambda x: attention_transfer_loss_reference(x, t, p=p, reduction=reduction), s,
                                        loss_tol=(1e-12, 1e-15), grad_tol=(1e-12, 1e-15))


# ------------------------------------------------------------------------------------------
# Awkward inputs, numerics
# ------------------------------------------------------------------------------------------

FUSED = [pytest.param("cpu", marks=needs_ext)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_and_offset_features(backend, dtype):
    """std 30, and a large common offset: cosine near 1, where 1 - cos cancels."""
    s, t = make_features((7, 3001), dtype, std=30.0)
    for kind in KINDS:
        check_hint(backend, s, t, kind, "none")
    s, t = make_features((7, 3001), dtype, std=1.0)
    base = torch.randn(1, 3001, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 100
    s, t = (s.double() + base).to(dtype), (t.double() + base).to(dtype)
    for kind in KINDS:
        check_hint(backend, s, t, kind, "mean")
    s, t = make_maps((3, 8, 12, 12), 4, dtype)
    check_at(backend, s * 30, t * 30 + 1e3)


@pytest.mark.parametrize("backend", FUSED)
def test_nearly_parallel_features_are_accurate(backend):
    """1 - cos and |u - v|^2 of nearly equal directions: computed entry by entry, never as a
    difference of two sums (which would leave nothing but rounding)."""
    s, _ = make_features((4, 5000), torch.float64)
    t = 3 * s + 1e-4 * torch.randn(4, 5000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kind in ("cosine", "normalized_mse"):
        exact = hint_loss_reference(s, t, kind=kind, reduction="none")
        got = fastkd.hint_loss(s.float(), t.float(), kind=kind, reduction="none", backend=backend).double()
        assert ((got - exact).abs() / exact).max() < 1e-3, (kind, got, exact)
        check_hint(backend, s.float(), t.float(), kind, "none")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_rows_and_zero_maps_follow_the_reference(backend, dtype):
    """A zero feature normalises to 0 (F.normalize, eps 1e-12) or has cos 0 (eps 1e-8):
    the value and gradient of the reference, never NaN."""
    s, t = make_features((5, 64), dtype)
    s[1] = 0
    t[2] = 0
    s[3] = 0
    t[3] = 0
    s[4] = 1e-10  # below the cosine eps, above the normalize eps
    for kind in KINDS:
        x = s.clone().requires_grad_(True)
        loss = fastkd.hint_loss(x, t, kind=kind, reduction="none", backend=backend)
        assert torch.isfinite(loss).all(), kind
        check_hint(backend, s, t, kind, "none")
    ms, mt = make_maps((4, 3, 5, 5), 6, dtype, relu=True)
    ms[0] = 0
    mt[1] = 0
    ms[2] = 0
    mt[2] = 0
    for p in (2.0, 1.0):
        x = ms.clone().requires_grad_(True)
        loss = fastkd.attention_transfer_loss(x, mt, p=p, reduction="none", backend=backend)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert torch.equal(x.grad[0], torch.zeros_like(x.grad[0]))  # a zero map: gradient 0
        torch.testing.assert_close(loss[2], torch.zeros((), dtype=loss.dtype))
        check_at(backend, ms, mt, p, "none")
    zero = torch.zeros(2, 3, 4, 4, dtype=dtype, requires_grad=True)
    loss = fastkd.attention_transfer_loss(zero, torch.zeros(2, 5, 4, 4, dtype=dtype), backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(zero.grad, torch.zeros_like(zero))


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_equal_student_and_teacher_give_zero(backend):
    s, _ = make_features((6, 3, 11))
    for kind in KINDS:
        x = s.clone().requires_grad_(True)
        loss = fastkd.hint_loss(x, s, kind=kind, backend=backend)
        loss.backward()
        assert abs(loss.item()) < 1e-6, kind
        assert x.grad.abs().max() < 1e-6, kind
    # duplicate rows and an all-equal batch change nothing: rows are independent
    dup = torch.ones(4, 50) * torch.arange(1.0, 51.0)
    t = dup.flip(1)
    rows = fastkd.hint_loss(dup, t, kind="cosine", reduction="none", backend=backend)
    assert torch.allclose(rows, rows[0].expand(4))
    m, _ = make_maps((3, 4, 5, 5), 4)
    x = m.clone().requires_grad_(True)
    loss = fastkd.attention_transfer_loss(x, m * 2, backend=backend)  # the same attention map
    loss.backward()
    assert abs(loss.item()) < 1e-7 and x.grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_a_sample_gives_nan_for_that_sample_only(backend, where):
    s, t = make_features((3, 40))
    (s if where == "student" else t)[1, 7] = math.nan
    for kind in KINDS:
        rows = fastkd.hint_loss(s, t, kind=kind, reduction="none", backend=backend)
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all(), kind
        assert torch.isnan(fastkd.hint_loss(s, t, kind=kind, backend=backend)), kind
    ms, mt = make_maps((3, 4, 5, 5), 2)
    (ms if where == "student" else mt)[1, 1, 2, 2] = math.nan
    rows = fastkd.attention_transfer_loss(ms, mt, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


@needs_ext
def test_infinite_entries_give_the_references_non_finite_pattern():
    s, t = make_features((4, 30))
    s[1, 3] = math.inf
    t[2, 5] = -math.inf
    for kind in KINDS:
        got = fastkd.hint_loss(s, t, kind=kind, reduction="none", backend="cpu")
        ref = hint_loss_reference(s, t, kind=kind, reduction="none")
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref)), (kind, got, ref)
        torch.testing.assert_close(got[[0, 3]], ref[[0, 3]])


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_and_channels_last_inputs(backend):
    s, t = make_maps((3, 8, 6, 5), 8)
    s_cl, t_cl = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    assert not s_cl.is_contiguous()
    check_at(backend, s_cl, t_cl)
    for kind in KINDS:
        check_hint(backend, s_cl, t_cl, kind)
        check_hint(backend, s.transpose(0, 1)[::2], t.transpose(0, 1)[1::2], kind, "none")


@needs_ext
def test_gradient_in_the_student_dtype_and_shape_and_teacher_gets_none():
    s, t = make_features((2, 3, 5, 5), torch.bfloat16)
    s.requires_grad_(True)
    t.requires_grad_(True)
    fastkd.hint_loss(s, t.float(), backend="cpu").backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == (2, 3, 5, 5) and t.grad is None
    s.grad = None
    fastkd.attention_transfer_loss(s, t, backend="cpu").backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == (2, 3, 5, 5) and t.grad is None


@needs_ext
def test_large_gradients_reuse_the_cpu_buffer_and_stay_correct():
    """Gradients of 8 MiB and more go through the shared buffer cache, with streaming stores."""
    s, t = make_features((16, 131072), seed=4)  # 8 MiB of fp32
    check_hint("cpu", s, t, "mse")
    check_hint("cpu", s, t, "cosine", "none")
    ms, mt = make_maps((8, 64, 64, 64), 32, seed=5)  # 8 MiB
    check_at("cpu", ms, mt)


@needs_ext
def test_modules_match_the_functions():
    s, t = make_features((5, 4, 6))
    m = fastkd.nn.HintLoss("cosine", reduction="none", backend="cpu")
    torch.testing.assert_close(m(s, t), fastkd.hint_loss(s, t, kind="cosine", reduction="none", backend="cpu"))
    assert "kind='cosine'" in repr(m)
    ms, mt = make_maps((2, 3, 4, 4), 5)
    a = fastkd.nn.AttentionTransferLoss(p=4, backend="cpu")
    torch.testing.assert_close(a([ms, ms], [mt, mt]), 2 * fastkd.attention_transfer_loss(ms, mt, p=4, backend="cpu"))
    assert "p=4" in repr(a)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: fastkd.nn.HintLoss("huber"), "kind must be one of 'mse', 'l1', 'smooth_l1', 'cosine', 'normalized_mse', got 'huber'"),
        (lambda: fastkd.nn.HintLoss(reduction="batchmean"), "reduction must be one of 'mean', 'sum', 'none', got 'batchmean'"),
        (lambda: fastkd.nn.HintLoss(backend="gpu"), "backend='gpu' is not a backend"),
        (lambda: fastkd.nn.AttentionTransferLoss(p=0.5), r"p must be in \[1, inf\], got 0.5"),
        (lambda: fastkd.nn.AttentionTransferLoss(p=math.inf), "p must be a finite number >= 1, got inf"),
        (lambda: fastkd.nn.AttentionTransferLoss(p="2"), "p must be a real number"),
        (lambda: fastkd.nn.AttentionTransferLoss(reduction="batchmean"), "reduction must be one of"),
    ],
)
def test_modules_check_their_options_at_construction(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


# ------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------


@needs_ext
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), d=st.integers(1, 300), kind=st.sampled_from(KINDS), std=st.floats(0.0, 20.0), seed=st.integers(0, 2**16))
def test_property_hint_cpu_agrees_with_reference_and_is_nonnegative(b, d, kind, std, seed):
    s, t = make_features((b, d), std=std, seed=seed)
    rows = fastkd.hint_loss(s, t, kind=kind, reduction="none", backend="cpu")
    assert (rows >= -1e-6).all()
    if std > 0:
        check_hint("cpu", s, t, kind, "none")


@needs_ext
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), cs=st.integers(1, 9), ct=st.integers(1, 9), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_property_attention_cpu_agrees_with_reference_and_is_bounded(b, cs, ct, h, w, seed):
    s, t = make_maps((b, cs, h, w), ct, seed=seed)
    rows = fastkd.attention_transfer_loss(s, t, reduction="none", backend="cpu")
    # two unit vectors of nonnegative entries: |a_s - a_t|^2 <= 2, so the mean over HW <= 2/HW
    assert (rows >= 0).all() and (rows <= 2.0 / (h * w) + 1e-6).all()
    check_at("cpu", s, t, 2.0, "none")


# ------------------------------------------------------------------------------------------
# PyTorch integration: gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_gradcheck_float64(backend):
    s, t = make_features((3, 2, 4), torch.float64)
    for kind in KINDS:
        for reduction in ("mean", "none"):
            f = lambda x: fastkd.hint_loss(x, t, kind=kind, reduction=reduction, backend=backend)  # noqa: E731
            assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(True),)), (kind, reduction)
    ms, mt = make_maps((2, 3, 3, 4), 2, torch.float64)
    for p in (2.0, 3.0, 1.5):
        f = lambda x: fastkd.attention_transfer_loss(x, mt, p=p, reduction="none", backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (ms.clone().requires_grad_(True),)), p


# ------------------------------------------------------------------------------------------
# Backends: choice and build
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Bad input (the rest: test_conformance.py)
# ------------------------------------------------------------------------------------------


def test_references_check_their_options_too():
    s, t = make_features((4, 10))
    ms, mt = make_maps((2, 3, 4, 4), 5)
    with pytest.raises(ValueError, match="kind must be one of"):
        hint_loss_reference(s, t, kind="huber")
    with pytest.raises(ValueError, match="reduction must be one of"):
        attention_transfer_loss_reference(ms, mt, reduction="batchmean")
