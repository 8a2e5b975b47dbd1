"""Fused linear KD: distil through the output layer without ever holding the ``[N, V]`` logits.

Everything about the op lives here or is named here:

- math and contract: ``fused_linear_kd_loss`` below, ``docs/design.md#fused-linear``; it equals
  ``kd_loss`` of the two heads' logits, so the per-row math and the options (``KDOptions``) are
  ``kd_loss``'s (``fastkd/ops/kd.py``, ``docs/design.md#kd``);
- reference (the oracle): ``fused_linear_kd_loss_reference``, the materialised composite;
- the chunk loop (shared by the cpu, triton and cuda backends): ``chunk_loop`` here, which takes
  the per-chunk loss as a function (``fastkd/ops/fused_linear_sparse.py``, the fused head over a
  cached sparse teacher, passes the sparse kernel); ``_chunked_forward`` hands it the ``kd``
  family's per-chunk loss-and-gradient kernel (``csrc/cpu/kd_kernel.h``,
  ``kernels/kd.py``, ``csrc/cuda/kd_cuda.cu``); the GEMMs are torch's (MKL/oneDNN, cuBLAS);
- op: ``fastkd::fused_linear_kd_forward``, a Python custom op; its fake kernel and autograd are
  ``register_fused_head``'s, shared by every fused head, as are the call's flattening and
  reduction (``Rows``); its backend is chosen as ``kd_loss``'s (``fastkd/ops/table.py``);
- tests: ``tests/test_fused_linear.py``; benchmark: ``bench/test_bench_fused_linear.py``.

Per chunk of rows ``c`` (memory: three ``[chunk, V]`` float32 buffers, never ``[N, V]``)::

    ls = cap_s(h_s[c] @ W_sᵀ + b_s)  lt = cap_t(h_t[c] @ W_tᵀ + b_t)    (float32 accumulation)
    loss_c, g = kd kernel(ls, lt)    g = d loss_c / d ls, one pass      (read 2·c·V, write c·V)
    g *= 1 - (ls / s)²               (soft-cap cap_s(z) = s·tanh(z / s), when the student has one)
    dh_s[c] = g @ W_s    dW_s += gᵀ @ h_s[c]    db_s += Σ_rows g         (float32 accumulation)

Four GEMMs, as the materialised composite does; what is saved is every ``[N, V]`` tensor.
The GEMMs take 16-bit hidden states and weights as they are and return float32, never a 16-bit
product (``docs/design.md#fused-linear``): on a GPU ``torch.mm(..., out_dtype=torch.float32)``
on the tensor cores, g rounded once to the weight's dtype for the two gradient GEMMs (as
autograd does for a float32-logit composite); on a CPU, where torch has no such GEMM, float32
GEMMs on weight blocks upcast into one reused buffer (exact: a 16-bit product fits in float32).

The op returns dh_s, dW_s, db_s in float32 (float64 for float64 input) whatever the inputs'
dtype: the backward scales them by grad_output (which carries batchmean's 1/valid-rows) and only
then casts them to the inputs' dtypes, so a 16-bit gradient is rounded once
(``fastkd/ops/fused_autograd.py``). They are held from forward to backward in float32: 2 bytes per entry
more than in 16 bits, i.e. 2·(N + V)·H bytes (V = 128256, H = 4096, N = 8192: 1.1 GB, nearly all
of it dW_s, which accumulates in float32 across chunks anyway).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastkd.ops import _validate, divergences, fused_autograd, table
from fastkd.ops import kd as _kd
from fastkd.ops.options import KDOptions

# chunk_size=None on a CPU: the chunk's three float32 [chunk, V] buffers (student logits, teacher
# logits, gradient) fit in this many bytes; at least one row. 256 MiB keeps the GEMMs large enough
# to run at full speed (1024 rows at V = 32000, 174 at V = 128256) while the peak stays far below
# one [N, V] tensor.
CHUNK_BUDGET_BYTES = 256 << 20
# On a GPU the budget is a quarter of the memory free once the float32 weight gradient is counted,
# between CHUNK_BUDGET_BYTES and this: 4 GiB is ~2400 rows at V = 128256, GEMMs at full rate.
CUDA_CHUNK_BUDGET_MAX = 4 << 30
# A 16-bit weight that meets a float32 GEMM (every CPU GEMM; a GPU's when hidden and weight differ
# in dtype) is upcast this many bytes of vocabulary rows at a time into one reused buffer.
WEIGHT_BLOCK_BYTES = 32 << 20


def chunk_budget(device: torch.device, vocab: int, hidden: int) -> int:
    """Bytes the chunk's buffers may take when ``chunk_size=None``: ``CHUNK_BUDGET_BYTES`` on a
    CPU; on a GPU a quarter of its free memory less the ``[V, H]`` float32 weight gradient,
    within ``[CHUNK_BUDGET_BYTES, CUDA_CHUNK_BUDGET_MAX]``."""
    if device.type != "cuda":
        return CHUNK_BUDGET_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return min(CUDA_CHUNK_BUDGET_MAX, max(CHUNK_BUDGET_BYTES, (free - 4 * vocab * hidden) // 4))


def auto_chunk_size(n_rows: int, vocab: int, budget: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk when ``chunk_size=None``: the largest count whose three float32
    ``[chunk, V]`` buffers fit in ``budget`` bytes, at least 1 and at most ``n_rows``."""
    return max(1, min(n_rows, budget // (3 * 4 * max(vocab, 1))))


def check_softcap(name: str, softcap) -> Optional[float]:
    """A logit soft-cap: None (none), or a finite number > 0."""
    if softcap is None:
        return None
    value = _validate.real(name, softcap)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 (the logits become {name} · tanh(z / {name})) or None, got {softcap}")
    return value


def softcapped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """``softcap · tanh(z / softcap)`` (Gemma 2/3's ``final_logit_softcapping``), out of place;
    ``z`` itself when ``softcap`` is None or 0 (the op's "no cap")."""
    return softcap * torch.tanh(z / softcap) if softcap else z


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
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    divergence: str = "kl",
    beta: Optional[float] = None,
    **_unused,
) -> torch.Tensor:
    """``kd_loss_reference`` of the two heads' (soft-capped) logits, computed in float32
    (float64 for float64 input): the composite the fused op is checked against."""
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta)
    caps = check_softcap("student_softcap", student_softcap), check_softcap("teacher_softcap", teacher_softcap)
    return _reference(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, options, *caps)


