"""Relational knowledge distillation, fused: the ``relational`` op family.

Four losses that match how a network arranges a batch rather than what it outputs per sample:
RKD distance and RKD angle (Park et al. 2019), similarity-preserving KD (Tung & Mori 2019) and
probabilistic knowledge transfer (Passalis & Tefas 2018). Each takes student embeddings
``[B, D]`` and teacher embeddings ``[B, Dt]`` (trailing dimensions flattened; the widths may
differ) and returns one scalar; only the student receives a gradient.

Everything about the family lives here or is named here:

- math and contract: the public functions below, and ``docs/design.md#relational``;
- references (the oracles): ``*_reference``, plain PyTorch, written as torchdistill writes them
  (deviations are listed in each docstring);
- cpu kernels: ``csrc/cpu/relational_cpu.cpp`` (torch wrapper: GEMMs through at::mm, the B²
  passes) and ``csrc/cpu/relational_kernel.h`` (the RKD-angle triplet loop, compiled for AVX-512,
  AVX2 and scalar);
- cuda kernels: ``csrc/cuda/relational_cuda.cu``; triton kernels: ``kernels/relational.py``;
- schemas: ``csrc/ops.cpp`` (``fastkd::rkd_distance_forward``, ``rkd_angle_forward``,
  ``sp_forward``, ``pkt_forward``); fake kernels and autograd: ``fastkd/ops/fused_autograd.py``;
  dispatch: ``fastkd/ops/table.py``;
- tests: ``tests/test_relational*.py``.

How the fused backends compute (all four backends share the reference's math; the fused ones
share this structure): the GEMMs go to the BLAS (``at::mm``/``torch.mm``, cuBLAS on GPU), the
fused kernels do everything between them, and the gradient comes back through one more GEMM:
``dE = M · E`` with a ``[B, B]`` matrix ``M`` built by the kernel (``M = dG + dGᵀ`` for a loss of
the Gram matrix ``G = E·Eᵀ``). Memory is O(B²) for every op, RKD angle included.

What the four public functions share:

Args:
    student: ``[B, ...]`` float32, bfloat16, float16 or float64; trailing dimensions flatten into
        the embedding (``[B, C, H, W]`` is ``B`` embeddings of size ``C·H·W``).
    teacher: ``[B, ...]`` any floating dtype, the same B (the same samples, in the same order) on
        the same device; its embedding size may differ from the student's. A constant: no
        gradient flows into it, even when it requires grad (fastkd says so once).
    backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: the
        ``FASTKD_BACKEND`` environment variable, else the fastest for the tensors' device.

Returns:
    A scalar loss, float32 (float64 for float64 input); computed in float32 for 16-bit input.
    The gradient w.r.t. ``student`` comes back in its dtype and shape. NaN anywhere in the input
    gives a NaN loss.

Backward: ``loss.backward()`` only scales the gradient the forward computed (for a 16-bit student
the op runs on a float32 copy, so the gradient is scaled in float32 and rounded to the student's
dtype once); repeated backward through a retained graph recomputes it; ``create_graph=True``
differentiates the reference composite, so second derivatives are exact (and cost what the
composite costs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastkd.ops import _validate, fused_autograd, table

# F.normalize's default: a vector shorter than this normalises to itself divided by it (a zero
# vector to zero). The RKD kernels follow it exactly, value and gradient.
NORMALIZE_EPS = 1e-12
# torchdistill's pdist clamps squared distances at this before the square root.
PDIST_EPS = 1e-12


def _flat(x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(compute)


# --------------------------------------------------------------------------------------------
# References: plain PyTorch, computed in float32 (float64 for float64 input). Never clever.
# --------------------------------------------------------------------------------------------


def _rkd_normalised_distances(e: torch.Tensor) -> torch.Tensor:
    b = e.shape[0]
    # Translating the batch changes no distance; centring first removes most of the cancellation
    # in |a|² + |b|² - 2 a·b (torchdistill computes the same on the uncentred embeddings).
    e = e - e.mean(0, keepdim=True)
    sq = (e * e).sum(1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())
    d = d2.clamp(min=PDIST_EPS).sqrt()
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=e.device)
    d = torch.where(off_diagonal, d, torch.zeros_like(d))
    # torchdistill divides by d[d > 0].mean(): after the clamp every off-diagonal distance is at
    # least 1e-6, so that is the mean over the B(B-1) off-diagonal entries (written without a
    # data-dependent shape, so that it traces).
    return d / (d.sum() / (b * (b - 1)))


def rkd_distance_loss_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The composite ``rkd_distance_loss`` is checked against; same arguments and semantics."""
    compute = fused_autograd.loss_dtype(student)
    s, t = _flat(student, compute), _flat(teacher.detach(), compute)
    return F.smooth_l1_loss(_rkd_normalised_distances(s), _rkd_normalised_distances(t))


