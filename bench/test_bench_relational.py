"""Benchmark of the relational losses, ``fastkd.rkd_distance_loss``, ``rkd_angle_loss``,
``sp_loss`` and ``pkt_loss``, against the composites users write today (torchdistill's and
RepDistiller's), eager and under ``torch.compile``. The timed body is ``bench.runner.run_case``;
the suite, the providers and the report are described in ``bench/common.py``.

    python -m pytest bench/ --benchmark-only [--bench-quick] [--bench-cases=rkd_,sp-,pkt-]

The inputs are embeddings: ``Case.n`` is the batch B, ``Case.v`` the student's width D, and the
param ``Dt`` the teacher's width. The unit of memory and traffic is one student ``[B, D]``
tensor. The traffic bound counts reading both embeddings and writing the gradient; the GEMMs
(``B²·D`` and, for RKD angle, ``B³``) dominate a CPU's time, so % of bound says little here:
time and memory are the targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import Case
from .runner import run_case

BENCH_OPS = ("rkd_distance", "rkd_angle", "sp", "pkt")

SPEEDUP_COMPILE_2 = (("fastkd-cpu", "speedup_compile", ">=", 2.0, "≥ 2× faster than torch.compile"),)
MIB = 2**20


def embeddings(case: Case):
    """Student ``[B, D]`` and teacher ``[B, Dt]`` ~ N(0, 1) in the case's dtype."""
    dt = dict(case.params).get("Dt", case.v)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(case.n, case.v, generator=g).to(case.torch_dtype)
    t = torch.randn(case.n, dt, generator=g).to(case.torch_dtype)
    return s, t


# ----------------------------------------------------------------------------------------------
# Composites: torchdistill's RKDLoss (distance and angle terms), RepDistiller's Similarity (SP),
# torchdistill's / RepDistiller's PKT.
# ----------------------------------------------------------------------------------------------


def _pdist(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_distance_composite(student, teacher, *, Dt: int) -> torch.Tensor:
    """torchdistill's RKD distance term: pairwise distances over their mean over distinct pairs,
    smooth L1."""
    with torch.no_grad():
        t_d = _pdist(teacher, squared=False)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = _pdist(student, squared=False)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    return F.smooth_l1_loss(d, t_d, reduction="mean")


def rkd_angle_composite(student, teacher, *, Dt: int) -> torch.Tensor:
    """torchdistill's RKD angle term: ``[B, B, D]`` unit differences, ``[B, B, B]`` cosines by
    bmm, smooth L1."""
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle, reduction="mean")


def sp_composite(f_s, f_t, *, Dt: int) -> torch.Tensor:
    """RepDistiller's Similarity loss: L2-row-normalised Gram matrices, ‖G_t - G_s‖²_F / B²."""
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)
    G_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).sum() / (bsz * bsz)


def pkt_composite(output_net, target_net, *, Dt: int, eps: float = 1e-7) -> torch.Tensor:
    """torchdistill's / RepDistiller's PKT ``cosine_similarity_loss``: cosine kernels mapped to
    [0, 1], row-normalised to probabilities, the mean of the teacher-to-student KL terms."""
    output_net_norm = torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0
    target_net_norm = torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def _fused_for(op: str):
    def fused(s, t, *, backend: str, Dt: int) -> torch.Tensor:
        import fastkd

        return getattr(fastkd, f"{op}_loss")(s, t, backend=backend)

    fused.__name__ = f"{op}_fused"
    return fused


def _traffic(case: Case) -> dict:
    teacher = dict(case.params).get("Dt", case.v) / case.v
    return {"fwd": round(1 + teacher, 4), "bwd": 2, "fwdbwd": round(2 + teacher, 4)}


_NOTE = (
    "fwd: read the student [B, D] and the teacher [B, Dt] = 1 + Dt/D units; fwd+bwd: also write "
    "the gradient (+1); bwd alone: read the saved gradient and write it scaled = 2 units (unit: "
    "one [B, D] student tensor; the [B, B] intermediates and the GEMMs' compute are not counted)"
)

