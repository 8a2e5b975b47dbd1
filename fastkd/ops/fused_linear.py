"""Fused linear KD: distil through the output layer without ever holding the ``[N, V]`` logits.

Everything about the op lives here or is named here:

- math and contract: ``fused_linear_kd_loss`` below; it equals ``kd_loss`` of the two heads'
  logits, so the per-row math is ``kd_loss``'s (``fastkd/ops/kd.py``, ``../shared/DESIGN.md``);
- reference (the oracle): ``fused_linear_kd_loss_reference``, the materialised composite;
- the chunk loop (shared by the cpu, triton and cuda backends): ``_chunked_forward`` here; the
  per-chunk loss-and-gradient kernel is the ``kd`` family's (``csrc/cpu/kd_kernel.h``,
  ``kernels/kd.py``, ``csrc/cuda/kd_cuda.cu``); the GEMMs are torch's (MKL/oneDNN, cuBLAS);
- op: ``fastkd::fused_linear_kd_forward``, a Python custom op (fake and autograd here);
- tests: ``tests/test_fused_linear.py``; benchmark: ``bench/test_bench_fused_linear.py``.

Per chunk of rows ``c`` (memory: three ``[chunk, V]`` float32 buffers, never ``[N, V]``)::

    ls = h_s[c] @ W_sᵀ + b_s        lt = h_t[c] @ W_tᵀ + b_t          (float32 accumulation)
    loss_c, g = kd kernel(ls, lt)    g = d loss_c / d ls, one pass      (read 2·c·V, write c·V)
    dh_s[c] = g @ W_s    dW_s += gᵀ @ h_s[c]    db_s += Σ_rows g         (float32 accumulation)

Four GEMMs, as the materialised composite does; what is saved is every ``[N, V]`` tensor.

The op returns dh_s, dW_s, db_s in float32 (float64 for float64 input) whatever the inputs'
dtype: the backward scales them by grad_output (which carries batchmean's 1/valid-rows) and only
then casts them to the inputs' dtypes, so a 16-bit gradient is rounded once
(``fastkd/ops/_fused.py``). They are held from forward to backward in float32: 2 bytes per entry
more than in 16 bits, i.e. 2·(N + V)·H bytes (V = 128256, H = 4096, N = 8192: 1.1 GB, nearly all
of it dW_s), below the forward's own peak (float32 copies of both heads' weights and dW_s).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastkd import backends
from fastkd.ops import _fused
from fastkd.ops import _validate as _validate_args
from fastkd.ops import kd as _kd

# chunk_size=None: the chunk's three float32 [chunk, V] buffers (student logits, teacher logits,
# gradient) fit in this many bytes; at least one row. 256 MiB keeps the GEMMs large enough to run
# at full speed (1024 rows at V = 32000) while the peak stays far below one [N, V] tensor.
CHUNK_BUDGET_BYTES = 256 << 20


def auto_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk when ``chunk_size=None``: the largest count whose three float32
    ``[chunk, V]`` buffers fit in ``CHUNK_BUDGET_BYTES``, at least 1 and at most ``n_rows``."""
    return max(1, min(n_rows, CHUNK_BUDGET_BYTES // (3 * 4 * max(vocab, 1))))


# --------------------------------------------------------------------------------------------
# Reference: the materialised composite.
# --------------------------------------------------------------------------------------------


def fused_linear_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    temperature: float = 1.0,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    divergence: str = "kl",
    beta: Optional[float] = None,
    **_unused,
) -> torch.Tensor:
    """``kd_loss_reference`` of the two heads' logits, computed in float32 (float64 for
    float64 input): the composite the fused op is checked against."""
    compute = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32

    def logits(h, w, b):
        out = h.to(compute) @ w.to(compute).t()
        return out if b is None else out + b.to(compute)

    s = logits(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = logits(teacher_hidden, teacher_weight, teacher_bias)
    return _kd.kd_loss_reference(
        s, t, temperature, labels=labels, hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction,
        t2_scale=t2_scale, divergence=divergence, beta=beta,
    )


# --------------------------------------------------------------------------------------------
# The chunk loop and its op
# --------------------------------------------------------------------------------------------


def _row_weights(grad_rows: Optional[torch.Tensor], rows: slice):
    return None if grad_rows is None else grad_rows[rows].unsqueeze(-1)


def _chunked_forward(
    h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta,
    chunk_size, kernel, compute_grad, row_weights=None,
):
    """The loss (per row or summed) and, when asked, the gradients w.r.t. h_s, w_s, b_s of
    Σ_rows row_weight · row_loss (row_weight 1 when None), chunk by chunk."""
    n, vocab = h_s.shape[0], w_s.shape[0]
    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    op = torch.ops.fastkd.kd_forward_triton if kernel == "triton" else torch.ops.fastkd.kd_forward
    # Every GEMM accumulates and returns float32 (float64 for float64 input): rounding a bf16 GEMM
    # result to bf16 before the loss costs 4-23 % in the gradient (a peer library's bug). A
    # low-precision weight is therefore copied to float32 once per call ([V, H], not [N, V]); the
    # hidden states chunk by chunk.
    ws, wt = w_s.to(acc), w_t.to(acc)
    per_row = reduction == "none"
    losses = []
    # Gradients in float32 (float64): the caller scales them before their one rounding.
    d_h = torch.empty(h_s.shape, dtype=acc, device=h_s.device) if compute_grad else h_s.new_empty((0,))
    d_w = torch.zeros(w_s.shape, dtype=acc, device=h_s.device) if compute_grad else None
    d_b = torch.zeros(vocab, dtype=acc, device=h_s.device) if compute_grad and b_s is not None else None
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        hs = h_s[rows].to(acc)
        ls = hs @ ws.t() if b_s is None else torch.addmm(b_s.to(acc), hs, ws.t())
        ht = h_t[rows].to(acc)
        lt = ht @ wt.t() if b_t is None else torch.addmm(b_t.to(acc), ht, wt.t())
        del ht
        y = None if labels is None else labels[rows]
        loss, g = op(ls, lt, y, None, *_kd.resolve_divergence(divergence, beta), temperature, hard_weight, ignore_index, "none" if per_row else "sum", t2_scale, compute_grad)
        del ls, lt
        losses.append(loss)
        if compute_grad:
            weight = _row_weights(row_weights, rows)
            if weight is not None:
                g = g * weight.to(g.dtype)
            d_h[rows] = g @ ws
            d_w.addmm_(g.t(), hs)
            if d_b is not None:
                d_b += g.sum(0)
            del g
    loss = torch.cat(losses) if per_row else torch.stack(losses).sum()
    if not compute_grad:  # distinct empties: a custom op's outputs may not alias each other
        return loss, h_s.new_empty((0,)), h_s.new_empty((0,)), h_s.new_empty((0,))
    return loss, d_h, d_w, d_b if d_b is not None else h_s.new_empty((0,))


@torch.library.custom_op("fastkd::fused_linear_kd_forward", mutates_args=())
def _fused_linear_kd_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    t2_scale: bool,
    divergence: str,
    beta: float,
    chunk_size: int,
    kernel: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d student_hidden, d student_weight, d student_bias) of Σ-rows loss, before the
    reduction's 1/valid-rows scale (applied by the caller as a tensor op: no host sync); the
    gradients in float32 (float64 for float64 input), to be scaled before they are cast to the
    inputs' dtypes; empty [0] tensors when compute_grad is false, and always for
    reduction="none" (whose backward needs grad_output's per-row weights: it runs the chunk loop
    then)."""
    grads = compute_grad and reduction != "none"
    return _chunked_forward(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta, chunk_size, kernel, grads,
    )


@_fused_linear_kd_forward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
      temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta, chunk_size, kernel, compute_grad):
    n = student_hidden.shape[0]
    loss = student_hidden.new_empty((n,) if reduction == "none" else (), dtype=_fused.loss_dtype(student_hidden))
    def empty():
        return student_hidden.new_empty((0,))

    if not compute_grad or reduction == "none":
        return loss, empty(), empty(), empty()
    acc = _fused.loss_dtype(student_hidden)
    d_b = student_bias.new_empty(student_bias.shape, dtype=acc) if student_bias is not None else empty()
    return loss, student_hidden.new_empty(student_hidden.shape, dtype=acc), student_weight.new_empty(student_weight.shape, dtype=acc), d_b


_INPUTS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias", "labels")


def _setup_context(ctx, inputs, output):
    ctx.args = [None if isinstance(x, torch.Tensor) else x for x in inputs]
    ctx.eager = _fused._plain_eager(output[1])
    if ctx.eager:
        ctx.save_for_backward(*inputs[:7])
        ctx.grads = output[1:]  # handed out once, like the kd family's saved gradient
    else:
        ctx.save_for_backward(*inputs[:7], *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    nothing = [None] * 17
    if grad_loss is None:
        return tuple(nothing)
    saved = ctx.saved_tensors
    args = list(saved[:7]) + list(ctx.args[7:])
    h_s, w_s, b_s = saved[0], saved[1], saved[2]
    reduction = ctx.args[10]
    wants = ctx.needs_input_grad
    if ctx.eager and torch.is_grad_enabled():
        # create_graph=True: differentiate the materialised composite instead.
        with torch.enable_grad():
            loss = fused_linear_kd_loss_reference(
                h_s, w_s, saved[3], saved[4], ctx.args[7], student_bias=b_s, teacher_bias=saved[5], labels=saved[6],
                hard_weight=ctx.args[8], ignore_index=ctx.args[9], reduction="sum" if reduction != "none" else "none",
                t2_scale=ctx.args[11], divergence=ctx.args[12], beta=ctx.args[13],
            )
        inputs = [x for x, want in zip((h_s, w_s, b_s), wants[:3]) if want]
        grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
        for i, want in enumerate(wants[:3]):
            nothing[i] = next(grads) if want else None
        return tuple(nothing)
    if reduction == "none":
        # Per-row weights reach the weight gradient only through the chunk loop.
        _, d_h, d_w, d_b = _chunked_forward(*args[:7], *args[7:16], True, row_weights=grad_loss)
    else:
        if ctx.eager:
            grads, ctx.grads = ctx.grads, None
        else:
            grads = saved[7:]
        if grads is None:  # a second backward through a retained graph: recompute
            _, d_h, d_w, d_b = _chunked_forward(*args[:7], *args[7:16], True)
        else:
            d_h, d_w, d_b = grads
        if not (ctx.eager and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            if ctx.eager:  # the op's own float32 buffers, handed out once
                d_h, d_w = d_h.mul_(grad_loss), d_w.mul_(grad_loss)
                d_b = d_b.mul_(grad_loss) if d_b.numel() else d_b
            else:
                d_h, d_w, d_b = d_h * grad_loss, d_w * grad_loss, d_b * grad_loss
    # The one rounding to the inputs' dtypes, after every scale.
    nothing[0] = d_h.to(h_s.dtype) if wants[0] else None
    nothing[1] = d_w.to(w_s.dtype) if wants[1] else None
    nothing[2] = d_b.to(b_s.dtype) if (wants[2] and b_s is not None) else None
    return tuple(nothing)


_fused_linear_kd_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Validation and the public function
# --------------------------------------------------------------------------------------------


def _check_linear(prefix: str, hidden, weight, bias):
    _validate_args.float_tensor(f"{prefix}_hidden", hidden)
    _validate_args.float_tensor(f"{prefix}_weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be [V, H] (an nn.Linear's weight), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}_hidden's last dimension {hidden.shape[-1]} must equal {prefix}_weight's second "
            f"dimension {weight.shape[1]} (weight is [V, H]; shapes {tuple(hidden.shape)} and {tuple(weight.shape)})"
        )
    _validate_args.same_device(f"{prefix}_weight", weight, f"{prefix}_hidden", hidden)
    if bias is not None:
        _validate_args.float_tensor(f"{prefix}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        _validate_args.same_device(f"{prefix}_bias", bias, f"{prefix}_hidden", hidden)
    if hidden.numel() == 0:
        raise ValueError(f"empty batch: {prefix}_hidden of shape {tuple(hidden.shape)} has no rows")


def _validate(h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta,
              chunk_size):
    _check_linear("student", h_s, w_s, b_s)
    _check_linear("teacher", h_t, w_t, b_t)
    if w_t.shape[0] != w_s.shape[0]:
        raise ValueError(
            f"teacher_weight has vocabulary size {w_t.shape[0]} but student_weight has {w_s.shape[0]} "
            f"(shapes {tuple(w_t.shape)} and {tuple(w_s.shape)})"
        )
    if h_t.shape[:-1] != h_s.shape[:-1]:
        raise ValueError(f"teacher_hidden's leading shape {tuple(h_t.shape[:-1])} must equal student_hidden's {tuple(h_s.shape[:-1])}")
    _validate_args.same_device("teacher_hidden", h_t, "student_hidden", h_s)
    temperature, hard_weight, ignore_index, beta = _kd.validate_options(
        temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta
    )
    if labels is None and hard_weight > 0:
        raise ValueError(f"hard_weight={hard_weight} > 0 needs labels (the hard term is cross-entropy with labels)")
    if labels is not None:
        _check_labels(labels, h_s, w_s.shape[0], ignore_index)
    if chunk_size is not None:
        chunk_size = _validate_args.integer("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (rows per chunk) or None, got {chunk_size}")
    return temperature, hard_weight, ignore_index, beta, chunk_size


def _check_labels(labels, h_s, vocab, ignore_index):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor, got {labels.dtype}")
    rows = h_s.shape[:-1]
    if labels.shape != rows and labels.shape != (h_s.numel() // h_s.shape[-1],):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal student_hidden's leading shape {tuple(rows)}")
    _validate_args.same_device("labels", labels, "student_hidden", h_s)
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels holds {int(labels[bad][0])}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    temperature: float = 1.0,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    divergence: str = "kl",
    beta: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""``kd_loss`` through the output layer, without ever materialising the ``[N, V]`` logits.

    The teacher is a constant: ``teacher_hidden``, ``teacher_weight`` and ``teacher_bias`` are
    detached (no gradient, even when they require grad; fastkd says so once on its logger).
    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``.

    The loss equals ``kd_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, temperature, ...)`` with every ``kd_loss``
    argument meaning the same, ``divergence`` and ``beta`` included. Rows are processed in chunks: per chunk, the two heads' logits are computed by
    torch's GEMM into float32 buffers (float32 accumulation and result, also for bf16/fp16
    inputs, whose weights are copied to float32 once per call), the ``kd`` kernel computes the chunk's loss and logit gradient in one pass, and the
    hidden-state, weight and bias gradients are accumulated in float32 before the next chunk. The
    forward computes everything; the backward only scales (for ``reduction="none"`` it runs the
    chunk loop again with the per-row grad_output weights, which the weight gradient needs). The
    gradients stay float32 until that scale, so 16-bit ones are rounded once (held from forward
    to backward: 2·(N + V)·H bytes more than in 16 bits; see the module docstring).

    Args:
        student_hidden: ``[..., H]`` hidden states entering the student's output layer.
        student_weight: ``[V, H]``, the student head's weight (``lm_head.weight``).
        teacher_hidden: ``[..., Ht]`` with the same leading shape; Ht may differ from H.
        teacher_weight: ``[V, Ht]``, same V as the student's.
        temperature, labels, hard_weight, ignore_index, reduction, t2_scale, divergence, beta:
            as ``kd_loss``
            (``labels`` shaped like the hiddens' leading dims, or flat ``[N]``).
        student_bias, teacher_bias: optional ``[V]``.
        chunk_size: rows per chunk; ``None`` picks the largest chunk whose three float32
            ``[chunk, V]`` buffers fit in 256 MiB (``auto_chunk_size``), e.g. 699 rows at
            V = 32000. An explicit int is honoured.
        backend: ``"reference"`` (the materialised composite), ``"cpu"``, ``"triton"`` or
            ``"cuda"`` (the per-chunk kernel); default as ``kd_loss``.

    Returns:
        The loss as ``kd_loss`` returns it (float32; float64 for float64 input).
    """
    temperature, hard_weight, ignore_index, beta, chunk_size = _validate(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta, chunk_size,
    )
    _fused.note_constant_teacher("fused_linear_kd_loss", (teacher_hidden, teacher_weight, teacher_bias))
    name = backends.choose("fused_linear_kd_loss", _kd._CHECKS, student_hidden.device, backend, student_hidden, teacher_hidden)
    kwargs = dict(labels=labels, hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction, t2_scale=t2_scale,
                  divergence=divergence, beta=beta)
    if name == "reference":
        return fused_linear_kd_loss_reference(
            student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), temperature,
            student_bias=student_bias, teacher_bias=None if teacher_bias is None else teacher_bias.detach(), **kwargs,
        )
    lead = student_hidden.shape[:-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).contiguous()
    n, vocab = h_s.shape[0], student_weight.shape[0]
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    chunk = chunk_size if chunk_size is not None else auto_chunk_size(n, vocab)
    wants = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    loss, *_ = _fused_linear_kd_forward(
        h_s, student_weight, student_bias, h_t, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
        flat_labels, temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta, chunk, name, wants,
    )
    if reduction == "none":
        return loss.reshape(lead)
    if reduction == "batchmean":
        valid = n if flat_labels is None else flat_labels.ne(ignore_index).sum().clamp_min(1)
        return loss / valid
    return loss
