"""kd_loss's other divergences (reverse KL, JSD, TVD, skew KL, skew reverse KL, Hellinger) and
ensembles of teachers: the reference against the published formulas and the closed-form gradients, the cpu
backend against the reference (the kd family's grid), gradcheck, the module's and the op's own
checks. opcheck, torch.compile and the public function's bad input: test_conformance.py.

Triton (interpreter) and GPU tests of the same: test_kd_triton.py, test_kd_gpu.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import kd_loss_reference
from fastkd.ops.divergences import DIVERGENCES
from backend_helpers import ISAS, force_isa, needs_ext
from kd_helpers import check_against_reference, make_labels, make_logits


# (divergence, beta): every divergence of the table but kl at its default, then each one that has
# a beta at a second value inside its range.
DIVS = [(name, None) for name in DIVERGENCES if name != "kl"] + [
    (name, 0.6 if d.beta[0] < 0.5 else 0.1) for name, d in DIVERGENCES.items() if d.beta is not None
]
ALL_DIVS = [("kl", None)] + DIVS
DIV_IDS = [f"{d}-{b}" for d, b in DIVS]
ALL_IDS = [f"{d}-{b}" for d, b in ALL_DIVS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ensemble(shape, m=3, dtype=torch.float32, std=3.0, seed=5):
    """Student logits ``shape`` and ``m`` teachers ``[m, *shape]``."""
    s, _ = make_logits(shape, dtype, std=std, seed=seed)
    t = torch.stack([make_logits(shape, dtype, std=std, seed=seed + 1 + i)[1] for i in range(m)])
    return s, t


# ------------------------------------------------------------------------------------------
# The reference against the published formulas, in float64
# ------------------------------------------------------------------------------------------


def trl_generalized_jsd(s, t, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (per token, before its reduction), written out."""
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    if beta == 0:
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=s.dtype)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    return (b * kl_teacher + (1 - b) * kl_student).sum(-1)


def liger_jsd(s, t, beta, temperature):
    """Liger's JSD kernel's per-entry loss (X = log q, Y = log p, M = beta P + (1 - beta) Q)."""
    x = F.log_softmax(s / temperature, -1)
    y = F.log_softmax(t / temperature, -1)
    p, q = y.exp(), x.exp()
    m = beta * p + (1 - beta) * q
    return (beta * p * y + (1 - beta) * q * x - m * m.log()).sum(-1)


def distillm_skew_forward(s, t, lam, temperature):
    """DistiLLM's skewed_forward_kl per token, plus the teacher's entropy term it drops
    (a constant in the student): KL(p || lam p + (1 - lam) q)."""
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    mixed = lam * p + (1 - lam) * q
    return -(p * mixed.log()).sum(-1) + (p * p.log()).sum(-1)


def distillm_skew_reverse(s, t, lam, temperature):
    """DistiLLM's skewed_reverse_kl per token: KL(q || (1 - lam) p + lam q)."""
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    mixed = (1 - lam) * p + lam * q
    return (q * (F.log_softmax(s / temperature, -1) - mixed.log())).sum(-1)


def minillm_reverse_kl(s, t, temperature):
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def tvd(s, t, temperature):
    return 0.5 * (F.softmax(t / temperature, -1) - F.softmax(s / temperature, -1)).abs().sum(-1)


