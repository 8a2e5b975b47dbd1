"""fused_linear_sparse_kd_loss against its materialised composite (sparse_kd_loss_reference of the
student head's logits): both teacher formats, reductions, odd shapes (one row, odd counts, GPT-2's
vocabulary, [B, T, H], bias or none), the soft-cap on and off, bf16/fp16 within the kd tests'
bound, gradcheck. opcheck, torch.compile, grad_output scaling and bad input: test_conformance.py."""

import pytest
import torch

import fastkd
import fused_linear_helpers as helpers
from fastkd.ops import fused_linear as fl
from fastkd.ops import sparse_kd as sparse_ops
from backend_helpers import GPU, backend_params, device_of, needs_ext
from fused_linear_helpers import labels_for
from op_specs import LINEAR_SPARSE_ARGS, linear_sparse_inputs
from sparse_kd_helpers import TAILS

FUSED = backend_params("sparse_kd_forward", sparse_ops.TRITON_ERROR, names=("cpu", "triton", "cuda"))


def _sparse_of_logits(logits, x64, **kwargs):
    """sparse_kd_loss_reference of the student's logits against the cached entries (float64)."""
    return fastkd.sparse_kd_loss_reference(logits, x64["teacher_values"], x64["teacher_indices"], 2.0, **kwargs)


def check(backend, x, **kwargs):
    """Loss and student gradients within the kd tests' rule of the float64 composite."""
    helpers.check(lambda *a, **k: fastkd.fused_linear_sparse_kd_loss(*a, backend=backend, **k),
                  fastkd.fused_linear_sparse_kd_loss_reference, _sparse_of_logits, LINEAR_SPARSE_ARGS, x, **kwargs)


def inputs(lead, h, v, k, values, backend="cpu", **kw):
    return linear_sparse_inputs(lead, h, v, k, values=values, device=device_of(backend), **kw)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("values, tail", TAILS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_composite(backend, values, tail, reduction):
    small = backend == "triton" and not GPU
    lead, v = ((7,), 67) if small else ((2, 9), 301)
    x = inputs(lead, 9, v, 6, values, backend, scale=3.0)
    check(backend, x, values=values, tail=tail, labels=labels_for(lead, v, device=device_of(backend)), hard_weight=0.2,
          reduction=reduction, student_softcap=2.0 if reduction == "none" else None, chunk_size=4)


@needs_ext
@pytest.mark.parametrize("lead, h, v, bias, softcap", [
    ((1,), 5, 50257, False, None),
    ((7,), 12, 503, True, 3.0),
    ((300,), 8, 37, True, None),
    ((2, 3), 6, 50257, True, 30.0),  # [B, T, H] at GPT-2's vocabulary, Gemma's cap
])
def test_odd_shapes(lead, h, v, bias, softcap):
    x = inputs(lead, h, v, 8, "logprobs", bias=bias, scale=3.0)
    check("cpu", x, values="logprobs", tail="uniform", labels=labels_for(lead, v, ignored=(0,)), hard_weight=0.3, reduction="none",
          student_softcap=softcap, chunk_size=None if v > 1000 else 64)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_low_precision_within_the_bound(dtype, softcap):
    x = inputs((41,), 64, 1271, 16, "logits")
    x = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in x.items()}
    check("cpu", x, labels=labels_for((41,), 1271), hard_weight=0.1, student_softcap=softcap, chunk_size=16)