def _normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``F.normalize(x, p=2, dim=dim, eps=1e-12)``: ``x / max(‖x‖, eps)``, with the same value and
    gradient, written as ``x / sqrt(max(‖x‖², eps²))`` so that its second derivative is finite at a
    zero vector too (``F.normalize``'s is NaN there, and every RKD-angle batch has zero differences,
    e_i − e_i, which would make double backward NaN)."""
    sq = (x * x).sum(dim, keepdim=True)
    return x / sq.clamp_min(NORMALIZE_EPS * NORMALIZE_EPS).sqrt()


def _rkd_angles(e: torch.Tensor) -> torch.Tensor:
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # [B, B, D]: diff[i, j] = e_j - e_i
    unit = _normalize(diff, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)  # [B³]: cos of the angle at e_i


def rkd_angle_loss_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The composite ``rkd_angle_loss`` is checked against: torchdistill's formulation, which
    builds ``[B, B, D]`` differences and ``[B, B, B]`` cosines (O(B²·D + B³) memory), with
    ``F.normalize`` written so that double backward is finite (see ``_normalize``)."""
    compute = fused_autograd.loss_dtype(student)
    s, t = _flat(student, compute), _flat(teacher.detach(), compute)
    return F.smooth_l1_loss(_rkd_angles(s), _rkd_angles(t))


def _sp_similarity(f: torch.Tensor) -> torch.Tensor:
    return _normalize(f @ f.t(), dim=1)


