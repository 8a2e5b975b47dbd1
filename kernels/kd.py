"""Fused temperature knowledge distillation (forward KL + optional hard-label CE): Triton.

One program per row. Per row, with p = softmax(t/T) (teacher), q = softmax(s/T) (student):

    KL   = sum p (log p - log q)
    CE   = logsumexp(s) - s[label]                                   (T = 1, only with labels, a > 0)
    loss = (1 - a) * c * KL + a * CE                                 c = T^2 if t2_scale else 1
    grad = scale * ((1 - a) * g * (q - p) + a * (softmax(s) - onehot(label)))
                                                                     g = T if t2_scale else 1/T

Pass 1 streams the row in BLOCK_V chunks with online maxima. Everything is kept in base 2:
x = (s - r_s) * log2(e)/T and y = (t - r_t) * log2(e)/T, where r_s, r_t are the running maxima
of the *raw* logits (0 while they are still -inf, so that -inf - -inf never occurs). The
differences are taken before scaling, so a large common offset in the logits costs no precision.
The accumulators are

    S_s = sum 2^x,   S_t = sum 2^y,   A = sum_{2^y != 0} 2^y (y - x),   S_1 = sum e^(s - r_s)

and KL = ln2 * (A / S_t + log2 S_s - log2 S_t). A is taken relative to both references, not as
sum 2^y (t - s)/T with the offset subtracted at the end: a constant shift between teacher and
student logits then cancels inside each term instead of cancelling between two large numbers.
Terms with 2^y == 0 (teacher -inf: masked vocabulary) contribute 0, not 0 * inf = NaN. When a
reference grows from r to r', the sums are multiplied by 2^((r - r')log2(e)/T) and A also gains
S_t times the shift of both references. NaN inputs propagate through the sums, so a row holding
a NaN gets a NaN loss whatever the max reduction does with NaN.

Pass 2 re-reads the row (last chunk first: it is the one most likely still in L2) and writes
the gradient. Ignored rows (label == ignore_index) read nothing and get loss 0 and a zero
gradient; a label outside [0, V) (and not ignore_index) gives a NaN loss and a NaN gradient.

Memory traffic: read 2*N*V (student, teacher; pass 2 re-reads them, ideally from L2),
write N*V (gradient) + N (row losses).
"""

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------
# Launch configurations: kd_forward chooses only through launch_shape() and switches(), so that
# a list of every launch it can make can be derived from them.
# ----------------------------------------------------------------------------------------------

# Largest chunk of a row held at once. Under the interpreter (CPU tensors) a smaller chunk keeps
# the blocked path exercised by small test shapes.
_BLOCK_V_MAX_GPU = 4096
_BLOCK_V_MAX_INTERPRETER = 256


