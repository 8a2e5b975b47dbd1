"""Fused decoupled knowledge distillation (Zhao et al. 2022, the mdistiller formulation): Triton,
on the online-softmax skeleton of kernels/_softmax.py. The math is atop the kernel and in
``docs/design.md#dkd``.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import GRAD_SCALE_OFF, GRAD_SCALE_ON, grad_scale_switches, grad_scale_variant
from ._softmax import (
    LOG2E, backward_chunk, batchmean_scale, check_reduction, fill_row, gpu_shapes, gradient_scale, kl_pass,
    launch_shape, load_chunk, reduce_rows, reference, row_outputs, row_start, row_status, store_row_loss,
)

# --------------------------------------------------------------------------------------------
# Launch configuration: the shape rule of kernels/_softmax.py with this kernel's cap.
# LAUNCH_CONFIGS lists every (BLOCK_V, num_warps) it gives on a GPU for V >= 2, and
# CONSTEXPR_SWITCHES every value of the kernel's other constexpr arguments, so that the static
# check compiles every variant for sm_80/sm_90.
# --------------------------------------------------------------------------------------------

# Largest chunk of a row held at once on a GPU.
BLOCK_V_MAX_GPU = 4096


def launch_config(vocab: int, on_gpu: bool) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a row of ``vocab`` entries."""
    return launch_shape(vocab, BLOCK_V_MAX_GPU, on_gpu)


LAUNCH_CONFIGS = [shape for shape in gpu_shapes(BLOCK_V_MAX_GPU) if shape[0] >= 2]
# SCALE_MODE: 0 -> 1, 2 -> *scale_ptr (batchmean; the rows are counted on the device).
CONSTEXPR_SWITCHES = {"SCALE_MODE": (0, 2), "COMPUTE_GRAD": (False, True)}


@triton.jit
def _log1p(e):
    # log(1 + e) for e >= 0, accurate for tiny e (Goldberg's trick: no libdevice needed, so it
    # also runs in the interpreter).
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


@triton.jit
def _log_sigmoid(x):
    # Accurate for any x; -inf at -inf; NaN stays NaN (the comparison fails).
    return tl.where(x >= 0.0, -_log1p(tl.exp(-x)), x - _log1p(tl.exp(x)))


@triton.jit
def _plogp_ratio(log_p, log_q):
    p = tl.exp(log_p)
    return tl.where(p == 0.0, 0.0, p * (log_p - log_q))


