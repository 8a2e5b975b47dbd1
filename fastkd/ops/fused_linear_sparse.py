"""Fused linear sparse KD: ``sparse_kd_loss`` through the student's output layer, for a teacher
read from a cache of its top-k entries, without ever holding the student's ``[N, V]`` logits.

Everything about the op lives here or is named here:

- math and contract: ``fused_linear_sparse_kd_loss`` below, ``docs/design.md#sparse-kd`` (the
  per-row math and the teacher's ``values``/``tail``, ``fastkd/ops/sparse_kd.py``) and
  ``docs/design.md#fused-linear`` (the chunk loop, the GEMMs, the soft-cap);
- reference (the oracle): ``fused_linear_sparse_kd_loss_reference``, the composite: the student's
  logits materialised, then ``sparse_kd_loss_reference``;
- the chunk loop: ``fused_linear.chunk_loop`` with the ``sparse_kd`` family's kernel per chunk
  (``csrc/cpu/sparse_kd_kernel.h``, ``kernels/sparse_kd.py``, ``csrc/cuda/sparse_kd_cuda.cu``);
- op: ``fastkd::fused_linear_sparse_kd_forward``, a Python custom op whose fake kernel and
  autograd are ``fused_linear.register_fused_head``'s; its backend is chosen as
  ``sparse_kd_loss``'s (``fastkd/ops/table.py``);
- tests: ``tests/test_fused_linear_sparse.py`` and the conformance suite (``tests/op_specs.py``).

Per chunk of rows ``c``: the student's logits ``cap_s(h[c] @ Wᵀ + b)`` in a float32 ``[chunk,
V]`` buffer (its log-sum-exp needs the whole row), the sparse kernel's loss and logit gradient
against the chunk's k cached entries, then the gradient GEMMs. Memory: two ``[chunk, V]`` float32
buffers and the float32 weight gradient; no teacher head, no ``[N, V]`` tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastkd.ops import _validate, fused_autograd, table
from fastkd.ops import sparse_kd as _sparse
from fastkd.ops.fused_linear import (
    Head, Rows, check_chunk_size, check_linear, check_softcap, chunk_loop, composite_logits, register_fused_head,
)
from fastkd.ops.options import KDOptions


def fused_linear_sparse_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    student_bias: Optional[torch.Tensor] = None,
    student_softcap: Optional[float] = None,
    values: str = "logits",
    tail: str = "renormalize",
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    **_unused,
) -> torch.Tensor:
    """``sparse_kd_loss_reference`` of the student head's (soft-capped) logits, computed in
    float32 (float64 for float64 input): the composite the fused op is checked against."""
    _sparse.check_teacher_format(values, tail)
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale)
    cap = check_softcap("student_softcap", student_softcap)
    return _reference(student_hidden, student_weight, student_bias, teacher_values, teacher_indices, labels, options, values, tail, cap)


def _reference(h, w, b, teacher_values, teacher_indices, labels, options: KDOptions, values: str, tail: str, softcap):
    z = composite_logits(h, w, b, softcap, fused_autograd.loss_dtype(h))
    return _sparse._reference(z, teacher_values, teacher_indices, options, values, tail, labels)


def _chunked_forward(h_s, w_s, b_s, teacher_values, teacher_indices, labels, values, tail, temperature, hard_weight, ignore_index,
                     reduction, t2_scale, student_softcap, chunk_size, kernel, compute_grad, row_weights=None):
    """The chunk loop with the sparse kernel of ``kernel`` on each chunk's cached entries."""
    per_row = reduction == "none"
    op = _sparse.SPARSE_KD_FORWARD.op(kernel)

    def chunk_loss(student_logits, rows):
        y = None if labels is None else labels[rows]
        return op(student_logits, teacher_values[rows], teacher_indices[rows], y, values, tail, temperature, hard_weight,
                  ignore_index, "none" if per_row else "sum", t2_scale, compute_grad)

    return chunk_loop(Head(h_s, w_s, b_s, student_softcap), chunk_loss, chunk_size, compute_grad, per_row, row_weights)


