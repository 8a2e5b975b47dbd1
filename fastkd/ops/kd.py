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

import math
import os
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils import _python_dispatch

from fastkd import _ext, backends

REDUCTIONS = ("none", "sum", "batchmean")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    p = log_p.exp()
    # Where the teacher gives an entry no mass (a -inf logit) the term is 0, not 0 * inf; a NaN
    # probability fails the comparison and stays NaN.
    kl = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1)
    rows = (1.0 - hard_weight) * (temperature**2 if t2_scale else 1.0) * kl
    if labels is None:
        valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        labels = labels.reshape(-1)
        valid = labels != ignore_index
        if hard_weight > 0:
            ce = F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="none")
            rows = rows + hard_weight * ce
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# Registered ops: fake kernels, the Triton op, autograd.
# --------------------------------------------------------------------------------------------


def _kd_forward_fake(student, teacher, labels, divergence, temperature, hard_weight, ignore_index, reduction, t2_scale, compute_grad):
    loss_shape = (student.shape[0],) if reduction == "none" else ()
    loss = student.new_empty(loss_shape, dtype=torch.float64 if student.dtype == torch.float64 else torch.float32)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    return loss, grad


def _plain_eager(*tensors) -> bool:
    """True outside any tracing (dynamo, AOT autograd, fake or functional tensors): only then may
    the backward read values or mutate the saved gradient."""
    return (
        not torch.compiler.is_compiling()
        and _python_dispatch._get_current_dispatch_mode() is None
        and all(type(t) is torch.Tensor for t in tensors)
    )


def _kd_setup_context(ctx, inputs, output):
    ctx.per_row = inputs[7] == "none"
    ctx.save_for_backward(output[1])
    # The second output (the gradient itself) is never differentiated; without this, autograd
    # would hand the backward an [N, V] tensor of zeros for it on every call.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _kd_backward(ctx, grad_loss, _grad_of_grad_output):
    # The forward already computed d loss / d student (reduction scale included); the chain
    # rule only multiplies by grad_output. In place, so that backward allocates no second
    # [N, V] tensor; after such a scale, a second backward through the same graph is refused by
    # autograd's saved-tensor version check rather than silently scaling twice.
    if grad_loss is None:  # nothing flowed back into the loss
        return (None,) * 10
    (grad,) = ctx.saved_tensors
    scale = grad_loss.unsqueeze(-1) if ctx.per_row else grad_loss
    if not _plain_eager(grad, grad_loss):
        grad_student = grad * scale
    elif not ctx.per_row and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
        # The common `loss.backward()`: nothing to scale. Reading a CPU scalar is no device
        # synchronisation, and it saves a read and write of the whole [N, V] gradient.
        grad_student = grad
    else:
        grad_student = grad.mul_(scale)
    return grad_student, None, None, None, None, None, None, None, None, None


def _register_triton_op():
    """Register ``fastkd::kd_forward_triton``; returns the reason when Triton is unavailable."""
    try:
        from fastkd.kernels import kd as triton_kd
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"Triton is not available ({type(exc).__name__}: {exc})"
    op = torch.library.triton_op("fastkd::kd_forward_triton", mutates_args=())(triton_kd.kd_forward)
    # triton_op would trace the launcher itself on fake tensors, which fails under the
    # interpreter (it then runs the kernel on them); the shapes are known without it.
    op.register_fake(_kd_forward_fake)
    op.register_autograd(_kd_backward, setup_context=_kd_setup_context)
    return None


if _ext.LOAD_ERROR is None:
    torch.library.register_fake("fastkd::kd_forward")(_kd_forward_fake)
    torch.library.register_autograd("fastkd::kd_forward", _kd_backward, setup_context=_kd_setup_context)
TRITON_ERROR = _register_triton_op()


# --------------------------------------------------------------------------------------------
# Backends: can each run this call, and if not, why.
# --------------------------------------------------------------------------------------------


def _check_reference(student, teacher):
    return None


def _check_cpu(student, teacher):
    if student.device.type != "cpu":
        return f"it runs on CPU tensors, got a {student.device.type} tensor"
    if _ext.LOAD_ERROR is not None:
        return _ext.LOAD_ERROR
    return None


