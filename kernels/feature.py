"""Feature-matching losses (FitNets hint, attention transfer): Triton.

hint_forward, features flattened to rows [B, D] (one row per sample), e = s - t:

    mse        sum e^2                                   grad 2e
    l1         sum |e|                                   grad sign(e)   (sign(NaN) = 0, as torch)
    smooth_l1  sum (|e| < 1 ? e^2/2 : |e| - 1/2)         grad clamp(e, -1, 1)
    cosine     1 - cos, cos = <s,t>/(Ns Nt), Ns = max(|s|, 1e-8)       grad -v/Ns + cos u/|s|
    normalized_mse  sum (u - v)^2, u = s/Ns, v = t/Nt, Ns = max(|s|, 1e-12)
                                                          grad 2/Ns ((1 - [|s|>=eps]<u,u-v>) u - v)

Every launch is over a 1-D grid of B * n_chunks programs, each one chunk of BLOCK entries of one
row (so that few large samples still fill the GPU). The elementwise kinds take one launch
(_hint_kernel: the chunk's loss and its gradient). cosine and normalized_mse take two: the
chunks' partial |s|^2, |t|^2, <s,t> (_hint_sums_kernel; each product kept exactly as its
rounded value and its fma rounding error), combined per row in float64 by torch
([B] values: the norms and the gradient's two coefficients), then _hint_kernel, which sums
(u - v)^2 entry by entry (1 - cos = |u - v|^2 / 2 for unclamped norms: no cancellation when cos is
near 1) and writes the gradient coef_u * u + coef_v * v. Chunk losses are summed per row by torch.
Memory traffic: read 2 B*D (twice for cosine/normalized_mse: the second pass finds the chunk in
L2 only for small batches), write B*D (gradient).

attention_transfer_forward, student x [B, Cs, HW], teacher y [B, Ct, HW]:

    Q[b, j] = mean_c |x[b, c, j]|^p   (_at_channel_mean_kernel, once for x and once for y)
    a = Q / max(|Q|, 1e-12); row loss = sum_j (a_s - a_t)^2; the [B, HW] algebra (norms, loss,
    w = dL/dQs * p/Cs) by torch in float64
    grad[b, c, j] = w[b, j] * |x|^(p-1) sign(x)   (_at_grad_kernel)

p = 1, 2, 3, 4 are exact polynomial forms (P_MODE); any other p >= 1 uses exp2(p log2 |x|).
Memory traffic: read B*Cs*HW twice and B*Ct*HW once, write B*Cs*HW.

grad_scale (kernels/__init__.py): the elementwise hint kinds multiply it into grad_coef in the
kernel; cosine, normalized_mse and attention transfer into their per-row coefficients (torch, in
float64). With GO_SKIP every kernel's program returns at once on a row whose scale is 1, so the
backward's in-place rescale reads nothing for it.

Accumulation is in float32 (the launchers refuse float64: that runs on the cuda, cpu or reference
backend). No host synchronisation anywhere: the launchers run inside torch.library.triton_op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import GRAD_SCALE_OFF, GRAD_SCALE_ON, grad_scale_switches, grad_scale_variant
from ._softmax import grad_scale_of

COSINE_EPS = 1e-8
NORMALIZE_EPS = 1e-12

# ----------------------------------------------------------------------------------------------
# Launch configuration: every choice the launchers below make (block sizes, num_warps, constexpr
# switches) is made here and only here, so that a static check can enumerate and compile each
# one (static_launches()).
# ----------------------------------------------------------------------------------------------

# Entries of a row one hint program handles: a power of two in [MIN, MAX] on a GPU. Under the
# interpreter (CPU tensors) a smaller chunk makes small test shapes run several chunks per row.
HINT_BLOCK_MIN_GPU = 128
HINT_BLOCK_MAX_GPU = 2048
HINT_BLOCK_MAX_INTERPRETER = 64

# Attention transfer tiles: BLOCK_C channels x BLOCK_J spatial positions, BLOCK_J a power of two
# in [MIN, MAX] on a GPU.
AT_BLOCK_J_MIN_GPU = 32
AT_BLOCK_J_MAX_GPU = 256
AT_BLOCK_C_GPU = 8
AT_BLOCK_J_MAX_INTERPRETER = 16
AT_BLOCK_C_INTERPRETER = 4

# kind -> the KIND constexpr of the hint kernels; KINDS_WITH_SUMS need _hint_sums_kernel first.
HINT_KIND_CODES = {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3, "normalized_mse": 4}
KINDS_WITH_SUMS = ("cosine", "normalized_mse")

# p -> the P_MODE constexpr of the attention kernels: exact forms for 1..4, 0 for any other p.
AT_P_MODES = {1.0: 1, 2.0: 2, 3.0: 3, 4.0: 4}


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(triton.next_power_of_2(n), hi))


def hint_num_warps(block: int) -> int:
    return 4 if block >= 1024 else 2 if block >= 256 else 1


def at_num_warps(block_c: int, block_j: int) -> int:
    return 4 if block_c * block_j >= 1024 else 2 if block_c * block_j >= 256 else 1


def hint_launch_shape(dim: int, on_gpu: bool = True) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``dim`` entries."""
    block = _pow2_between(dim, HINT_BLOCK_MIN_GPU, HINT_BLOCK_MAX_GPU) if on_gpu else _pow2_between(dim, 1, HINT_BLOCK_MAX_INTERPRETER)
    return block, hint_num_warps(block)