OPS = (
    ("rkd_distance", "rkd_distance_loss (RKD distance)", rkd_distance_composite,
     "torchdistill RKDLoss distance term: pdist (clamp 1e-12, sqrt, zero diagonal) / d[d > 0].mean(), "
     "teacher under no_grad; F.smooth_l1_loss(d_s, d_t)"),
    ("rkd_angle", "rkd_angle_loss (RKD angle)", rkd_angle_composite,
     "torchdistill RKDLoss angle term: F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2) [B, B, D], "
     "bmm with its transpose to [B, B, B] cosines; F.smooth_l1_loss(angle_s, angle_t)"),
    ("sp", "sp_loss (similarity-preserving)", sp_composite,
     "RepDistiller Similarity: G = F.normalize(f @ fᵀ); ((G_t - G_s)²).sum() / B²"),
    ("pkt", "pkt_loss (probabilistic knowledge transfer)", pkt_composite,
     "torchdistill/RepDistiller PKT: rows / (‖row‖ + eps), K = (f fᵀ + 1) / 2 row-normalised; "
     "mean(P_t · log((P_t + eps) / (P_s + eps))), eps = 1e-7"),
)

# Full-size cases: B = 256, D = Dt = 2048, except RKD angle, whose composite's [B, B, D] and
# [B, B, B] tensors take B = D = 512 to about 3.5 GB (the fused op stays O(B²)); at B = 2048 the
# composite would need tens of GB, so only fastkd runs there.
FULL = {
    "rkd_distance": [Case("rkd_distance", 256, 2048, "fp32", params=(("Dt", 2048),), headline=True, targets=SPEEDUP_COMPILE_2)],
    "sp": [Case("sp", 256, 2048, "fp32", params=(("Dt", 2048),), headline=True, targets=SPEEDUP_COMPILE_2)],
    "pkt": [Case("pkt", 256, 2048, "fp32", params=(("Dt", 2048),), headline=True, targets=SPEEDUP_COMPILE_2)],
    "rkd_angle": [
        Case("rkd_angle", 512, 512, "fp32", params=(("Dt", 512),), headline=True, targets=(
            ("fastkd-cpu", "speedup_eager", ">=", 10.0, "≥ 10× faster than eager"),
            ("fastkd-cpu", "peak_ratio_eager", ">=", 50.0, "≥ 50× less peak extra memory than the eager composite"),
        )),
        # 64 MiB expressed in units of one [B, D] float32 tensor (2048 * 512 * 4 bytes = 4 MiB): 16.
        Case("rkd_angle", 2048, 512, "fp32", params=(("Dt", 512),), only=("fastkd-cpu",), targets=(
            ("fastkd-cpu", "peak_units", "<=", 64 * MIB / (2048 * 512 * 4), "≤ 64 MiB of peak extra memory (16 × one B×D tensor)"),
        )),
    ],
}
QUICK = {
    "rkd_distance": [Case("rkd_distance", 33, 65, "fp32", params=(("Dt", 47),), headline=True, targets=SPEEDUP_COMPILE_2)],
    "sp": [Case("sp", 33, 65, "fp32", params=(("Dt", 47),), headline=True, targets=SPEEDUP_COMPILE_2)],
    "pkt": [Case("pkt", 33, 65, "fp32", params=(("Dt", 47),), headline=True, targets=SPEEDUP_COMPILE_2)],
    "rkd_angle": [Case("rkd_angle", 24, 37, "fp32", params=(("Dt", 29),), headline=True, targets=(
        ("fastkd-cpu", "speedup_eager", ">=", 10.0, "≥ 10× faster than eager"),
        ("fastkd-cpu", "peak_ratio_eager", ">=", 50.0, "≥ 50× less peak extra memory than the eager composite"),
    ))],
}

# The sweep: B from 64 to 2048 at the headline's D and Dt; RKD angle's composite stops at B = 512
# ([B, B, D] and [B, B, B] tensors), fastkd alone runs beyond.
SWEEP = {
    "rkd_distance": ([64, 256, 1024, 2048], None),
    "sp": ([64, 256, 1024, 2048], None),
    "pkt": ([64, 256, 1024, 2048], None),
    "rkd_angle": ([64, 128, 256, 512, 1024, 2048], 4),
}

for _name, _title, _composite, _text in OPS:
    _head = FULL[_name][0]
    _bs, _fused_only_from = SWEEP[_name]
    common.register(
        common.Op(
            name=_name,
            title=_title,
            composite=_composite,
            fused=_fused_for(_name),
            traffic=_traffic,
            traffic_note=_NOTE,
            composite_text=_text,
            inputs=embeddings,
        ),
        full=FULL[_name],
        quick=QUICK[_name],
        sweep=common.sweep(_head, [(b, _head.v) for b in _bs], fused_only_from=_fused_only_from),
        # fastkd bench --quick on CPU: RKD angle at B = 128 (its composite takes ~10 s a call at 512).
        cpu_quick_size=(128, 512) if _name == "rkd_angle" else None,
    )


def test_relational(benchmark, bench_item, budget):
    run_case(benchmark, bench_item, budget)
