"""Benchmark of ``fastkd.fused_linear_kd_loss`` (kd through the output layer, logits never
materialised) and ``fastkd.fused_linear_sparse_kd_loss`` (the same against a cached top-k
teacher) against the materialised composites, eager and under ``torch.compile`` (and Liger's
fused linear JSD at beta = 0 on CUDA); PyTorch's ``F.linear_cross_entropy`` (the CE-only
analogue) is timed beside them for scale. The ``gemms`` provider times the op's bare GEMMs
alone (no loss): the bound a fused head is held to (``time_ratio_gemms``).

The unit of memory and traffic here is still one N×V tensor of the student dtype (what the
composite materialises several of). The traffic bound counts the bytes a fused pass must move
with float32 logits kept chunk-sized: the hidden states and weights, read for the two forward
GEMMs and again for the two gradient GEMMs, and the gradients written; it is far below the
GEMMs' compute time on a CPU, so % of bound says little here: time and memory are the targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import Case
from .runner import run_case

BENCH_OPS = ("fused_linear_kd", "fused_linear_sparse_kd", "linear_ce")

H, HT = 1024, 1024
# Llama-3-8B-class heads: what users distil on a GPU (BT = 8192 tokens a step).
LLAMA3 = (("temperature", 2.0), ("H", 4096), ("Ht", 4096))
LLAMA3_VOCAB = 128256
# The CPU's shape of the same vocabulary: H = 1024, 1024 tokens.
CPU_LARGE_VOCAB = (("temperature", 2.0), ("H", 1024))
FUSED_HEAD_TARGETS = (
    ("fastkd-cpu", "peak_ratio_eager", ">=", 10.0, "≥ 10× less peak extra memory than the eager composite"),
    ("fastkd-cpu", "time_ratio_gemms", "<=", 1.15, "≤ 1.15 × the bare GEMMs' time"),
)
GPU_TARGETS = tuple((p, "time_ratio_gemms", "<=", 1.3, "≤ 1.3 × the bare GEMMs' time") for p in ("fastkd-triton", "fastkd-cuda"))


def _head(case: Case, g, width: int, scale: float = 1.0, requires_grad: bool = False):
    """Hidden states [N, width] and a weight [V, width] in the case's dtype."""
    dt = case.torch_dtype
    hidden = torch.randn(case.n, width, generator=g).to(dt)
    return hidden, (torch.randn(case.v, width, generator=g) * width**-0.5 * scale).to(dt).requires_grad_(requires_grad)


def _inputs(case: Case):
    g = torch.Generator().manual_seed(0)
    params = dict(case.params)
    return (*_head(case, g, params.get("H", H), requires_grad=True), *_head(case, g, params.get("Ht", HT), scale=2.0))


class _BareGemms(torch.autograd.Function):
    """A fused head's GEMMs and nothing else, in the inputs' dtype: forward the student's
    ``h @ Wᵀ`` (and the teacher's, when given), backward ``g @ W`` and ``gᵀ @ h`` with the
    student's product standing in for the logit gradient g."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t=None, w_t=None):
        z = h_s @ w_s.t()
        if h_t is not None:
            h_t @ w_t.t()
        ctx.save_for_backward(h_s, w_s, z)
        return z.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        h_s, w_s, z = ctx.saved_tensors
        return z @ w_s, z.t() @ h_s, None, None


def gemms(h_s, w_s, h_t, w_t, **_params) -> torch.Tensor:
    """The four GEMMs of fused_linear_kd: two forward, two for the student's gradients."""
    return _BareGemms.apply(h_s, w_s, h_t, w_t)


def composite(h_s, w_s, h_t, w_t, *, temperature: float, H: int = H, Ht: int = HT) -> torch.Tensor:
    """Materialise both heads' logits, then Hinton KD, as users write it today."""
    s = h_s @ w_s.t()
    with torch.no_grad():
        t = h_t @ w_t.t()
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean") * temperature**2


def fused(h_s, w_s, h_t, w_t, *, backend: str, temperature: float, H: int = H, Ht: int = HT) -> torch.Tensor:
    import fastkd

    return fastkd.fused_linear_kd_loss(h_s, w_s, h_t, w_t, temperature, backend=backend)