def at_launch_shape(spatial: int, on_gpu: bool = True) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_J, num_warps) for maps of ``spatial`` positions."""
    if on_gpu:
        block_c, block_j = AT_BLOCK_C_GPU, _pow2_between(spatial, AT_BLOCK_J_MIN_GPU, AT_BLOCK_J_MAX_GPU)
    else:
        block_c, block_j = AT_BLOCK_C_INTERPRETER, _pow2_between(spatial, 1, AT_BLOCK_J_MAX_INTERPRETER)
    return block_c, block_j, at_num_warps(block_c, block_j)


def at_p_mode(p: float) -> int:
    return AT_P_MODES.get(float(p), 0)


def _pow2_range(lo: int, hi: int) -> list[int]:
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


def static_launches() -> list:
    """The launches the launchers can make on a GPU (convention: kernels/__init__.py).

    Covered: with fp32 inputs, every kernel at every block size the shape rules above can give
    (hint BLOCK 128..2048, attention BLOCK_J 32..256) with the gradient on: every hint KIND, and
    the attention kernels at p = 2 and at a p with no exact form (P_MODE 0, the general power);
    at the largest block, every KIND without the gradient and every P_MODE; with bf16 inputs
    (fp16 converts alike), every variant at the largest block only. Not covered: bf16/fp16 at
    the smaller blocks (the same code with a narrower load and store), P_MODE 1, 3, 4 below the
    largest attention block (fewer live values than P_MODE 0). grad_scale (GRAD_SCALE_ON, the
    backward of a 16-bit student): bf16 at the largest block, every hint KIND with the gradient,
    attention at p = 2 and 2.5. Row lengths and spatial sizes are odd, as a real launch's may be,
    so no divisible-by-16 specialisation is assumed."""
    from . import StaticLaunch

    specs = []

    def go_args(go):
        return dict(go_ptr=torch.float32 if go["GO_MODE"] else None, **go)

    def go_tag(go):
        return f", {grad_scale_variant(go)}" if go["GO_MODE"] else ""

    def hint(dtype, block, kinds, grads, go=GRAD_SCALE_OFF):
        size, name = torch.empty((), dtype=dtype).element_size(), str(dtype).removeprefix("torch.")
        warps = hint_num_warps(block)
        label = f"hint · {name} · BLOCK={block} · {warps} warps"
        specs.append(dict(
            kernel=_hint_sums_kernel,
            args=dict(s_ptr=dtype, t_ptr=dtype, part_ptr=torch.float32, D=4097, n_chunks=3, BLOCK=block, **go_args(go)),
            num_warps=warps, label=label, variant="sums" + go_tag(go), row_bytes=(2 * size, 0),
        ))
        for kind in kinds:
            for grad in grads:
                specs.append(dict(
                    kernel=_hint_kernel,
                    args=dict(s_ptr=dtype, t_ptr=dtype, g_ptr=dtype if grad else None, part_ptr=torch.float32,
                              row_ptr=torch.float32 if kind in KINDS_WITH_SUMS else None, D=4097, n_chunks=3,
                              grad_coef=0.5, KIND=HINT_KIND_CODES[kind], COMPUTE_GRAD=grad, BLOCK=block, **go_args(go)),
                    num_warps=warps, label=label, variant=f"{kind}{', grad' if grad else ''}{go_tag(go)}",
                    row_bytes=((3 if grad else 2) * size, 0),
                ))

    def attention(dtype, block_j, p_modes, go=GRAD_SCALE_OFF):
        size, name = torch.empty((), dtype=dtype).element_size(), str(dtype).removeprefix("torch.")
        block_c = AT_BLOCK_C_GPU
        warps = at_num_warps(block_c, block_j)
        label = f"attention · {name} · BLOCK_C={block_c} · BLOCK_J={block_j} · {warps} warps"
        for p, mode in p_modes:
            common = dict(C=37, HW=1023, n_jb=3, p=p, P_MODE=mode, BLOCK_C=block_c, BLOCK_J=block_j, **go_args(go))
            specs.append(dict(
                kernel=_at_channel_mean_kernel, args=dict(x_ptr=dtype, q_ptr=torch.float32, inv_c=1 / 37, **common),
                num_warps=warps, label=label, variant=f"channel mean, p={p:g}{go_tag(go)}", row_bytes=(size, 0),
            ))
            specs.append(dict(
                kernel=_at_grad_kernel, args=dict(x_ptr=dtype, w_ptr=torch.float32, g_ptr=dtype, n_cb=5, **common),
                num_warps=warps, label=label, variant=f"gradient, p={p:g}{go_tag(go)}", row_bytes=(2 * size, 0),
            ))

    kinds = list(HINT_KIND_CODES)
    for block in _pow2_range(HINT_BLOCK_MIN_GPU, HINT_BLOCK_MAX_GPU):
        hint(torch.float32, block, kinds, (True,) if block < HINT_BLOCK_MAX_GPU else (True, False))
    hint(torch.bfloat16, HINT_BLOCK_MAX_GPU, kinds, (True, False))
    every_p = list(AT_P_MODES.items()) + [(2.5, 0)]
    for block_j in _pow2_range(AT_BLOCK_J_MIN_GPU, AT_BLOCK_J_MAX_GPU):
        attention(torch.float32, block_j, every_p if block_j == AT_BLOCK_J_MAX_GPU else [(2.0, 2), (2.5, 0)])
    attention(torch.bfloat16, AT_BLOCK_J_MAX_GPU, every_p)
    # The backward's relaunches with grad_scale (16-bit students), bf16 at the largest block.
    for go in GRAD_SCALE_ON:
        hint(torch.bfloat16, HINT_BLOCK_MAX_GPU, kinds, (True,), go)
        attention(torch.bfloat16, AT_BLOCK_J_MAX_GPU, [(2.0, 2), (2.5, 0)], go)
    return [StaticLaunch(**spec) for spec in specs]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _program_row(per_row, go_ptr, GO_MODE: tl.constexpr, GO_SKIP: tl.constexpr):
    """(program id, the sample row it works on, the row's grad_scale, whether the program has
    nothing to do): a GO_SKIP relaunch, which rewrites the forward's gradient in place, leaves a
    row whose scale is exactly 1 as it stands, with no traffic."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // per_row
    go = grad_scale_of(go_ptr, row, GO_MODE)
    if GO_SKIP:
        skip = go == 1.0
    else:
        skip = False
    return pid, row, go, skip


