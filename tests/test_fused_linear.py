"""fused_linear_kd_loss against the materialised composite (kd_loss of the two heads' logits):
odd shapes, H ≠ Ht, biases, reductions, labels, grad_output ≠ 1, [B, T, H] inputs, chunk sizes,
bf16 within the FlashAttention-style bound, float32 weight-gradient accumulation, double and
repeated backward. opcheck, torch.compile and bad input: test_conformance.py."""

import pytest
import torch

import fastkd
from fastkd.ops import fused_linear as fl
from fastkd.ops import kd as kd_ops
from backend_helpers import GPU, backend_params, device_of, needs_ext
import fused_linear_helpers as helpers
from fused_linear_helpers import labels_for, make

FUSED = backend_params("kd_forward", kd_ops.TRITON_ERROR, names=("cpu", "triton", "cuda"))


KD_ARGS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")


def run(fn, x, grad_output, **kwargs):
    """Loss and the student gradients (hidden, weight, bias) of (loss * grad_output).sum()."""
    return helpers.run(fn, x, grad_output, KD_ARGS, **kwargs)


def _kd_of_logits(logits, x64, teacher_softcap=None, **kwargs):
    """kd_loss_reference of the student's logits against the teacher head's (float64)."""
    ht = x64["teacher_hidden"].reshape(-1, x64["teacher_hidden"].shape[-1])
    teacher = ht @ x64["teacher_weight"].t() + (0 if x64["teacher_bias"] is None else x64["teacher_bias"])
    return fastkd.kd_loss_reference(logits, fl.softcapped(teacher, teacher_softcap), 2.0, **kwargs)


def check(backend, x, **kwargs):
    """Every output within the kd tests' rule of the float64 composite (``helpers.check``)."""
    helpers.check(lambda *a, **k: fastkd.fused_linear_kd_loss(*a, backend=backend, **k), fl.fused_linear_kd_loss_reference,
                  _kd_of_logits, KD_ARGS, x, **kwargs)


# ------------------------------------------------------------------------------------------
# Against the materialised composite
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("mode", ["none", "labels", "hard"])
def test_matches_composite(backend, reduction, mode):
    small = backend == "triton" and not GPU
    lead, v = ((7,), 301) if small else ((41,), 1271)
    x = make(lead, 17, 29, v, device=device_of(backend))
    kwargs = dict(reduction=reduction, chunk_size=5)
    if mode != "none":
        kwargs.update(labels=labels_for(lead, v, device=device_of(backend)), hard_weight=0.3 if mode == "hard" else 0.0)
    check(backend, x, **kwargs)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("divergence", [name for name in kd_ops.divergences.DIVERGENCES if name != "kl"])
