"""Benchmark of ``fastkd.fused_linear_kd_loss`` (kd through the output layer, logits never
materialised) against the materialised composite, eager and under ``torch.compile``; PyTorch's
``F.linear_cross_entropy`` (the CE-only analogue) is timed beside them for scale.

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

BENCH_OPS = ("fused_linear_kd", "linear_ce")

H, HT = 1024, 1024


def _inputs(case: Case):
    g = torch.Generator().manual_seed(0)
    h = dict(case.params).get("H", H)
    dt = case.torch_dtype
    return (
        torch.randn(case.n, h, generator=g).to(dt),
        (torch.randn(case.v, h, generator=g) * h**-0.5).to(dt).requires_grad_(True),
        torch.randn(case.n, HT, generator=g).to(dt),
        (torch.randn(case.v, HT, generator=g) * HT**-0.5 * 2).to(dt),
    )


def composite(h_s, w_s, h_t, w_t, *, temperature: float, H: int = H) -> torch.Tensor:
    """Materialise both heads' logits, then Hinton KD, as users write it today."""
    s = h_s @ w_s.t()
    with torch.no_grad():
        t = h_t @ w_t.t()
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean") * temperature**2


def fused(h_s, w_s, h_t, w_t, *, backend: str, temperature: float, H: int = H) -> torch.Tensor:
    import fastkd

    return fastkd.fused_linear_kd_loss(h_s, w_s, h_t, w_t, temperature, backend=backend)


def _traffic(case: Case) -> dict:
    h = dict(case.params).get("H", H)
    rows, weights = case.n * (h + HT), case.v * (h + HT)
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
    ),
    full=[
        Case("fused_linear_kd", 8192, 32000, "fp32", headline=True, targets=(
            ("fastkd-cpu", "peak_ratio_eager", ">=", 10.0, "≥ 10× less peak extra memory than the eager composite"),
            ("fastkd-cpu", "time_ratio_eager", "<=", 0.9, "≤ 0.9 × the eager composite's time"),
        )),
        # N=32768 (where the composite would need ~28 GB) is left out of the full run: at ~80 s
        # per fused fwd+bwd on 2 cores it alone would take a quarter of an hour; the peak memory
        # of the case above already shows that no [N, V] tensor is held.
    ],
    quick=[Case("fused_linear_kd", 64, 1000, "fp32", params=(("temperature", 2.0), ("H", 64)), headline=True)],
    # V from 4k to 64k at N = 1024 (H = 1024): the GEMMs dominate, so 128k would double the
    # sweep's time on 2 cores for little more information.
    sweep=common.sweep(Case("fused_linear_kd", 1024, 32000, "fp32"), [(1024, 4096), (1024, 16384), (1024, 32000), (1024, 65536)]),
    # fastkd bench --quick on CPU: N = 256 (the eager composite takes ~10 s a call at 8192).
    cpu_quick_size=(256, 32000),
)


def linear_ce_composite(h_s, w_s, h_t, w_t, *, temperature: float, H: int = H) -> torch.Tensor:
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