def sp_loss_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The composite ``sp_loss`` is checked against; same arguments and semantics."""
    compute = fused_autograd.loss_dtype(student)
    s, t = _flat(student, compute), _flat(teacher.detach(), compute)
    b = s.shape[0]
    return ((_sp_similarity(t) - _sp_similarity(s)) ** 2).sum() / (b * b)


def _pkt_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_loss_reference(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The composite ``pkt_loss`` is checked against; same arguments and semantics."""
    compute = fused_autograd.loss_dtype(student)
    s, t = _flat(student, compute), _flat(teacher.detach(), compute)
    p_s, p_t = _pkt_probabilities(s, eps), _pkt_probabilities(t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# --------------------------------------------------------------------------------------------
# The registered ops (fastkd/ops/table.py). Schemas (csrc/ops.cpp): <name>(Tensor student, Tensor
# teacher[, float eps], bool compute_grad) -> (Tensor loss, Tensor grad), student and teacher
# contiguous [B, D] and [B, Dt]; no grad_scale (a 16-bit student runs as a float32 copy, _run).
# --------------------------------------------------------------------------------------------


def _op(reference) -> table.Op:
    """The public loss ``<name>_loss`` of ``<name>_loss_reference`` and its kernel
    ``fastkd::<name>_forward`` (whose arguments are the reference's and ``compute_grad``)."""
    name = reference.__name__.removesuffix("_loss_reference")
    kernel = table.register_kernel("relational", f"{name}_forward", lambda *args: reference(*args[:-1]), reduction_arg=None,
                                   rescales=False)
    return table.Op(f"{name}_loss", "relational", kernel, reference)


RKD_DISTANCE_LOSS = _op(rkd_distance_loss_reference)
RKD_ANGLE_LOSS = _op(rkd_angle_loss_reference)
SP_LOSS = _op(sp_loss_reference)
PKT_LOSS = _op(pkt_loss_reference)


def validate_eps(eps) -> float:
    """PKT's ``eps``, normalised (``nn.PKTLoss`` checks it at construction)."""
    return _validate.real("eps", eps, lo=0.0, lo_open=True, hi=1.0)


def _check_tensors(student, teacher, min_batch: int) -> None:
    """Student ``[B, ...]`` and teacher ``[B, ...]`` float tensors on one device, the batch at
    least ``min_batch``; every error names the argument and what was wrong."""
    for name, x in (("student", student), ("teacher", teacher)):
        _validate.float_tensor(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions [B, D] (a batch of embeddings), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"empty batch: {name} of shape {tuple(x.shape)} has no rows")
        if x[0].numel() == 0:
            raise ValueError(f"{name} of shape {tuple(x.shape)} has no features (an embedding of size 0)")
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(
            f"teacher has batch size {teacher.shape[0]} but student has {student.shape[0]} "
            f"(shapes {tuple(teacher.shape)} and {tuple(student.shape)}); the rows must be the same samples"
        )
    _validate.same_device("teacher", teacher, "student", student)
    if student.shape[0] < min_batch:
        raise ValueError(
            f"student has batch size {student.shape[0]}: this relational loss needs at least {min_batch} "
            "samples (with one sample there is no pair to relate and the loss is undefined)"
        )


def _run(op: table.Op, student, teacher, extra: tuple, min_batch: int, backend: Optional[str]):
    _check_tensors(student, teacher, min_batch)
    run = op.dispatch(backend, student, teacher)
    if run is None:
        return op.reference(student, teacher, *extra)
    b = student.shape[0]
    s = student.reshape(b, -1)
    if s.dtype in fused_autograd.LOW_PRECISION:
        # The kernels compute in float32 either way; handed float32 (an exact copy), they keep the
        # gradient in float32 until the backward has scaled it by grad_output, and autograd's cast
        # back rounds it to the student's dtype once (fastkd/ops/fused_autograd.py). [B, D] is small.
        s = s.float()
    s = s.contiguous()
    t = teacher.detach().reshape(b, -1).contiguous()
    loss, _ = run(s, t, *extra)
    return loss


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------

def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    r"""RKD distance loss (Park et al. 2019, "Relational Knowledge Distillation"), fused.

    With :math:`d_{ij} = \sqrt{\max(\|e_i - e_j\|^2, 10^{-12})}` for :math:`i \ne j`, :math:`d_{ii}
    = 0`, and :math:`\mu` the mean of the :math:`B(B-1)` off-diagonal distances, the normalised
    distances are :math:`\psi_{ij} = d_{ij} / \mu` and

    .. math::
        L = \frac{1}{B^2} \sum_{i,j} \mathrm{smooth\_L1}_{\beta=1}(\psi^s_{ij} - \psi^t_{ij})

    (the zero diagonal counts in the mean). This is torchdistill's ``RKDLoss`` distance term
    (``dist_factor`` = 1, ``reduction="mean"``) exactly, including its clamp of squared
    distances at 1e-12, which makes duplicate rows sit at distance 1e-6 (and count in μ) and gives
    them zero gradient. Park et al. write μ as the mean over distinct pairs (the same set).

    Computation: squared distances come from the Gram matrix of the centred embeddings
    (:math:`\|a\|^2 + \|b\|^2 - 2 a\cdot b`, one GEMM each), and pairs whose Gram distance is
    within the GEMM's rounding error of zero are recomputed exactly from the rows, so duplicate
    rows give exactly 1e-6, as in exact arithmetic. The gradient is
    :math:`dE = 4(\mathrm{diag}(Z\mathbf{1}) - Z)\,E` with :math:`Z = \partial L/\partial(d^2)`:
    one more GEMM. Close pairs (:math:`d^2_{ij} < (\|e_i\|^2 + \|e_j\|^2)/16` on centred rows,
    where the Gram identity and the GEMM cancel) are computed from the rows: their squared
    distance, and their gradient term :math:`Z_{ij}(e_i - e_j)`, O(D) each (every fused backend).
    Needs B ≥ 2 (with one sample μ is 0/0).

    ``student``, ``teacher``, ``backend``, the result and the backward: as every relational loss
    (``fastkd.ops.relational``).
    """
    return _run(RKD_DISTANCE_LOSS, student, teacher, (), 2, backend)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    r"""RKD angle loss (Park et al. 2019), fused, in O(B²) memory.

    For every triplet :math:`(i, j, k)` (all :math:`B^3`, repeats included), the cosine of the
    angle at :math:`e_i`: :math:`\cos_{ijk} = \langle n(e_j - e_i), n(e_k - e_i)\rangle` with
    :math:`n(x) = x / \max(\|x\|, 10^{-12})` (``F.normalize``: a zero difference normalises to 0),
    and

    .. math::
        L = \frac{1}{B^3} \sum_{i,j,k} \mathrm{smooth\_L1}_{\beta=1}(\cos^s_{ijk} - \cos^t_{ijk})

    exactly torchdistill's (and RepDistiller's) ``RKDLoss`` angle term (``angle_factor`` = 1,
    ``reduction="mean"``). Those build ``[B, B, D]`` differences and ``[B, B, B]`` cosines (3.6 GB
    at B = D = 512); this computes every cosine from the squared distances,
    :math:`\langle e_j - e_i, e_k - e_i\rangle = (d^2_{ij} + d^2_{ik} - d^2_{jk}) / 2`, themselves
    from a float64 Gram matrix of the centred embeddings (one GEMM), and visits the B³ triplets in
    cache-sized tiles without storing them. The gradient flows back through a ``[B, B]`` matrix:
    :math:`dE = M\,E` (one GEMM); the derivation is at the top of ``csrc/cpu/relational_kernel.h``.

    Identical rows (a zero difference vector) give what ``F.normalize`` gives: a cosine of 0 and
    the gradient of ``x / 1e-12``, never NaN. Pairs that are exact duplicates are found exactly
    (the Gram distance of a pair within the GEMM's rounding error of zero is recomputed from the
    rows). Deviation: a difference vector that is not zero but shorter than 1e-12 (only possible
    with coordinates near 1e-12) gets cosine 0 instead of ``⟨x, y⟩ / (1e-12 ‖y‖)``; its gradient
    is the reference's. Precision: in float32, cosines from squared distances are accurate to a
    few ulps of the triangle's longest side over the product of the two sides at ``e_i``, and the
    gradient's GEMM loses as much where a difference is short next to the embeddings; the fused
    backends therefore run every vertex whose longest difference exceeds 4× its shortest
    (collinear or 1-D batches, near-duplicate rows) in float64, and are no worse than the float32
    composite there (the derivation: "Precision" atop ``csrc/cpu/relational_kernel.h``). On a GPU
    that costs a float64 pass over the thin vertices and the final GEMM in float64 (a batch without
    thin vertices pays only the latter), and up to ~2× the B×B working memory. Needs B ≥ 2.

    ``student``, ``teacher``, ``backend``, the result and the backward: as every relational loss
    (``fastkd.ops.relational``).
    """
    return _run(RKD_ANGLE_LOSS, student, teacher, (), 2, backend)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    r"""Similarity-preserving KD loss (Tung & Mori 2019), fused.

    With :math:`G = \mathrm{normalize\_rows}(F F^\top)` (each row divided by its L2 norm, or by
    1e-12 when the norm is smaller, as ``F.normalize``),

    .. math::
        L = \frac{1}{B^2} \| G^t - G^s \|_F^2

    as in the paper (Eq. 2-4, one layer pair). **torchdistill's ``SPKDLoss`` differs**: it calls
    ``normalize(z @ z.t(), 1)``, whose second positional argument is ``p``, so its rows are
    L1-normalised. This follows the paper's L2.

    Computation: one GEMM per Gram matrix, the row norms and the loss in one fused pass, and the
    gradient :math:`dF = (dG + dG^\top) F` through one more GEMM. A zero row of F gives a zero row
    of G (normalised to zero) and, as ``F.normalize``'s gradient, a row gradient scaled by 1e12.
    B = 1 is allowed (the loss is then 0).

    ``student``, ``teacher``, ``backend``, the result and the backward: as every relational loss
    (``fastkd.ops.relational``).
    """
    return _run(SP_LOSS, student, teacher, (), 1, backend)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, *, eps: float = 1e-7, backend: Optional[str] = None) -> torch.Tensor:
    r"""Probabilistic knowledge transfer loss (Passalis & Tefas 2018), fused.

    As torchdistill's ``PKTLoss``: rows are scaled by :math:`1/(\|f_i\| + \epsilon)`, the cosine
    kernel :math:`K = \hat F \hat F^\top` is mapped to :math:`[0, 1]` by :math:`(K + 1)/2`, each row
    is normalised to a probability distribution :math:`P_{ij} = K'_{ij} / \sum_m K'_{im}`, and

    .. math::
        L = \frac{1}{B^2} \sum_{i,j} P^t_{ij} \log\frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    (the mean over all :math:`B^2` entries of the teacher-to-student KL terms). Two deviations
    from torchdistill, both outside its finite-input behaviour: a NaN in the input gives a NaN loss
    here (torchdistill replaces NaN after normalisation by 0), and a zero row gets a finite
    gradient (torchdistill's ``sqrt(sum(x**2))`` has a NaN gradient there; this uses the norm's
    subgradient 0, as ``torch.linalg.vector_norm``).

    Computation: :math:`K_{ij} = G_{ij} / ((\sqrt{G_{ii}} + \epsilon)(\sqrt{G_{jj}} + \epsilon))`
    from one GEMM :math:`G = F F^\top` per network, the kernel, probabilities, loss and
    :math:`\partial L / \partial G` in fused passes, and :math:`dF = (dG + dG^\top) F`. ``eps`` in
    (0, 1]. B = 1 is allowed (the loss is then 0).

    ``student``, ``teacher``, ``backend``, the result and the backward: as every relational loss
    (``fastkd.ops.relational``).
    """
    eps = validate_eps(eps)
    return _run(PKT_LOSS, student, teacher, (eps,), 1, backend)