def _traffic(case: Case) -> dict:
    h, ht = dict(case.params).get("H", H), dict(case.params).get("Ht", HT)
    rows, weights = case.n * (h + ht), case.v * (h + ht)
    # fwd: read hiddens and weights once; fwd+bwd: twice, and write d hidden and d weight.
    per_unit = 1.0 / (case.n * case.v)
    fwd = (rows + weights) * per_unit
    both = (2 * (rows + weights) + case.n * h + case.v * h) * per_unit
    return {"fwd": fwd, "bwd": case.n * h * 2 * per_unit, "fwdbwd": both}


common.register(
    common.Op(
        name="fused_linear_kd",
        title="fused_linear_kd_loss (kd through the output layer)",
        composite=composite,
        fused=fused,
        traffic=_traffic,
        traffic_note=(
            "read the hidden states [N, H + Ht] and weights [V, H + Ht] for the forward GEMMs "
            "(again for the gradient GEMMs in fwd+bwd) and write d hidden and d weight; the logits "
            "stay in chunk-sized float32 buffers"
        ),
        composite_text="kl_div(log_softmax(h_s @ W_sᵀ / T), log_softmax(h_t @ W_tᵀ / T)) · T² with both [N, V] logits materialised",
        inputs=_inputs,
        gemms=gemms,
    ),
    full=[
        Case("fused_linear_kd", 8192, 32000, "fp32", headline=True, targets=(
            ("fastkd-cpu", "peak_ratio_eager", ">=", 10.0, "≥ 10× less peak extra memory than the eager composite"),
            ("fastkd-cpu", "time_ratio_eager", "<=", 0.9, "≤ 0.9 × the eager composite's time"),
        )),
        # N=32768 (where the composite would need ~28 GB) is left out of the full run: at ~80 s
        # per fused fwd+bwd on 2 cores it alone would take a quarter of an hour; the peak memory
        # of the case above already shows that no [N, V] tensor is held.
        Case("fused_linear_kd", 8192, LLAMA3_VOCAB, "bf16", LLAMA3, devices=("cuda",), targets=GPU_TARGETS),
        # ~30 s a call on 2 cores: one fp32 and one bf16 case at Llama 3's vocabulary.
        Case("fused_linear_kd", 1024, LLAMA3_VOCAB, "fp32", CPU_LARGE_VOCAB, devices=("cpu",), targets=FUSED_HEAD_TARGETS),
        Case("fused_linear_kd", 1024, LLAMA3_VOCAB, "bf16", CPU_LARGE_VOCAB, devices=("cpu",), targets=FUSED_HEAD_TARGETS),
    ],
    quick=[Case("fused_linear_kd", 64, 1000, "fp32", params=(("temperature", 2.0), ("H", 64)), headline=True)],
    # V from 4k to 64k at N = 1024 (H = 1024): the GEMMs dominate, so 128k would double the
    # sweep's time on 2 cores for little more information.
    sweep=common.sweep(Case("fused_linear_kd", 1024, 32000, "fp32"), [(1024, 4096), (1024, 16384), (1024, 32000), (1024, 65536)]),
    # fastkd bench --quick on CPU: N = 256 (the eager composite takes ~10 s a call at 8192).
    cpu_quick_size=(256, 32000),
)


# --------------------------------------------------------------------------------------------
# fused_linear_sparse_kd: the student's head against a cached top-k teacher
# --------------------------------------------------------------------------------------------

TOP_K = 64


def _sparse_inputs(case: Case):
    """The student's head and a cached teacher's top-64 logits with distinct indices (one per
    stretch of V / 64 entries: no [N, V] tensor to draw them from)."""
    g = torch.Generator().manual_seed(0)
    k = min(TOP_K, case.v)
    stride = case.v // k
    indices = torch.arange(k) * stride + torch.randint(0, stride, (case.n, k), generator=g)
    values = (torch.randn(case.n, k, generator=g) * 2.0).to(case.torch_dtype)
    return (*_head(case, g, dict(case.params).get("H", H), requires_grad=True), values, indices)


