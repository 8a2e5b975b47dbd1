"""Fused KD against a sparse teacher (top-k logits or log-probabilities), with optional hard-label
CE: Triton, on the online-softmax skeleton of kernels/_softmax.py. The math is atop the kernel
and in ``docs/design.md#sparse-kd``.
"""

import torch
import triton
import triton.language as tl

from . import GRAD_SCALE_OFF, GRAD_SCALE_ON, grad_scale_switches
from . import _softmax
from ._softmax import (
    LOG2E, backward_chunk, batchmean_scale, check_reduction, fill_row, finish_loss, forward_chunk, gpu_shapes,
    grad_coefs, kd_scalars, load_chunk, online_start, reduce_rows, reference, row_outputs, row_start, row_status, static_launch,
    store_grad, student_step, switch_combos,
)

# ----------------------------------------------------------------------------------------------
# Launch configurations: sparse_kd_forward chooses only through launch_shape() and switches(),
# and static_launches() enumerates them (every launch compiled for sm_80 and sm_90 by the static
# GPU checks; kernels/__init__.py).
# ----------------------------------------------------------------------------------------------

# Largest chunk of a row (BLOCK_V: the shape rule of kernels/_softmax.py) and of the k teacher
# entries (BLOCK_K) held at once. Under the interpreter (CPU tensors) a smaller BLOCK_K keeps the
# blocked path over the kept entries exercised by small shapes.
_BLOCK_V_MAX_GPU = 4096
_BLOCK_K_MAX_GPU = 1024
_BLOCK_K_MAX_INTERPRETER = 16