@triton.jit
def _hint_sums_kernel(
    s_ptr,  # [B, D] student
    t_ptr,  # [B, D] teacher
    part_ptr,  # [B * n_chunks, 6] float32: |s|^2, |t|^2, <s, t> of each chunk, then their low parts
    go_ptr,  # float32 grad_scale: [] (GO_MODE 1) or [B] (GO_MODE 2), else None
    D,
    n_chunks,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py)
    GO_SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The sums of the hint kinds cosine and normalized_mse (docs/design.md#feature): one program per
    chunk of BLOCK entries of a row, its |s|², |t|², <s, t>, each product as its rounded value and
    its fma rounding error (joined in float64 by the launcher).

    Bytes moved per launch: reads 2 B·D elements (s, t), writes 6 float32 per chunk."""
    pid, row, _, skip = _program_row(n_chunks, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    offs = (pid % n_chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    s = tl.load(s_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    # Each product as its rounded value plus its rounding error, fma(a, b, -a*b), summed apart
    # (joined in float64 by the launcher): a row of one entry then gets cos = +-1 exactly.
    ss = s * s
    tt = t * t
    st = s * t
    tl.store(part_ptr + pid * 6, tl.sum(ss, axis=0))
    tl.store(part_ptr + pid * 6 + 1, tl.sum(tt, axis=0))
    tl.store(part_ptr + pid * 6 + 2, tl.sum(st, axis=0))
    tl.store(part_ptr + pid * 6 + 3, tl.sum(tl.fma(s, s, -ss), axis=0))
    tl.store(part_ptr + pid * 6 + 4, tl.sum(tl.fma(t, t, -tt), axis=0))
    tl.store(part_ptr + pid * 6 + 5, tl.sum(tl.fma(s, t, -st), axis=0))


@triton.jit
def _hint_kernel(
    s_ptr,  # [B, D] student
    t_ptr,  # [B, D] teacher
    g_ptr,  # [B, D] student dtype, or None when COMPUTE_GRAD is False
    part_ptr,  # [B * n_chunks] float32: each chunk's part of its row's raw loss
    row_ptr,  # [B, 4] float32 Ns, Nt, coef_u, coef_v for cosine / normalized_mse, else None
    go_ptr,  # float32 grad_scale: [] (GO_MODE 1) or [B] (GO_MODE 2), else None
    D,
    n_chunks,
    grad_coef,  # the reduction's scale of an elementwise kind's gradient
    KIND: tl.constexpr,  # HINT_KIND_CODES
    COMPUTE_GRAD: tl.constexpr,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py); cosine/normalized_mse: in row_ptr
    GO_SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The hint loss and its gradient (docs/design.md#feature; the per-kind forms atop this module):
    one program per chunk of BLOCK entries of a row, the chunk's part of the row loss and, with
    COMPUTE_GRAD, its gradient rounded once to the student's dtype.

    Bytes moved per launch: reads 2 B·D elements (s, t) and, for cosine / normalized_mse, 4 float32
    per row; writes one float32 per chunk and, with COMPUTE_GRAD, B·D gradient elements. A GO_SKIP
    program whose row's scale is 1 moves nothing but that scale."""
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    grad_coef = tl.cast(grad_coef, tl.float32)
    pid, row, go, skip = _program_row(n_chunks, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    if KIND < 3:
        grad_coef = grad_coef * go
    offs = (pid % n_chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    s = tl.load(s_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        e = s - t
        loss = e * e
        g = (e + e) * grad_coef
    elif KIND == 1:
        e = s - t
        loss = tl.abs(e)
        g = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0)) * grad_coef
    elif KIND == 2:
        e = s - t
        a = tl.abs(e)
        m = tl.where(a > 1.0, 1.0, a)  # min(|e|, 1), NaN kept
        loss = 0.5 * m * m + (a - m)
        g = tl.where(e > 1.0, 1.0, tl.where(e < -1.0, -1.0, e)) * grad_coef
    else:
        n_s = tl.load(row_ptr + row * 4)
        n_t = tl.load(row_ptr + row * 4 + 1)
        c_u = tl.load(row_ptr + row * 4 + 2)
        c_v = tl.load(row_ptr + row * 4 + 3)
        u = s / n_s
        v = t / n_t
        d = u - v
        loss = tl.where(mask, d * d, 0.0)
        g = c_u * u + c_v * v
    tl.store(part_ptr + pid, tl.sum(loss, axis=0))
    if COMPUTE_GRAD:
        tl.store(g_ptr + row * D + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _at_power(x, p, P_MODE: tl.constexpr):
    """|x|^p."""
    a = tl.abs(x)
    if P_MODE == 1:
        r = a
    elif P_MODE == 2:
        r = x * x
    elif P_MODE == 3:
        r = a * x * x
    elif P_MODE == 4:
        r = (x * x) * (x * x)
    else:
        r = tl.where(a == 0.0, 0.0, tl.exp2(p * tl.log2(tl.where(a == 0.0, 1.0, a))))
    return r


@triton.jit
def _at_power_slope(x, p, P_MODE: tl.constexpr):
    """|x|^(p-1) sign(x), the derivative of |x|^p over p (sign(NaN) = 0 for p = 1, as torch):
    sign(x) for p = 1, else _at_power one degree down with x's sign (the exact forms give x, |x| x
    and x^3 bit for bit; NaN and zeros pass through x * 0)."""
    if P_MODE == 1:
        r = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    else:
        if P_MODE == 0:
            m = _at_power(x, p - 1.0, 0)
        else:
            m = _at_power(x, p - 1.0, P_MODE - 1)
        r = tl.where(x > 0, m, tl.where(x < 0, -m, x * 0.0))
    return r


@triton.jit
def _at_channel_mean_kernel(
    x_ptr,  # [B, C, HW]
    q_ptr,  # [B, HW] float32: mean over C of |x|^p
    go_ptr,  # float32 grad_scale: [] (GO_MODE 1) or [B] (GO_MODE 2), else None
    C,
    HW,
    n_jb,  # spatial blocks per row
    inv_c,
    p,
    P_MODE: tl.constexpr,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py): only skips rows here
    GO_SKIP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Attention transfer's Q[b, j] = (1/C) Σ_c |x[b, c, j]|^p (docs/design.md#feature): one program
    per sample and block of BLOCK_J spatial positions, looping over the channels.

    Bytes moved per launch: reads B·C·HW elements, writes B·HW float32."""
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    inv_c = tl.cast(inv_c, tl.float32)
    p = tl.cast(p, tl.float32)
    pid, row, _, skip = _program_row(n_jb, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    j = (pid % n_jb) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < HW
    cs = tl.arange(0, BLOCK_C)
    base = x_ptr + row * C * HW
    acc = tl.zeros((BLOCK_J,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        mask = (c < C)[:, None] & j_mask[None, :]
        x = tl.load(base + c.to(tl.int64)[:, None] * HW + j[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(_at_power(x, p, P_MODE), axis=0)
    tl.store(q_ptr + row * HW + j, acc * inv_c, mask=j_mask)


@triton.jit
def _at_grad_kernel(
    x_ptr,  # [B, C, HW] student
    w_ptr,  # [B, HW] float32: dL/dQ * p / C
    g_ptr,  # [B, C, HW] student dtype
    go_ptr,  # float32 grad_scale: [] (GO_MODE 1) or [B] (GO_MODE 2), else None
    C,
    HW,
    n_jb,
    n_cb,
    p,
    P_MODE: tl.constexpr,
    GO_MODE: tl.constexpr,  # grad_scale (kernels/__init__.py): already in w; only skips rows here
    GO_SKIP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Attention transfer's gradient grad[b, c, j] = w[b, j] |x|^(p-1) sign(x) (docs/design.md#feature;
    w = dL/dQ_s · p / C from the launcher): one program per [BLOCK_C, BLOCK_J] tile of a sample.

    Bytes moved per launch: reads B·Cs·HW elements of x and B·HW float32 of w (once per channel
    block, from L2), writes B·Cs·HW gradient elements."""
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    p = tl.cast(p, tl.float32)
    pid, row, _, skip = _program_row(n_jb * n_cb, go_ptr, GO_MODE, GO_SKIP)
    if skip:
        return
    rest = pid % (n_jb * n_cb)
    c = (rest // n_jb) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = (rest % n_jb) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < HW
    mask = (c < C)[:, None] & j_mask[None, :]
    offs = row * C * HW + c.to(tl.int64)[:, None] * HW + j[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * HW + j, mask=j_mask, other=0.0)
    g = w[None, :] * _at_power_slope(x, p, P_MODE)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers (the ops' Triton implementations, registered in fastkd/ops/feature.py)
# ----------------------------------------------------------------------------------------------


def _reduce(raw: torch.Tensor, reduction: str, row_scale: float) -> torch.Tensor:
    """The op's float32 loss from float64 raw row losses."""
    if reduction == "none":
        return (raw * row_scale).to(torch.float32)
    if reduction == "sum":
        return raw.sum().to(torch.float32)
    return (raw.sum() * (row_scale / raw.shape[0])).to(torch.float32)


def _grad_coef(reduction: str, row_scale: float, n_rows: int) -> float:
    return row_scale if reduction == "none" else 1.0 if reduction == "sum" else row_scale / n_rows


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op} (triton): reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _row_scales(go, n: int):
    """grad_scale as [B] float64 for the per-row coefficients computed by torch, or None."""
    return None if go is None else go.double().expand(n) if go.numel() == 1 else go.double()


def hint_forward(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, reduction: str, compute_grad: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::hint_forward on Triton: (loss float32, grad in the student's dtype or empty [0]).
    Inputs are expected validated by the caller (contiguous [B, D], same shape; grad_scale
    float32 of 1 or B elements, or None)."""
    return _hint_launch(student, teacher, kind, reduction, compute_grad, grad_scale, None)


def hint_forward_rescale_(grad, student, teacher, kind, reduction, grad_scale) -> None:
    """fastkd::hint_forward_rescale_ on Triton (csrc/ops.cpp): ``grad``, the forward's gradient,
    rewritten with grad_scale folded in; rows whose scale is exactly 1 are skipped on the device."""
    _hint_launch(student, teacher, kind, reduction, True, grad_scale, grad)


def _hint_launch(student, teacher, kind, reduction, compute_grad, grad_scale, into):
    if kind not in HINT_KIND_CODES:
        raise ValueError(f"hint_forward (triton): kind must be one of {', '.join(HINT_KIND_CODES)}, got {kind!r}")
    _check_reduction("hint_forward", reduction)
    n, d = student.shape
    device = student.device
    block, num_warps = hint_launch_shape(d, device.type == "cuda")
    n_chunks = triton.cdiv(d, block)
    grid = (n * n_chunks,)
    row_scale = 1.0 if kind == "cosine" else 1.0 / d
    grad_coef = _grad_coef(reduction, row_scale, n)
    if into is not None:
        grad = into
    else:
        grad = torch.empty_like(student) if compute_grad else torch.empty(0, dtype=student.dtype, device=device)
    part = torch.empty(n * n_chunks, dtype=torch.float32, device=device)
    go = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()
    go_switches = grad_scale_switches(go, into is not None)

    row_params = None
    if kind in KINDS_WITH_SUMS:
        sums_part = torch.empty(n * n_chunks, 6, dtype=torch.float32, device=device)
        torch.library.wrap_triton(_hint_sums_kernel)[grid](
            student, teacher, sums_part, go, d, n_chunks, BLOCK=block, num_warps=num_warps, **go_switches,
        )
        sums = sums_part.view(n, n_chunks, 2, 3).double().sum((1, 2))
        ss, tt, st = sums.unbind(1)
        eps = COSINE_EPS if kind == "cosine" else NORMALIZE_EPS
        n_s, n_t = ss.sqrt(), tt.sqrt()
        c_s, c_t = n_s.clamp_min(eps), n_t.clamp_min(eps)  # NaN stays NaN
        if kind == "cosine":
            cosine = st / (c_s * c_t)
            # cos * u / |s|, 0 when |s| = 0 (NaN kept)
            coef_u = torch.where(n_s > 0, grad_coef * cosine / n_s, torch.where(n_s == 0, torch.zeros_like(n_s), n_s))
            coef_v = -grad_coef / c_s
        else:
            ur = ss / (c_s * c_s) - st / (c_s * c_t)
            keep = torch.where(n_s >= eps, ur, torch.where(n_s < eps, torch.zeros_like(ur), n_s))
            coef_u = 2 * grad_coef / c_s * (1 - keep)
            coef_v = -2 * grad_coef / c_s
        if go is not None:
            coef_u, coef_v = coef_u * _row_scales(go, n), coef_v * _row_scales(go, n)
        row_params = torch.stack([c_s, c_t, coef_u, coef_v], 1).to(torch.float32).contiguous()

    torch.library.wrap_triton(_hint_kernel)[grid](
        student, teacher, grad if compute_grad else None, part, row_params, go, d, n_chunks, grad_coef,
        KIND=HINT_KIND_CODES[kind], COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=num_warps, **go_switches,
    )
    raw = part.view(n, n_chunks).double().sum(1)
    if kind == "cosine":
        # 1 - cos = |u - v|^2 / 2 + (1 - (|u|^2 + |v|^2) / 2), the second term 0 unless clamped
        clamped = (n_s < COSINE_EPS) | (n_t < COSINE_EPS)
        correction = 1 - 0.5 * (ss / (c_s * c_s) + tt / (c_t * c_t))
        raw = 0.5 * raw + torch.where(clamped, correction, torch.zeros_like(correction))
    return _reduce(raw, reduction, row_scale), grad


def attention_transfer_forward(
    student: torch.Tensor, teacher: torch.Tensor, p: float, reduction: str, compute_grad: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::attention_transfer_forward on Triton. student [B, Cs, HW], teacher [B, Ct, HW],
    contiguous, validated by the caller; grad_scale float32 of 1 or B elements, or None."""
    return _attention_launch(student, teacher, p, reduction, compute_grad, grad_scale, None)


def attention_transfer_forward_rescale_(grad, student, teacher, p, reduction, grad_scale) -> None:
    """fastkd::attention_transfer_forward_rescale_ on Triton (csrc/ops.cpp): ``grad``, the
    forward's gradient, rewritten with grad_scale folded in; rows whose scale is exactly 1 are
    skipped on the device."""
    _attention_launch(student, teacher, p, reduction, True, grad_scale, grad)


def _attention_launch(student, teacher, p, reduction, compute_grad, grad_scale, into):
    _check_reduction("attention_transfer_forward", reduction)
    if not p >= 1:
        raise ValueError(f"attention_transfer_forward (triton): p must be >= 1, got {p}")
    n, cs, hw = student.shape
    ct = teacher.shape[1]
    device = student.device
    on_gpu = device.type == "cuda"
    block_c, block_j, num_warps = at_launch_shape(hw, on_gpu)
    mode = at_p_mode(p)
    n_jb = triton.cdiv(hw, block_j)
    q_s = torch.empty(n, hw, dtype=torch.float32, device=device)
    q_t = torch.empty(n, hw, dtype=torch.float32, device=device)
    go = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()
    go_switches = grad_scale_switches(go, into is not None)
    for x, q, c in ((student, q_s, cs), (teacher, q_t, ct)):
        # A skipped row's q is left unwritten: its loss and w are garbage, and never read.
        torch.library.wrap_triton(_at_channel_mean_kernel)[(n * n_jb,)](
            x, q, go, c, hw, n_jb, 1.0 / c, float(p), P_MODE=mode, BLOCK_C=block_c, BLOCK_J=block_j,
            num_warps=num_warps, **go_switches,
        )
    qs, qt = q_s.double(), q_t.double()
    n_s, n_t = torch.linalg.vector_norm(qs, dim=1), torch.linalg.vector_norm(qt, dim=1)
    c_s, c_t = n_s.clamp_min(NORMALIZE_EPS), n_t.clamp_min(NORMALIZE_EPS)
    a_s = qs / c_s[:, None]
    r = a_s - qt / c_t[:, None]
    raw = (r * r).sum(1)
    row_scale = 1.0 / hw
    if compute_grad:
        grad = torch.empty_like(student) if into is None else into
        ar = (a_s * r).sum(1)
        keep = torch.where(n_s >= NORMALIZE_EPS, ar, torch.where(n_s < NORMALIZE_EPS, torch.zeros_like(ar), n_s))
        k = _grad_coef(reduction, row_scale, n) * 2.0 * float(p) / cs
        coef = k / c_s if go is None else k / c_s * _row_scales(go, n)
        w = (coef[:, None] * (r - a_s * keep[:, None])).to(torch.float32).contiguous()
        n_cb = triton.cdiv(cs, block_c)
        torch.library.wrap_triton(_at_grad_kernel)[(n * n_jb * n_cb,)](
            student, w, grad, go, cs, hw, n_jb, n_cb, float(p), P_MODE=mode, BLOCK_C=block_c, BLOCK_J=block_j,
            num_warps=num_warps, **go_switches,
        )
    else:
        grad = torch.empty(0, dtype=student.dtype, device=device)
    return _reduce(raw, reduction, row_scale), grad