@needs_ext
def test_soft_cap_as_gemma_applies_it():
    """The op equals sparse_kd_loss of logits capped by hand, cap · tanh(z / cap), loss and
    gradients; and the cap changes the loss (the case would catch a cap that is ignored)."""
    x = inputs((6,), 5, 40, 4, "logits", scale=4.0)
    x = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}

    def capped(h, w, vals, idx, temperature, student_bias, **kw):
        z = h @ w.t() + student_bias
        return fastkd.sparse_kd_loss_reference(1.5 * torch.tanh(z / 1.5), vals, idx, temperature, **kw)

    go = torch.tensor(1.0)
    want = helpers.run(capped, x, go, LINEAR_SPARSE_ARGS)
    got = helpers.run(lambda *a, **k: fastkd.fused_linear_sparse_kd_loss(*a, backend="cpu", chunk_size=4, **k), x, go, LINEAR_SPARSE_ARGS,
                      student_softcap=1.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    uncapped = helpers.run(fastkd.fused_linear_sparse_kd_loss_reference, x, go, LINEAR_SPARSE_ARGS)
    assert not torch.allclose(got[0], uncapped[0])


@needs_ext
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_and_gradgradcheck_float64(reduction):
    x = inputs((4,), 3, 9, 3, "logprobs", scale=3.0)
    x = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    y = labels_for((4,), 9)

    def f(h, w, b):
        return fastkd.fused_linear_sparse_kd_loss(h, w, x["teacher_values"], x["teacher_indices"], 1.7, student_bias=b, values="logprobs",
                                                  tail="uniform", labels=y, hard_weight=0.3, reduction=reduction, student_softcap=1.3,
                                                  chunk_size=2, backend="cpu")

    leaves = tuple(x[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@needs_ext
def test_no_student_logits_of_the_batch(monkeypatch):
    """The chunk loop's buffers are [chunk, V]: no [N, V] tensor is made (the GEMM's output is
    the widest allocation, recorded here)."""
    x = inputs((40,), 8, 300, 4, "logits")
    shapes = []
    real_logits = fl._logits

    def logits(head, rows, acc):
        z = real_logits(head, rows, acc)
        shapes.append(tuple(z.shape))
        return z

    monkeypatch.setattr(fl, "_logits", logits)
    x["student_hidden"].requires_grad_(True)
    fastkd.fused_linear_sparse_kd_loss(*(x[k] for k in LINEAR_SPARSE_ARGS), student_bias=x["student_bias"], chunk_size=16,
                                       backend="cpu").backward()
    assert shapes == [(16, 300), (16, 300), (8, 300)], shapes


# ------------------------------------------------------------------------------------------
# The engine's KD terms: a cached teacher through the fused head, and a model's soft-cap
# ------------------------------------------------------------------------------------------


def _kd_term(cached, **spec):
    from fastkd.engine.losses import KDTerm

    full = {name: field.default for name, field in KDTerm.SCHEMA.items()}
    full.update(kind="kd", temperature=2.0, hard_weight=0.2, chunk_size=4, **spec)
    return KDTerm.build(full, 0, cached_teacher=cached)


def _lm_step(softcap, teacher):
    """A language model's step as the LM task gives it: hidden states and lm_head, the soft-cap
    read from the model's config (``final_logit_softcapping``, None for GPT-2)."""
    from types import SimpleNamespace

    from fastkd.engine.losses import StepOutputs
    from fastkd.engine.tasks import LMTask

    torch.manual_seed(0)
    model = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=softcap), lm_head=torch.nn.Linear(8, 40, bias=False))
    out = torch.randn(2, 6, 8) * 3
    labels = labels_for((2, 6), 40)
    view = LMTask({}).view(model, out, labels)
    step = StepOutputs(None, {}, view.labels, teacher, torch.nn.ModuleDict(), hidden=view.hidden, head=view.head,
                       masked=view.masked, softcap=view.softcap)
    return view, step


@needs_ext
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_cached_teacher_term_fused_equals_materialised(softcap):
    """``fused_head = true`` against a cache: fused_linear_sparse_kd_loss gives sparse_kd_loss of
    the (soft-capped) materialised logits, never forming them."""
    from fastkd.engine.losses import SparseTeacher, TeacherOutputs

    cached = linear_sparse_inputs((10,), 8, 40, 5, values="logprobs")
    teacher = TeacherOutputs(sparse=SparseTeacher(cached["teacher_indices"], cached["teacher_values"], "logprobs", "uniform"))
    view, fused_step = _lm_step(softcap, teacher)
    assert view.softcap == softcap
    fused = _kd_term(True, fused_head=True)(fused_step)
    assert fused_step._logits is None  # the fused term never formed the logits
    _, dense_step = _lm_step(softcap, teacher)
    dense = _kd_term(True, fused_head=False)(dense_step)
    torch.testing.assert_close(fused, dense)
    if softcap is not None:
        _, plain = _lm_step(None, teacher)
        assert not torch.allclose(fused, _kd_term(True, fused_head=True)(plain))


@needs_ext
def test_fused_head_term_passes_the_models_soft_caps():
    """FusedHeadKD caps each head as its model's config says, as DenseKD's logits are capped."""
    from fastkd.engine.losses import TeacherOutputs

    g = torch.Generator().manual_seed(1)
    teacher = TeacherOutputs(None, [{}], hidden=[torch.randn(10, 6, generator=g) * 3], heads=[torch.nn.Linear(6, 40)], softcaps=[2.5])
    _, step = _lm_step(1.5, teacher)
    fused = _kd_term(False, fused_head=True)(step)
    dense = _kd_term(False, fused_head=False)(step)
    torch.testing.assert_close(fused, dense)
    teacher.softcaps = [None]
    teacher._logits = None
    assert not torch.allclose(fused, _kd_term(False, fused_head=True)(step))
