"""The online-softmax skeleton the row-wise logit kernels (kd, dkd, sparse_kd) share: Triton
helpers, and on the host the one rule for their launch shapes and the pieces of their launchers.

A helper module: ``@triton.jit`` functions that the families' kernels call (Triton inlines them,
so a kernel compiles as if they were written in it) and no launch of its own; the static GPU
check compiles them inside every kernel that calls them (kernels/__init__.py).

The math these helpers carry is in ``docs/design.md#online-softmax``: a row is streamed in
chunks with a running maximum m of the raw logits, sums are kept relative to a reference r (m,
or 0 while m is still -inf, so that -inf - -inf never occurs), in base 2 with x = (s - r) x_scale
and x_scale = log2(e)/T; when the reference moves from r to r' an old sum is multiplied by
2^((m - r') x_scale), which is 0 while nothing finite was seen yet. The gradient scale (the
reduction's, times grad_scale) is ``docs/design.md#gradient-scale``.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# Host side: the launch shape rule of every row kernel, and the launchers' shared pieces.
# ---------------------------------------------------------------------------------------------

# Under the interpreter (CPU tensors) a small chunk keeps the blocked path exercised by the tests'
# small rows; on a GPU each kernel caps the chunk at what its live values allow (its module says).
BLOCK_V_MAX_INTERPRETER = 256


def num_warps_for(block_v: int) -> int:
    """Warps for a chunk of ``block_v`` entries: 8 from 2048 (16 fp32 per thread at 4096, four
    16-byte loads), fewer below so that small rows do not leave most threads masked."""
    return 8 if block_v >= 2048 else 4 if block_v >= 512 else 2 if block_v >= 128 else 1


def block_v_for(vocab: int, cap_gpu: int, on_gpu: bool) -> int:
    """The chunk of a row of ``vocab`` entries: the row rounded up to a power of two, capped."""
    return min(triton.next_power_of_2(vocab), cap_gpu if on_gpu else BLOCK_V_MAX_INTERPRETER)


def launch_shape(vocab: int, cap_gpu: int, on_gpu: bool) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a row of ``vocab`` entries."""
    block_v = block_v_for(vocab, cap_gpu, on_gpu)
    return block_v, num_warps_for(block_v)


def gpu_shapes(cap_gpu: int) -> list:
    """Every ``(BLOCK_V, num_warps)`` launch_shape() gives on a GPU, over every row length."""
    return sorted({launch_shape(1 << k, cap_gpu, True) for k in range(31)})


def switches(has_labels: bool, hard_weight: float, temperature: float, reduction: str, compute_grad: bool) -> dict:
    """The constexpr switches of the kd and sparse_kd kernels, for one call."""
    # batchmean divides by the number of non-ignored rows: with labels that count is only known
    # on the device (SCALE_MODE 2 reads it from a tensor), without it is n_rows (SCALE_MODE 1).
    scale_mode = 0 if reduction != "batchmean" else 2 if has_labels else 1
    has_ce = has_labels and hard_weight > 0
    return dict(
        HAS_LABELS=has_labels,
        HAS_CE=has_ce,
        # Only the CE term reads SAME_T; without it, one value means one compiled kernel, not two.
        SAME_T=has_ce and temperature == 1.0,
        SCALE_MODE=scale_mode,
        COMPUTE_GRAD=compute_grad,
    )


# For each input of switches(), values that reach every result it can give.
SWITCH_INPUTS = dict(
    has_labels=(False, True),
    hard_weight=(0.0, 0.5),
    temperature=(1.0, 2.0),
    reduction=("none", "sum", "batchmean"),
    compute_grad=(False, True),
)


def switch_combos(fn, inputs: dict, richest: dict) -> list:
    """Every distinct result of ``fn`` over the product of ``inputs`` (static_launches)."""
    combos = []
    for values in itertools.product(*inputs.values()):
        combo = fn(**dict(zip(inputs, values)))
        if combo not in combos:
            combos.append(combo)
    assert richest in combos, "the richest switches must be a combination the switch function can return"
    return combos


def switch_variant(combo: dict) -> list:
    """The labels, CE, gradient and scale part of a static launch's variant label."""
    return [
        "labels" if combo["HAS_LABELS"] else "no labels",
        *(["CE"] if combo["HAS_CE"] else []),
        *(["T = 1"] if combo["SAME_T"] else []),
        "grad" if combo["COMPUTE_GRAD"] else "loss only",
        f"scale mode {combo['SCALE_MODE']}",
    ]


