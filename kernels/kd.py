"""Fused temperature knowledge distillation (any divergence, one teacher or an ensemble, optional
hard-label CE): Triton, on the online-softmax skeleton of kernels/_softmax.py.

Two kernels, one program per row each: ``_kd_forward_kernel`` (forward KL from one teacher: two
passes) and ``_kd_div_kernel`` (every other divergence, and ensembles: three passes). Their math
is atop each kernel; the loss and its options are ``docs/design.md#kd``, the divergences
``#divergences``.

The launcher takes the divergence and beta as the op layer resolved them (an endpoint that *is*
another divergence comes as that divergence): it checks that they are a pair the kernels can
take, and decides nothing about them.
"""

import inspect
import math

import torch
import triton
import triton.language as tl

from fastkd.ops.divergences import TAKE_BETA, grad_factor  # the one table of the divergences' rules

from . import GRAD_SCALE_OFF, GRAD_SCALE_ON, grad_scale_switches
from ._softmax import (
    LOG2E, SWITCH_INPUTS, backward_chunk, batchmean_scale, check_reduction, fill_row, finish_loss, forward_chunk,
    gpu_shapes, grad_coefs, kd_scalars, kl_pass, launch_shape, load_chunk, online_max, online_start, reduce_rows, reference,
    row_outputs, row_start, row_status, static_launch, store_grad, student_step, sum_step, switch_combos, switches,
)

# ---------------------------------------------------------------------------------------------
# Launch configuration: the shape rule of kernels/_softmax.py with each kernel's cap. The static
# GPU checks compile every kernel of this file for the configurations static_launches() lists.
# ---------------------------------------------------------------------------------------------

# Largest chunk of a row held at once, per kernel. The divergence kernel keeps about twice as
# many live values per element (q, log q, p, log p, the mixture), hence its smaller cap.
BLOCK_V_MAX_GPU = {"_kd_forward_kernel": 4096, "_kd_div_kernel": 2048}


def m_pad_for(n_teachers: int) -> int:
    """_kd_div_kernel's M_PAD: the teachers' [M_PAD] register vectors, a power of two >= 2.

    8 is skipped (5 to 16 teachers take 16): at M_PAD 8, BLOCK_V 2048, 8 warps, ptxas for sm_80
    puts 16 bytes on the stack (the static check's spill rule), at 16 it does not; the vectors
    are tiny either way."""
    m_pad = max(2, triton.next_power_of_2(n_teachers))
    return 16 if m_pad == 8 else m_pad


# DIVERGENCE codes of _kd_div_kernel (kl comes here only for an ensemble).
DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_kl": 4, "skew_reverse_kl": 5, "hellinger": 6}


