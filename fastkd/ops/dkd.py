"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), fused: the ``dkd`` op family.

Everything about the op lives here or is named here:

- math and contract: ``dkd_loss`` below, and ``docs/design.md#dkd``;
- reference (the oracle): ``dkd_loss_reference``, plain PyTorch;
- cpu kernel: ``csrc/cpu/dkd_cpu.cpp`` (torch wrapper) and ``csrc/cpu/dkd_kernel.h`` (the row
  kernel, compiled for AVX-512, AVX2 and scalar; the gradient's derivation is written there);
- cuda kernel: ``csrc/cuda/dkd_cuda.cu``; triton kernel: ``kernels/dkd.py``;
- schema: ``csrc/ops.cpp`` (``fastkd::dkd_forward``); fake kernels and autograd:
  ``fastkd/ops/fused_autograd.py``; dispatch: ``fastkd/ops/table.py``;
- tests: ``tests/test_dkd.py`` (cpu grid, contract), ``tests/test_dkd_triton.py`` (interpreter),
  ``tests/test_dkd_gpu.py`` (GPU only); engine term: ``fastkd/engine/losses.py`` (``kind = "dkd"``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastkd.ops import _validate, fused_autograd, table
from fastkd.ops.options import reduce_rows


# --------------------------------------------------------------------------------------------
# Reference: plain PyTorch, computed in float32 (float64 for float64 input). Never clever.
# --------------------------------------------------------------------------------------------


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` elementwise, 0 where ``p == 0`` (not 0 * inf); NaN stays NaN."""
    p = log_p.exp()
    return torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))


def dkd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The composite ``dkd_loss`` is checked against; same arguments and semantics.

    mdistiller's formulation, written from its definition: the binary (target, rest)
    probabilities come from log-space quantities (``log p_y = a_y - lse(a)``, ``log(1 - p_y) =
    lse(a_rest) - lse(a)``), and the non-target softmax removes the target exactly (mdistiller
    subtracts 1000 from its logit instead).
    """
    vocab = student_logits.shape[-1]
    compute = fused_autograd.loss_dtype(student_logits)
    s = student_logits.reshape(-1, vocab).to(compute)
    t = teacher_logits.detach().reshape(-1, vocab).to(compute)
    y = labels.reshape(-1)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    use = valid & in_range
    # An ignored row must influence nothing: not even a NaN in it may reach the gradient.
    s = torch.where(use.unsqueeze(-1), s, torch.zeros_like(s))
    t = torch.where(use.unsqueeze(-1), t, torch.zeros_like(t))
    y_safe = torch.where(use, y, torch.zeros_like(y))
    target = F.one_hot(y_safe, vocab).bool()

    a = s / temperature
    b = t / temperature
    a_y = a.gather(-1, y_safe.unsqueeze(-1)).squeeze(-1)
    b_y = b.gather(-1, y_safe.unsqueeze(-1)).squeeze(-1)
    a_rest = a.masked_fill(target, -math.inf)
    b_rest = b.masked_fill(target, -math.inf)
    lse_a_rest = torch.logsumexp(a_rest, dim=-1)
    lse_b_rest = torch.logsumexp(b_rest, dim=-1)

    # NCKD: KL between the softmaxes over the non-target classes.
    log_q_rest = a_rest - lse_a_rest.unsqueeze(-1)
    log_p_rest = b_rest - lse_b_rest.unsqueeze(-1)
    nckd = _plogp_ratio(log_p_rest, log_q_rest).sum(-1)

    # TCKD: KL between [p_y, 1 - p_y] of teacher and student; the target's log-odds against the
    # rest is d = a_y - lse(a_rest), so log p_y = logsigmoid(d), log(1 - p_y) = logsigmoid(-d).
    d_s = a_y - lse_a_rest
    d_t = b_y - lse_b_rest
    tckd = _plogp_ratio(F.logsigmoid(d_t), F.logsigmoid(d_s)) + _plogp_ratio(F.logsigmoid(-d_t), F.logsigmoid(-d_s))

    # T * T one factor at a time, as the composite's `* temperature**2` on a float32 loss.
    rows = (alpha * tckd + beta * nckd) * temperature * temperature
    rows = torch.where(use, rows, torch.where(valid, torch.full_like(rows, math.nan), torch.zeros_like(rows)))
    return reduce_rows(rows, valid, reduction, student_logits.shape[:-1])


# --------------------------------------------------------------------------------------------
# The registered op (fastkd/ops/table.py) and the checks of the arguments
# --------------------------------------------------------------------------------------------


def _reference_from_op_args(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, compute_grad):
    return dkd_loss_reference(
        student, teacher, labels, temperature, alpha=alpha, beta=beta, ignore_index=ignore_index, reduction=reduction
    )


DKD_FORWARD = table.register_kernel("dkd", "dkd_forward", _reference_from_op_args, reduction_arg=7)
TRITON_ERROR = DKD_FORWARD.triton_error
DKD_LOSS = table.Op("dkd_loss", "dkd", DKD_FORWARD, dkd_loss_reference)


def _weight(name: str, x) -> float:
    value = _validate.real(name, x, lo=0.0)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return value


def validate_options(temperature, alpha, beta, ignore_index, reduction):
    """The non-tensor arguments, normalised (``nn.DKDLoss`` checks them at construction)."""
    temperature = _validate.temperature(temperature)
    alpha = _weight("alpha", alpha)
    beta = _weight("beta", beta)
    ignore_index = _validate.integer("ignore_index", ignore_index)
    _validate.reduction(reduction)
    return temperature, alpha, beta, ignore_index


def _check_arguments(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction):
    """The arguments as the op takes them; every error names the argument and what was wrong."""
    _validate.logits_pair(student, teacher)
    if student.shape[-1] < 2:
        raise ValueError(
            f"student_logits has {student.shape[-1]} class (last dimension); DKD needs at least 2: "
            "the target class and at least one non-target class"
        )
    options = validate_options(temperature, alpha, beta, ignore_index, reduction)
    _validate.labels(labels, student, options[3], required=True, why=" (DKD is defined by the target class of each row)")
    return options


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), loss and gradient in one pass.

    A drop-in for mdistiller's ``dkd_loss(logits_student, logits_teacher, target, alpha, beta,
    temperature)``: same value and gradient (mdistiller masks the target by subtracting 1000
    from its logit; here it is removed exactly). The teacher is a constant: no gradient flows
    into ``teacher_logits``.

    With :math:`y` the row's label, :math:`a = s/T`, :math:`b = t/T` (student, teacher) and
    :math:`p = \mathrm{softmax}(b)`, :math:`q = \mathrm{softmax}(a)`:

    * TCKD (target-class KD) is the KL divergence between the binary distributions
      :math:`[p_y, 1 - p_y]` and :math:`[q_y, 1 - q_y]`;
    * NCKD (non-target-class KD) is :math:`\mathrm{KL}(\hat p \,\|\, \hat q)` with
      :math:`\hat p, \hat q` the softmaxes over the non-target classes only
      (:math:`\hat p_j = p_j / (1 - p_y)`, :math:`j \ne y`);

    and each row's loss is

    .. math::
        \ell = T^2 \left(\alpha\, \mathrm{TCKD} + \beta\, \mathrm{NCKD}\right).

    The binary probabilities are formed in log space (:math:`\log q_y = a_y - \mathrm{lse}(a)`,
    :math:`\log(1-q_y) = \mathrm{lse}(a_{\ne y}) - \mathrm{lse}(a)`), so a row whose target
    dominates the others (or vanishes next to them) by any margin stays finite and accurate.
    The gradient w.r.t. the student's logits is, per row,

    .. math::
        \partial \ell / \partial s_y = T \alpha (q_y - p_y), \qquad
        \partial \ell / \partial s_j = T \left[\beta (\hat q_j - \hat p_j)
            + \alpha (p_y - q_y) \hat q_j\right] \quad (j \ne y);

    the fused backends compute it during the forward, and the backward only scales it by
    ``grad_output`` (a 16-bit gradient rounded once, as :func:`fastkd.kd_loss` says).

    Rows and ``batchmean``: leading dimensions flatten into N rows, and ``"batchmean"`` divides
    by the number of *valid* rows (labels not equal to ``ignore_index``). For 2-D logits without
    ignored rows that is mdistiller's division by the batch size.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16, float16 or float64, ``V >= 2``. Leading
            dimensions flatten into N rows.
        teacher_logits: same shape as ``student_logits``, any floating dtype. A constant.
        labels: int64 ``[...]`` (the leading shape) or ``[N]``: each row's target class, in
            ``[0, V)`` or equal to ``ignore_index``. Required: DKD is defined by the target.
        temperature: T, a real number in ``[1e-30, 1e30]``.
        alpha: weight of TCKD, a finite real ``>= 0`` (mdistiller: 1.0).
        beta: weight of NCKD, a finite real ``>= 0`` (mdistiller: 8.0 on CIFAR-100, 0.5 on
            ImageNet).
        ignore_index: any integral number; rows with this label count in nothing and influence
            nothing (a NaN in such a row leaves loss and gradient untouched).
        reduction: ``"batchmean"`` (sum over valid rows / number of valid rows; 0 when every row
            is ignored), ``"sum"``, or ``"none"`` (per-row losses, shaped like the leading dims).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: the
            ``FASTKD_BACKEND`` environment variable, else the fastest for the tensors' device.
            A backend asked for explicitly that cannot run this call raises ``RuntimeError``.

    Returns:
        float32 loss (float64 for float64 input): a scalar, or the per-row losses for
        ``reduction="none"``. The gradient w.r.t. ``student_logits`` comes back in its dtype.
        ``-inf`` logits (masked vocabulary) are allowed where teacher and student are both
        ``-inf`` (zero gradient there); a row whose non-target logits are all ``-inf`` has no
        NCKD and gives NaN. A NaN in a valid row gives a NaN loss. An out-of-range label raises
        ``ValueError`` on CPU and gives a NaN row on GPU.

    Backward, exactly as :func:`fastkd.kd_loss`: ``loss.backward()`` scales the gradient
    computed in the forward (a 16-bit gradient rounded once: the kernel runs again when
    ``grad_output`` is not 1); backpropagating again through a retained graph runs the kernel
    again; ``create_graph=True`` differentiates the reference, so second derivatives are exact.
    """
    temperature, alpha, beta, ignore_index = _check_arguments(
        student_logits, teacher_logits, labels, temperature, alpha, beta, ignore_index, reduction
    )
    run = DKD_LOSS.dispatch(backend, student_logits, teacher_logits)
    if run is None:
        return dkd_loss_reference(
            student_logits, teacher_logits, labels, temperature, alpha=alpha, beta=beta, ignore_index=ignore_index,
            reduction=reduction,
        )

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.detach().reshape(-1, vocab).contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    loss, _ = run(student, teacher, flat_labels, temperature, alpha, beta, ignore_index, reduction)
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