def _check_cuda(student, teacher):
    if student.device.type != "cuda":
        return f"it runs on CUDA tensors, got a {student.device.type} tensor"
    if _ext.LOAD_ERROR is not None:
        return _ext.LOAD_ERROR
    if not _ext.has_kernel("kd_forward", "CUDA"):
        return "the extension was built without CUDA (nvcc missing, or FASTKD_NO_CUDA=1)"
    return None


def _check_triton(student, teacher):
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if torch.float64 in (student.dtype, teacher.dtype):
        return "its kernel computes in float32; float64 input runs on the cuda, cpu or reference backend"
    if student.device.type == "cuda":
        return None
    if student.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"it runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got a {student.device.type} tensor"


_CHECKS = {"reference": _check_reference, "cpu": _check_cpu, "cuda": _check_cuda, "triton": _check_triton}


# --------------------------------------------------------------------------------------------
# Argument validation: every error names the argument and what was wrong.
# --------------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _validate(student, teacher, temperature, labels, hard_weight, ignore_index, reduction, t2_scale):
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
    if teacher.shape != student.shape:
        if teacher.dim() >= 1 and teacher.shape[-1] != student.shape[-1]:
            raise ValueError(
                f"teacher_logits has vocabulary size {teacher.shape[-1]} but student_logits has "
                f"{student.shape[-1]} (shapes {tuple(teacher.shape)} and {tuple(student.shape)})"
            )
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} must equal student_logits shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (last dimension is 0)")
    if student.numel() == 0:
        raise ValueError(f"empty batch: student_logits of shape {tuple(student.shape)} has no rows")
    if not _is_number(temperature):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not _is_number(hard_weight):
        raise TypeError(f"hard_weight must be a real number, got {type(hard_weight).__name__}")
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
    if labels is None:
        if hard_weight > 0:
            raise ValueError(f"hard_weight={hard_weight} > 0 needs labels (the hard term is cross-entropy with labels)")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor, got {labels.dtype}")
    rows = student.shape[:-1]
    if labels.shape != rows and labels.shape != (student.numel() // student.shape[-1],):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal student_logits' leading shape {tuple(rows)}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {student.device}")
    # A range check needs the labels' values: free on the CPU, a host sync on a GPU (the
    # kernels turn an out-of-range label into a NaN loss instead of a plausible number).
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= student.shape[-1]))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"labels holds {value}, outside [0, {student.shape[-1]}) and not ignore_index={ignore_index}"
            )


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

    Args:
        student_logits: ``[..., V]`` float32, bfloat16, float16 or float64. Leading dimensions
            flatten into N rows (e.g. ``[B, T, V]`` for a language model).
        teacher_logits: same shape as ``student_logits``, any floating dtype. Treated as a
            constant: no gradient flows into it.
        temperature: T > 0, applied to both distributions.
        labels: optional int64 ``[...]`` (the leading shape) or ``[N]``. Rows whose label equals
            ``ignore_index`` count in neither the soft nor the hard term.
        hard_weight: :math:`\alpha \in [0, 1]`, weight of the cross-entropy term; needs labels.
        ignore_index: label value that marks a row to skip.
        reduction: ``"batchmean"`` (sum over valid rows / number of valid rows; 0 when every row
            is ignored), ``"sum"``, or ``"none"`` (per-row losses, shaped like the leading dims).
        t2_scale: multiply the soft term by :math:`T^2`.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: the
            ``FASTKD_BACKEND`` environment variable, else the fastest for the tensors' device.
            A backend asked for explicitly that cannot run this call raises ``RuntimeError``.

    Returns:
        float32 loss (float64 for float64 input): a scalar, or the per-row losses for ``reduction="none"``. The gradient
        w.r.t. ``student_logits`` comes back in its dtype. ``-inf`` logits (masked vocabulary)
        are allowed and get zero gradient where teacher and student are both ``-inf``; a NaN in
        a row gives a NaN loss. An out-of-range label raises on CPU and gives a NaN row on GPU.

    Note:
        The fused backward scales the saved gradient in place, so backpropagating twice through
        the same loss (``retain_graph=True``) raises an error; compute the loss again instead.
    """
    _validate(student_logits, teacher_logits, temperature, labels, hard_weight, ignore_index, reduction, t2_scale)
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
    loss, _ = op(
        student, teacher, flat_labels, "kl", float(temperature), float(hard_weight), ignore_index, reduction, t2_scale, compute_grad
    )
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