def _check_resolved(divergence: str, beta: float) -> None:
    """The kernels' precondition on (divergence, beta): a name they have a code for and, for one
    with a beta, beta strictly inside (0, 1)."""
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"kd_forward (triton): divergence must be one of {', '.join(DIVERGENCE_CODES)}, got {divergence!r}")
    # Those with a beta: the kernel takes log2(beta) and log2(1 - beta), so beta is inside (0, 1)
    # (the endpoints are other divergences, resolved before the launch).
    if divergence in TAKE_BETA and not 0.0 < beta < 1.0:
        raise ValueError(
            f"kd_forward (triton): beta={beta} for divergence {divergence!r} must be inside (0, 1); an endpoint is "
            "another divergence, which the op layer passes instead"
        )


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
    """Forward KL from one teacher (docs/design.md#kd). Per row, p = softmax(t/T), q = softmax(s/T):

        KL   = sum p (log p - log q)
        CE   = logsumexp(s) - s[label]                        (T = 1, only with labels, a > 0)
        loss = (1 - a) c KL + a CE                            c = T^2 if t2_scale else 1
        grad = scale ((1 - a) g (q - p) + a (softmax(s) - onehot(label)))
                                                              g = T if t2_scale else 1/T

    Pass 1 streams the row with kl_step (docs/design.md#online-softmax), and the T = 1 sum of
    the CE with sum_step; NaN inputs propagate through the sums. Pass 2 re-reads the row, last
    chunk first, and writes the gradient. An ignored row reads nothing (loss 0, gradient 0); a
    label outside [0, V) gives a NaN loss and gradient row.

    Bytes moved per row of V: reads 2 V elements (student, teacher; pass 2 re-reads them,
    ideally from L2), writes V gradient elements and one float32 loss, reads one int64 label.
    """
    x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef = kd_scalars(
        x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef)

    row, go, skip, s_row = row_start(s_ptr, V, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    t_row = t_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    label, compute, bad = row_status(labels_ptr, row, ignore_index, V, HAS_LABELS)

    # Pass 1: online maxima of the raw logits and the sums relative to them.
    m_s, m_t, sum_s, sum_t, acc_a, sum_1 = kl_pass(s_row, t_row, V, cols, label, compute, x_scale, BLOCK_V, False,
                                                   HAS_CE and not SAME_T)

    LN2: tl.constexpr = 0.6931471805599453
    loss = soft_loss_coef * (soft_loss_t * (LN2 * (acc_a / sum_t + tl.log2(sum_s) - tl.log2(sum_t))))
    r_s = reference(m_s)
    r_t = reference(m_t)
    sum_1 = finish_loss(row_loss_ptr, row, loss, s_row, label, compute, bad, r_s, sum_s, sum_1, hard_weight, HAS_CE, SAME_T)

    # Pass 2: the gradient, last chunk first.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * V
        k_soft, k_hard, inv_1 = grad_coefs(scale_ptr, n_rows, go, soft_grad_coef, hard_weight, sum_1, SCALE_MODE)
        inv_s = 1.0 / sum_s
        inv_t = 1.0 / sum_t
        if compute:
            for start in range(0, V, BLOCK_V):
                offs, mask = backward_chunk(start, V, cols, BLOCK_V)
                s = load_chunk(s_row + offs, mask, "evict_first")
                t = load_chunk(t_row + offs, mask, "evict_first")
                q = tl.exp2((s - r_s) * x_scale) * inv_s
                p = tl.exp2((t - r_t) * x_scale) * inv_t
                store_grad(g_row, offs, mask, k_soft * (q - p), q, s, r_s, inv_1, label, k_hard, HAS_CE, SAME_T)
        else:
            fill_row(g_row, V, bad, BLOCK_V)


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
    elif DIVERGENCE == 6:  # hellinger: x = -sqrt(p/q), -inf at q = 0 (the callers take q x = 0 there)
        sp = tl.exp2(0.5 * lp2)
        sq = tl.exp2(0.5 * lq2)
        x = -sp / sq
        t1 = (sp - sq) * (sp - sq)
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
        tm = load_chunk(t_row + m * stride + offs, mask, "")
        v = c_m + (tm - r_m) * x_scale
        new = tl.maximum(best, v)
        ref = tl.where(new == NEG_INF, 0.0, new)
        acc = acc * tl.exp2(best - ref) + tl.exp2(v - ref)
        best = new
    # Every term -inf (a masked entry): best = -inf, acc = 0, and the sum is -inf + -inf = -inf;
    # a NaN term leaves acc NaN, whatever tl.maximum made of it.
    return best + tl.log2(acc)


@triton.jit
def _chunk_log_probs(s_row, t_row, offs, mask, teacher_stride, x_scale, M, r_s, log2_ss, r_t, log2_st, r_vec, c_vec,
                     midx, MIX: tl.constexpr, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """A chunk's student logits s, q and log2 q, and the teacher's (or the mixture's) p and log2 p,
    exactly: log2 q = x - log2 S, never the log of a probability."""
    s = load_chunk(s_row + offs, mask, EVICT)
    lq2 = (s - r_s) * x_scale - log2_ss
    q = tl.exp2(lq2)
    if MIX:
        lp2 = _mixture_log2(t_row, offs, mask, teacher_stride, x_scale, M, r_vec, c_vec, midx, BLOCK_V)
    else:
        t = load_chunk(t_row + offs, mask, EVICT)
        lp2 = (t - r_t) * x_scale - log2_st
    return s, q, lq2, tl.exp2(lp2), lp2


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
        hellinger   L = 1/2 sum (sqrt p - sqrt q)^2                x = -sqrt(p/q)           k = 1/2

    Pass 1: online maxima and sums (base 2, as _kd_forward_kernel) of the student and of each
    teacher; an ensemble keeps each teacher's reference r_m and c_m = log2 w_m - log2 S_m in
    registers ([M_PAD] vectors). Pass 2: per chunk, log q and log p exactly (log2 q = x - log2 S,
    an ensemble's log p by an online log-sum-exp over the teachers), log m as a log-sum-exp
    (max + log2(1 + 2^-|A-B|), never the log of a sum of probabilities: finite where float32
    probabilities underflow), the skews' p/m and q/m from that same 2^-|A-B|; sums of the loss
    terms and of q x. Pass 3: the gradient, recomputing pass 2's per-entry values. An entry where
    p and q are both 0 (masked vocabulary) contributes 0 and gets 0: its terms are taken only
    where their weight (p or q) is nonzero. The loss, CE, reduction and gradient scale are
    _kd_forward_kernel's, with KL replaced by the divergence (docs/design.md#divergences).

    Bytes moved per row of V: reads 3 (M + 1) V elements (passes 2 and 3 re-read the row, from
    L2 where it stays), writes V gradient elements and one float32 loss, reads one int64 label.
    """
    x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef = kd_scalars(
        x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef)
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    beta = tl.cast(beta, tl.float32)
    log2_1mb = tl.cast(log2_1mb, tl.float32)
    log2_b = tl.cast(log2_b, tl.float32)
    log2_uniform = tl.cast(log2_uniform, tl.float32)
    NEG_INF: tl.constexpr = float("-inf")

    row, go, skip, s_row = row_start(s_ptr, V, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    t_row = t_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    midx = tl.arange(0, M_PAD)

    label, compute, bad = row_status(labels_ptr, row, ignore_index, V, HAS_LABELS)

    # Pass 1: the student's (and one teacher's) online maximum and sum; then each teacher's.
    m_s, sum_s = online_start()
    m_t, sum_t = online_start()
    sum_1 = tl.zeros((), tl.float32)
    r_vec = tl.zeros((M_PAD,), tl.float32)
    c_vec = tl.zeros((M_PAD,), tl.float32)
    if compute:
        for start in range(0, V, BLOCK_V):
            offs, mask = forward_chunk(start, V, cols)
            s = load_chunk(s_row + offs, mask, "evict_last")
            m_s, r_s, sum_s, sum_1 = student_step(m_s, sum_s, sum_1, s, x_scale, HAS_CE and not SAME_T)
            if not MIX:
                t = load_chunk(t_row + offs, mask, "evict_last")
                new_m_t, r_t = online_max(m_t, t)
                sum_t = sum_step(sum_t, m_t, r_t, t, x_scale)
                m_t = new_m_t
        if MIX:
            stride = tl.zeros((), tl.int64) + teacher_stride  # as in _mixture_log2
            for m in range(M):
                tm_row = t_row + m * stride
                mx, sm = online_start()
                for start in range(0, V, BLOCK_V):
                    offs, mask = forward_chunk(start, V, cols)
                    tm = load_chunk(tm_row + offs, mask, "evict_last")
                    new_mx, r = online_max(mx, tm)
                    sm = sum_step(sm, mx, r, tm, x_scale)
                    mx = new_mx
                if HAS_WEIGHTS:
                    lw = tl.load(lw_ptr + m)
                else:
                    lw = log2_uniform
                r_vec = tl.where(midx == m, reference(mx), r_vec)
                c_vec = tl.where(midx == m, lw - tl.log2(sm), c_vec)

    r_s = reference(m_s)
    r_t = reference(m_t)
    log2_ss = tl.log2(sum_s)
    log2_st = tl.log2(sum_t)

    # Pass 2: the row's statistics.
    acc1 = tl.zeros((BLOCK_V,), tl.float32)
    accc = tl.zeros((BLOCK_V,), tl.float32)
    if compute:
        for start in range(0, V, BLOCK_V):
            offs, mask = forward_chunk(start, V, cols)
            s, q, lq2, p, lp2 = _chunk_log_probs(s_row, t_row, offs, mask, teacher_stride, x_scale, M, r_s, log2_ss, r_t,
                                                 log2_st, r_vec, c_vec, midx, MIX, BLOCK_V, "evict_last")
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
    elif DIVERGENCE == 3 or DIVERGENCE == 6:  # tvd, hellinger
        soft = 0.5 * tot1
    else:
        soft = tot1
    soft = tl.where(soft < 0.0, 0.0, soft)  # >= 0; rounding can leave -1e-9 at p == q (NaN kept)
    loss = soft_loss_coef * (soft_loss_t * soft)
    sum_1 = finish_loss(row_loss_ptr, row, loss, s_row, label, compute, bad, r_s, sum_s, sum_1, hard_weight, HAS_CE, SAME_T)

    # Pass 3: the gradient, last chunk first.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * V
        k_soft, k_hard, inv_1 = grad_coefs(scale_ptr, n_rows, go, soft_grad_coef, hard_weight, sum_1, SCALE_MODE)
        if compute:
            for start in range(0, V, BLOCK_V):
                offs, mask = backward_chunk(start, V, cols, BLOCK_V)
                s, q, lq2, p, lp2 = _chunk_log_probs(s_row, t_row, offs, mask, teacher_stride, x_scale, M, r_s, log2_ss, r_t,
                                                     log2_st, r_vec, c_vec, midx, MIX, BLOCK_V, "evict_first")
                _, x = _div_terms(q, lq2, p, lp2, beta, log2_b, log2_1mb, DIVERGENCE)
                if DIVERGENCE == 0:
                    g = k_soft * (q - x)
                else:
                    g = k_soft * tl.where(q == 0.0, 0.0, q * (x - c))
                store_grad(g_row, offs, mask, g, q, s, r_s, inv_1, label, k_hard, HAS_CE, SAME_T)
        else:
            fill_row(g_row, V, bad, BLOCK_V)


def launch_config(kernel: str, vocab: int, on_gpu: bool) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of ``kernel`` for a row of ``vocab`` entries."""
    return launch_shape(vocab, BLOCK_V_MAX_GPU[kernel], on_gpu)


def kd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_weights: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float, hard_weight: float, ignore_index: int, reduction: str, t2_scale: bool,  # the KD options
    compute_grad: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::kd_forward on Triton: (loss float32, grad in the student's dtype or empty [0]).

    Inputs are expected validated by the caller (contiguous student [N, V], teacher [N, V] or
    [M, N, V], labels int64 [N] or None, teacher_weights [M] or None, grad_scale a float32
    tensor of 1 or N elements or None), and (divergence, beta) resolved: an endpoint that is
    another divergence passed as that one, beta 0.0 for a divergence without one.
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
    check_reduction("kd_forward", reduction)
    _check_resolved(divergence, beta)
    n, v = student.shape[0], student.shape[-1]
    mix = teacher.dim() == 3
    on_gpu = student.device.type == "cuda"
    row_loss, grad = row_outputs(student, compute_grad, into)
    go = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()

    common = switches(labels is not None, hard_weight, temperature, reduction, compute_grad)
    common.update(grad_scale_switches(go, into is not None))
    scale_t = batchmean_scale(labels, ignore_index) if common["SCALE_MODE"] == 2 else None

    soft_loss_coef = (1.0 - hard_weight) * (temperature if t2_scale else 1.0)
    soft_grad_coef = (1.0 - hard_weight) * (temperature if t2_scale else 1.0 / temperature)
    if divergence == "kl" and not mix:
        block_v, num_warps = launch_config("_kd_forward_kernel", v, on_gpu)
        torch.library.wrap_triton(_kd_forward_kernel)[(n,)](
            student, teacher, labels, row_loss, grad if compute_grad else None, scale_t, go,
            n, v, ignore_index, LOG2E / temperature, soft_loss_coef, temperature if t2_scale else 1.0,
            hard_weight, soft_grad_coef,
            BLOCK_V=block_v, num_warps=num_warps, **common,
        )
    else:
        n_teachers = teacher.shape[0] if mix else 1
        has_beta = divergence in TAKE_BETA
        log2_w = None if teacher_weights is None else torch.log2(teacher_weights.to(torch.float32)).contiguous()
        block_v, num_warps = launch_config("_kd_div_kernel", v, on_gpu)
        torch.library.wrap_triton(_kd_div_kernel)[(n,)](
            student, teacher, labels, log2_w, row_loss, grad if compute_grad else None, scale_t, go,
            n, v, n_teachers, n * v, ignore_index, LOG2E / temperature, soft_loss_coef,
            temperature if t2_scale else 1.0, hard_weight, soft_grad_coef * grad_factor(divergence, beta), beta,
            math.log2(beta) if has_beta else 0.0, math.log2(1.0 - beta) if has_beta else 0.0,
            -math.log2(n_teachers),
            DIVERGENCE=DIVERGENCE_CODES[divergence], MIX=mix, M_PAD=m_pad_for(n_teachers),
            HAS_WEIGHTS=log2_w is not None, BLOCK_V=block_v, num_warps=num_warps, **common,
        )
    return reduce_rows(row_loss, reduction, scale_t, n), grad


# ----------------------------------------------------------------------------------------------
# Every launch kd_forward can make, for the static GPU check (convention: kernels/__init__.py).
# ----------------------------------------------------------------------------------------------

# The switch combination with the most work and live values: the CE at T != 1 (a second
# exponential sum), the label loads, the device-side scale, the gradient pass.
RICHEST_SWITCHES = dict(HAS_LABELS=True, HAS_CE=True, SAME_T=False, SCALE_MODE=2, COMPUTE_GRAD=True)
STATIC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shapes(kernel: str) -> tuple:
    """(BLOCK_V, num_warps) of every row length, and the largest block of each warp count."""
    from . import largest_per_warp_count

    shapes = gpu_shapes(BLOCK_V_MAX_GPU[kernel])
    return shapes, largest_per_warp_count(shapes)


def static_launches() -> list:
    """The launches kd_forward can make on a GPU, reduced as follows (the full product is some
    ten thousand compilations, far beyond the few minutes the check may take on 2 cores).

    ``_kd_forward_kernel`` (forward KL, one teacher), 93 launches:

    * every switch combination switches() can return (16) at the largest block of each warp
      count (BLOCK_V 64/1, 256/2, 1024/4, 4096/8 warps), fp32;
    * the richest combination (RICHEST_SWITCHES) at every block shape (BLOCK_V 1 .. 4096), fp32;
      at the largest block of each warp count for bf16 and fp16, and there also with a row length
      that is not a multiple of 16 (fp32: Triton cannot then vectorise the loads);
    * fp32 student with a bf16 teacher and the reverse, richest combination, BLOCK_V 4096.

    ``_kd_div_kernel`` (the other divergences, and ensembles), 78 launches:

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
    from . import dtype_label, shape_label

    combos = switch_combos(switches, SWITCH_INPUTS, RICHEST_SWITCHES)
    # Scalar arguments by parameter name; Triton specialises integers on their value (1, or a
    # multiple of 16), so these are values real launches have.
    scalars = dict(
        n_rows=64, ignore_index=-100, x_scale=LOG2E / 2.0, soft_loss_coef=0.5, soft_loss_t=2.0,
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
        return static_launch(
            kernel, args, num_warps, f"{dtype_label(student, teacher)} · {shape_label(block_v, num_warps)}", v, combo,
            (per_entry, 4 + (8 if combo["HAS_LABELS"] else 0)), before=variant_extra,
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