def static_launch(kernel, args: dict, num_warps: int, label: str, v: int, combo: dict, row_bytes, before=(), after=()):
    """A StaticLaunch of a row kernel with switches() (kernels/__init__.py): the label marks a row
    length that is not a multiple of 16 (Triton cannot then vectorise the loads), the variant
    lists ``before``, the switches, ``after`` and the grad_scale mode."""
    from . import StaticLaunch, grad_scale_variant

    variant = [*before, *switch_variant(combo), *after, *([grad_scale_variant(combo)] if combo["GO_MODE"] else [])]
    return StaticLaunch(
        kernel=kernel, args=args, num_warps=num_warps,
        label=label + ("" if v % 16 == 0 or v < 16 else " · V % 16 != 0"),
        variant=", ".join(variant), row_bytes=row_bytes,
    )


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in ("none", "sum", "batchmean"):
        raise ValueError(f"{op} (triton): reduction must be 'none', 'sum' or 'batchmean', got {reduction!r}")


def row_outputs(student: torch.Tensor, compute_grad: bool, into):
    """The row losses (float32 [N]) and the gradient: ``into`` (the forward's, rewritten in
    place), a fresh one in the student's dtype, or an empty [0] without a gradient."""
    device = student.device
    row_loss = torch.empty(student.shape[0], dtype=torch.float32, device=device)
    if into is not None:
        return row_loss, into
    grad = torch.empty_like(student) if compute_grad else torch.empty(0, dtype=student.dtype, device=device)
    return row_loss, grad


def batchmean_scale(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 / the number of non-ignored rows, on the device (no host synchronisation). With none of
    them every row loss and gradient row is 0, so any finite scale will do."""
    return labels.ne(ignore_index).sum().clamp_min(1).to(torch.float32).reciprocal()


def reduce_rows(row_loss: torch.Tensor, reduction: str, scale_t, n_rows: int) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    if scale_t is not None:
        return row_loss.sum() * scale_t
    return row_loss.sum() / n_rows


# ---------------------------------------------------------------------------------------------
# Device side.
# ---------------------------------------------------------------------------------------------


@triton.jit
def grad_scale_of(go_ptr, row, GO_MODE: tl.constexpr):
    """Row ``row``'s grad_scale (kernels/__init__.py): 1 without one."""
    if GO_MODE == 1:
        go = tl.load(go_ptr).to(tl.float32)
    elif GO_MODE == 2:
        go = tl.load(go_ptr + row).to(tl.float32)
    else:
        go = tl.full((), 1.0, tl.float32)
    return go


@triton.jit
def load_chunk(ptrs, mask, EVICT: tl.constexpr):
    """A chunk of a row in float32, -inf where masked (out of the row: in no maximum or sum).
    EVICT: "evict_last" on a pass whose row is read again (keep it in L2), "evict_first" on
    the last pass over it, "" for the default."""
    return tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)


@triton.jit
def row_start(s_ptr, V, go_ptr, GO_MODE: tl.constexpr, GO_SKIP: tl.constexpr):
    """The program's row (int64: row * V passes 2^31 on large batches), its grad_scale, whether
    the program has nothing to do (a relaunch that rewrites the forward's gradient in place,
    GO_SKIP, at a grad_scale of exactly 1 leaves it as it stands, with no traffic), and the
    row's student logits."""
    row = tl.program_id(0).to(tl.int64)
    go = grad_scale_of(go_ptr, row, GO_MODE)
    if GO_SKIP:
        skip = go == 1.0
    else:
        skip = False
    return row, go, skip, s_ptr + row * V


@triton.jit
def kd_scalars(x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef):
    """The KD kernels' float scalars in fp32 whoever launches: torch.compile passes them as fp64
    (kernels/__init__.py)."""
    return (tl.cast(x_scale, tl.float32), tl.cast(soft_loss_coef, tl.float32), tl.cast(soft_loss_t, tl.float32),
            tl.cast(hard_weight, tl.float32), tl.cast(soft_grad_coef, tl.float32))




@triton.jit
def row_status(labels_ptr, row, ignore_index, V, HAS_LABELS: tl.constexpr):
    """(label, compute, bad) of a row: ``compute`` unless its label is ignore_index or outside
    [0, V); ``bad`` (a NaN loss and gradient) for a label outside [0, V) that is not ignored.
    Without labels: label -1, every row computed (compile-time constants)."""
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < V)
        compute = valid & in_range
        bad = valid & (~in_range)
    else:
        label = -1
        compute = True
        bad = False
    return label, compute, bad