@torch.library.custom_op("fastkd::fused_linear_sparse_kd_forward", mutates_args=())
def _fused_linear_sparse_kd_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    labels: Optional[torch.Tensor],
    values: str,
    tail: str,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    t2_scale: bool,
    student_softcap: float,
    chunk_size: int,
    kernel: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``fastkd::fused_linear_kd_forward``, with the cached teacher's ``[N, k]`` values and
    indices for the teacher head: (loss, d hidden, d weight, d bias) of Σ-rows loss, the
    gradients float32 (float64) and empty without ``compute_grad`` or for ``reduction="none"``."""
    grads = compute_grad and reduction != "none"
    return _chunked_forward(student_hidden, student_weight, student_bias, teacher_values, teacher_indices, labels, values, tail,
                            temperature, hard_weight, ignore_index, reduction, t2_scale, student_softcap, chunk_size, kernel, grads)


def _composite(h_s, w_s, b_s, teacher_values, teacher_indices, labels, values, tail, temperature, hard_weight, ignore_index,
               reduction, t2_scale, student_softcap, chunk_size, kernel):
    options = KDOptions(temperature, hard_weight, ignore_index, "none" if reduction == "none" else "sum", t2_scale)
    return _reference(h_s, w_s, b_s, teacher_values, teacher_indices, labels, options, values, tail, student_softcap)


register_fused_head(_fused_linear_sparse_kd_forward, 6, 11, _chunked_forward, _composite)

# The public op; each chunk runs sparse_kd_loss's kernel, on the backend chosen as for sparse_kd_loss.
FUSED_LINEAR_SPARSE_KD_LOSS = table.Op("fused_linear_sparse_kd_loss", "fused_linear_sparse", _sparse.SPARSE_KD_FORWARD,
                                       fused_linear_sparse_kd_loss_reference)


def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    student_bias: Optional[torch.Tensor] = None,
    student_softcap: Optional[float] = None,
    values: str = "logits",
    tail: str = "renormalize",
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""``sparse_kd_loss`` through the student's output layer, without materialising its
    ``[N, V]`` logits: the fused head for a teacher read from a top-k cache.

    The loss equals ``sparse_kd_loss(student_hidden @ student_weight.T + student_bias,
    teacher_values, teacher_indices, temperature, ...)`` with every ``sparse_kd_loss`` argument
    meaning the same (``values``, ``tail``, the KD options; the divergence is KL); with
    ``student_softcap`` the logits z become ``cap · tanh(z / cap)`` first. Rows run in chunks as
    in ``fused_linear_kd_loss``: per chunk the student's logits are a float32 ``[chunk, V]``
    buffer (torch's GEMM, float32 accumulation and result also for 16-bit inputs), the sparse
    kernel computes the chunk's loss and logit gradient in one pass, and the gradients w.r.t.
    the hidden states, weight and bias accumulate in float32, rounded once to the inputs'
    dtypes in the backward. The teacher is a constant.

    Args:
        student_hidden: ``[..., H]`` hidden states entering the student's output layer.
        student_weight: ``[V, H]`` (``lm_head.weight``).
        teacher_values, teacher_indices: ``[..., k]`` (the hidden states' leading shape, or flat
            ``[N, k]``), as ``sparse_kd_loss`` takes them; a row's indices must be distinct and
            in ``[0, V)`` (checked on CPU; on GPU such a row gets a NaN loss and gradient).
        temperature, values, tail, labels, hard_weight, ignore_index, reduction, t2_scale: as
            ``sparse_kd_loss``.
        student_bias: optional ``[V]``.
        student_softcap: optional logit soft-cap (a finite number > 0), Gemma 2/3's
            ``final_logit_softcapping``; None: not capped.
        chunk_size: rows per chunk; None: as ``fused_linear_kd_loss`` chooses it.
        backend: ``"reference"`` (the materialised composite), ``"cpu"``, ``"triton"`` or
            ``"cuda"`` (the per-chunk kernel); default as ``sparse_kd_loss``.

    Returns:
        The loss as ``sparse_kd_loss`` returns it (float32; float64 for float64 input).

    Example (a teacher cache of top-64 log-probabilities)::

        values, indices = cache[batch]  # [B, L, 64] float, [B, L, 64] int32
        loss = fastkd.fused_linear_sparse_kd_loss(hidden, model.lm_head.weight, values, indices, 2.0,
                                                  values="logprobs", tail="uniform", labels=y)
    """
    _sparse.check_teacher_format(values, tail)
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale)
    cap = check_softcap("student_softcap", student_softcap)
    check_linear("student", student_hidden, student_weight, student_bias)
    vocab = student_weight.shape[0]
    _sparse._validate_tensors(student_hidden, teacher_values, teacher_indices, student_name="student_hidden", vocab=vocab)
    options.require_labels(labels)
    _validate.labels(labels, student_hidden, options.ignore_index, student_name="student_hidden", vocab=vocab)
    _sparse._validate_rows(student_hidden, teacher_values, teacher_indices, tail, labels, options.ignore_index, vocab=vocab)
    chunk_size = check_chunk_size(chunk_size)
    name = FUSED_LINEAR_SPARSE_KD_LOSS.choose(backend, student_hidden, teacher_values, teacher_indices)
    if name == "reference":
        return _reference(student_hidden, student_weight, student_bias, teacher_values.detach(), teacher_indices, labels, options,
                          values, tail, cap)
    rows = Rows.of(student_hidden, student_weight, student_bias, labels, chunk_size)
    n, k = rows.hidden.shape[0], teacher_values.shape[-1]
    loss, *_ = _fused_linear_sparse_kd_forward(
        rows.hidden, student_weight, student_bias, teacher_values.detach().reshape(n, k).contiguous(),
        teacher_indices.reshape(n, k).contiguous(), rows.labels, values, tail, *options.op_args(), cap or 0.0, rows.chunk_size,
        name, rows.wants,
    )
    return rows.reduce(loss, options)
