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

import inspect
import itertools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------
# Launch configurations: kd_forward chooses only through launch_shape() and switches(), and
# static_launches() enumerates them for tests/test_gpu_static.py (every launch compiled for
# sm_80 and sm_90, failing on a spill) and the resource report. See kernels/__init__.py.
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


# The combination with the most work (and the most live values): a second exponential sum for
# the CE at T != 1, the label loads, the device-side scale, the gradient pass.
RICHEST_SWITCHES = dict(HAS_LABELS=True, HAS_CE=True, SAME_T=False, SCALE_MODE=2, COMPUTE_GRAD=True)
STATIC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def static_launches() -> list:
    """Every launch kd_forward can make on a GPU, or the reduction below (the convention of
    kernels/__init__.py).

    The full product is 16 switch combinations x 9 (student, teacher) dtype pairs x 22 block
    shapes (BLOCK_V 1..4096, and from 16 up a row length that is a multiple of 16 or not) x 2
    architectures: about 6300 compilations at ~0.3 s of CPU each, over half an hour. This list
    has 255 launches, 510 compilations (~2.5 min of CPU), each compiled for sm_80 and sm_90:

    * every switch combination x every student dtype (fp32, bf16, fp16; teacher of the same
      dtype) at the largest block of each warp count: BLOCK_V 64/1, 256/2, 1024/4, 4096/8 warps,
      where a thread holds the most elements and register pressure is highest;
    * every block shape (BLOCK_V 1, 2, 4, ..., 4096 with its warp count) x every dtype, at the
      richest switch combination (RICHEST_SWITCHES);
    * a row length that is not a multiple of 16 (Triton then cannot vectorise the loads), at
      the richest combination, the largest block of each warp count, every dtype;
    * every mixed (student, teacher) dtype pair, same richest combination and blocks.

    Row lengths are the block size itself (a multiple of 16 from BLOCK_V 16 up), or one less;
    n_rows = 64 and ignore_index = -100. Not compiled: the switch combinations other than the
    richest at blocks below the largest of their warp count, with mixed dtypes, or with a row
    length that is not a multiple of 16; n_rows == 1, which Triton turns into a constant (it only
    removes a division); an ignore_index or row count past 2**31 (64-bit scalars).
    """
    from . import StaticLaunch

    combos = []
    for values in itertools.product(*SWITCH_INPUTS.values()):
        combo = switches(**dict(zip(SWITCH_INPUTS, values)))
        if combo not in combos:
            combos.append(combo)
    assert RICHEST_SWITCHES in combos, "RICHEST_SWITCHES must be a combination switches() can return"
    shapes = sorted({launch_shape(1 << k) for k in range(0, 31)})
    largest = [max(s for s in shapes if s[1] == w) for w in sorted({w for _, w in shapes})]

    # Scalar arguments by parameter name, passed where the kernel has that parameter: their
    # types, and Triton's specialisation of integers, are what the compiled code depends on. A
    # parameter with no entry here fails the static check, naming it. (soft_loss_t, the loss's
    # second T factor, is in the kernel on main.)
    scalars = dict(
        n_rows=64, ignore_index=-100, x_scale=_LOG2E / 2.0, soft_loss_coef=0.5, soft_loss_t=2.0,
        hard_weight=0.5, soft_grad_coef=0.5,
    )
    params = inspect.signature(_kd_forward_kernel.fn).parameters

    def launch(student, teacher, shape, combo, v):
        block_v, num_warps = shape
        args = dict(
            s_ptr=student,
            t_ptr=teacher,
            labels_ptr=torch.int64 if combo["HAS_LABELS"] else None,
            row_loss_ptr=torch.float32,
            grad_ptr=student if combo["COMPUTE_GRAD"] else None,
            scale_ptr=torch.float32 if combo["SCALE_MODE"] == 2 else None,
            V=v,
            BLOCK_V=block_v,
            **combo,
            **{k: x for k, x in scalars.items() if k in params},
        )
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        dt = names[student] if student == teacher else f"{names[student]}/{names[teacher]}"
        per_entry = student.itemsize + teacher.itemsize + (student.itemsize if combo["COMPUTE_GRAD"] else 0)
        per_row = 4 + (8 if combo["HAS_LABELS"] else 0)
        variant = [
            "labels" if combo["HAS_LABELS"] else "no labels",
            *(["CE"] if combo["HAS_CE"] else []),
            "T = 1" if combo["SAME_T"] else "T != 1",
            "grad" if combo["COMPUTE_GRAD"] else "loss only",
            f"scale mode {combo['SCALE_MODE']}",
        ]
        return StaticLaunch(
            kernel=_kd_forward_kernel,
            args=args,
            num_warps=num_warps,
            label=f"{dt} · BLOCK_V={block_v} · {num_warps} warp{'s' if num_warps > 1 else ''}"
            + ("" if v % 16 == 0 or v < 16 else " · V % 16 != 0"),
            variant=", ".join(variant),
            row_bytes=(per_entry, per_row),
        )

    out = []
    for dtype in STATIC_DTYPES:
        for shape in largest:
            out += [launch(dtype, dtype, shape, combo, shape[0]) for combo in combos]
        out += [launch(dtype, dtype, shape, RICHEST_SWITCHES, shape[0]) for shape in shapes if shape not in largest]
        out += [launch(dtype, dtype, shape, RICHEST_SWITCHES, shape[0] - 1) for shape in largest]
        for teacher in STATIC_DTYPES:
            if teacher != dtype:
                out += [launch(dtype, teacher, shape, RICHEST_SWITCHES, shape[0]) for shape in largest]
    return out