def composite_logits(hidden, weight, bias, softcap, compute: torch.dtype) -> torch.Tensor:
    """A head's materialised (soft-capped) logits in ``compute``: what a reference distils."""
    out = hidden.to(compute) @ weight.to(compute).t()
    return softcapped(out if bias is None else out + bias.to(compute), softcap)


def _reference(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
               options: KDOptions, student_softcap=None, teacher_softcap=None) -> torch.Tensor:
    compute = fused_autograd.loss_dtype(student_hidden)
    s = composite_logits(student_hidden, student_weight, student_bias, student_softcap, compute)
    with torch.no_grad():
        t = composite_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, compute)
    return _kd._reference(s, t, options, labels, None)


# --------------------------------------------------------------------------------------------
# The GEMMs and the chunk loop
# --------------------------------------------------------------------------------------------


class Head(NamedTuple):
    """One output layer: ``hidden [N, H] @ weightᵀ [H, V] + bias``, then soft-capped at
    ``softcap`` (0: not capped)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: float


def _on_tensor_cores(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """16-bit hidden states and weight of one dtype on a GPU: the GEMMs take them as they are and
    accumulate and return float32 (``out_dtype``; cuBLAS on the tensor cores). torch has no such
    GEMM on a CPU (``mm.dtype`` is CUDA-only in the pinned torch), so there ``_weight_blocks``."""
    return x.is_cuda and x.dtype == weight.dtype and x.dtype in fused_autograd.LOW_PRECISION


def _weight_blocks(weight: torch.Tensor, acc: torch.dtype):
    """``(vocabulary rows, those rows of the weight in acc)``: the weight itself when it is
    already ``acc``; else blocks of ``WEIGHT_BLOCK_BYTES`` upcast one at a time into one reused
    buffer, never a ``[V, H]`` copy. A product of two bf16 (fp16) numbers is exact in float32, so a
    float32 GEMM of the upcast values is the 16-bit GEMM accumulated in float32; a 16-bit GEMM
    whose result is rounded to 16 bits before the loss is what costs 4-23 % of the gradient."""
    vocab = weight.shape[0]
    if weight.dtype == acc:
        yield slice(0, vocab), weight
        return
    step = max(1, WEIGHT_BLOCK_BYTES // (torch.finfo(acc).bits // 8 * weight.shape[1]))
    buffer = weight.new_empty((min(step, vocab), weight.shape[1]), dtype=acc)
    for start in range(0, vocab, step):
        block = weight[start:start + step]
        yield slice(start, start + block.shape[0]), buffer[: block.shape[0]].copy_(block)


def _logits(head: Head, rows: slice, acc: torch.dtype) -> torch.Tensor:
    """The head's (soft-capped) logits of ``rows``, a fresh ``[chunk, V]`` tensor in ``acc``."""
    x, weight = head.hidden[rows], head.weight
    if _on_tensor_cores(x, weight):
        z = torch.mm(x, weight.t(), out_dtype=acc)
    else:
        x = x.to(acc)
        z = x.new_empty((x.shape[0], weight.shape[0]))
        for cols, block in _weight_blocks(weight, acc):
            torch.mm(x, block.t(), out=z[:, cols])
    if head.bias is not None:
        z += head.bias
    if head.softcap:  # as softcapped(), in place
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    return z


