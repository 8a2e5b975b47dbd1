"""Fused temperature knowledge distillation (any divergence, one teacher or an ensemble, optional
hard-label CE): Triton. Two kernels: ``_kd_forward_kernel`` (forward KL, one teacher: two
passes) and ``_kd_div_kernel`` (every other divergence, and ensembles: three passes; its math is
at its definition below).

``_kd_forward_kernel``: one program per row. Per row, with p = softmax(t/T) (teacher), q = softmax(s/T) (student):

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

import inspect
import itertools
import math

import torch
import triton
import triton.language as tl

from . import GRAD_SCALE_OFF, GRAD_SCALE_ON, grad_scale_switches, grad_scale_variant

_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# Launch configuration: the one place that decides it. The static GPU checks compile every kernel
# of this file for every configuration listed here (block sizes up to the cap, the num_warps rule,
# every value of every constexpr switch).
# ---------------------------------------------------------------------------------------------

# Largest chunk of a row held at once, per kernel. Under the interpreter (CPU tensors) a smaller
# chunk keeps the blocked path exercised by small test shapes. The divergence kernel keeps about
# twice as many live values per element (q, log q, p, log p, the mixture), hence its smaller cap.
BLOCK_V_MAX_GPU = {"_kd_forward_kernel": 4096, "_kd_div_kernel": 2048}
BLOCK_V_MAX_INTERPRETER = 256


def block_v_for(kernel: str, vocab: int, device_type: str) -> int:
    cap = BLOCK_V_MAX_GPU[kernel] if device_type == "cuda" else BLOCK_V_MAX_INTERPRETER
    return min(triton.next_power_of_2(vocab), cap)


def num_warps_for(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4 if block_v >= 512 else 2 if block_v >= 128 else 1


def switches(has_labels: bool, hard_weight: float, temperature: float, reduction: str, compute_grad: bool) -> dict:
    """The constexpr switches both kernels share, for one call."""
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


def m_pad_for(n_teachers: int) -> int:
    """_kd_div_kernel's M_PAD: the teachers' [M_PAD] register vectors, a power of two >= 2.

    8 is skipped (5 to 16 teachers take 16): at M_PAD 8, BLOCK_V 2048, 8 warps, ptxas for sm_80
    puts 16 bytes on the stack (the static check's spill rule), at 16 it does not; the vectors
    are tiny either way."""
    m_pad = max(2, triton.next_power_of_2(n_teachers))
    return 16 if m_pad == 8 else m_pad


# DIVERGENCE codes of _kd_div_kernel (kl comes here only for an ensemble).
DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_kl": 4, "skew_reverse_kl": 5}


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
def _kd_forward_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    labels_ptr,  # [N] int64, or None when HAS_LABELS is False
    row_loss_ptr,  # [N] float32
    grad_ptr,  # [N, V] student dtype, or None when COMPUTE_GRAD is False
    scale_ptr,  # [] float32 reduction scale when SCALE_MODE == 2, else None
    go_ptr,  # float32 grad_scale: [] (GO_MODE 1) or [N] (GO_MODE 2), else None
    n_rows,
    V,
    ignore_index,
    x_scale,  # log2(e) / T
    soft_loss_coef,  # (1 - a) * (T or 1); the loss's T^2 is this times soft_loss_t
    soft_loss_t,  # T or 1: two float32 factors, since T^2 alone overflows float32 from T ~ 1.8e19
    hard_weight,  # a
    soft_grad_coef,  # (1 - a) * (T or 1/T), before the reduction scale
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    SAME_T: tl.constexpr,  # T == 1: the CE softmax is the student softmax
    SCALE_MODE: tl.constexpr,  # gradient scale: 0 -> 1, 1 -> 1 / n_rows, 2 -> *scale_ptr
    COMPUTE_GRAD: tl.constexpr,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py)
    GO_SKIP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    hard_weight = tl.cast(hard_weight, tl.float32)
    soft_grad_coef = tl.cast(soft_grad_coef, tl.float32)
    soft_loss_coef = tl.cast(soft_loss_coef, tl.float32)
    soft_loss_t = tl.cast(soft_loss_t, tl.float32)
    x_scale = tl.cast(x_scale, tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")

    row = tl.program_id(0).to(tl.int64)
    go = grad_scale_of(go_ptr, row, GO_MODE)
    if GO_SKIP:
        if go == 1.0:  # the forward's gradient stands: no traffic
            return
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
    loss = soft_loss_coef * (soft_loss_t * (LN2 * (acc_a / sum_t + tl.log2(sum_s) - tl.log2(sum_t))))
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
        scale = scale * go
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


@triton.jit
def _div_terms(q, lq2, p, lp2, beta, log2_b, log2_1mb, DIVERGENCE: tl.constexpr):
    """Per entry: (t1, x) of _kd_div_kernel's table, from q, p and their base-2 logs."""
    LN2: tl.constexpr = 0.6931471805599453
    if DIVERGENCE == 0:  # kl: x = p (the gradient is q - p)
        x = p
        t1 = tl.where(p == 0.0, 0.0, p * (LN2 * (lp2 - lq2)))
    elif DIVERGENCE == 1:  # reverse_kl
        x = LN2 * (lq2 - lp2)
        t1 = tl.zeros_like(q)
    elif DIVERGENCE == 3:  # tvd
        d = q - p
        x = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        t1 = tl.abs(d)
    else:
        if DIVERGENCE == 5:  # skew_reverse_kl: m = (1-b) p + b q
            a = log2_1mb + lp2
            b = log2_b + lq2
        else:  # jsd, skew_kl: m = b p + (1-b) q
            a = log2_b + lp2
            b = log2_1mb + lq2
        e = tl.exp2(-tl.abs(a - b))
        lm2 = tl.maximum(a, b) + tl.log2(1.0 + e)
        if DIVERGENCE == 2:  # jsd
            x = LN2 * (lq2 - lm2)
            t1 = tl.where(p == 0.0, 0.0, p * (LN2 * (lp2 - lm2)))
        elif DIVERGENCE == 4:  # skew_kl: x = -p/m
            x = -tl.where(a - b < 0.0, e, 1.0) / (beta * (1.0 + e))
            t1 = tl.where(p == 0.0, 0.0, p * (LN2 * (lp2 - lm2)))
        else:  # skew_reverse_kl: x = (log q - log m) - b q/m
            d = LN2 * (lq2 - lm2)
            x = d - tl.where(b - a < 0.0, e, 1.0) / (1.0 + e)
            t1 = tl.where(q == 0.0, 0.0, q * d)
    return t1, x


@triton.jit
def _mixture_log2(t_row, offs, mask, teacher_stride, x_scale, M, r_vec, c_vec, midx, BLOCK_V: tl.constexpr):
    """log2 of the ensemble's p at offs: log2 sum_m 2^(c_m + (t_m - r_m) x_scale), an online
    log-sum-exp over the teachers (exact where probabilities underflow)."""
    NEG_INF: tl.constexpr = float("-inf")
    best = tl.full((BLOCK_V,), NEG_INF, tl.float32)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    # Teacher m's row at m * stride, in int64 (it passes 2^31 on large batches). Computed from m
    # rather than by advancing a pointer through the loop: the pointer kept across the loop cost
    # 8 bytes of stack on sm_80/sm_90 (the static check's spill rule).
    stride = tl.zeros((), tl.int64) + teacher_stride
    for m in range(M):
        r_m = tl.sum(tl.where(midx == m, r_vec, 0.0), axis=0)
        c_m = tl.sum(tl.where(midx == m, c_vec, 0.0), axis=0)
        tm = tl.load(t_row + m * stride + offs, mask=mask, other=NEG_INF).to(tl.float32)
        v = c_m + (tm - r_m) * x_scale
        new = tl.maximum(best, v)
        ref = tl.where(new == NEG_INF, 0.0, new)
        acc = acc * tl.exp2(best - ref) + tl.exp2(v - ref)
        best = new
    # Every term -inf (a masked entry): best = -inf, acc = 0, and the sum is -inf + -inf = -inf;
    # a NaN term leaves acc NaN, whatever tl.maximum made of it.
    return best + tl.log2(acc)


@triton.jit
def _kd_div_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V], or [M, N, V] when MIX
    labels_ptr,  # [N] int64, or None when HAS_LABELS is False
    lw_ptr,  # [M] float32 log2 of the teacher weights when HAS_WEIGHTS, else None (uniform)
    row_loss_ptr,  # [N] float32
    grad_ptr,  # [N, V] student dtype, or None when COMPUTE_GRAD is False
    scale_ptr,  # [] float32 reduction scale when SCALE_MODE == 2, else None
    go_ptr,  # float32 grad_scale: [] (GO_MODE 1) or [N] (GO_MODE 2), else None
    n_rows,
    V,
    M,  # teachers (1 unless MIX)
    teacher_stride,  # N * V
    ignore_index,
    x_scale,  # log2(e) / T
    soft_loss_coef,  # (1 - a) * (T or 1)
    soft_loss_t,  # T or 1
    hard_weight,  # a
    soft_grad_coef,  # (1 - a) * (T or 1/T) * the divergence's gradient factor k
    beta,
    log2_b,  # log2(beta), log2(1 - beta) (0 where unused)
    log2_1mb,
    log2_uniform,  # -log2(M)
    DIVERGENCE: tl.constexpr,  # DIVERGENCE_CODES
    MIX: tl.constexpr,
    M_PAD: tl.constexpr,  # a power of two >= M (>= 2)
    HAS_WEIGHTS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    SAME_T: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py)
    GO_SKIP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Every divergence but one-teacher KL, and ensembles. Per row (q = softmax(s/T), p the
    teacher's or the mixture sum_m w_m softmax(t_m/T)), every divergence's gradient is
    dL/d(s/T) = k q (x - c) with c = sum q x (kl: q - p), x and k per divergence:

        reverse_kl  L = sum q (lq - lp)                            x = lq - lp              k = 1
        jsd         L = b sum p (lp - lm) + (1-b) sum q (lq - lm)  x = lq - lm              k = 1-b
        tvd         L = 1/2 sum |p - q|                            x = sign(q - p)          k = 1/2
        skew_kl     L = sum p (lp - lm), m = b p + (1-b) q         x = -p/m                 k = 1-b
        skew_rkl    L = sum q (lq - lm), m = (1-b) p + b q         x = (lq - lm) - b q/m    k = 1

    Pass 1: online maxima and sums (base 2, as _kd_forward_kernel) of the student and of each
    teacher; an ensemble keeps each teacher's reference r_m and c_m = log2 w_m - log2 S_m in
    registers ([M_PAD] vectors). Pass 2: per chunk, log q and log p exactly (log2 q = x - log2 S,
    an ensemble's log p by an online log-sum-exp over the teachers), log m as a log-sum-exp
    (max + log2(1 + 2^-|A-B|), never the log of a sum of probabilities: finite where float32
    probabilities underflow), the skews' p/m and q/m from that same 2^-|A-B|; sums of the loss
    terms and of q x. Pass 3: the gradient, recomputing pass 2's per-entry values. An entry where
    p and q are both 0 (masked vocabulary) contributes 0 and gets 0: its terms are taken only
    where their weight (p or q) is nonzero. Memory traffic: read 3 (M+1) N V (passes 2 and 3
    re-read the row, from L2 where it stays), write N V.
    """
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    beta = tl.cast(beta, tl.float32)
    hard_weight = tl.cast(hard_weight, tl.float32)
    log2_1mb = tl.cast(log2_1mb, tl.float32)
    log2_b = tl.cast(log2_b, tl.float32)
    log2_uniform = tl.cast(log2_uniform, tl.float32)
    soft_grad_coef = tl.cast(soft_grad_coef, tl.float32)
    soft_loss_coef = tl.cast(soft_loss_coef, tl.float32)
    soft_loss_t = tl.cast(soft_loss_t, tl.float32)
    x_scale = tl.cast(x_scale, tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")

    row = tl.program_id(0).to(tl.int64)
    go = grad_scale_of(go_ptr, row, GO_MODE)
    if GO_SKIP:
        if go == 1.0:  # the forward's gradient stands: no traffic
            return
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    midx = tl.arange(0, M_PAD)

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

    # Pass 1: the student's (and one teacher's) online maximum and sum; then each teacher's.
    m_s = tl.full((), NEG_INF, tl.float32)
    m_t = tl.full((), NEG_INF, tl.float32)
    sum_s = tl.zeros((), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    sum_1 = tl.zeros((), tl.float32)
    r_vec = tl.zeros((M_PAD,), tl.float32)
    c_vec = tl.zeros((M_PAD,), tl.float32)
    if compute:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            s = tl.load(s_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32)
            new_m_s = tl.maximum(m_s, tl.max(s, axis=0))
            r_s = tl.where(new_m_s == NEG_INF, 0.0, new_m_s)
            sum_s = sum_s * tl.exp2((m_s - r_s) * x_scale) + tl.sum(tl.exp2((s - r_s) * x_scale), axis=0)
            if HAS_CE and not SAME_T:
                sum_1 = sum_1 * tl.exp2((m_s - r_s) * LOG2E) + tl.sum(tl.exp2((s - r_s) * LOG2E), axis=0)
            m_s = new_m_s
            if not MIX:
                t = tl.load(t_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32)
                new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
                r_t = tl.where(new_m_t == NEG_INF, 0.0, new_m_t)
                sum_t = sum_t * tl.exp2((m_t - r_t) * x_scale) + tl.sum(tl.exp2((t - r_t) * x_scale), axis=0)
                m_t = new_m_t
        if MIX:
            stride = tl.zeros((), tl.int64) + teacher_stride  # as in _mixture_log2
            for m in range(M):
                tm_row = t_row + m * stride
                mx = tl.full((), NEG_INF, tl.float32)
                sm = tl.zeros((), tl.float32)
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    tm = tl.load(tm_row + offs, mask=offs < V, other=NEG_INF, eviction_policy="evict_last").to(tl.float32)
                    new_mx = tl.maximum(mx, tl.max(tm, axis=0))
                    r = tl.where(new_mx == NEG_INF, 0.0, new_mx)
                    sm = sm * tl.exp2((mx - r) * x_scale) + tl.sum(tl.exp2((tm - r) * x_scale), axis=0)
                    mx = new_mx
                if HAS_WEIGHTS:
                    lw = tl.load(lw_ptr + m)
                else:
                    lw = log2_uniform
                r_vec = tl.where(midx == m, tl.where(mx == NEG_INF, 0.0, mx), r_vec)
                c_vec = tl.where(midx == m, lw - tl.log2(sm), c_vec)

    r_s = tl.where(m_s == NEG_INF, 0.0, m_s)
    r_t = tl.where(m_t == NEG_INF, 0.0, m_t)
    log2_ss = tl.log2(sum_s)
    log2_st = tl.log2(sum_t)

    # Pass 2: the row's statistics.
    acc1 = tl.zeros((BLOCK_V,), tl.float32)
    accc = tl.zeros((BLOCK_V,), tl.float32)
    if compute:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            s = tl.load(s_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32)
            lq2 = (s - r_s) * x_scale - log2_ss
            q = tl.exp2(lq2)
            if MIX:
                lp2 = _mixture_log2(t_row, offs, mask, teacher_stride, x_scale, M, r_vec, c_vec, midx, BLOCK_V)
            else:
                t = tl.load(t_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32)
                lp2 = (t - r_t) * x_scale - log2_st
            p = tl.exp2(lp2)
            t1, x = _div_terms(q, lq2, p, lp2, beta, log2_b, log2_1mb, DIVERGENCE)
            acc1 += t1
            if DIVERGENCE != 0:
                accc += tl.where(q == 0.0, 0.0, q * x)
    tot1 = tl.sum(acc1, axis=0)
    c = tl.sum(accc, axis=0)
    if DIVERGENCE == 0:
        soft = tot1
    elif DIVERGENCE == 1:
        soft = c
    elif DIVERGENCE == 2:
        soft = beta * tot1 + (1.0 - beta) * c
    elif DIVERGENCE == 3:
        soft = 0.5 * tot1
    else:
        soft = tot1
    soft = tl.where(soft < 0.0, 0.0, soft)  # >= 0; rounding can leave -1e-9 at p == q (NaN kept)
    loss = soft_loss_coef * (soft_loss_t * soft)
    if HAS_CE:
        if SAME_T:
            sum_1 = sum_s
        safe_label = tl.where(compute, label, 0)
        s_label = tl.load(s_row + safe_label).to(tl.float32)
        loss += hard_weight * (LN2 * tl.log2(sum_1) + (r_s - s_label))
    if HAS_LABELS:
        loss = tl.where(compute, loss, tl.where(bad, float("nan"), 0.0))
    tl.store(row_loss_ptr + row, loss)

    # Pass 3: the gradient, last chunk first.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * V
        if SCALE_MODE == 2:
            scale = tl.load(scale_ptr)
        elif SCALE_MODE == 1:
            scale = 1.0 / n_rows
        else:
            scale = 1.0
        scale = scale * go
        k_soft = soft_grad_coef * scale
        k_hard = hard_weight * scale
        inv_1 = 1.0 / sum_1
        last = ((V - 1) // BLOCK_V) * BLOCK_V
        if compute:
            for start in range(0, V, BLOCK_V):
                offs = (last - start) + cols
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_first").to(tl.float32)
                lq2 = (s - r_s) * x_scale - log2_ss
                q = tl.exp2(lq2)
                if MIX:
                    lp2 = _mixture_log2(t_row, offs, mask, teacher_stride, x_scale, M, r_vec, c_vec, midx, BLOCK_V)
                else:
                    t = tl.load(t_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_first").to(tl.float32)
                    lp2 = (t - r_t) * x_scale - log2_st
                p = tl.exp2(lp2)
                _, x = _div_terms(q, lq2, p, lp2, beta, log2_b, log2_1mb, DIVERGENCE)
                if DIVERGENCE == 0:
                    g = k_soft * (q - x)
                else:
                    g = k_soft * tl.where(q == 0.0, 0.0, q * (x - c))
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


# The divergence's beta range and its gradient factor k (see _kd_div_kernel).
def _resolve_divergence(divergence: str, beta: float) -> tuple[str, float]:
    """The endpoints that are another divergence become it (as the cpu kernel does): jsd at 0 is
    kl and at 1 reverse_kl, skew_kl at 0 kl, skew_reverse_kl at 0 reverse_kl."""
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"kd_forward (triton): divergence must be one of {', '.join(DIVERGENCE_CODES)}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0 or divergence in ("skew_kl", "skew_reverse_kl") and not 0.0 <= beta < 1.0:
        raise ValueError(f"kd_forward (triton): beta={beta} is out of range for divergence {divergence!r}")
    if divergence in ("jsd", "skew_kl") and beta == 0.0:
        return "kl", 0.0
    if divergence == "jsd" and beta == 1.0 or divergence == "skew_reverse_kl" and beta == 0.0:
        return "reverse_kl", 0.0
    return divergence, beta


def kd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_weights: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    t2_scale: bool,
    compute_grad: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::kd_forward on Triton: (loss float32, grad in the student's dtype or empty [0]).

    Inputs are expected validated by the caller (contiguous student [N, V], teacher [N, V] or
    [M, N, V], labels int64 [N] or None, teacher_weights [M] or None, grad_scale a float32
    tensor of 1 or N elements or None).
    Uses only torch ops and one wrap_triton launch, with no host synchronisation, so that it
    can run inside torch.library.triton_op.
    """
    return _kd_launch(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight,
                      ignore_index, reduction, t2_scale, compute_grad, grad_scale, None)


def kd_forward_rescale_(grad, student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight,
                        ignore_index, reduction, t2_scale, grad_scale) -> None:
    """fastkd::kd_forward_rescale_ on Triton (csrc/ops.cpp): ``grad``, the forward's gradient,
    rewritten with grad_scale folded in; rows whose scale is exactly 1 are skipped on the device."""
    _kd_launch(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight, ignore_index,
               reduction, t2_scale, True, grad_scale, grad)


def _kd_launch(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight, ignore_index,
               reduction, t2_scale, compute_grad, grad_scale, into):
    if reduction not in ("none", "sum", "batchmean"):
        raise ValueError(f"kd_forward (triton): reduction must be 'none', 'sum' or 'batchmean', got {reduction!r}")
    divergence, beta = _resolve_divergence(divergence, beta)
    n, v = student.shape[0], student.shape[-1]
    mix = teacher.dim() == 3
    device = student.device
    row_loss = torch.empty(n, dtype=torch.float32, device=device)
    if into is not None:
        grad = into
    else:
        grad = torch.empty_like(student) if compute_grad else torch.empty(0, dtype=student.dtype, device=device)
    go = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()

    has_labels = labels is not None
    # batchmean divides by the number of non-ignored rows, which is only known on the device.
    # With none of them, every row loss and gradient row is 0, so any finite scale will do.
    common = switches(has_labels, hard_weight, temperature, reduction, compute_grad)
    common.update(grad_scale_switches(go, into is not None))
    scale_t = None
    if common["SCALE_MODE"] == 2:
        scale_t = labels.ne(ignore_index).sum().clamp_min(1).to(torch.float32).reciprocal()

    soft_loss_coef = (1.0 - hard_weight) * (temperature if t2_scale else 1.0)
    soft_grad_coef = (1.0 - hard_weight) * (temperature if t2_scale else 1.0 / temperature)
    if divergence == "kl" and not mix:
        block_v = block_v_for("_kd_forward_kernel", v, device.type)
        torch.library.wrap_triton(_kd_forward_kernel)[(n,)](
            student, teacher, labels, row_loss, grad if compute_grad else None, scale_t, go,
            n, v, ignore_index, _LOG2E / temperature, soft_loss_coef, temperature if t2_scale else 1.0,
            hard_weight, soft_grad_coef,
            BLOCK_V=block_v, num_warps=num_warps_for(block_v), **common,
        )
    else:
        n_teachers = teacher.shape[0] if mix else 1
        factor = 1.0 - beta if divergence in ("jsd", "skew_kl") else 0.5 if divergence == "tvd" else 1.0
        has_beta = divergence in ("jsd", "skew_kl", "skew_reverse_kl")
        log2_w = None if teacher_weights is None else torch.log2(teacher_weights.to(torch.float32)).contiguous()
        block_v = block_v_for("_kd_div_kernel", v, device.type)
        torch.library.wrap_triton(_kd_div_kernel)[(n,)](
            student, teacher, labels, log2_w, row_loss, grad if compute_grad else None, scale_t, go,
            n, v, n_teachers, n * v, ignore_index, _LOG2E / temperature, soft_loss_coef,
            temperature if t2_scale else 1.0, hard_weight, soft_grad_coef * factor, beta,
            math.log2(beta) if has_beta else 0.0, math.log2(1.0 - beta) if has_beta else 0.0,
            -math.log2(n_teachers),
            DIVERGENCE=DIVERGENCE_CODES[divergence], MIX=mix, M_PAD=m_pad_for(n_teachers),
            HAS_WEIGHTS=log2_w is not None, BLOCK_V=block_v, num_warps=num_warps_for(block_v), **common,
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


# ----------------------------------------------------------------------------------------------
# Every launch kd_forward can make, for the static GPU check (convention: kernels/__init__.py).
# ----------------------------------------------------------------------------------------------

# The switch combination with the most work and live values: the CE at T != 1 (a second
# exponential sum), the label loads, the device-side scale, the gradient pass.
RICHEST_SWITCHES = dict(HAS_LABELS=True, HAS_CE=True, SAME_T=False, SCALE_MODE=2, COMPUTE_GRAD=True)
STATIC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _switch_combos() -> list:
    combos = []
    for values in itertools.product(*SWITCH_INPUTS.values()):
        combo = switches(**dict(zip(SWITCH_INPUTS, values)))
        if combo not in combos:
            combos.append(combo)
    assert RICHEST_SWITCHES in combos, "RICHEST_SWITCHES must be a combination switches() can return"
    return combos


def _shapes(kernel: str) -> tuple:
    """(BLOCK_V, num_warps) of every row length, and the largest block of each warp count."""
    from . import largest_per_warp_count

    shapes = sorted({(b, num_warps_for(b)) for b in (block_v_for(kernel, 1 << k, "cuda") for k in range(31))})
    return shapes, largest_per_warp_count(shapes)


def static_launches() -> list:
    """The launches kd_forward can make on a GPU, reduced as follows (the full product is some
    ten thousand compilations, far beyond the few minutes the check may take on 2 cores).

    ``_kd_forward_kernel`` (forward KL, one teacher), 87 launches:

    * every switch combination switches() can return (16) at the largest block of each warp
      count (BLOCK_V 64/1, 256/2, 1024/4, 4096/8 warps), fp32;
    * the richest combination (RICHEST_SWITCHES) at every block shape (BLOCK_V 1 .. 4096), fp32;
      at the largest block of each warp count for bf16 and fp16, and there also with a row length
      that is not a multiple of 16 (fp32: Triton cannot then vectorise the loads);
    * fp32 student with a bf16 teacher and the reverse, richest combination, BLOCK_V 4096.

    ``_kd_div_kernel`` (the other divergences, and ensembles), 59 launches:

    * every divergence, one teacher and an ensemble of 4 with weights (M_PAD 4), richest
      combination, BLOCK_V 1024/4 warps and 2048/8 warps (the two largest, equally loaded per
      thread), fp32; the same at 2048 for bf16, one teacher; every divergence, one teacher, at
      the largest block of the smaller warp counts (BLOCK_V 64/1, 256/2);
    * jsd at 2048, fp32: every other switch combination, and ensembles with M_PAD 2 and 16
      (uniform weights).

    Not compiled: the smaller blocks below the largest of each warp count except as listed
    (fewer elements per thread: never more registers), fp16 where bf16 is (the same code but
    the conversions), n_rows == 1 (Triton makes it a constant; it only removes a division), and
    ignore_index or row counts past 2**31 (64-bit scalars).
    """
    from . import StaticLaunch, dtype_label, shape_label

    combos = _switch_combos()
    # Scalar arguments by parameter name; Triton specialises integers on their value (1, or a
    # multiple of 16), so these are values real launches have.
    scalars = dict(
        n_rows=64, ignore_index=-100, x_scale=_LOG2E / 2.0, soft_loss_coef=0.5, soft_loss_t=2.0,
        hard_weight=0.5, soft_grad_coef=0.5, M=4, teacher_stride=64 * 4096, beta=0.5, log2_b=-1.0,
        log2_1mb=-1.0, log2_uniform=-2.0,
    )

    def launch(kernel, student, teacher, shape, combo, v, extra=None, variant_extra=()):
        block_v, num_warps = shape
        params = inspect.signature(kernel.fn).parameters
        extra = extra or {}
        combo = {**GRAD_SCALE_OFF, **combo}
        args = dict(
            s_ptr=student,
            t_ptr=teacher,
            labels_ptr=torch.int64 if combo["HAS_LABELS"] else None,
            row_loss_ptr=torch.float32,
            grad_ptr=student if combo["COMPUTE_GRAD"] else None,
            scale_ptr=torch.float32 if combo["SCALE_MODE"] == 2 else None,
            go_ptr=torch.float32 if combo["GO_MODE"] else None,
            V=v,
            BLOCK_V=block_v,
            **combo,
            **{k: x for k, x in scalars.items() if k in params},
        )
        if "lw_ptr" in params:
            args["lw_ptr"] = torch.float32 if extra.get("HAS_WEIGHTS") else None
        args.update(extra)
        m = extra.get("M_PAD", 1) if extra.get("MIX") else 1
        per_entry = student.itemsize + m * teacher.itemsize + (student.itemsize if combo["COMPUTE_GRAD"] else 0)
        variant = [
            *variant_extra,
            "labels" if combo["HAS_LABELS"] else "no labels",
            *(["CE"] if combo["HAS_CE"] else []),
            *(["T = 1"] if combo["SAME_T"] else []),
            "grad" if combo["COMPUTE_GRAD"] else "loss only",
            f"scale mode {combo['SCALE_MODE']}",
            *([grad_scale_variant(combo)] if combo["GO_MODE"] else []),
        ]
        return StaticLaunch(
            kernel=kernel,
            args=args,
            num_warps=num_warps,
            label=f"{dtype_label(student, teacher)} · {shape_label(block_v, num_warps)}"
            + ("" if v % 16 == 0 or v < 16 else " · V % 16 != 0"),
            variant=", ".join(variant),
            row_bytes=(per_entry, 4 + (8 if combo["HAS_LABELS"] else 0)),
        )

    out = []
    f32, b16 = torch.float32, torch.bfloat16
    kl = _kd_forward_kernel
    shapes, largest = _shapes("_kd_forward_kernel")
    for shape in largest:
        out += [launch(kl, f32, f32, shape, combo, shape[0]) for combo in combos]
    out += [launch(kl, f32, f32, shape, RICHEST_SWITCHES, shape[0]) for shape in shapes if shape not in largest]
    for dtype in STATIC_DTYPES[1:]:
        out += [launch(kl, dtype, dtype, shape, RICHEST_SWITCHES, shape[0]) for shape in largest]
    out += [launch(kl, f32, f32, shape, RICHEST_SWITCHES, shape[0] - 1) for shape in largest]
    out += [launch(kl, a, b, largest[-1], RICHEST_SWITCHES, largest[-1][0]) for a, b in ((f32, b16), (b16, f32))]
    # The backward's relaunches with grad_scale (16-bit students): bf16, every mode at the
    # largest block, the per-row in-place one at the largest block of every warp count.
    out += [launch(kl, b16, b16, largest[-1], {**RICHEST_SWITCHES, **go}, largest[-1][0]) for go in GRAD_SCALE_ON]
    out += [launch(kl, b16, b16, shape, {**RICHEST_SWITCHES, **GRAD_SCALE_ON[1]}, shape[0]) for shape in largest[:-1]]

    div = _kd_div_kernel
    _, largest = _shapes("_kd_div_kernel")
    top = largest[-2:]
    names = {code: name for name, code in DIVERGENCE_CODES.items()}

    def div_extra(code, mix, m_pad=2, weights=False):
        return dict(DIVERGENCE=code, MIX=mix, M_PAD=m_pad, HAS_WEIGHTS=weights), (
            names[code] + (f" · ensemble (M_PAD {m_pad}{', weights' if weights else ''})" if mix else ""),
        )

    for code in names:
        for shape in largest[:-2]:
            extra, tag = div_extra(code, False)
            out.append(launch(div, f32, f32, shape, RICHEST_SWITCHES, shape[0], extra, tag))
        for shape in top:
            for mix, m_pad, weights in ((False, 2, False), (True, 4, True)):
                extra, tag = div_extra(code, mix, m_pad, weights)
                out.append(launch(div, f32, f32, shape, RICHEST_SWITCHES, shape[0], extra, tag))
        extra, tag = div_extra(code, False)
        out.append(launch(div, b16, b16, top[-1], RICHEST_SWITCHES, top[-1][0], extra, tag))
    jsd = DIVERGENCE_CODES["jsd"]
    for combo in combos:
        if combo != RICHEST_SWITCHES:
            extra, tag = div_extra(jsd, False)
            out.append(launch(div, f32, f32, top[-1], combo, top[-1][0], extra, tag))
    for m_pad in (2, 16):
        extra, tag = div_extra(jsd, True, m_pad)
        out.append(launch(div, f32, f32, top[-1], RICHEST_SWITCHES, top[-1][0], extra, tag))
    # grad_scale: every divergence per row in place, bf16, BLOCK_V 2048; every mode for jsd and
    # for an ensemble.
    for code in names:
        extra, tag = div_extra(code, False)
        out.append(launch(div, b16, b16, top[-1], {**RICHEST_SWITCHES, **GRAD_SCALE_ON[1]}, top[-1][0], extra, tag))
    for go in (GRAD_SCALE_ON[0], GRAD_SCALE_ON[2]):
        extra, tag = div_extra(jsd, False)
        out.append(launch(div, b16, b16, top[-1], {**RICHEST_SWITCHES, **go}, top[-1][0], extra, tag))
    for go in GRAD_SCALE_ON:
        extra, tag = div_extra(jsd, True, 4, True)
        out.append(launch(div, b16, b16, top[-1], {**RICHEST_SWITCHES, **go}, top[-1][0], extra, tag))
    return out