def launch_shape(v: int, k: int, on_gpu: bool = True) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_K, num_warps) for rows of v entries and k teacher entries (k <= v)."""
    block_v, num_warps = _softmax.launch_shape(v, _BLOCK_V_MAX_GPU, on_gpu)
    block_k = min(triton.next_power_of_2(k), _BLOCK_K_MAX_GPU if on_gpu else _BLOCK_K_MAX_INTERPRETER)
    return block_v, block_k, num_warps


def switches(has_labels: bool, hard_weight: float, temperature: float, reduction: str, compute_grad: bool, uniform: bool) -> dict:
    """The kernel's constexpr switches other than the block sizes, for one call: kd's, and UNIFORM."""
    return dict(_softmax.switches(has_labels, hard_weight, temperature, reduction, compute_grad), UNIFORM=uniform)


# For each input of switches(), values that reach every result it can give.
SWITCH_INPUTS = dict(_softmax.SWITCH_INPUTS, uniform=(False, True))


@triton.jit
def _kept_chunk(v_row, kstart, K, kcols):
    """Offsets, mask and float32 values (-inf where masked) of the chunk at ``kstart`` of a row's
    K teacher entries (``kcols``: tl.arange(0, BLOCK_K))."""
    ko = kstart + kcols
    km = ko < K
    return ko, km, load_chunk(v_row + ko, km, "")


@triton.jit
def _sparse_kd_forward_kernel(
    s_ptr,  # [N, V] student logits
    v_ptr,  # [N, K] teacher values
    idx_ptr,  # [N, K] int64 or int32 vocabulary indices
    labels_ptr,  # [N] int64, or None when HAS_LABELS is False
    broken_ptr,  # [N] int8: 1 where the row's indices leave [0, V) or repeat
    row_loss_ptr, grad_ptr, scale_ptr, go_ptr,  # as _kd_forward_kernel's (kernels/kd.py)
    n_rows,
    V,
    K,
    ignore_index,
    inv_t,  # 1 / T
    x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef,  # as _kd_forward_kernel's (kernels/kd.py)
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, SAME_T: tl.constexpr,  # as _kd_forward_kernel's
    UNIFORM: tl.constexpr,  # tail="uniform"
    SCALE_MODE: tl.constexpr,  # gradient scale: 0 -> 1, 1 -> 1 / n_rows, 2 -> *scale_ptr
    COMPUTE_GRAD: tl.constexpr,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py)
    GO_SKIP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """KD against a sparse teacher (docs/design.md#sparse-kd).
    One program per row. The teacher is known at k entries K = {idx_i} of a row of V, values v_i;
    s is the student row, T the temperature, r = max s (0 while it is still -inf):

        student   x_j = (s_j - r)/T,  S = sum_j e^{x_j},  log q_j = x_j - log S   (FULL vocabulary)
        teacher   tail="renormalize":  p_i = softmax(v/T)_i on K, 0 elsewhere
                  tail="uniform" (v: full-vocabulary log-probabilities): the missing mass
                  m = max(0, 1 - sum_K e^{v_i}) spread evenly over the n = V - k other entries,
                  u = log(m / n); p proportional to e^{lp/T} over the full row:
                  log Z = LSE((v_1..v_k)/T, u/T + log n),  p_i = e^{v_i/T - log Z},  p_b = e^{u/T - log Z}
                  (each tail entry). An empty tail (k = V, or m = 0) has p_b = 0 and contributes nothing.
        KL(p||q)  = sum_j p_j (log p_j - log q_j) = sum_j p_j ((v_j - top) - (s_j - r)) / T + log S - lz
                  with top the teacher's maximum (of v, and of u on the uniform tail), log Z = top/T + lz,
                  v_j = u off K, and sum_j p_j = 1: kernels/kd.py's form, each term a difference taken
                  before scaling, and log S - lz (both near log V) subtracted last. The tail's part is
                  p_b (n (u - top) - sum_{j not in K} (s_j - r)) / T, and its student sum needs no
                  membership test:
                  sum_{j not in K} (s_j - r) = sum_all (s_j - r) - sum_K (s_j - r), summed over finite
                  entries with the -inf ones counted apart (-inf - -inf is undefined): a -inf student
                  entry in a tail of positive mass makes the loss +inf.
        grad      d KL / d s_j = (q_j - p_j) / T over the full row (the teacher is a constant,
                  sum_j p_j = 1), so with p_j = p_b off K (0 for "renormalize"):
                  grad = scale * ((1 - a) * g * (q - p) + a * (softmax(s) - onehot(label)))
        CE        = logsumexp(s) - s[label]                          (T = 1, only with labels, a > 0)
        loss      = (1 - a) * c * KL + a * CE,  c = T^2 if t2_scale else 1, g = T if t2_scale else 1/T

    Pass 1 streams the student row with an online maximum (docs/design.md#online-softmax), keeping S and, for the uniform tail, sum (s - r) over the finite entries (shifted
    with the reference: sum (s - r') = sum (s - r) + n_finite (r - r')) and the count of -inf ones.
    Pass 2 reads the k values (BLOCK_K chunks) for the teacher's maximum and normaliser; pass 3 the
    k values, indices and the student at those indices for the KL's kept terms. Pass 4 writes the
    gradient over the row (the tail's value soft (q - p_b) everywhere), then, after a barrier, the k
    kept entries' own value soft (q_i - p_i) at their indices.

    A row whose indices leave [0, V) or repeat (found by the launcher with device-side torch ops,
    no host synchronisation) gets a NaN loss and a NaN gradient, as a label outside [0, V) does.
    Ignored rows (label == ignore_index) read nothing: loss 0, gradient 0.

    Bytes moved per row of V with k kept entries: reads V student elements (passes 1 and 4, the
    second ideally from L2), k values and k indices (passes 2 to 4, from L1/L2 after the first),
    k student elements at the indices, one int8 row flag and one int64 label; writes V gradient
    elements and one float32 loss.
    """
    x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef = kd_scalars(
        x_scale, soft_loss_coef, soft_loss_t, hard_weight, soft_grad_coef)
    inv_t = tl.cast(inv_t, tl.float32)  # fp32 whoever launches (kernels/__init__.py)
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")

    row, go, skip, s_row = row_start(s_ptr, V, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    v_row = v_ptr + row * K
    i_row = idx_ptr + row * K
    cols = tl.arange(0, BLOCK_V)
    kcols = tl.arange(0, BLOCK_K)
    broken = tl.load(broken_ptr + row) != 0

    # A broken row (indices outside [0, V) or repeated) is bad unless its label is ignored.
    label, compute, bad = row_status(labels_ptr, row, ignore_index, V, HAS_LABELS)
    bad = bad | (compute & broken)
    compute = compute & (~broken)

    # Pass 1: the student row: online maximum, S, sum (s - r) over finite entries, -inf count.
    m_s, sum_s = online_start()
    sum_1 = tl.zeros((), tl.float32)
    d_all = tl.zeros((), tl.float32)
    n_fin = tl.zeros((), tl.float32)
    n_ninf = tl.zeros((), tl.int32)
    if compute:
        for start in range(0, V, BLOCK_V):
            offs, mask = forward_chunk(start, V, cols)
            # evict_last: keep the row in L2 for the gradient pass.
            s = load_chunk(s_row + offs, mask, "evict_last")
            old_r = reference(m_s)  # taken before the step: so ptxas fits sm_80 in 64 registers, no spill
            new_m, r, sum_s, sum_1 = student_step(m_s, sum_s, sum_1, s, x_scale, HAS_CE and not SAME_T)
            if UNIFORM:
                fin = mask & (s != NEG_INF)
                d_all = d_all + n_fin * (old_r - r) + tl.sum(tl.where(fin, s - r, 0.0), axis=0)
                n_fin += tl.sum(fin.to(tl.float32), axis=0)
                n_ninf += tl.sum((mask & (s == NEG_INF)).to(tl.int32), axis=0)
            m_s = new_m
    r_s = reference(m_s)

    # Pass 2: the teacher's maximum (NaN kept), the uniform tail, log Z = top / T + lz. Differences
    # are taken before scaling by 1/T.
    mv = tl.full((), NEG_INF, tl.float32)
    n_nan = tl.zeros((), tl.int32)
    mass = tl.zeros((), tl.float32)
    if compute:
        for kstart in range(0, K, BLOCK_K):
            ko, km, v = _kept_chunk(v_row, kstart, K, kcols)
            mv = tl.maximum(mv, tl.max(tl.where(v == v, v, NEG_INF), axis=0))
            n_nan += tl.sum((v != v).to(tl.int32), axis=0)
            if UNIFORM:
                mass += tl.sum(tl.exp(v), axis=0)
    mv = tl.where(n_nan > 0, float("nan"), mv)
    n_rest = (V - K) * 1.0
    if UNIFORM:
        tail_mass = 1.0 - mass  # NaN stays NaN
        tail_mass = tl.where(tail_mass < 0.0, 0.0, tail_mass)  # kept mass 1 up to rounding: no tail
        has_tail = (tail_mass != 0.0) & (V > K)
        ub = tl.where(has_tail, tl.log(tail_mass / n_rest), NEG_INF)
        top = tl.where(has_tail & (~(ub <= mv)), ub, mv)
        z = tl.where(has_tail, n_rest * tl.exp((ub - top) * inv_t), 0.0)
    else:
        has_tail = False
        top = mv
        z = tl.zeros((), tl.float32)
    if compute:
        for kstart in range(0, K, BLOCK_K):
            ko, km, v = _kept_chunk(v_row, kstart, K, kcols)
            z += tl.sum(tl.where(km, tl.exp((v - top) * inv_t), 0.0), axis=0)
    lz = tl.log(z)
    if UNIFORM:
        pb = tl.where(has_tail, tl.exp((ub - top) * inv_t - lz), 0.0)
    else:
        pb = tl.zeros((), tl.float32)

    # Pass 3: the kept entries' KL terms, and sum (s - r) over them for the tail. As in
    # kernels/kd.py, KL = sum_j p_j ((v_j - top) - (s_j - r)) / T + log S - lz: each term is a
    # difference taken before scaling, and log S - lz, both near log V, are subtracted last.
    kept = tl.zeros((), tl.float32)
    d_kept = tl.zeros((), tl.float32)
    n_ninf_kept = tl.zeros((), tl.int32)
    if compute:
        for kstart in range(0, K, BLOCK_K):
            ko, km, v = _kept_chunk(v_row, kstart, K, kcols)
            j = tl.load(i_row + ko, mask=km, other=0).to(tl.int64)
            sj = tl.load(s_row + j, mask=km, other=0.0).to(tl.float32)
            p = tl.exp((v - top) * inv_t - lz)
            dj = sj - r_s
            # where the teacher has no mass the term is 0, not 0 * inf (NaN fails p == 0: kept)
            kept += tl.sum(tl.where(km & (p != 0.0), p * (((v - top) - dj) * inv_t), 0.0), axis=0)
            if UNIFORM:
                d_kept += tl.sum(tl.where(km & (sj != NEG_INF), dj, 0.0), axis=0)
                n_ninf_kept += tl.sum((km & (sj == NEG_INF)).to(tl.int32), axis=0)

    if UNIFORM:
        # sum over the tail of ((u - top) - (s_j - r)); +inf when a tail entry is -inf
        tail_diff = tl.where(n_ninf > n_ninf_kept, float("inf"), n_rest * (ub - top) - (d_all - d_kept))
        kept += tl.where(has_tail & (pb != 0.0), pb * (tail_diff * inv_t), 0.0)
    kl = (kept + LN2 * tl.log2(sum_s)) - lz
    kl = tl.where(kl < 0.0, 0.0, kl)  # KL >= 0; rounding can leave a hair below 0 (NaN kept)
    loss = soft_loss_coef * (soft_loss_t * kl)
    sum_1 = finish_loss(row_loss_ptr, row, loss, s_row, label, compute, bad, r_s, sum_s, sum_1, hard_weight, HAS_CE, SAME_T)

    # Pass 4: the gradient: the tail's value over the row (last chunk first: the one most likely
    # still in L2), then the kept entries' own.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * V
        k_soft, k_hard, inv_1 = grad_coefs(scale_ptr, n_rows, go, soft_grad_coef, hard_weight, sum_1, SCALE_MODE)
        inv_s = 1.0 / sum_s
        if compute:
            for start in range(0, V, BLOCK_V):
                offs, mask = backward_chunk(start, V, cols, BLOCK_V)
                s = load_chunk(s_row + offs, mask, "evict_first")
                q = tl.exp2((s - r_s) * x_scale) * inv_s
                store_grad(g_row, offs, mask, k_soft * (q - pb), q, s, r_s, inv_1, label, k_hard, HAS_CE, SAME_T)
            # The kept entries are written after every thread's store above has landed.
            tl.debug_barrier()
            for kstart in range(0, K, BLOCK_K):
                ko, km, v = _kept_chunk(v_row, kstart, K, kcols)
                j = tl.load(i_row + ko, mask=km, other=0).to(tl.int64)
                sj = load_chunk(s_row + j, km, "")
                p = tl.exp((v - top) * inv_t - lz)
                q = tl.exp2((sj - r_s) * x_scale) * inv_s
                store_grad(g_row, j, km, k_soft * (q - p), q, sj, r_s, inv_1, label, k_hard, HAS_CE, SAME_T)
        else:
            fill_row(g_row, V, bad, BLOCK_V)


def broken_rows(indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """int8 [N]: 1 where a row's indices leave [0, vocab) or repeat. Device-side torch ops only
    (a sort per row), no host synchronisation."""
    outside = ((indices < 0) | (indices >= vocab)).any(-1)
    if indices.shape[-1] > 1:
        ordered = indices.sort(-1).values
        outside = outside | (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    return outside.to(torch.int8)


def sparse_kd_forward(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor | None,
    values_kind: str, tail: str,  # the teacher's format
    temperature: float, hard_weight: float, ignore_index: int, reduction: str, t2_scale: bool,  # the KD options
    compute_grad: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::sparse_kd_forward on Triton: (loss float32, grad in the student's dtype or empty [0]).

    Inputs are expected validated by the caller (contiguous [N, V] and [N, k], labels int64 [N]
    or None, grad_scale float32 of 1 or N elements or None). Uses only torch ops and one
    wrap_triton launch, with no host synchronisation, so that it can run inside
    torch.library.triton_op.
    """
    return _sparse_kd_launch(student, values, indices, labels, values_kind, tail, temperature, hard_weight,
                             ignore_index, reduction, t2_scale, compute_grad, grad_scale, None)


def sparse_kd_forward_rescale_(grad, student, values, indices, labels, values_kind, tail, temperature, hard_weight,
                               ignore_index, reduction, t2_scale, grad_scale) -> None:
    """fastkd::sparse_kd_forward_rescale_ on Triton (csrc/ops.cpp): ``grad``, the forward's
    gradient, rewritten with grad_scale folded in; rows whose scale is exactly 1 are skipped on
    the device."""
    _sparse_kd_launch(student, values, indices, labels, values_kind, tail, temperature, hard_weight, ignore_index,
                      reduction, t2_scale, True, grad_scale, grad)


def _sparse_kd_launch(student, values, indices, labels, values_kind, tail, temperature, hard_weight, ignore_index,
                      reduction, t2_scale, compute_grad, grad_scale, into):
    if values_kind not in ("logits", "logprobs"):
        raise ValueError(f"sparse_kd_forward (triton): values must be 'logits' or 'logprobs', got {values_kind!r}")
    if tail not in ("renormalize", "uniform"):
        raise ValueError(f"sparse_kd_forward (triton): tail must be 'renormalize' or 'uniform', got {tail!r}")
    if tail == "uniform" and values_kind != "logprobs":
        raise ValueError("sparse_kd_forward (triton): tail='uniform' needs values='logprobs'")
    check_reduction("sparse_kd_forward", reduction)
    n, v = student.shape
    k = values.shape[1]
    row_loss, grad = row_outputs(student, compute_grad, into)
    go = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()
    broken = broken_rows(indices, v)

    has_labels = labels is not None
    sw = switches(has_labels, hard_weight, temperature, reduction, compute_grad, tail == "uniform")
    sw.update(grad_scale_switches(go, into is not None))
    scale_t = batchmean_scale(labels, ignore_index) if sw["SCALE_MODE"] == 2 else None
    block_v, block_k, num_warps = launch_shape(v, k, on_gpu=student.device.type == "cuda")

    torch.library.wrap_triton(_sparse_kd_forward_kernel)[(n,)](
        student,
        values,
        indices,
        labels,
        broken,
        row_loss,
        grad if compute_grad else None,
        scale_t,
        go,
        n,
        v,
        k,
        ignore_index,
        1.0 / temperature,
        LOG2E / temperature,
        (1.0 - hard_weight) * (temperature if t2_scale else 1.0),
        temperature if t2_scale else 1.0,
        hard_weight,
        (1.0 - hard_weight) * (temperature if t2_scale else 1.0 / temperature),
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=num_warps,
        **sw,
    )
    return reduce_rows(row_loss, reduction, scale_t, n), grad


# ----------------------------------------------------------------------------------------------
# Every launch sparse_kd_forward can make, for the static GPU check (convention: kernels/__init__.py).
# ----------------------------------------------------------------------------------------------

RICHEST_SWITCHES = dict(HAS_LABELS=True, HAS_CE=True, SAME_T=False, UNIFORM=True, SCALE_MODE=2, COMPUTE_GRAD=True)
STATIC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def static_launches() -> list:
    """The launches sparse_kd_forward can make on a GPU, reduced as follows (convention:
    kernels/__init__.py). The full product is 32 switch combinations x 9 (student, values) dtype
    pairs x 2 index dtypes x ~24 (BLOCK_V, BLOCK_K) shapes x 2 architectures; this list has 75:

    * every switch combination at BLOCK_V 4096, BLOCK_K 1024, 8 warps (the most elements per
      thread), fp32 with int64 indices; the richest (RICHEST_SWITCHES) at the largest block of
      the other warp counts (BLOCK_V 64/1, 256/2, 1024/4);
    * the richest switches at every other BLOCK_V (1 .. 4096, BLOCK_K = min(BLOCK_V, 1024)) and
      every BLOCK_K (1 .. 1024) at BLOCK_V 4096, fp32; at the largest block of each warp count
      for bf16 and fp16, and there with a row length that is not a multiple of 16 (fp32);
    * int32 indices, and an fp32 student with bf16 values and the reverse, at BLOCK_V 4096;
    * grad_scale (the backward of a 16-bit student), bf16: every mode at BLOCK_V 4096, the
      per-row in-place one at the largest block of the other warp counts.

    Row lengths are the block size (k = BLOCK_K), or one less; n_rows = 64, ignore_index = -100.
    Not compiled: switch combinations other than the richest below BLOCK_V 4096 or with 16-bit
    inputs, other mixed dtype pairs, n_rows == 1, 64-bit scalars.
    """
    combos = switch_combos(switches, SWITCH_INPUTS, RICHEST_SWITCHES)
    shapes = sorted({(b, min(b, _BLOCK_K_MAX_GPU), w) for b, w in gpu_shapes(_BLOCK_V_MAX_GPU)})
    largest = [max(s for s in shapes if s[2] == w) for w in sorted({w for _, _, w in shapes})]
    k_shapes = [(_BLOCK_V_MAX_GPU, 1 << e, launch_shape(_BLOCK_V_MAX_GPU, 1)[2]) for e in range(0, 11)]
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}

    def launch(student, vals, index, shape, combo, v):
        block_v, block_k, num_warps = shape
        combo = {**GRAD_SCALE_OFF, **combo}
        args = dict(
            s_ptr=student,
            v_ptr=vals,
            idx_ptr=index,
            labels_ptr=torch.int64 if combo["HAS_LABELS"] else None,
            broken_ptr=torch.int8,
            row_loss_ptr=torch.float32,
            grad_ptr=student if combo["COMPUTE_GRAD"] else None,
            scale_ptr=torch.float32 if combo["SCALE_MODE"] == 2 else None,
            go_ptr=torch.float32 if combo["GO_MODE"] else None,
            n_rows=64,
            V=v,
            K=min(block_k, v),
            ignore_index=-100,
            inv_t=0.5,
            x_scale=LOG2E / 2.0,
            soft_loss_coef=0.5,
            soft_loss_t=2.0,
            hard_weight=0.5,
            soft_grad_coef=0.5,
            **combo,
            BLOCK_V=block_v,
            BLOCK_K=block_k,
        )
        dt = names[student] if student == vals else f"{names[student]}/{names[vals]}"
        per_entry = student.itemsize + (student.itemsize if combo["COMPUTE_GRAD"] else 0)
        per_row = min(block_k, v) * (vals.itemsize + index.itemsize) + 4 + 1 + (8 if combo["HAS_LABELS"] else 0)
        label = f"{dt} · {names[index]} · BLOCK_V={block_v} · BLOCK_K={block_k} · {num_warps} warp{'s' if num_warps > 1 else ''}"
        return static_launch(_sparse_kd_forward_kernel, args, num_warps, label, v, combo, (per_entry, per_row),
                             after=["uniform" if combo["UNIFORM"] else "renormalize"])

    f32, b16, i64 = torch.float32, torch.bfloat16, torch.int64
    top = largest[-1]
    out = [launch(f32, f32, i64, top, combo, top[0]) for combo in combos]
    out += [launch(f32, f32, i64, shape, RICHEST_SWITCHES, shape[0]) for shape in largest[:-1]]
    out += [launch(f32, f32, i64, shape, RICHEST_SWITCHES, shape[0]) for shape in shapes + k_shapes if shape not in largest]
    for dtype in STATIC_DTYPES[1:]:
        out += [launch(dtype, dtype, i64, shape, RICHEST_SWITCHES, shape[0]) for shape in largest]
    out += [launch(f32, f32, i64, shape, RICHEST_SWITCHES, shape[0] - 1) for shape in largest]
    out.append(launch(f32, f32, torch.int32, top, RICHEST_SWITCHES, top[0]))
    out += [launch(a, b, i64, top, RICHEST_SWITCHES, top[0]) for a, b in ((f32, b16), (b16, f32))]
    out += [launch(b16, b16, i64, top, {**RICHEST_SWITCHES, **go}, top[0]) for go in GRAD_SCALE_ON]
    out += [launch(b16, b16, i64, shape, {**RICHEST_SWITCHES, **GRAD_SCALE_ON[1]}, shape[0]) for shape in largest[:-1]]
    return out