def _gradient_gemms(g: torch.Tensor, head: Head, rows: slice, d_h, d_w, d_b) -> None:
    """``d_h[rows] = g @ W``, ``d_w += gᵀ @ h[rows]``, ``d_b += Σ_rows g`` (``g``: d loss /
    d logits of the chunk, float32), accumulating in ``d_h``'s dtype."""
    x, weight = head.hidden[rows], head.weight
    if d_b is not None:
        d_b += g.sum(0)
    if _on_tensor_cores(x, weight):
        # g rounded once to the weight's dtype, as autograd rounds it in a float32-logit composite
        # ((h @ Wᵀ).float(): the cast's backward), so that both gradient GEMMs run on tensor cores.
        g = g.to(weight.dtype)
        torch.mm(g, weight, out_dtype=d_h.dtype, out=d_h[rows])
        torch.addmm(d_w, g.t(), x, out_dtype=d_w.dtype, out=d_w)
        return
    d_w.addmm_(g.t(), x.to(d_w.dtype))
    out = d_h[rows]
    for i, (cols, block) in enumerate(_weight_blocks(weight, d_h.dtype)):
        if i == 0:
            torch.mm(g[:, cols], block, out=out)
        else:
            out.addmm_(g[:, cols], block)


def _row_weights(grad_rows: Optional[torch.Tensor], rows: slice):
    return None if grad_rows is None else grad_rows[rows].unsqueeze(-1)


def chunk_loop(student: Head, chunk_loss, chunk_size: int, compute_grad: bool, per_row: bool, row_weights=None):
    """The skeleton of a fused head: per chunk of rows, the student's logits (a float32 ``[chunk,
    V]`` buffer, float64 for float64 input), ``chunk_loss(logits, rows) -> (loss, d loss / d
    logits)`` (the teacher and the per-row math are the caller's: a kd kernel on the teacher
    head's logits here; a sparse kernel on the cached top-k would serve the same way), then the
    soft-cap's derivative and the gradient GEMMs. Returns the loss (per row, or summed) and the
    gradients w.r.t. the student's hidden, weight and bias of Σ_rows row_weight · row_loss (row
    weight 1 when None), in float32 (float64), or distinct empties without ``compute_grad``."""
    h_s, w_s, b_s = student.hidden, student.weight, student.bias
    n, acc = h_s.shape[0], fused_autograd.loss_dtype(h_s)
    losses = []
    # Gradients in float32 (float64) across chunks: the caller scales them before their one rounding.
    d_h = torch.empty(h_s.shape, dtype=acc, device=h_s.device) if compute_grad else None
    d_w = torch.zeros(w_s.shape, dtype=acc, device=h_s.device) if compute_grad else None
    d_b = torch.zeros(w_s.shape[0], dtype=acc, device=h_s.device) if compute_grad and b_s is not None else None
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        z = _logits(student, rows, acc)
        loss, g = chunk_loss(z, rows)
        losses.append(loss)
        if compute_grad and student.softcap:  # d cap·tanh(u / cap) / du = 1 - t², t = z / cap
            g.mul_(z.div_(student.softcap).square_().neg_().add_(1))
        del z
        if compute_grad:
            weight = _row_weights(row_weights, rows)
            if weight is not None:
                g.mul_(weight.to(g.dtype))
            _gradient_gemms(g, student, rows, d_h, d_w, d_b)
        del g
    loss = torch.cat(losses) if per_row else torch.stack(losses).sum()
    if not compute_grad:  # distinct empties: a custom op's outputs may not alias each other
        return loss, h_s.new_empty((0,)), h_s.new_empty((0,)), h_s.new_empty((0,))
    return loss, d_h, d_w, d_b if d_b is not None else h_s.new_empty((0,))