def hellinger(s, t, temperature):
    """The squared Hellinger distance in its other closed form, 1 - the Bhattacharyya coefficient."""
    return 1 - (F.softmax(t / temperature, -1) * F.softmax(s / temperature, -1)).sqrt().sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reference_matches_published_formulas(temperature):
    s, t = make_logits((6, 50), torch.float64)
    T = temperature

    def ref(div, beta=None):
        return kd_loss_reference(s, t, T, divergence=div, beta=beta, reduction="none", t2_scale=False)

    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        torch.testing.assert_close(ref("jsd", beta), trl_generalized_jsd(s, t, beta, T), rtol=1e-12, atol=1e-13)
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(ref("jsd", beta), liger_jsd(s, t, beta, T), rtol=1e-12, atol=1e-13)
    for lam in (0.1, 0.5):
        torch.testing.assert_close(ref("skew_kl", lam), distillm_skew_forward(s, t, lam, T), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(ref("skew_reverse_kl", lam), distillm_skew_reverse(s, t, lam, T), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ref("reverse_kl"), minillm_reverse_kl(s, t, T), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ref("tvd"), tvd(s, t, T), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ref("hellinger"), hellinger(s, t, T), rtol=1e-12, atol=1e-13)
    # the defaults: jsd 0.5, the skews 0.1
    torch.testing.assert_close(ref("jsd"), trl_generalized_jsd(s, t, 0.5, T), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ref("skew_kl"), distillm_skew_forward(s, t, 0.1, T), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ref("skew_reverse_kl"), distillm_skew_reverse(s, t, 0.1, T), rtol=1e-12, atol=1e-13)


def closed_form_grad(s, t, T, div, beta):
    """dL/ds of one row set (t2_scale off, sum reduction) from the closed forms the kernels use."""
    q, p = F.softmax(s / T, -1), F.softmax(t / T, -1)
    lq, lp = q.log(), p.log()

    def centred(x):  # q (x - sum q x)
        return q * (x - (q * x).sum(-1, keepdim=True))

    if div == "kl":
        g = q - p
    elif div == "reverse_kl":
        g = centred(lq - lp)
    elif div == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        g = (1 - beta) * centred(lq - lm)
    elif div == "tvd":
        g = 0.5 * centred(torch.sign(q - p))
    elif div == "hellinger":
        g = 0.5 * centred(-(p / q).sqrt())
    elif div == "skew_kl":
        m = beta * p + (1 - beta) * q
        g = (1 - beta) * centred(-p / m)
    else:  # skew_reverse_kl
        m = (1 - beta) * p + beta * q
        g = centred((lq - m.log()) - beta * q / m)
    return g / T


@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
def test_reference_gradient_matches_the_closed_forms(div, beta):
    s, t = make_logits((5, 40), torch.float64)
    beta_value = fastkd.ops.divergences.check(div, beta)
    x = s.clone().requires_grad_(True)
    kd_loss_reference(x, t, 1.7, divergence=div, beta=beta, reduction="sum", t2_scale=False).backward()
    torch.testing.assert_close(x.grad, closed_form_grad(s, t, 1.7, div, beta_value), rtol=1e-10, atol=1e-13)


def test_jsd_and_skew_endpoints_are_the_kls():
    s, t = make_logits((4, 30), torch.float64)

    def ref(div, beta=None):
        return kd_loss_reference(s, t, 2.0, divergence=div, beta=beta, reduction="none")

    torch.testing.assert_close(ref("jsd", 0.0), ref("kl"))
    torch.testing.assert_close(ref("jsd", 1.0), ref("reverse_kl"))
    torch.testing.assert_close(ref("skew_kl", 0.0), ref("kl"))
    torch.testing.assert_close(ref("skew_reverse_kl", 0.0), ref("reverse_kl"))
    # Inside the range the formula itself is continuous and tends to 0 at both ends.
    assert (ref("jsd", 1e-6) < 1e-4 * ref("kl")).all() and (ref("jsd", 1 - 1e-6) < 1e-4 * ref("reverse_kl")).all()


def test_ensemble_reference_is_the_mixture_of_probabilities():
    s, t = ensemble((4, 30), m=3, dtype=torch.float64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mixture = (w.view(3, 1, 1) * F.softmax(t / 2.0, -1)).sum(0)
    for div, beta in ALL_DIVS:
        # The mixture's logits: any logits whose softmax is the mixture give the same loss.
        single = kd_loss_reference(s, 2.0 * mixture.log(), 2.0, divergence=div, beta=beta, reduction="none")
        got = kd_loss_reference(s, t, 2.0, divergence=div, beta=beta, teacher_weights=w, reduction="none")
        torch.testing.assert_close(got, single, rtol=1e-10, atol=1e-12)
    uniform = kd_loss_reference(s, t, 2.0, divergence="jsd", reduction="none")
    explicit = kd_loss_reference(s, t, 2.0, divergence="jsd", teacher_weights=torch.full((3,), 1 / 3, dtype=torch.float64), reduction="none")
    torch.testing.assert_close(uniform, explicit)


# ------------------------------------------------------------------------------------------
# cpu backend against the reference: the kd family's grid for every divergence
# ------------------------------------------------------------------------------------------

SHAPES = [(41, 1271), (3, 131073), (2, 3, 257), (1, 1)]
LABEL_MODES = ["none", "labels", "hard"]
REDUCTIONS = ["batchmean", "sum", "none"]


def label_kwargs(mode, rows_shape, vocab, ignored=(0,)):
    if mode == "none":
        return {}
    labels = make_labels(rows_shape, vocab, ignored=ignored if math.prod(rows_shape) > 1 else ())
    return {"labels": labels, "hard_weight": 0.0 if mode == "labels" else 0.3}


@needs_ext
@pytest.mark.parametrize("div,beta", DIVS, ids=DIV_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_matches_reference(div, beta, shape, dtype):
    s, t = make_logits(shape, dtype, seed=shape[-1])
    # Label modes, reductions and temperatures rotate through the grid rather than multiply it.
    k = DTYPES.index(dtype) + SHAPES.index(shape)
    kwargs = label_kwargs(LABEL_MODES[k % 3], shape[:-1], shape[-1])
    for T in (1.0, 2.5):
        check_against_reference("cpu", s, t, T, divergence=div, beta=beta, reduction=REDUCTIONS[(k + int(T)) % 3], **kwargs)


@needs_ext
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
@pytest.mark.parametrize("shape,m", [((41, 1271), 3), ((2, 3, 257), 2), ((3, 20001), 4), ((1, 1), 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_ensemble_matches_reference(div, beta, shape, m, dtype):
    s, t = ensemble(shape, m, dtype, seed=shape[-1])
    k = DTYPES.index(dtype) + m
    kwargs = label_kwargs(LABEL_MODES[k % 3], shape[:-1], shape[-1])
    gen = torch.Generator().manual_seed(m)
    w = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
    weights = None if k % 2 else (w / w.sum()).float()
    T = 1.0 if k % 2 else 2.0
    check_against_reference("cpu", s, t, T, divergence=div, beta=beta, teacher_weights=weights, reduction=REDUCTIONS[k % 3], **kwargs)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_every_instruction_set(isa, monkeypatch):
    force_isa(monkeypatch, isa)
    for dtype in DTYPES:
        s, t = make_logits((5, 3001), dtype, seed=3)
        es, et = ensemble((5, 3001), 3, dtype)
        y = make_labels((5,), 3001, ignored=(1,))
        for div, beta in ALL_DIVS:
            if div != "kl":
                check_against_reference("cpu", s, t, 2.0, divergence=div, beta=beta, labels=y, hard_weight=0.2)
            check_against_reference("cpu", es, et, 1.0, divergence=div, beta=beta, reduction="none")


@needs_ext
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_mixed_student_and_teacher_dtypes(teacher_dtype):
    s, _ = make_logits((9, 300), torch.bfloat16)
    _, t = make_logits((9, 300), teacher_dtype)
    _, te = ensemble((9, 300), 2, teacher_dtype)
    for div, beta in DIVS[:4]:
        check_against_reference("cpu", s, t, 2.0, divergence=div, beta=beta)
        check_against_reference("cpu", s, te, 2.0, divergence=div, beta=beta)


@needs_ext
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
def test_cpu_float64_is_computed_in_float64(div, beta):
    s, t = make_logits((6, 1000), torch.float64)
    _, te = ensemble((6, 1000), 3, torch.float64)
    y = make_labels((6,), 1000, ignored=(2,))
    for teacher in ((t, te) if div != "kl" else (te,)):
        a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        kwargs = dict(divergence=div, beta=beta, labels=y, hard_weight=0.3, reduction="none")
        got = fastkd.kd_loss(a, teacher, 1.3, backend="cpu", **kwargs)
        expected = kd_loss_reference(b, teacher, 1.3, **kwargs)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        got.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# Awkward inputs: std-30 logits, -inf masks, log-probabilities below -104, NaN, ignored rows
# ------------------------------------------------------------------------------------------

BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


@needs_ext
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_wide_logits(div, beta, dtype, request):
    if div == "reverse_kl" and dtype == torch.float32:
        # Measured under the per-entry rule: the ensemble case's gradient entry (1, 1586), 0.161265,
        # comes out 0.161266 (error 7.3e-7, 4.5e-6 relative); PyTorch's float32 composite errs by
        # 2.8e-8 there and by at most ~1e-7 in that row. A real accuracy gap of the CPU kernel,
        # reported rather than hidden by a looser floor; strict: a fix turns this red.
        request.applymarker(pytest.mark.xfail(strict=True, reason="CPU reverse_kl ensemble kernel: 4.5e-6 relative error on std-30 logits, PyTorch ~1e-7"))
    s, t = make_logits((17, 3001), dtype, std=30.0)
    if div != "kl":
        check_against_reference("cpu", s, t, 1.0, divergence=div, beta=beta)
    es, et = ensemble((7, 3001), 3, dtype, std=30.0)
    check_against_reference("cpu", es, et, 4.0, divergence=div, beta=beta, labels=make_labels((7,), 3001), hard_weight=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
def test_log_probabilities_below_float32_underflow_stay_finite_and_correct(backend, div, beta):
    """Liger's JSD gave NaN here (its issue #1453): entries whose probabilities underflow float32
    (log-probabilities below -104) must give finite, correct terms."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(4, 600, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(4, 600, generator=gen, dtype=torch.float64) * 3
    # Half of each row 150 below its maximum, in different places for student and teacher, so
    # that one side's probability is representable where the other's is not.
    s[:, :300] -= 150.0
    t[:, 150:450] -= 150.0
    te = torch.stack([t, t.roll(7, -1)])
    for teacher in (t, te):
        exact = kd_loss_reference(s, teacher, 1.0, divergence=div, beta=beta, reduction="none")
        x = s.float().requires_grad_(True)
        got = fastkd.kd_loss(x, teacher.float(), 1.0, divergence=div, beta=beta, reduction="none", backend=backend)
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(x.grad).all(), f"{div}: non-finite"
        torch.testing.assert_close(got.double(), exact, rtol=2e-5, atol=2e-5)
        y = s.clone().requires_grad_(True)
        kd_loss_reference(y, teacher, 1.0, divergence=div, beta=beta, reduction="none").sum().backward()
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_vocabulary_entries(backend, div, beta, dtype):
    s, t = make_logits((6, 257), dtype)
    mask = torch.zeros(6, 257, dtype=torch.bool)
    mask[:, 200:] = True
    mask[2, :100] = True
    te = torch.stack([t, t.roll(3, -1)]).masked_fill(mask, -math.inf)
    s = s.masked_fill(mask, -math.inf)
    t = t.masked_fill(mask, -math.inf)
    labels = make_labels((6,), 100) + 100  # never a masked entry
    for teacher in (t, te):
        x = s.clone().requires_grad_(True)
        loss = fastkd.kd_loss(x, teacher, 2.0, labels=labels, hard_weight=0.2, divergence=div, beta=beta, backend=backend)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(x.grad).all()
        assert torch.equal(x.grad[mask], torch.zeros_like(x.grad[mask]))
        # the same loss as on the unmasked entries alone, row by row
        rows = fastkd.kd_loss(s, teacher, 2.0, divergence=div, beta=beta, reduction="none", backend=backend)
        for i in (0, 2):
            keep = ~mask[i]
            alone = kd_loss_reference(s[i : i + 1, keep], teacher[..., i : i + 1, keep], 2.0, divergence=div, beta=beta, reduction="none")
            # Both float32 row losses of the same input values: measured <= 4.5e-7 relative.
            torch.testing.assert_close(rows[i : i + 1], alone, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", DIVS, ids=DIV_IDS)
def test_student_masked_where_the_teacher_is_not(backend, div, beta):
    """q = 0 < p (a -inf student logit under a finite teacher one): every divergence but kl is
    finite there. Hellinger's term is then p and its x = -sqrt(p/q) is -inf: the gradient entry,
    q (x - c) = 0, must not be formed as 0 * inf."""
    s, t = make_logits((4, 129))
    s[:, 100:] = -math.inf
    s[1, :50] = -math.inf
    masked = s == -math.inf
    for teacher in (t, torch.stack([t, t.roll(3, -1)])):
        check_against_reference(backend, s, teacher, 2.0, divergence=div, beta=beta, reduction="none")
        x = s.clone().requires_grad_(True)
        fastkd.kd_loss(x, teacher, 2.0, divergence=div, beta=beta, backend=backend).backward()
        assert torch.equal(x.grad[masked], torch.zeros(int(masked.sum())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
def test_nan_in_gives_nan_out_and_in_an_ignored_row_nothing(backend, div, beta):
    s, t = make_logits((4, 40))
    _, te = ensemble((4, 40), 2)
    y = torch.tensor([3, -100, 5, 7])
    for teacher in (t, te):
        for where in ("student", "teacher"):
            ss, tt = s.clone(), teacher.clone()
            (ss if where == "student" else tt)[..., 2, 7] = math.nan
            rows = fastkd.kd_loss(ss, tt, 2.0, divergence=div, beta=beta, reduction="none", backend=backend)
            assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all(), (where, rows)
            # NaN in an ignored row influences nothing
            ss, tt = s.clone(), teacher.clone()
            (ss if where == "student" else tt)[..., 1, 4] = math.nan
            clean = s.clone().requires_grad_(True)
            fastkd.kd_loss(clean, teacher, 2.0, labels=y, hard_weight=0.3, divergence=div, beta=beta, backend=backend).backward()
            x = ss.requires_grad_(True)
            loss = fastkd.kd_loss(x, tt, 2.0, labels=y, hard_weight=0.3, divergence=div, beta=beta, backend=backend)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
            assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
            torch.testing.assert_close(x.grad, clean.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_loss_and_gradient(backend, reduction):
    s, t = make_logits((4, 33))
    _, te = ensemble((4, 33), 3)
    y = torch.full((4,), -100)
    for div, beta in ALL_DIVS:
        for teacher in (t, te):
            x = s.clone().requires_grad_(True)
            loss = fastkd.kd_loss(x, teacher, 2.0, labels=y, hard_weight=0.5, divergence=div, beta=beta, reduction=reduction, backend=backend)
            assert torch.equal(loss, torch.zeros_like(loss))
            loss.sum().backward()
            assert torch.equal(x.grad, torch.zeros_like(x))


@needs_ext
def test_non_contiguous_inputs_and_ignore_index():
    base_s, base_t = make_logits((64, 90))
    s = base_s.t()[::2]  # [45, 64], strided
    t = base_t.t()[1::2]
    te = torch.stack([base_t, base_t.roll(1, 0)]).transpose(1, 2)[:, ::2]  # [2, 45, 64], strided
    assert not s.is_contiguous() and not t.is_contiguous() and not te.is_contiguous()
    y = make_labels((90,), 64, ignored=(5,))[::2]
    y7 = y.clone()
    y7[[3, 10]] = 7
    for div, beta in DIVS[:4]:
        check_against_reference("cpu", s, t, 2.0, labels=y, hard_weight=0.25, divergence=div, beta=beta)
        check_against_reference("cpu", s, te, 2.0, labels=y7, hard_weight=0.25, ignore_index=7, divergence=div, beta=beta)


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
def test_zero_loss_and_gradient_when_student_equals_teacher(backend, div, beta):
    s, _ = make_logits((5, 300), std=5.0)
    x = s.clone().requires_grad_(True)
    teacher = torch.stack([s, s]) if div == "kl" else s  # an ensemble of equal members is that member
    loss = fastkd.kd_loss(x, teacher, 2.0, divergence=div, beta=beta, reduction="none", backend=backend)
    assert (loss.abs() <= 1e-5).all(), loss
    loss.sum().backward()
    # TVD's subgradient at p == q is 0 exactly where the probabilities agree exactly.
    assert x.grad.abs().max() <= (0 if div == "tvd" else 1e-6), x.grad.abs().max()


@needs_ext
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
def test_loss_nonnegative_and_gradient_rows_sum_to_zero(div, beta):
    for seed, std in [(1, 0.5), (2, 4.0), (3, 15.0)]:
        s, t = ensemble((6, 211), 3, std=std, seed=seed)
        for teacher in (t, t[0]):
            x = s.clone().requires_grad_(True)
            rows = fastkd.kd_loss(x, teacher, 1.5, divergence=div, beta=beta, reduction="none", labels=make_labels((6,), 211), hard_weight=0.3, backend="cpu")
            assert (rows >= 0).all()
            rows.sum().backward()
            torch.testing.assert_close(x.grad.sum(-1), torch.zeros(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ensemble_of_one_hot_weights_is_that_teacher(backend):
    s, t = ensemble((5, 120), 3)
    for div, beta in ALL_DIVS:
        got = fastkd.kd_loss(s, t, 2.0, divergence=div, beta=beta, teacher_weights=torch.tensor([0.0, 1.0, 0.0]), reduction="none", backend=backend)
        single = fastkd.kd_loss(s, t[1], 2.0, divergence=div, beta=beta, reduction="none", backend=backend)
        torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# PyTorch integration: gradcheck, gradgradcheck, opcheck, torch.compile, the module
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,beta", ALL_DIVS, ids=ALL_IDS)
def test_gradcheck_and_gradgradcheck_float64(backend, div, beta):
    s, t = ensemble((4, 9), 2, torch.float64)
    y = torch.tensor([2, -100, 0, 8])
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    for teacher, weights, reduction in ((t[0], None, "batchmean"), (t, w, "none")):
        if div == "kl" and teacher.dim() == 2:
            continue  # test_kd.py and test_kd_contract.py

        def f(x):
            return fastkd.kd_loss(x, teacher, 1.7, labels=y, hard_weight=0.3, reduction=reduction, divergence=div, beta=beta, teacher_weights=weights, backend=backend)

        assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(True),))
        assert torch.autograd.gradgradcheck(f, (s.clone().requires_grad_(True),))


@needs_ext
def test_module_takes_divergence_beta_and_weights():
    s, t = ensemble((5, 40), 2)
    y = make_labels((5,), 40, ignored=(2,))
    w = torch.tensor([0.25, 0.75])
    module = fastkd.nn.KDLoss(temperature=3.0, hard_weight=0.2, divergence="skew_kl", beta=0.3, teacher_weights=w)
    expected = fastkd.kd_loss(s, t, 3.0, labels=y, hard_weight=0.2, divergence="skew_kl", beta=0.3, teacher_weights=w)
    torch.testing.assert_close(module(s, t, y), expected)
    assert "divergence='skew_kl'" in repr(module) and "beta=0.3" in repr(module)
    assert "teacher_weights" not in module.state_dict()
    torch.testing.assert_close(fastkd.nn.KDLoss(divergence="tvd")(s, t[0]), fastkd.kd_loss(s, t[0], divergence="tvd"))


# ------------------------------------------------------------------------------------------
# Bad input (the public functions' cases: test_conformance.py)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(divergence="jsd", beta=2.0), r"beta must be in \[0, 1\] for divergence='jsd'"),
        (dict(divergence="kl", beta=0.2), "takes no beta"),
        (dict(divergence="fkl"), "divergence must be one of"),
        (dict(teacher_weights=torch.tensor([0.9, 0.2])), "teacher_weights must sum to 1"),
        (dict(teacher_weights=(0.5, 0.5)), "teacher_weights must be a torch.Tensor"),
    ],
)
def test_module_checks_divergence_options_at_construction(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fastkd.nn.KDLoss(**kwargs)


@needs_ext
def test_op_refuses_a_bad_divergence_or_beta_itself():
    s, t = make_logits((2, 8))
    with pytest.raises(RuntimeError, match="divergence must be one of"):
        torch.ops.fastkd.kd_forward(s, t, None, None, "wasserstein", 0.0, 1.0, 0.0, -100, "sum", True, False)
    with pytest.raises(RuntimeError, match=r"beta must be in \[0, 1\) for divergence skew_kl, got 1"):
        torch.ops.fastkd.kd_forward(s, t, None, None, "skew_kl", 1.0, 1.0, 0.0, -100, "sum", True, False)
    with pytest.raises(RuntimeError, match=r"teacher_weights must be a float CPU tensor of shape \[3\]"):
        torch.ops.fastkd.kd_forward(s, torch.stack([t, t, t]), None, torch.ones(2), "kl", 0.0, 1.0, 0.0, -100, "sum", True, False)