def sparse_composite(h_s, w_s, values, indices, *, temperature: float, H: int = H) -> torch.Tensor:
    """The student's logits materialised, then KL(teacher's top-k softmax || student) over the
    full vocabulary, as users write it (sparse_kd_loss, values="logits", tail="renormalize")."""
    T = temperature
    log_q = F.log_softmax((h_s @ w_s.t()).float() / T, -1).gather(-1, indices)
    log_p = F.log_softmax(values.float() / T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T


def sparse_fused(h_s, w_s, values, indices, *, backend: str, temperature: float, H: int = H) -> torch.Tensor:
    import fastkd

    return fastkd.fused_linear_sparse_kd_loss(h_s, w_s, values, indices, temperature, backend=backend)


def sparse_gemms(h_s, w_s, values, indices, **_params) -> torch.Tensor:
    """The three GEMMs of fused_linear_sparse_kd: the student's forward and its two gradients."""
    return _BareGemms.apply(h_s, w_s)


def _sparse_traffic(case: Case) -> dict:
    h = dict(case.params).get("H", H)
    per_unit = 1.0 / (case.n * case.v)
    teacher = case.n * TOP_K * 2  # values and indices, read per pass
    fwd = (case.n * h + case.v * h + teacher) * per_unit
    return {"fwd": fwd, "bwd": 2 * (case.n + case.v) * h * per_unit, "fwdbwd": 2 * fwd + (case.n + case.v) * h * per_unit}


common.register(
    common.Op(
        name="fused_linear_sparse_kd",
        title="fused_linear_sparse_kd_loss (sparse kd from a top-k cache, through the output layer)",
        composite=sparse_composite,
        fused=sparse_fused,
        traffic=_sparse_traffic,
        traffic_note="read the hidden states [N, H], the weight [V, H] and the cached top-k (again in fwd+bwd) and write d hidden and d weight",
        composite_text="KL(softmax(top-k / T) || log_softmax(h_s @ W_sᵀ / T)) · T² with the [N, V] student logits materialised",
        inputs=_sparse_inputs,
        gemms=sparse_gemms,
    ),
    full=[
        Case("fused_linear_sparse_kd", 8192, LLAMA3_VOCAB, "bf16", LLAMA3[:2], devices=("cuda",), targets=GPU_TARGETS),
        Case("fused_linear_sparse_kd", 1024, LLAMA3_VOCAB, "fp32", CPU_LARGE_VOCAB, devices=("cpu",), headline=True,
             targets=FUSED_HEAD_TARGETS),
        Case("fused_linear_sparse_kd", 1024, LLAMA3_VOCAB, "bf16", CPU_LARGE_VOCAB, devices=("cpu",), targets=FUSED_HEAD_TARGETS),
    ],
    quick=[Case("fused_linear_sparse_kd", 64, 1000, "fp32", params=(("temperature", 2.0), ("H", 64)), headline=True)],
    sweep=common.sweep(Case("fused_linear_sparse_kd", 1024, 32000, "fp32", CPU_LARGE_VOCAB), [(1024, 4096), (1024, 32000), (1024, 65536)]),
    cpu_quick_size=(256, 32000),
)


def linear_ce_composite(h_s, w_s, h_t, w_t, *, temperature: float, H: int = H, Ht: int = HT) -> torch.Tensor:
    """PyTorch's fused linear cross-entropy on the student head alone (labels: the teacher's
    argmax would cost a teacher GEMM; fixed pseudo-labels are enough for scale)."""
    labels = torch.arange(h_s.shape[0], device=h_s.device) % w_s.shape[0]
    return F.linear_cross_entropy(h_s, w_s, labels)


def _not_fastkd(*xs, backend, **kw):
    raise NotImplementedError("PyTorch's own op, timed for scale: no fastkd backend")


common.register(
    common.Op(
        name="linear_ce",
        title="F.linear_cross_entropy (PyTorch, CE only; for scale)",
        composite=linear_ce_composite,
        fused=_not_fastkd,
        traffic=_traffic,
        traffic_note="as fused_linear_kd, for one head",
        composite_text="F.linear_cross_entropy(h_s, W_s, labels)",
        inputs=_inputs,
    ),
    full=[Case("linear_ce", 8192, 32000, "fp32", only=("eager",))],
    quick=[],
)


def test_fused_linear_kd(benchmark, bench_item, budget):
    run_case(benchmark, bench_item, budget)