def _chunked_forward(
    h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta,
    student_softcap, teacher_softcap, chunk_size, kernel, compute_grad, row_weights=None,
):
    """The chunk loop with the kd kernel of ``kernel`` on the teacher head's logits per chunk."""
    per_row = reduction == "none"
    op = _kd.KD_FORWARD.op(kernel)
    teacher = Head(h_t, w_t, b_t, teacher_softcap)
    acc = fused_autograd.loss_dtype(h_s)

    def chunk_loss(student_logits, rows):
        teacher_logits = _logits(teacher, rows, acc)
        y = None if labels is None else labels[rows]
        return op(student_logits, teacher_logits, y, None, divergence, beta, temperature, hard_weight, ignore_index,
                  "none" if per_row else "sum", t2_scale, compute_grad)

    return chunk_loop(Head(h_s, w_s, b_s, student_softcap), chunk_loss, chunk_size, compute_grad, per_row, row_weights)


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
    student_softcap: float,
    teacher_softcap: float,
    chunk_size: int,
    kernel: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d student_hidden, d student_weight, d student_bias) of Σ-rows loss, before the
    reduction's 1/valid-rows scale (applied by the caller as a tensor op: no host sync); the
    gradients in float32 (float64 for float64 input), to be scaled before they are cast to the
    inputs' dtypes; empty [0] tensors when compute_grad is false, and always for
    reduction="none" (whose backward needs grad_output's per-row weights: it runs the chunk loop
    then). A soft-cap of 0 means none."""
    grads = compute_grad and reduction != "none"
    return _chunked_forward(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta, student_softcap, teacher_softcap,
        chunk_size, kernel, grads,
    )


def _composite(h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, hard_weight, ignore_index, reduction, t2_scale, divergence,
               beta, student_softcap, teacher_softcap, chunk_size, kernel):
    """The op's loss as the materialised composite (before the 1/valid-rows scale): what a
    ``create_graph=True`` backward differentiates."""
    options = KDOptions(temperature, hard_weight, ignore_index, "none" if reduction == "none" else "sum", t2_scale,
                        divergence, divergences.beta_argument(divergence, beta))
    return _reference(h_s, w_s, b_s, h_t, w_t, b_t, labels, options, student_softcap, teacher_softcap)


def register_fused_head(op, n_tensors: int, reduction_arg: int, chunked, composite) -> None:
    """The fake kernel and autograd of a fused head's custom op ``op``, whose arguments are its
    ``n_tensors`` tensors (the student's hidden, weight and bias first), its options (the
    reduction at ``reduction_arg``), then ``compute_grad``; it returns (loss, d hidden, d weight,
    d bias) as ``_fused_linear_kd_forward`` does. ``chunked(*args, compute_grad, row_weights=)``
    runs its chunk loop and ``composite(*args)`` its materialised composite, ``args`` being the
    op's arguments before ``compute_grad``."""

    def fake(*args):
        h_s, w_s, b_s = args[:3]
        reduction, compute_grad = args[reduction_arg], args[-1]
        acc = fused_autograd.loss_dtype(h_s)
        loss = h_s.new_empty((h_s.shape[0],) if reduction == "none" else (), dtype=acc)

        def empty():
            return h_s.new_empty((0,))

        if not compute_grad or reduction == "none":
            return loss, empty(), empty(), empty()
        d_b = b_s.new_empty(b_s.shape, dtype=acc) if b_s is not None else empty()
        return loss, h_s.new_empty(h_s.shape, dtype=acc), w_s.new_empty(w_s.shape, dtype=acc), d_b

    def setup_context(ctx, inputs, output):
        ctx.args = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.eager = fused_autograd._plain_eager(output[1])
        if ctx.eager:
            ctx.save_for_backward(*inputs[:n_tensors])
            ctx.grads = output[1:]  # handed out once, like the kd family's saved gradient
        else:
            ctx.save_for_backward(*inputs[:n_tensors], *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, *_):
        nothing = [None] * len(ctx.args)
        if grad_loss is None:
            return tuple(nothing)
        saved = ctx.saved_tensors
        # The op's arguments but compute_grad.
        args = list(saved[:n_tensors]) + list(ctx.args[n_tensors:-1])
        h_s, w_s, b_s = saved[0], saved[1], saved[2]
        reduction = ctx.args[reduction_arg]
        wants = ctx.needs_input_grad
        if ctx.eager and torch.is_grad_enabled():
            # create_graph=True: differentiate the materialised composite instead.
            with torch.enable_grad():
                loss = composite(*args)
            inputs = [x for x, want in zip((h_s, w_s, b_s), wants[:3]) if want]
            grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
            for i, want in enumerate(wants[:3]):
                nothing[i] = next(grads) if want else None
            return tuple(nothing)
        if reduction == "none":
            # Per-row weights reach the weight gradient only through the chunk loop.
            _, d_h, d_w, d_b = chunked(*args, True, row_weights=grad_loss)
        else:
            if ctx.eager:
                grads, ctx.grads = ctx.grads, None
            else:
                grads = saved[n_tensors:]
            if grads is None:  # a second backward through a retained graph: recompute
                _, d_h, d_w, d_b = chunked(*args, True)
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

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)