@triton.jit
def reference(m):
    """The reference of a running maximum m: m, or 0 while m is -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_start():
    """A fresh online log-sum-exp state: the running maximum, -inf, and the sum, 0."""
    return tl.full((), float("-inf"), tl.float32), tl.zeros((), tl.float32)


@triton.jit
def online_max(m, chunk):
    """The running maximum after ``chunk``, and its reference."""
    new_m = tl.maximum(m, tl.max(chunk, axis=0))
    return new_m, reference(new_m)


@triton.jit
def sum_step(total, m, r, chunk, scale):
    """The log-sum-exp step: ``total`` = sum 2^((z - r_old) scale) over the chunks before,
    rescaled to the new reference r (factor 2^((m - r) scale), m the old maximum), plus the
    chunk's own terms 2^((z - r) scale)."""
    return total * tl.exp2((m - r) * scale) + tl.sum(tl.exp2((chunk - r) * scale), axis=0)


@triton.jit
def kl_step(m_s, m_t, sum_s, sum_t, acc_a, s, t, x_scale):
    """One chunk of the two-distribution KL statistics (docs/design.md#online-softmax):
    S_s = sum 2^x, S_t = sum 2^y, A = sum_{2^y != 0} 2^y (y - x), with x = (s - r_s) x_scale and
    y = (t - r_t) x_scale; KL(p || q) = ln2 (A / S_t + log2 S_s - log2 S_t). A is taken
    relative to both references, so a constant shift between the rows cancels inside each term;
    when the references move, A gains S_t times the shift of both. A term with 2^y == 0 (teacher
    -inf) counts 0, not 0 * inf. Returns the new (m_s, m_t, S_s, S_t, A)."""
    new_m_s, r_s = online_max(m_s, s)
    new_m_t, r_t = online_max(m_t, t)
    x = (s - r_s) * x_scale
    y = (t - r_t) * x_scale
    e_s = tl.exp2(x)
    e_t = tl.exp2(y)
    a_s = tl.exp2((m_s - r_s) * x_scale)
    a_t = tl.exp2((m_t - r_t) * x_scale)
    shift = ((reference(m_t) - r_t) - (reference(m_s) - r_s)) * x_scale
    term = tl.where(e_t == 0.0, 0.0, e_t * (y - x))
    acc_a = a_t * (acc_a + sum_t * shift) + tl.sum(term, axis=0)
    sum_t = sum_t * a_t + tl.sum(e_t, axis=0)
    sum_s = sum_s * a_s + tl.sum(e_s, axis=0)
    return new_m_s, new_m_t, sum_s, sum_t, acc_a


@triton.jit
def kl_pass(s_row, t_row, V, cols, label, compute, x_scale, BLOCK_V: tl.constexpr, SKIP_LABEL: tl.constexpr,
            CE_SUM: tl.constexpr):
    """The first pass of a two-distribution kernel over its row (nothing for a row not computed):
    kl_step over every chunk, the label's entry left out with SKIP_LABEL (loaded as -inf: in no
    maximum or sum), and with CE_SUM the CE's sum at T = 1, S_1 = sum 2^((s - r_s) log2(e)), from
    the same loads. Returns (m_s, m_t, S_s, S_t, A, S_1)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    m_s, sum_s = online_start()
    m_t, sum_t = online_start()
    acc_a = tl.zeros((), tl.float32)
    sum_1 = tl.zeros((), tl.float32)
    if compute:
        for start in range(0, V, BLOCK_V):
            offs, mask = forward_chunk(start, V, cols)
            if SKIP_LABEL:
                mask = mask & (offs != label)
            # evict_last: keep the row in L2 for the next pass.
            s = load_chunk(s_row + offs, mask, "evict_last")
            t = load_chunk(t_row + offs, mask, "evict_last")
            old_m_s = m_s
            m_s, m_t, sum_s, sum_t, acc_a = kl_step(m_s, m_t, sum_s, sum_t, acc_a, s, t, x_scale)
            if CE_SUM:
                sum_1 = sum_step(sum_1, old_m_s, reference(m_s), s, LOG2E)
    return m_s, m_t, sum_s, sum_t, acc_a, sum_1


@triton.jit
def student_step(m_s, sum_s, sum_1, s, x_scale, CE_SUM: tl.constexpr):
    """One chunk of the student's own online sums: S_s at T and, with CE_SUM, the CE's S_1 at
    T = 1. Returns the new maximum, its reference, S_s and S_1."""
    LOG2E: tl.constexpr = 1.4426950408889634
    new_m, r = online_max(m_s, s)
    sum_s = sum_step(sum_s, m_s, r, s, x_scale)
    if CE_SUM:
        sum_1 = sum_step(sum_1, m_s, r, s, LOG2E)
    return new_m, r, sum_s, sum_1


@triton.jit
def ce_loss(s_row, label, compute, r_s, sum_1):
    """The hard-label cross-entropy logsumexp(s) - s[label] from the T = 1 sum S_1 = sum e^(s - r_s)."""
    LN2: tl.constexpr = 0.6931471805599453
    s_label = tl.load(s_row + tl.where(compute, label, 0)).to(tl.float32)
    return LN2 * tl.log2(sum_1) + (r_s - s_label)


@triton.jit
def ce_grad(q, s, r_s, inv_1, offs, label, SAME_T: tl.constexpr):
    """softmax(s) - onehot(label) at ``offs``: q itself at T = 1."""
    LOG2E: tl.constexpr = 1.4426950408889634
    if SAME_T:
        sm = q
    else:
        sm = tl.exp2((s - r_s) * LOG2E) * inv_1
    return sm - tl.where(offs == label, 1.0, 0.0)


@triton.jit
def finish_loss(row_loss_ptr, row, loss, s_row, label, compute, bad, r_s, sum_s, sum_1, hard_weight,
                HAS_CE: tl.constexpr, SAME_T: tl.constexpr):
    """Stores the row's loss: the soft term ``loss``, plus hard_weight times the CE with one; 0
    for an ignored row, NaN for a bad one. Returns S_1, the sum of the CE's softmax (S_s at T = 1)."""
    if HAS_CE:
        if SAME_T:
            sum_1 = sum_s
        loss += hard_weight * ce_loss(s_row, label, compute, r_s, sum_1)
    store_row_loss(row_loss_ptr, row, loss, compute, bad)
    return sum_1