def test_every_divergence_matches_composite(backend, divergence):
    """Every divergence of kd_loss through the chunk loop, with labels, CE and an ignored row."""
    beta = None  # the divergence's default
    small = backend == "triton" and not GPU
    lead, v = ((2, 3), 131) if small else ((3, 7), 517)
    x = make(lead, 11, 19, v, device=device_of(backend))
    check(backend, x, divergence=divergence, beta=beta, labels=labels_for(lead, v, device=device_of(backend)), hard_weight=0.2,
          reduction="batchmean", chunk_size=4)
    if backend == "cpu":
        with pytest.raises(ValueError, match="beta"):
            fastkd.fused_linear_kd_loss(*(x[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")),
                                        divergence="tvd", beta=0.5)


@needs_ext
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_chunk_sizes_and_biases(chunk_size, bias):
    x = make((2, 13), 33, 20, 257, bias=bias)  # [B, T, H], 26 rows: 7 and 13 leave a short last chunk
    check("cpu", x, chunk_size=chunk_size, labels=labels_for((2, 13), 257), hard_weight=0.2, reduction="none")
    check("cpu", x, chunk_size=chunk_size)


@needs_ext
@pytest.mark.slow
def test_gpt2_vocabulary():
    x = make((37,), 24, 40, 50257)
    check("cpu", x, chunk_size=16, labels=labels_for((37,), 50257), hard_weight=0.1)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_bound(dtype):
    x = make((41,), 64, 48, 1271, dtype=dtype)
    check("cpu", x, chunk_size=16, labels=labels_for((41,), 1271), hard_weight=0.1)


@needs_ext
def test_weight_gradient_is_accumulated_in_float32():
    """512 rows of a bf16 batch, one per chunk, add into every weight-gradient entry. Summed in
    bf16 that loses ~5 % here (shown below on the exact per-row terms); accumulated in float32
    and rounded once, it stays within ~0.3 %."""
    x = make((512,), 32, 32, 64, dtype=torch.bfloat16, seed=7)
    got = run(lambda *a, **k: fastkd.fused_linear_kd_loss(*a, backend="cpu", chunk_size=1, **k), x, torch.tensor(1.0), reduction="sum")
    x64 = {k: v.double() for k, v in x.items()}
    exact = run(fl.fused_linear_kd_loss_reference, x64, torch.tensor(1.0), reduction="sum")

    def rel(w_grad):
        return ((w_grad.double() - exact[2]).abs().max() / exact[2].abs().max()).item()

    logits = (x64["student_hidden"] @ x64["student_weight"].t() + x64["student_bias"]).requires_grad_(True)
    teacher = x64["teacher_hidden"] @ x64["teacher_weight"].t() + x64["teacher_bias"]
    (g,) = torch.autograd.grad(fastkd.kd_loss_reference(logits, teacher, 2.0, reduction="sum"), logits)
    bf16_sum = torch.zeros(64, 32, dtype=torch.bfloat16)
    for g_row, h_row in zip(g, x64["student_hidden"]):
        bf16_sum = (bf16_sum.double() + torch.outer(g_row, h_row)).to(torch.bfloat16)
    assert rel(bf16_sum) > 1e-2, "the case no longer tells bf16 accumulation from float32"
    assert rel(got[2]) < 1e-2, f"weight gradient relative error {rel(got[2]):.3g}"


@needs_ext
def test_teacher_is_constant():
    x = make((9,), 8, 8, 50)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        x[k].requires_grad_(True)
    h = x["student_hidden"].requires_grad_(True)
    fastkd.fused_linear_kd_loss(h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"], 2.0, teacher_bias=x["teacher_bias"]).backward()
    assert h.grad is not None and all(x[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))


@needs_ext
def test_only_hidden_requires_grad():
    x = make((9,), 8, 8, 50)
    h = x["student_hidden"].requires_grad_(True)
    fastkd.fused_linear_kd_loss(h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"], 2.0).backward()
    assert h.grad is not None and x["student_weight"].grad is None


@needs_ext
def test_module_form():
    x = make((9,), 8, 6, 50)
    head_s = torch.nn.Linear(8, 50)
    head_t = torch.nn.Linear(6, 50)
    crit = fastkd.nn.FusedLinearKDLoss(temperature=2.0, chunk_size=4)
    loss = crit(x["student_hidden"], head_s, x["teacher_hidden"], head_t)
    expected = fastkd.kd_loss(head_s(x["student_hidden"]), head_t(x["teacher_hidden"]), 2.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert head_s.weight.grad is not None and head_t.weight.grad is None
    with pytest.raises(ValueError, match="temperature"):
        fastkd.nn.FusedLinearKDLoss(temperature=0)


# ------------------------------------------------------------------------------------------
# Autograd: gradcheck, double and repeated backward; PyTorch integration
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_and_gradgradcheck_float64(reduction):
    x = make((5,), 4, 3, 11, dtype=torch.float64)
    y = labels_for((5,), 11)

    def f(h, w, b):
        return fastkd.fused_linear_kd_loss(h, w, x["teacher_hidden"], x["teacher_weight"], 1.7, student_bias=b, teacher_bias=x["teacher_bias"],
                                           labels=y, hard_weight=0.3, reduction=reduction, chunk_size=2, backend="cpu")

    leaves = tuple(x[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@needs_ext
@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_repeated_backward_through_a_retained_graph(weight):
    x = make((9,), 8, 8, 50)
    h1 = x["student_hidden"].clone().requires_grad_(True)
    h3 = x["student_hidden"].clone().requires_grad_(True)
    (fastkd.fused_linear_kd_loss(h1, x["student_weight"], x["teacher_hidden"], x["teacher_weight"], 2.0) * weight).backward()
    loss = fastkd.fused_linear_kd_loss(h3, x["student_weight"], x["teacher_hidden"], x["teacher_weight"], 2.0) * weight
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(h3.grad, 3 * h1.grad)


def test_auto_chunk_size_rule():
    assert fl.auto_chunk_size(8192, 32000) == (256 << 20) // (12 * 32000)
    assert fl.auto_chunk_size(3, 32000) == 3
    assert fl.auto_chunk_size(10**6, 10**9) == 1


def test_auto_chunk_size_reads_the_budget():
    vocab, hidden = 128256, 4096
    assert fl.auto_chunk_size(8192, vocab, 4 << 30) == (4 << 30) // (12 * vocab)
    assert fl.chunk_budget(torch.device("cpu"), vocab, hidden) == fl.CHUNK_BUDGET_BYTES


# ------------------------------------------------------------------------------------------
# Low precision: 16-bit GEMMs accumulated and returned in float32
# ------------------------------------------------------------------------------------------


def _float32_logit_composite(h, w, ht, wt, temperature, student_bias=None, teacher_bias=None, **kwargs):
    """What users write for a 16-bit head: the GEMM in the inputs' dtype, the logits cast to
    float32 for the loss (autograd rounds their gradient to 16 bits for the GEMMs' backward)."""
    s = (h @ w.t() + student_bias).float()
    with torch.no_grad():
        t = (ht @ wt.t() + teacher_bias).float()
    return fastkd.kd_loss_reference(s, t, temperature, **kwargs)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_no_worse_than_a_float32_logit_composite(dtype):
    """Against the float64 composite, the fused op's loss and every student gradient are at least
    as close as the float32-logit composite's (relative to the largest entry), one row per chunk
    (a weight gradient summed in 16 bits across the 256 chunks would not be). That the logits
    themselves are float32 (no 16-bit GEMM result) is test_low_precision_within_the_bound's."""
    x = make((256,), 48, 40, 777, dtype=dtype, seed=11, scale=2.0)
    go = torch.tensor(1.0)
    got = run(lambda *a, **k: fastkd.fused_linear_kd_loss(*a, backend="cpu", chunk_size=1, **k), x, go)
    exact = run(fl.fused_linear_kd_loss_reference, {k: v.double() for k, v in x.items()}, go)
    baseline = run(_float32_logit_composite, x, go)
    for name, a, e, b in zip(["loss", "d student_hidden", "d student_weight", "d student_bias"], got, exact, baseline):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)

        def err(t):
            return ((t.double() - e).abs().max() / e.abs().max()).item()

        assert err(a) <= err(b), f"{name}: fused error {err(a):.3g} > float32-logit composite's {err(b):.3g}"


@needs_ext
def test_no_float32_copy_of_a_16bit_weight(monkeypatch):
    """A bf16 weight meets the CPU's float32 GEMMs a block at a time: with blocks of 100 rows, no
    float32 tensor of the weight's size is allocated (the [V, H] float32 weight gradient aside)."""
    monkeypatch.setattr(fl, "WEIGHT_BLOCK_BYTES", 100 * 24 * 4)
    x = make((9,), 24, 24, 1000, dtype=torch.bfloat16, bias=False)
    sizes = []
    real_new_empty = torch.Tensor.new_empty

    def new_empty(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real_new_empty(self, size, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    with torch.no_grad():
        fastkd.fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], backend="cpu")
    assert (100, 24) in sizes and (1000, 24) not in sizes, sizes
    check("cpu", x, chunk_size=4)  # and the blocked GEMMs give the same loss and gradients


# ------------------------------------------------------------------------------------------
# Logit soft-capping (Gemma 2/3)
# ------------------------------------------------------------------------------------------

SOFTCAPS = [(1.5, None), (None, 2.0), (1.5, 2.0)]
DIVERGENCES = [("kl", None), ("reverse_kl", None), ("jsd", 0.3), ("tvd", None), ("skew_kl", None), ("skew_reverse_kl", 0.2)]


def test_reference_soft_caps_as_gemma_does():
    """The reference (what the fused op is checked against) equals a composite that applies
    cap · tanh(z / cap) to each head's logits itself, loss and gradients, per side."""
    x = make((6,), 5, 7, 40, dtype=torch.float64, scale=3.0)
    for s_cap, t_cap in SOFTCAPS:
        def composite(h, w, ht, wt, temperature, student_bias, teacher_bias, **kw):
            s, t = h @ w.t() + student_bias, ht @ wt.t() + teacher_bias
            s = s if s_cap is None else s_cap * torch.tanh(s / s_cap)
            t = t if t_cap is None else t_cap * torch.tanh(t / t_cap)
            return fastkd.kd_loss_reference(s, t, temperature, **kw)

        go = torch.tensor(1.0)
        want = run(composite, x, go, divergence="jsd", beta=0.3)
        got = run(fl.fused_linear_kd_loss_reference, x, go, student_softcap=s_cap, teacher_softcap=t_cap, divergence="jsd", beta=0.3)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(got[0], run(fl.fused_linear_kd_loss_reference, x, go, divergence="jsd", beta=0.3)[0])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
@pytest.mark.parametrize("student_softcap, teacher_softcap", SOFTCAPS)
def test_soft_capped_heads_match_composite(backend, divergence, beta, student_softcap, teacher_softcap):
    small = backend == "triton" and not GPU
    lead, v = ((5,), 67) if small else ((2, 5), 301)
    x = make(lead, 9, 13, v, device=device_of(backend), scale=3.0)  # logits of a few units: the cap bends them
    check(backend, x, student_softcap=student_softcap, teacher_softcap=teacher_softcap, divergence=divergence, beta=beta,
          labels=labels_for(lead, v, device=device_of(backend)), hard_weight=0.2, chunk_size=3)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_capped_low_precision_within_the_bound(dtype):
    x = make((7,), 16, 8, 300, dtype=dtype, scale=3.0)
    check("cpu", x, student_softcap=2.0, teacher_softcap=3.0, reduction="none", chunk_size=3)


@needs_ext
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_soft_capped_gradcheck_and_gradgradcheck_float64(reduction):
    x = make((5,), 4, 3, 11, dtype=torch.float64, scale=3.0)

    def f(h, w, b):
        return fastkd.fused_linear_kd_loss(h, w, x["teacher_hidden"], x["teacher_weight"], 1.7, student_bias=b, teacher_bias=x["teacher_bias"],
                                           student_softcap=1.3, teacher_softcap=2.0, reduction=reduction, chunk_size=2, backend="cpu")

    leaves = tuple(x[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("bad, error, match", [
    (0.0, ValueError, "student_softcap must be a finite number > 0"),
    (-2.0, ValueError, "student_softcap must be a finite number > 0"),
    (float("inf"), ValueError, "student_softcap must be a finite number > 0"),
    (float("nan"), ValueError, "student_softcap must be a number, got nan"),
    ("30", TypeError, "student_softcap must be a real number"),
    (1j, TypeError, "student_softcap must be a real number"),
])
def test_bad_softcap(bad, error, match):
    x = make((3,), 4, 4, 10)
    args = (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
    with pytest.raises(error, match=match):
        fastkd.fused_linear_kd_loss(*args, student_softcap=bad)
    with pytest.raises(error, match=match.replace("student", "teacher")):
        fastkd.fused_linear_kd_loss(*args, teacher_softcap=bad)
    with pytest.raises(error, match=match):
        fastkd.nn.FusedLinearKDLoss(student_softcap=bad)


@needs_ext
def test_module_soft_caps():
    x = make((6,), 8, 6, 50, scale=3.0)
    head_s, head_t = torch.nn.Linear(8, 50), torch.nn.Linear(6, 50)
    crit = fastkd.nn.FusedLinearKDLoss(temperature=2.0, student_softcap=1.5, teacher_softcap=2.5, chunk_size=4)
    assert "student_softcap=1.5, teacher_softcap=2.5" in repr(crit)
    loss = crit(x["student_hidden"], head_s, x["teacher_hidden"], head_t)
    expected = fastkd.kd_loss(fl.softcapped(head_s(x["student_hidden"]), 1.5), fl.softcapped(head_t(x["teacher_hidden"]), 2.5), 2.0)
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------
# Shapes users meet: one row, odd counts, GPT-2's and Llama 3's vocabularies, tied heads
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("lead, h, ht, v, bias", [
    ((1,), 5, 9, 50257, False),
    ((7,), 12, 12, 503, True),
    ((1000,), 8, 6, 37, True),
    ((1, 3), 16, 12, 128256, False),  # Llama 3's vocabulary: 3 rows, H <= 16, to stay fast
])
def test_odd_shapes(lead, h, ht, v, bias):
    x = make(lead, h, ht, v, bias=bias)
    check("cpu", x, labels=labels_for(lead, v, ignored=(0,)), hard_weight=0.3, reduction="none", student_softcap=3.0)


@needs_ext
def test_tied_student_and_teacher_weight():
    """One weight as both heads (self-distillation across layers): the teacher's use of it stays
    constant, the student's gets the gradient."""
    x = make((9,), 8, 8, 40)
    w = x["student_weight"].clone().requires_grad_(True)
    fastkd.fused_linear_kd_loss(x["student_hidden"], w, x["teacher_hidden"], w, 2.0, chunk_size=4).backward()
    w_ref = x["student_weight"].clone().requires_grad_(True)
    fastkd.kd_loss_reference(x["student_hidden"] @ w_ref.t(), x["teacher_hidden"] @ w_ref.detach().t(), 2.0).backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