def launch_shape(v: int, on_gpu: bool = True) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of v entries."""
    cap = _BLOCK_V_MAX_GPU if on_gpu else _BLOCK_V_MAX_INTERPRETER
    block_v = min(triton.next_power_of_2(v), cap)
    num_warps = 8 if block_v >= 2048 else 4 if block_v >= 512 else 2 if block_v >= 128 else 1
    return block_v, num_warps


def switches(has_labels: bool, hard_weight: float, temperature: float, reduction: str, compute_grad: bool) -> dict:
    """The kernel's constexpr switches other than BLOCK_V, for one call."""
    # batchmean divides by the number of non-ignored rows: with labels that count is only known
    # on the device (SCALE_MODE 2 reads it from a tensor), without it is n_rows (SCALE_MODE 1).
    scale_mode = 0 if reduction != "batchmean" else 2 if has_labels else 1
    return dict(
        HAS_LABELS=has_labels,
        HAS_CE=has_labels and hard_weight > 0,
        SAME_T=temperature == 1.0,
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


@triton.jit
def _kd_forward_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    labels_ptr,  # [N] int64, or None when HAS_LABELS is False
    row_loss_ptr,  # [N] float32
    grad_ptr,  # [N, V] student dtype, or None when COMPUTE_GRAD is False
    scale_ptr,  # [] float32 reduction scale when SCALE_MODE == 2, else None
    n_rows,
    V,
    ignore_index,
    x_scale,  # log2(e) / T
    soft_loss_coef,  # (1 - a) * (T^2 or 1)
    hard_weight,  # a
    soft_grad_coef,  # (1 - a) * (T or 1/T), before the reduction scale
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    SAME_T: tl.constexpr,  # T == 1: the CE softmax is the student softmax
    SCALE_MODE: tl.constexpr,  # gradient scale: 0 -> 1, 1 -> 1 / n_rows, 2 -> *scale_ptr
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")

    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    cols = tl.arange(0, BLOCK_V)

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

    # Pass 1: online maxima of the raw logits and the sums relative to them.
    m_s = tl.full((), NEG_INF, tl.float32)
    m_t = tl.full((), NEG_INF, tl.float32)
    sum_s = tl.zeros((), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    acc_a = tl.zeros((), tl.float32)
    sum_1 = tl.zeros((), tl.float32)
    if compute:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            # evict_last: keep the row in L2 for pass 2.
            s = tl.load(s_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32)
            t = tl.load(t_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32)
            new_m_s = tl.maximum(m_s, tl.max(s, axis=0))
            new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
            old_r_s = tl.where(m_s == NEG_INF, 0.0, m_s)
            old_r_t = tl.where(m_t == NEG_INF, 0.0, m_t)
            r_s = tl.where(new_m_s == NEG_INF, 0.0, new_m_s)
            r_t = tl.where(new_m_t == NEG_INF, 0.0, new_m_t)
            x = (s - r_s) * x_scale
            y = (t - r_t) * x_scale
            e_s = tl.exp2(x)
            e_t = tl.exp2(y)
            # Rescale factors of the old sums: 2^(-inf) = 0 while nothing finite was seen yet.
            a_s = tl.exp2((m_s - r_s) * x_scale)
            a_t = tl.exp2((m_t - r_t) * x_scale)
            shift = ((old_r_t - r_t) - (old_r_s - r_s)) * x_scale
            term = tl.where(e_t == 0.0, 0.0, e_t * (y - x))
            acc_a = a_t * (acc_a + sum_t * shift) + tl.sum(term, axis=0)
            sum_t = sum_t * a_t + tl.sum(e_t, axis=0)
            sum_s = sum_s * a_s + tl.sum(e_s, axis=0)
            if HAS_CE and not SAME_T:
                a_1 = tl.exp2((m_s - r_s) * LOG2E)
                sum_1 = sum_1 * a_1 + tl.sum(tl.exp2((s - r_s) * LOG2E), axis=0)
            m_s = new_m_s
            m_t = new_m_t

    r_s = tl.where(m_s == NEG_INF, 0.0, m_s)
    r_t = tl.where(m_t == NEG_INF, 0.0, m_t)
    loss = soft_loss_coef * (LN2 * (acc_a / sum_t + tl.log2(sum_s) - tl.log2(sum_t)))
    if HAS_CE:
        if SAME_T:
            sum_1 = sum_s
        safe_label = tl.where(compute, label, 0)
        s_label = tl.load(s_row + safe_label).to(tl.float32)
        loss += hard_weight * (LN2 * tl.log2(sum_1) + (r_s - s_label))
    if HAS_LABELS:
        loss = tl.where(compute, loss, tl.where(bad, float("nan"), 0.0))
    tl.store(row_loss_ptr + row, loss)

    # Pass 2: the gradient, last chunk first.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * V
        if SCALE_MODE == 2:
            scale = tl.load(scale_ptr)
        elif SCALE_MODE == 1:
            scale = 1.0 / n_rows
        else:
            scale = 1.0
        k_soft = soft_grad_coef * scale
        k_hard = hard_weight * scale
        inv_s = 1.0 / sum_s
        inv_t = 1.0 / sum_t
        inv_1 = 1.0 / sum_1
        last = ((V - 1) // BLOCK_V) * BLOCK_V
        if compute:
            for start in range(0, V, BLOCK_V):
                offs = (last - start) + cols
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_first").to(tl.float32)
                t = tl.load(t_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_first").to(tl.float32)
                q = tl.exp2((s - r_s) * x_scale) * inv_s
                p = tl.exp2((t - r_t) * x_scale) * inv_t
                g = k_soft * (q - p)
                if HAS_CE:
                    if SAME_T:
                        sm = q
                    else:
                        sm = tl.exp2((s - r_s) * LOG2E) * inv_1
                    g += k_hard * (sm - tl.where(offs == label, 1.0, 0.0))
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            fill = tl.where(bad, float("nan"), 0.0).to(grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(g_row + offs, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty) + fill, mask=offs < V)


def kd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    divergence: str,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    t2_scale: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::kd_forward on Triton: (loss float32, grad in the student's dtype or empty [0]).

    Inputs are expected validated by the caller (contiguous [N, V], labels int64 [N] or None).
    Uses only torch ops and one wrap_triton launch, with no host synchronisation, so that it
    can run inside torch.library.triton_op.
    """
    if divergence != "kl":
        raise ValueError(f"kd_forward (triton): divergence {divergence!r} is not supported; only 'kl' is")
    if reduction not in ("none", "sum", "batchmean"):
        raise ValueError(f"kd_forward (triton): reduction must be 'none', 'sum' or 'batchmean', got {reduction!r}")
    n, v = student.shape
    device = student.device
    row_loss = torch.empty(n, dtype=torch.float32, device=device)
    grad = torch.empty_like(student) if compute_grad else torch.empty(0, dtype=student.dtype, device=device)

    has_labels = labels is not None
    switch = switches(has_labels, hard_weight, temperature, reduction, compute_grad)
    # batchmean divides by the number of non-ignored rows, which is only known on the device.
    # With none of them, every row loss and gradient row is 0, so any finite scale will do.
    scale_t = None
    if switch["SCALE_MODE"] == 2:
        scale_t = labels.ne(ignore_index).sum().clamp_min(1).to(torch.float32).reciprocal()

    block_v, num_warps = launch_shape(v, on_gpu=device.type == "cuda")

    torch.library.wrap_triton(_kd_forward_kernel)[(n,)](
        student,
        teacher,
        labels,
        row_loss,
        grad if compute_grad else None,
        scale_t,
        n,
        v,
        ignore_index,
        _LOG2E / temperature,
        (1.0 - hard_weight) * (temperature * temperature if t2_scale else 1.0),
        hard_weight,
        (1.0 - hard_weight) * (temperature if t2_scale else 1.0 / temperature),
        **switch,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )

    if reduction == "none":
        loss = row_loss
    elif reduction == "sum":
        loss = row_loss.sum()
    elif scale_t is not None:
        loss = row_loss.sum() * scale_t
    else:
        loss = row_loss.sum() / n
    return loss, grad