@triton.jit
def store_row_loss(row_loss_ptr, row, loss, compute, bad):
    """The row's loss; 0 for an ignored row, NaN for a bad one."""
    tl.store(row_loss_ptr + row, tl.where(compute, loss, tl.where(bad, float("nan"), 0.0)))


@triton.jit
def gradient_scale(scale_ptr, n_rows, go, SCALE_MODE: tl.constexpr):
    """The factor of every gradient entry besides the loss's own: the reduction's (0: 1,
    1: 1 / n_rows, 2: *scale_ptr) times the row's grad_scale ``go``."""
    if SCALE_MODE == 2:
        scale = tl.load(scale_ptr)
    elif SCALE_MODE == 1:
        scale = 1.0 / n_rows
    else:
        scale = 1.0
    return scale * go


@triton.jit
def grad_coefs(scale_ptr, n_rows, go, soft_grad_coef, hard_weight, sum_1, SCALE_MODE: tl.constexpr):
    """The soft and hard terms' gradient factors (theirs times gradient_scale()), and 1 / S_1."""
    scale = gradient_scale(scale_ptr, n_rows, go, SCALE_MODE)
    return soft_grad_coef * scale, hard_weight * scale, 1.0 / sum_1


@triton.jit
def store_grad(g_row, offs, mask, g, q, s, r_s, inv_1, label, k_hard, HAS_CE: tl.constexpr, SAME_T: tl.constexpr):
    """Writes the soft term's gradient ``g`` plus, with the CE, k_hard (softmax(s) - onehot(label))
    at ``offs``, rounded once to the gradient's dtype."""
    if HAS_CE:
        g += k_hard * ce_grad(q, s, r_s, inv_1, offs, label, SAME_T)
    tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def forward_chunk(start, V, cols):
    """Offsets and mask of the chunk at ``start`` of a row of V (``cols``: tl.arange(0, BLOCK_V),
    made once per kernel)."""
    offs = start + cols
    return offs, offs < V


@triton.jit
def backward_chunk(start, V, cols, BLOCK_V: tl.constexpr):
    """Offsets and mask of the gradient pass's chunk ``start``, last chunk first: the one most
    likely still in L2 after the pass before."""
    offs = (((V - 1) // BLOCK_V) * BLOCK_V - start) + cols
    return offs, offs < V


@triton.jit
def fill_row(g_row, V, bad, BLOCK_V: tl.constexpr):
    """The gradient row of a row not computed: NaN for a bad row, else 0."""
    fill = tl.where(bad, float("nan"), 0.0).to(g_row.dtype.element_ty)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        tl.store(g_row + offs, tl.zeros((BLOCK_V,), g_row.dtype.element_ty) + fill, mask=offs < V)