@triton.jit
def _dkd_forward_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    labels_ptr,  # [N] int64
    row_loss_ptr,  # [N] float32
    grad_ptr,  # [N, V] student dtype, or None when COMPUTE_GRAD is False
    scale_ptr,  # [] float32 reduction scale when SCALE_MODE == 2, else None
    go_ptr,  # float32 grad_scale: [] (GO_MODE 1) or [N] (GO_MODE 2), else None
    V,
    ignore_index,
    x_scale,  # log2(e) / T
    temperature,  # T (the loss's T^2 is applied as two float32 factors: T^2 overflows from 1.8e19)
    alpha,
    beta,
    SCALE_MODE: tl.constexpr,  # gradient scale: 0 -> 1, 2 -> *scale_ptr
    COMPUTE_GRAD: tl.constexpr,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py)
    GO_SKIP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """DKD (docs/design.md#dkd), one program per row. With y the row's label, a = s/T, b = t/T,
    R = the non-target classes:

        q = softmax(a), p = softmax(b);  q^, p^ = the softmaxes over R only (target removed)
        d_s = a_y - lse_R(a),  d_t = b_y - lse_R(b)           the target's log-odds against the rest
        q_y = sigmoid(d_s), 1 - q_y = sigmoid(-d_s)          (log q_y = logsigmoid(d_s), and so on:
        p_y = sigmoid(d_t), 1 - p_y = sigmoid(-d_t)           no 1 - x anywhere, any margin is finite)
        TCKD = p_y log(p_y / q_y) + (1 - p_y) log((1 - p_y) / (1 - q_y))
        NCKD = sum_R p^ (log p^ - log q^)
        loss = T^2 (alpha TCKD + beta NCKD)

    Gradient (derivation): TCKD depends on a only through z = d_s, the logit of a two-class softmax,
    so dTCKD/dz = q_y - p_y; dz/da_y = 1 and dz/da_j = -q^_j on R. NCKD is a KL of softmaxes over R:
    dNCKD/da_j = q^_j - p^_j on R, 0 at y. With d/ds = (1/T) d/da and the loss's T^2:

        dloss/ds_y = T alpha (q_y - p_y)
        dloss/ds_j = T [(beta + alpha (p_y - q_y)) q^_j - beta p^_j]          (j in R)

    times the reduction scale. Each gradient row sums to 0.

    Pass 1 streams the row with kl_step (docs/design.md#online-softmax) over R (the target is
    loaded as -inf, so it is in no maximum or sum: a target that dominates the row by any margin
    cannot flush the non-target sums): S_s = sum_R 2^x, S_t = sum_R 2^y, A = sum_R 2^y (y - x), so
    NCKD = ln2 (A / S_t + log2 S_s - log2 S_t), lse_R(a) = r_s/T + ln S_s and
    d_s = (s_y - r_s)/T - ln S_s (d_t likewise). NaN inputs propagate through the sums
    (non-target) or d_s, d_t (target).

    Pass 2 re-reads the row (last chunk first: the one most likely still in L2) and writes the
    gradient; the target's entry is replaced by T alpha (q_y - p_y) * scale. Ignored rows
    (label == ignore_index) read nothing: loss 0, gradient 0; a label outside [0, V) that is not
    ignore_index gives a NaN loss and a NaN gradient row.

    Bytes moved per row of V: reads 2 V elements (student, teacher; pass 2 re-reads them,
    ideally from L2) and one int64 label, writes V gradient elements and one float32 loss.
    """
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    alpha = tl.cast(alpha, tl.float32)
    beta = tl.cast(beta, tl.float32)
    temperature = tl.cast(temperature, tl.float32)
    x_scale = tl.cast(x_scale, tl.float32)

    row, go, skip, s_row = row_start(s_ptr, V, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    label, compute, bad = row_status(labels_ptr, row, ignore_index, V, True)
    t_row = t_ptr + row * V
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: online maxima of the raw non-target logits and the sums relative to them.
    m_s, m_t, sum_s, sum_t, acc_a, _ = kl_pass(s_row, t_row, V, cols, label, compute, x_scale, BLOCK_V, True, False)

    LN2: tl.constexpr = 0.6931471805599453
    log2_ss = tl.log2(sum_s)
    log2_st = tl.log2(sum_t)
    r_s = reference(m_s)
    r_t = reference(m_t)
    nckd = LN2 * (acc_a / sum_t + log2_ss - log2_st)
    nckd = tl.where(nckd < 0.0, 0.0, nckd)  # KL >= 0 (rounding); a NaN fails the test and stays
    safe_label = tl.where(compute, label, 0)
    s_y = tl.load(s_row + safe_label).to(tl.float32)
    t_y = tl.load(t_row + safe_label).to(tl.float32)
    d_s = LN2 * ((s_y - r_s) * x_scale - log2_ss)
    d_t = LN2 * ((t_y - r_t) * x_scale - log2_st)
    ls_s = _log_sigmoid(d_s)
    ls_s_not = _log_sigmoid(-d_s)
    ls_t = _log_sigmoid(d_t)
    ls_t_not = _log_sigmoid(-d_t)
    tckd = _plogp_ratio(ls_t, ls_s) + _plogp_ratio(ls_t_not, ls_s_not)
    tckd = tl.where(tckd < 0.0, 0.0, tckd)
    loss = ((alpha * tckd + beta * nckd) * temperature) * temperature
    store_row_loss(row_loss_ptr, row, loss, compute, bad)

    # Pass 2: the gradient, last chunk first.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * V
        k = temperature * gradient_scale(scale_ptr, 1, go, SCALE_MODE)
        # q_y - p_y from whichever side of 1/2 keeps the digits.
        near_one = d_s + d_t > 0.0
        dq = tl.where(near_one, tl.exp(ls_t_not) - tl.exp(ls_s_not), tl.exp(ls_s) - tl.exp(ls_t))
        k_q = k * (beta - alpha * dq) / sum_s
        k_p = k * beta / sum_t
        g_y = k * alpha * dq
        if compute:
            for start in range(0, V, BLOCK_V):
                offs, mask = backward_chunk(start, V, cols, BLOCK_V)
                s = load_chunk(s_row + offs, mask, "evict_first")
                t = load_chunk(t_row + offs, mask, "evict_first")
                g = k_q * tl.exp2((s - r_s) * x_scale) - k_p * tl.exp2((t - r_t) * x_scale)
                g = tl.where(offs == label, g_y, g)
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            fill_row(g_row, V, bad, BLOCK_V)


def dkd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::dkd_forward on Triton: (loss float32, grad in the student's dtype or empty [0]).

    Inputs are expected validated by the caller (contiguous [N, V] with V >= 2, labels int64
    [N], grad_scale float32 of 1 or N elements or None). Uses only torch ops and one wrap_triton
    launch, with no host synchronisation, so that it can run inside torch.library.triton_op.
    """
    return _dkd_launch(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, compute_grad,
                       grad_scale, None)


def dkd_forward_rescale_(grad, student, teacher, labels, temperature, alpha, beta, ignore_index, reduction,
                         grad_scale) -> None:
    """fastkd::dkd_forward_rescale_ on Triton (csrc/ops.cpp): ``grad``, the forward's gradient,
    rewritten with grad_scale folded in; rows whose scale is exactly 1 are skipped on the device."""
    _dkd_launch(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, True, grad_scale, grad)


def _dkd_launch(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, compute_grad, grad_scale, into):
    check_reduction("dkd_forward", reduction)
    if student.shape[1] < 2:
        raise ValueError(f"dkd_forward (triton): DKD needs at least 2 classes, got V = {student.shape[1]}")
    n, v = student.shape
    row_loss, grad = row_outputs(student, compute_grad, into)
    go = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()
    scale_t = batchmean_scale(labels, ignore_index) if reduction == "batchmean" else None
    block_v, num_warps = launch_config(v, student.device.type == "cuda")
    torch.library.wrap_triton(_dkd_forward_kernel)[(n,)](
        student,
        teacher,
        labels,
        row_loss,
        grad if compute_grad else None,
        scale_t,
        go,
        v,
        ignore_index,
        LOG2E / temperature,
        temperature,
        alpha,
        beta,
        SCALE_MODE=0 if scale_t is None else 2,
        COMPUTE_GRAD=compute_grad,
        **grad_scale_switches(go, into is not None),
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return reduce_rows(row_loss, reduction, scale_t, n), grad


def static_launches() -> list:
    """The launches dkd_forward can make on a GPU (convention: kernels/__init__.py), 44 of them:

    * both switches (SCALE_MODE 0/2, COMPUTE_GRAD) in every combination at the largest block of each
      warp count (BLOCK_V 64/1, 256/2, 1024/4, 4096/8 warps; the most elements per thread), fp32;
    * both switches on at every other block of LAUNCH_CONFIGS, fp32; at the largest block of each
      warp count for bf16 and fp16, and there with a row length that is not a multiple of 16
      (fp32); fp32 student with a bf16 teacher and the reverse at BLOCK_V 4096;
    * grad_scale (the backward of a 16-bit student), bf16: every mode at BLOCK_V 4096, the
      per-row in-place one at the largest block of every warp count.

    Not compiled: the other switch combinations at the smaller blocks (fewer live values than
    the ones listed) and mixed dtypes below BLOCK_V 4096.
    """
    from . import StaticLaunch, dtype_label, largest_per_warp_count, shape_label

    f32, b16 = torch.float32, torch.bfloat16
    largest = largest_per_warp_count(LAUNCH_CONFIGS)
    both = dict(SCALE_MODE=2, COMPUTE_GRAD=True)

    def launch(student, teacher, shape, switch, v):
        block_v, num_warps = shape
        switch = {**GRAD_SCALE_OFF, **switch}
        args = dict(
            s_ptr=student, t_ptr=teacher, labels_ptr=torch.int64, row_loss_ptr=torch.float32,
            grad_ptr=student if switch["COMPUTE_GRAD"] else None,
            scale_ptr=torch.float32 if switch["SCALE_MODE"] == 2 else None,
            go_ptr=torch.float32 if switch["GO_MODE"] else None,
            V=v, ignore_index=-100, x_scale=LOG2E / 4.0, temperature=4.0, alpha=1.0, beta=8.0,
            BLOCK_V=block_v, **switch,
        )
        per_entry = student.itemsize + teacher.itemsize + (student.itemsize if switch["COMPUTE_GRAD"] else 0)
        return StaticLaunch(
            kernel=_dkd_forward_kernel, args=args, num_warps=num_warps,
            label=f"{dtype_label(student, teacher)} · {shape_label(block_v, num_warps)}"
            + ("" if v % 16 == 0 or v < 16 else " · V % 16 != 0"),
            variant=", ".join(["batchmean scale" if switch["SCALE_MODE"] == 2 else "no scale",
                               "grad" if switch["COMPUTE_GRAD"] else "loss only"]
                              + ([grad_scale_variant(switch)] if switch["GO_MODE"] else [])),
            row_bytes=(per_entry, 12),
        )

    out = []
    for shape in largest:
        for values in itertools.product(*CONSTEXPR_SWITCHES.values()):
            out.append(launch(f32, f32, shape, dict(zip(CONSTEXPR_SWITCHES, values)), shape[0]))
    out += [launch(f32, f32, shape, both, shape[0]) for shape in LAUNCH_CONFIGS if shape not in largest]
    for dtype in (b16, torch.float16):
        out += [launch(dtype, dtype, shape, both, shape[0]) for shape in largest]
    out += [launch(f32, f32, shape, both, shape[0] - 1) for shape in largest]
    out += [launch(a, b, largest[-1], both, largest[-1][0]) for a, b in ((f32, b16), (b16, f32))]
    # The backward's relaunches with grad_scale (16-bit students): bf16, every mode at BLOCK_V
    # 4096, the per-row in-place one at the largest block of every warp count.
    out += [launch(b16, b16, largest[-1], {**both, **go}, largest[-1][0]) for go in GRAD_SCALE_ON]
    out += [launch(b16, b16, shape, {**both, **GRAD_SCALE_ON[1]}, shape[0]) for shape in largest[:-1]]
    return out