register_fused_head(_fused_linear_kd_forward, 7, 10, _chunked_forward, _composite)

# The public op; each chunk runs kd_loss's kernel, on the backend chosen as for kd_loss.
FUSED_LINEAR_KD_LOSS = table.Op("fused_linear_kd_loss", "fused_linear", _kd.KD_FORWARD, fused_linear_kd_loss_reference)


# --------------------------------------------------------------------------------------------
# Validation and the public function
# --------------------------------------------------------------------------------------------


def check_linear(prefix: str, hidden, weight, bias):
    _validate.float_tensor(f"{prefix}_hidden", hidden)
    _validate.float_tensor(f"{prefix}_weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be [V, H] (an nn.Linear's weight), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}_hidden's last dimension {hidden.shape[-1]} must equal {prefix}_weight's second "
            f"dimension {weight.shape[1]} (weight is [V, H]; shapes {tuple(hidden.shape)} and {tuple(weight.shape)})"
        )
    _validate.same_device(f"{prefix}_weight", weight, f"{prefix}_hidden", hidden)
    if bias is not None:
        _validate.float_tensor(f"{prefix}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        _validate.same_device(f"{prefix}_bias", bias, f"{prefix}_hidden", hidden)
    if hidden.numel() == 0:
        raise ValueError(f"empty batch: {prefix}_hidden of shape {tuple(hidden.shape)} has no rows")


def check_chunk_size(chunk_size) -> Optional[int]:
    """``chunk_size``: None, or an integral number >= 1 (``nn.FusedLinearKDLoss`` checks it at
    construction)."""
    if chunk_size is None:
        return None
    chunk_size = _validate.integer("chunk_size", chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (rows per chunk) or None, got {chunk_size}")
    return chunk_size


class Rows(NamedTuple):
    """A fused head's call as its custom op takes it: the student's hidden states ``[N, H]`` and
    the labels ``[N]`` flattened, the rows per chunk, whether a gradient is wanted, and the
    leading shape that ``reduction="none"`` gives back."""

    hidden: torch.Tensor
    labels: Optional[torch.Tensor]
    chunk_size: int
    wants: bool
    lead: torch.Size

    @staticmethod
    def of(student_hidden, student_weight, student_bias, labels, chunk_size: Optional[int]) -> "Rows":
        h = student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()
        flat_labels = None if labels is None else labels.reshape(-1).contiguous()
        vocab = student_weight.shape[0]
        if chunk_size is None:
            chunk_size = auto_chunk_size(h.shape[0], vocab, chunk_budget(h.device, vocab, h.shape[1]))
        wants = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
        return Rows(h, flat_labels, chunk_size, wants, student_hidden.shape[:-1])

    def reduce(self, loss: torch.Tensor, options: KDOptions) -> torch.Tensor:
        """The op's loss (per row, or the sum over rows) as ``reduction`` asks; batchmean's
        1/valid-rows as a tensor op (no host synchronisation)."""
        if options.reduction == "none":
            return loss.reshape(self.lead)
        if options.reduction == "batchmean":
            n = self.hidden.shape[0]
            return loss / (n if self.labels is None else self.labels.ne(options.ignore_index).sum().clamp_min(1))
        return loss


def _check_tensors(h_s, w_s, b_s, h_t, w_t, b_t, labels, options: KDOptions) -> None:
    check_linear("student", h_s, w_s, b_s)
    check_linear("teacher", h_t, w_t, b_t)
    if w_t.shape[0] != w_s.shape[0]:
        raise ValueError(
            f"teacher_weight has vocabulary size {w_t.shape[0]} but student_weight has {w_s.shape[0]} "
            f"(shapes {tuple(w_t.shape)} and {tuple(w_s.shape)})"
        )
    if h_t.shape[:-1] != h_s.shape[:-1]:
        raise ValueError(f"teacher_hidden's leading shape {tuple(h_t.shape[:-1])} must equal student_hidden's {tuple(h_s.shape[:-1])}")
    _validate.same_device("teacher_hidden", h_t, "student_hidden", h_s)
    options.require_labels(labels)
    _validate.labels(labels, h_s, options.ignore_index, student_name="student_hidden", vocab=w_s.shape[0])


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    temperature: float = 1.0,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
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
    argument meaning the same, ``divergence`` and ``beta`` included; with a soft-cap, each head's
    logits z become ``cap · tanh(z / cap)`` first. Rows are processed in chunks: per chunk, the
    two heads' logits are computed by torch's GEMM into float32 buffers (float32 accumulation and
    result, also for bf16/fp16 inputs: no 16-bit product, and no float32 copy of a weight), the
    ``kd`` kernel computes the chunk's loss and logit gradient in one pass, and the hidden-state,
    weight and bias gradients are accumulated in float32 before the next chunk. The
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
        student_softcap, teacher_softcap: optional logit soft-caps (a finite number > 0), each
            head's own, as Gemma 2/3's ``final_logit_softcapping``; None: not capped.
        chunk_size: rows per chunk; ``None`` picks the largest chunk whose three float32
            ``[chunk, V]`` buffers fit in ``chunk_budget`` (256 MiB on a CPU, e.g. 699 rows at
            V = 32000; on a GPU a quarter of the free memory, up to 4 GiB). An explicit int is
            honoured.
        backend: ``"reference"`` (the materialised composite), ``"cpu"``, ``"triton"`` or
            ``"cuda"`` (the per-chunk kernel); default as ``kd_loss``.

    Returns:
        The loss as ``kd_loss`` returns it (float32; float64 for float64 input).
    """
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta)
    caps = check_softcap("student_softcap", student_softcap), check_softcap("teacher_softcap", teacher_softcap)
    _check_tensors(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, options)
    chunk_size = check_chunk_size(chunk_size)
    # The backend that runs kd_loss's kernel for each chunk.
    name = FUSED_LINEAR_KD_LOSS.choose(backend, student_hidden, teacher_hidden, teacher_weight, teacher_bias)
    if name == "reference":
        return _reference(
            student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(), labels, options, *caps,
        )
    rows = Rows.of(student_hidden, student_weight, student_bias, labels, chunk_size)
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).contiguous()
    loss, *_ = _fused_linear_kd_forward(
        rows.hidden, student_weight, student_bias, h_t, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
        rows.labels, *options.op_args(), *options.resolved(), caps[0] or 0.0, caps[1] or 0.0, rows.chunk_size, name, rows.wants,
    )
    return rows.reduce(loss, options)
