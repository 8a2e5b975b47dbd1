"""Temperature knowledge distillation (Hinton et al. 2015), fused: the ``kd`` op family.

Everything about the op lives here or is named here:

- math and contract: ``kd_loss`` below, and ``../shared/DESIGN.md`` ("The op contract");
- reference (the oracle): ``kd_loss_reference``, plain PyTorch;
- cpu kernel: ``csrc/cpu/kd_cpu.cpp`` (torch wrapper) and ``csrc/cpu/kd_kernel.h`` (the row
  kernel, compiled for AVX-512, AVX2 and scalar);
- cuda kernel: ``csrc/cuda/kd_cuda.cu``; triton kernel: ``kernels/kd.py``;
- schema: ``csrc/ops.cpp`` (``fastkd::kd_forward``); fake kernels and autograd: here;
- tests: ``tests/test_kd.py``; benchmark: ``bench/test_bench_kd.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastkd import backends
from fastkd.ops import _fused
from fastkd.ops import _validate as _validate_args


# --------------------------------------------------------------------------------------------
# Reference: plain PyTorch, computed in float32 (float64 for float64 input). Never clever.
# --------------------------------------------------------------------------------------------


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
) -> torch.Tensor:
    """The composite ``kd_loss`` is checked against; same arguments and semantics."""
    vocab = student_logits.shape[-1]
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, vocab).to(compute)
    t = teacher_logits.detach().reshape(-1, vocab).to(compute)
    if labels is None:
        valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        labels = labels.reshape(-1)
        valid = labels != ignore_index
        # An ignored row must influence nothing: not even a NaN in it may reach the gradient
        # (softmax's backward would spread it over the row even where the loss is masked).
        s = torch.where(valid.unsqueeze(-1), s, torch.zeros_like(s))
        t = torch.where(valid.unsqueeze(-1), t, torch.zeros_like(t))
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    p = log_p.exp()
    # Where the teacher gives an entry no mass (a -inf logit) the term is 0, not 0 * inf; a NaN
    # probability fails the comparison and stays NaN.
    kl = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1)
    # T * T one factor at a time, as the composite `kl_div(...) * T * T` does: T² alone
    # overflows float32 from T ≈ 1.8e19, and inf * 0 would turn an exact 0 into NaN.
    rows = kl * temperature * temperature if t2_scale else kl
    rows = (1.0 - hard_weight) * rows
    if labels is not None and hard_weight > 0:
        rows = rows + hard_weight * F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="none")
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# Registered ops: fake kernels and autograd (shared by every fused loss, fastkd/ops/_fused.py),
# the Triton twin, the backends' checks.
# --------------------------------------------------------------------------------------------


def _reference_from_op_args(student, teacher, labels, divergence, temperature, hard_weight, ignore_index, reduction, t2_scale, compute_grad):
    return kd_loss_reference(
        student, teacher, temperature, labels=labels, hard_weight=hard_weight,
        ignore_index=ignore_index, reduction=reduction, t2_scale=t2_scale,
    )


OP = _fused.FusedLoss("kd_forward", _reference_from_op_args, reduction_arg=7)
_triton_kd, _triton_error = _fused.import_triton("fastkd.kernels.kd")
TRITON_ERROR = OP.register(_triton_kd and _triton_kd.kd_forward, _triton_error)
_CHECKS = backends.fused_checks("kd_forward", TRITON_ERROR)


def validate_options(temperature, hard_weight, ignore_index, reduction, t2_scale):
    """The non-tensor arguments, normalised (``nn.KDLoss`` checks them at construction)."""
    temperature = _validate_args.temperature(temperature)
    hard_weight = _validate_args.real("hard_weight", hard_weight, lo=0.0, hi=1.0)
    ignore_index = _validate_args.integer("ignore_index", ignore_index)
    _validate_args.reduction(reduction)
    _validate_args.boolean("t2_scale", t2_scale)
    return temperature, hard_weight, ignore_index


def _validate(student, teacher, temperature, labels, hard_weight, ignore_index, reduction, t2_scale):
    """The arguments as the op takes them; every error names the argument and what was wrong."""
    _validate_args.logits_pair(student, teacher)
    temperature, hard_weight, ignore_index = validate_options(temperature, hard_weight, ignore_index, reduction, t2_scale)
    if labels is None and hard_weight > 0:
        raise ValueError(f"hard_weight={hard_weight} > 0 needs labels (the hard term is cross-entropy with labels)")
    _validate_args.labels(labels, student, ignore_index)
    return temperature, hard_weight, ignore_index


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Hinton's temperature knowledge-distillation loss, loss and gradient in one fused pass.

    The teacher is a constant: no gradient flows into ``teacher_logits``, even when it requires
    grad (fastkd says so once on its logger). Only ``student_logits`` is differentiated.

    With :math:`p = \mathrm{softmax}(t/T)` (teacher) and :math:`q = \mathrm{softmax}(s/T)`
    (student), each row's loss is

    .. math::
        \ell = (1-\alpha)\, T^2\, \mathrm{KL}(p \,\|\, q) + \alpha\, \mathrm{CE}(s, y)

    where the cross-entropy is taken at temperature 1 and only when ``labels`` are given and
    ``hard_weight`` :math:`\alpha > 0`. The :math:`T^2` factor (which keeps the soft gradient's
    magnitude independent of T) is dropped with ``t2_scale=False``. The gradient w.r.t. the
    student is :math:`(1-\alpha)\,T\,(q - p) + \alpha\,(\mathrm{softmax}(s) - \mathrm{onehot}(y))`
    per row; the fused backends compute it during the forward, and the backward only scales it
    by ``grad_output``.

    Rows and ``batchmean``: leading dimensions flatten into N rows, and ``"batchmean"`` divides
    by the number of *valid rows* (all N without labels). For ``[B, T, V]`` logits that is B·T,
    not B: ``F.kl_div(..., reduction="batchmean")`` on the 3-D tensors divides by B only. The
    composite is equivalent on ``logits.view(-1, V)``; for the per-sequence convention use
    ``kd_loss(..., reduction="sum") / B``.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16, float16 or float64. Leading dimensions
            flatten into N rows (e.g. ``[B, T, V]`` for a language model).
        teacher_logits: same shape as ``student_logits``, any floating dtype. A constant.
        temperature: T, a real number in ``[1e-30, 1e30]`` (outside it, T² or 1/T would leave
            float32's range; the scale factors are formed in double precision inside it).
        labels: optional int64 ``[...]`` (the leading shape) or ``[N]``. Rows whose label equals
            ``ignore_index`` count in neither the soft nor the hard term and influence nothing
            (a NaN in such a row leaves loss and gradient untouched).
        hard_weight: :math:`\alpha \in [0, 1]`, weight of the cross-entropy term; needs labels.
        ignore_index: any integral number (``int``, NumPy integer); marks a row to skip.
        reduction: ``"batchmean"`` (sum over valid rows / number of valid rows; 0 when every row
            is ignored), ``"sum"``, or ``"none"`` (per-row losses, shaped like the leading dims).
        t2_scale: multiply the soft term by :math:`T^2`.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: the
            ``FASTKD_BACKEND`` environment variable, else the fastest for the tensors' device.
            A backend asked for explicitly that cannot run this call raises ``RuntimeError``.

    Returns:
        float32 loss (float64 for float64 input): a scalar, or the per-row losses for
        ``reduction="none"``. The gradient w.r.t. ``student_logits`` comes back in its dtype.
        ``-inf`` logits (masked vocabulary) are allowed and get zero gradient where teacher and
        student are both ``-inf``; a NaN in a valid row gives a NaN loss. An out-of-range label
        raises on CPU and gives a NaN row on GPU.

    Backward, exactly:
        * ``loss.backward()`` scales the gradient computed in the forward; nothing is recomputed.
        * Backpropagating again through a retained graph (``retain_graph=True``) is correct: the
          first backward hands its buffer to autograd, so later ones run the kernel again.
        * ``create_graph=True`` (gradient penalties, meta-learning) differentiates a composite
          formula of the same loss, so second derivatives are exact on every backend
          (``torch.autograd.gradgradcheck`` passes); that backward costs what the composite costs.
    """
    temperature, hard_weight, ignore_index = _validate(
        student_logits, teacher_logits, temperature, labels, hard_weight, ignore_index, reduction, t2_scale
    )
    _fused.note_constant_teacher("kd_loss", (teacher_logits,))
    name = backends.choose("kd_loss", _CHECKS, student_logits.device, backend, student_logits, teacher_logits)
    kwargs = dict(labels=labels, hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction, t2_scale=t2_scale)
    if name == "reference":
        return kd_loss_reference(student_logits, teacher_logits, temperature, **kwargs)

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.detach().reshape(-1, vocab).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    op = torch.ops.fastkd.kd_forward_triton if name == "triton" else torch.ops.fastkd.kd_forward
    loss, _ = op(student, teacher, flat_labels, "kl", temperature, hard_weight, ignore_index, reduction, t2_scale, compute_grad)
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
