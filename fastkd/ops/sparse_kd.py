"""Knowledge distillation from a sparse teacher (top-k logits or log-probabilities), fused: the
``sparse_kd`` op family.

Everything about the op lives here or is named here:

- math and contract: ``sparse_kd_loss`` below, ``docs/design.md#sparse-kd``; the KD options
  (``KDOptions``, ``fastkd/ops/options.py``) are ``kd_loss``'s, without a divergence (KL only);
- reference (the oracle): ``sparse_kd_loss_reference``, plain PyTorch on the dense teacher;
- cpu kernel: ``csrc/cpu/sparse_kd_cpu.cpp`` (torch wrapper) and ``csrc/cpu/sparse_kd_kernel.h``
  (the row kernel, compiled for AVX-512, AVX2 and scalar);
- cuda kernel: ``csrc/cuda/sparse_kd_cuda.cu``; triton kernel: ``kernels/sparse_kd.py``;
- schema: ``csrc/ops.cpp`` (``fastkd::sparse_kd_forward``); fake kernels and autograd:
  ``fastkd/ops/fused_autograd.py``; dispatch: ``fastkd/ops/table.py``;
- tests: ``tests/test_sparse_kd*.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastkd import _ext
from fastkd.ops import _validate, fused_autograd, table
from fastkd.ops.options import KDOptions

VALUES = ("logits", "logprobs")
TAILS = ("renormalize", "uniform")
INDEX_DTYPES = (torch.int64, torch.int32)

# tail="uniform": how far a row's kept probability mass sum_k exp(value_k) may exceed 1 and still
# count as rounding (the excess is then treated as an empty tail). Rounding a log-probability v
# to its dtype moves it by at most u*|v| (u the unit roundoff), so exp(v) by a factor within
# exp(+-u*|v|): the row's mass moves by at most ~u * sum_k exp(v_k)*|v_k|, doubled for margin;
# KEPT_MASS_SLACK covers the float32 log-softmax that produced the values (its normaliser is
# off by a few ulps of |logsumexp|, ~1e-5 for logits up to ~100, and that shifts every value).
KEPT_MASS_SLACK = 1e-4
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# --------------------------------------------------------------------------------------------
# Reference: plain PyTorch on the dense [N, V] teacher, computed in float32 (float64 for float64
# input). Never clever.
# --------------------------------------------------------------------------------------------


def sparse_kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    values: str = "logits",
    tail: str = "renormalize",
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
) -> torch.Tensor:
    """The composite ``sparse_kd_loss`` is checked against; same arguments and semantics.

    It builds the teacher's dense log-probabilities ``[N, V]`` and takes the full KL. A row whose
    indices leave ``[0, V)`` or repeat (which the public function refuses on CPU) gets a NaN loss
    and gradient, as on the GPU backends.
    """
    check_teacher_format(values, tail)
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale)
    return _reference(student_logits, teacher_values, teacher_indices, options, values, tail, labels)


def _reference(student_logits, teacher_values, teacher_indices, options: KDOptions, values: str, tail: str, labels):
    vocab = student_logits.shape[-1]
    k = teacher_values.shape[-1]
    temperature = options.temperature
    compute = fused_autograd.loss_dtype(student_logits)
    s = student_logits.reshape(-1, vocab).to(compute)
    n = s.shape[0]
    v = teacher_values.detach().reshape(n, k).to(compute)
    idx = teacher_indices.reshape(n, k).long()
    if labels is None:
        valid = torch.ones(n, dtype=torch.bool, device=s.device)
    else:
        labels = labels.reshape(-1)
        valid = labels != options.ignore_index
    ordered = idx.sort(-1).values
    broken = ((idx < 0) | (idx >= vocab)).any(-1) | (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    bad = valid & broken
    keep = valid & ~broken
    # Ignored (and broken) rows get harmless stand-ins, so that nothing in them reaches the loss
    # or the gradient (softmax's backward would spread a NaN over the row); a broken row is then
    # made NaN, as a NaN input would.
    stand_in = torch.arange(k, device=idx.device).expand(n, k) % vocab
    idx = torch.where(keep.unsqueeze(-1), idx, stand_in)
    v = torch.where(keep.unsqueeze(-1), v, torch.zeros_like(v))
    s = torch.where(valid.unsqueeze(-1), s, torch.zeros_like(s))
    s = s + torch.where(bad, math.nan, 0.0).to(compute).unsqueeze(-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    if tail == "renormalize":
        dense = torch.full((n, vocab), -math.inf, dtype=compute, device=s.device).scatter(-1, idx, v)
        log_p = F.log_softmax(dense / temperature, dim=-1)
    else:
        # The missing mass spread evenly over the V - k entries not kept (none when k == V or
        # when the kept mass reaches 1), then the temperature over the whole row.
        tail_mass = (1 - v.exp().sum(-1)).clamp_min(0)
        fill = torch.log(tail_mass / (vocab - k)) if vocab > k else torch.full_like(tail_mass, -math.inf)
        dense = fill.unsqueeze(-1).expand(n, vocab).contiguous().scatter(-1, idx, v)
        log_p = F.log_softmax(dense / temperature, dim=-1)
    p = log_p.exp()
    # Where the teacher gives an entry no mass the term is 0, not 0 * inf; NaN stays NaN.
    kl = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1)
    return options.reference_loss(kl, s, labels, valid, student_logits.shape[:-1])


# --------------------------------------------------------------------------------------------
# The registered op (fastkd/ops/table.py) and the checks of the arguments
# --------------------------------------------------------------------------------------------


def _reference_from_op_args(student, values, indices, labels, values_kind, tail, temperature, hard_weight, ignore_index, reduction, t2_scale, compute_grad):
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale)
    return _reference(student, values, indices, options, values_kind, tail, labels)


SPARSE_KD_FORWARD = table.register_kernel("sparse_kd", "sparse_kd_forward", _reference_from_op_args, reduction_arg=9)
TRITON_ERROR = SPARSE_KD_FORWARD.triton_error
SPARSE_KD_LOSS = table.Op("sparse_kd_loss", "sparse_kd", SPARSE_KD_FORWARD, sparse_kd_loss_reference)


def check_teacher_format(values, tail) -> None:
    """``values`` and ``tail``, the sparse teacher's format (``nn.SparseKDLoss`` checks them at
    construction, with the ``KDOptions``)."""
    _validate.choice("values", values, VALUES)
    _validate.choice("tail", tail, TAILS)
    if tail == "uniform" and values != "logprobs":
        raise ValueError(
            "tail='uniform' needs values='logprobs': the missing mass 1 - sum(exp(values)) is only "
            f"defined for full-vocabulary log-probabilities, got values={values!r}"
        )


def _validate_tensors(student, values, indices, *, student_name="student_logits", vocab=None) -> None:
    """``vocab`` None: ``student`` is the logits; else the hidden states ``student_name`` of a head
    of ``vocab`` rows (``fused_linear_sparse_kd_loss``, which checks them itself)."""
    _validate.float_tensor(student_name, student)
    _validate.float_tensor("teacher_values", values)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be an int64 or int32 tensor, got {indices.dtype}")
    if indices.shape != values.shape:
        raise ValueError(f"teacher_indices shape {tuple(indices.shape)} must equal teacher_values shape {tuple(values.shape)}")
    if vocab is None:
        _validate.nonempty_rows(student)
        vocab = student.shape[-1]
    rows = student.shape[:-1]
    lead = values.shape[:-1]
    if lead != rows and lead != (math.prod(rows),):
        raise ValueError(
            f"teacher_values shape {tuple(values.shape)} must be {student_name}' leading shape {tuple(rows)} "
            "followed by k, the number of teacher entries per row"
        )
    k = values.shape[-1]
    if k == 0:
        raise ValueError("teacher_values has k = 0 entries per row; a sparse teacher needs k >= 1")
    if k > vocab:
        raise ValueError(f"teacher_indices has k = {k} entries per row but the vocabulary has V = {vocab}: a row's indices must be distinct")
    _validate.same_device("teacher_values", values, student_name, student)
    _validate.same_device("teacher_indices", indices, student_name, student)


def _row_problem_torch(values, indices, vocab, tail, labels, ignore_index):
    """``sparse_kd_check`` (csrc/cpu/sparse_kd_cpu.cpp) in torch ops, where the extension is
    missing: the first problem as (kind, row, column, value, slack), or None. It reports an index
    problem before a mass one, where the C++ check goes row by row; each finds one when there is
    one."""
    k = values.shape[-1]
    idx = indices.reshape(-1, k)
    valid = None if labels is None else (labels.reshape(-1) != ignore_index).unsqueeze(-1)
    outside = (idx < 0) | (idx >= vocab)
    if valid is not None:
        outside &= valid
    if bool(outside.any()):
        row, col = (int(x) for x in outside.nonzero()[0])
        return 0, row, col, int(idx[row, col]), 0.0
    if k > 1:
        ordered, order = idx.sort(-1)
        repeated = ordered[:, 1:] == ordered[:, :-1]
        if valid is not None:
            repeated &= valid
        if bool(repeated.any()):
            row, col = (int(x) for x in repeated.nonzero()[0])
            return 1, row, int(order[row, col + 1]), int(ordered[row, col]), 0.0
    if tail == "uniform":
        v = values.detach().reshape(-1, k).double()
        mass = v.exp().sum(-1)
        slack = KEPT_MASS_SLACK + 2 * UNIT_ROUNDOFF[values.dtype] * (v.exp() * v.abs()).nan_to_num(0.0).sum(-1)
        over = mass > 1 + slack  # NaN fails: a NaN value gives a NaN row, not an error
        if valid is not None:
            over &= valid.squeeze(-1)
        if bool(over.any()):
            row = int(over.nonzero()[0, 0])
            return 2, row, 0, float(mass[row]), float(slack[row])
    return None


def _row_problem(values, indices, vocab, tail, labels, ignore_index, use_extension=True):
    if use_extension and _ext.LOAD_ERROR is None:
        found = torch.ops.fastkd.sparse_kd_check(
            values.detach(), indices, vocab, labels, ignore_index, tail == "uniform", KEPT_MASS_SLACK, UNIT_ROUNDOFF[values.dtype]
        )
        return None if not found else (int(found[0]), int(found[1]), int(found[2]), found[3], found[4])
    return _row_problem_torch(values, indices, vocab, tail, labels, ignore_index)


def _validate_rows(student, values, indices, tail, labels, ignore_index, vocab=None) -> None:
    """On CPU, every valid row's indices in ``[0, V)`` and distinct and, for ``tail="uniform"``,
    its kept mass at most 1 up to rounding. Ignored rows are not checked (a padded position of a
    teacher cache may hold anything). One pass over ``[N, k]`` (``fastkd::sparse_kd_check``);
    skipped under torch.compile, as the labels' check is (a GPU check would need a host
    synchronisation: the kernels give such a row a NaN loss and gradient instead)."""
    if student.device.type != "cpu" or torch.compiler.is_compiling():
        return
    vocab = student.shape[-1] if vocab is None else vocab
    problem = _row_problem(values, indices, vocab, tail, labels, ignore_index)
    if problem is None:
        return
    kind, row, col, value, slack = problem
    if kind == 0:
        raise ValueError(f"teacher_indices holds {int(value)} in row {row}, outside [0, {vocab})")
    if kind == 1:
        raise ValueError(f"teacher_indices repeats {int(value)} in row {row}: each row's k indices must be distinct")
    raise ValueError(
        f"teacher_values row {row} keeps probability mass sum(exp(values)) = {value:.6g} > 1 "
        f"(beyond rounding, {slack:.2g}): with tail='uniform' the values must be "
        "log-probabilities over the full vocabulary"
    )


def _check_arguments(student, values, indices, options: KDOptions, tail, labels) -> None:
    """The tensors as the op takes them; every error names the argument and what was wrong."""
    _validate_tensors(student, values, indices)
    options.require_labels(labels)
    _validate.labels(labels, student, options.ignore_index)
    _validate_rows(student, values, indices, tail, labels, options.ignore_index)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    values: str = "logits",
    tail: str = "renormalize",
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Knowledge distillation from a teacher known only at k entries per row, fused.

    This is how offline teacher caches and served teachers deliver a teacher: the top-k logits,
    or the top-k log-probabilities a server returns, with their vocabulary indices. The student
    is normalised over the **full** vocabulary, :math:`q = \mathrm{softmax}(s/T)`; never over
    the k entries alone. The teacher :math:`p` is, by ``tail``:

    * ``"renormalize"`` (default): :math:`p = \mathrm{softmax}(v/T)` over the k kept entries, 0
      elsewhere. The values may be logits or log-probabilities (the same thing up to a constant).
    * ``"uniform"`` (needs ``values="logprobs"``: log-probabilities at temperature 1 over the
      full vocabulary): the teacher's full row is reconstructed as the given values at the k kept
      entries and :math:`\log\frac{1 - \sum_k e^{v_k}}{V - k}` at each of the other V − k (the
      missing mass spread evenly); then :math:`p \propto e^{\mathrm{lp}/T}` over the full row.
      The loss is the full :math:`\mathrm{KL}(p\,\|\,q)`, tail included. A kept mass of 1 (or
      k = V) leaves an empty tail, which carries no mass.

    Each row's loss is

    .. math::
        \ell = (1-\alpha)\, T^2\, \mathrm{KL}(p \,\|\, q) + \alpha\, \mathrm{CE}(s, y)

    exactly as :func:`fastkd.kd_loss` (CE at temperature 1, only with ``labels`` and
    ``hard_weight`` :math:`\alpha > 0`; ``t2_scale=False`` drops :math:`T^2`). The gradient
    w.r.t. the student covers the full vocabulary row,
    :math:`(1-\alpha)\,T\,(q - p) + \alpha\,(\mathrm{softmax}(s) - \mathrm{onehot}(y))`, with
    :math:`p` the tail's probability off the kept entries (0 for ``"renormalize"``). With
    ``k = V`` this is :func:`fastkd.kd_loss` against the full teacher, for both tails.

    Rows and ``batchmean`` as in :func:`fastkd.kd_loss`: leading dimensions flatten into N rows,
    and ``"batchmean"`` divides by the number of valid rows.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16, float16 or float64.
        teacher_values: ``[..., k]`` (the student's leading shape, or flat ``[N, k]``), any
            floating dtype, ``1 <= k <= V``: the teacher's values at the kept entries. A constant:
            no gradient flows into it. ``-inf`` is allowed (an entry with no teacher mass).
        teacher_indices: int64 or int32, shaped like ``teacher_values``: the vocabulary index of
            each value. A row's indices must be distinct and in ``[0, V)``; on CPU anything else
            is a ``ValueError``, on GPU (where checking would need a host synchronisation) such a
            row gets a NaN loss and a NaN gradient. Ignored rows are not checked.
        temperature: T, a real number in ``[1e-30, 1e30]``.
        values: ``"logits"`` (raw teacher logits) or ``"logprobs"`` (the teacher's
            log-probabilities at temperature 1 over the full vocabulary, as a server returns).
        tail: ``"renormalize"`` or ``"uniform"``, see above. With ``"uniform"``, a valid row whose
            kept mass :math:`\sum_k e^{v_k}` exceeds 1 by more than rounding is a ``ValueError``
            on CPU (the allowance is ``1e-4 + 2u\sum_k e^{v_k}|v_k|``, u the values' unit
            roundoff); a kept mass within it, or on GPU any excess, counts as 1: an empty tail.
        labels: optional int64 ``[...]`` or ``[N]``; rows whose label is ``ignore_index`` count in
            neither term and influence nothing (a NaN, or a bad index, in such a row is ignored).
        hard_weight: :math:`\alpha \in [0, 1]`, weight of the cross-entropy term; needs labels.
        ignore_index: any integral number; marks a row to skip.
        reduction: ``"batchmean"`` (sum over valid rows / their number; 0 when all are ignored),
            ``"sum"``, or ``"none"`` (per-row losses, shaped like the leading dims).
        t2_scale: multiply the soft term by :math:`T^2`.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: the
            ``FASTKD_BACKEND`` environment variable, else the fastest for the tensors' device.

    Returns:
        float32 loss (float64 for float64 input): a scalar, or the per-row losses for
        ``reduction="none"``. The gradient w.r.t. ``student_logits`` comes back in its dtype.
        A NaN in a valid row gives a NaN loss. A ``-inf`` student logit where the teacher puts
        mass (a kept entry with positive probability, or a tail of positive mass) gives ``+inf``.

    Backward: as :func:`fastkd.kd_loss` (the forward computes the gradient; backward scales it;
    a retained graph may be backpropagated again; ``create_graph=True`` differentiates the
    reference, so second derivatives are exact).

    Example (a teacher cache of top-64 log-probabilities)::

        values, indices = cache[batch]  # [B, L, 64] float, [B, L, 64] int32
        loss = fastkd.sparse_kd_loss(student_logits, values, indices, 2.0, values="logprobs",
                                     tail="uniform", labels=y, hard_weight=0.1)
    """
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale)
    check_teacher_format(values, tail)
    _check_arguments(student_logits, teacher_values, teacher_indices, options, tail, labels)
    run = SPARSE_KD_LOSS.dispatch(backend, student_logits, teacher_values, teacher_indices)
    if run is None:
        return _reference(student_logits, teacher_values, teacher_indices, options, values, tail, labels)

    vocab = student_logits.shape[-1]
    k = teacher_values.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    vals = teacher_values.detach().reshape(-1, k).contiguous()
    idx = teacher_indices.reshape(-1, k).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    loss, _ = run(student, vals, idx, flat_labels, values, tail, *options.op_args())
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
