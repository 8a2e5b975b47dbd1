"""Relational knowledge distillation (RKD distance, RKD angle, SP, PKT): Triton.

Every op is GEMM (torch.mm: cuBLAS), fused kernels, GEMM, on [B, D] student and [B, Dt] teacher
embeddings; the math, shared with the CPU and CUDA backends, is in fastkd/ops/relational.py and,
for RKD angle with its gradient derivation, at the top of csrc/cpu/relational_kernel.h. Loss and
sums in float32 (Triton refuses float64 input: the cpu and cuda backends compute it in float64).

* Squared distances (RKD): G = Ec·Ecᵀ of the centred rows (float32 for distance, float64 for angle,
  whose cosines are differences of distances), then ``_pair_sq_dist_kernel`` (a program per row):
  d² = G_ii + G_jj − 2 G_ij from G's upper triangle (so d² is exactly symmetric), recomputed from
  the input rows where it is within the GEMM's rounding error of zero (an exact duplicate then gets
  exactly 0, which the references' clamp and F.normalize kinks need).
* RKD distance: three row kernels (the μ row sums; ψ, the loss and Σ H ψ; the Laplacian row
  M_ij = −4 Z_ij, M_ii = 4 Σ_j Z_ij), then dE = M·Ec.
* RKD angle: ``_angle_rows_kernel`` (program per vertex i and block of rows j, looping over k):
  the loss and, per (i, j), S_ij = Σ_k Ω^i_jk and T_ij = Σ_k Ω^i_kj; ``_angle_pairs_kernel``
  (program per (j, k) tile, looping over vertices i): P_jk = Σ_i Ω^i_jk; ``_angle_assemble_kernel``:
  M = (2/B³)(P − Sᵀ − T + diag(S·1)); dE = M·Ec. The triplet math is computed twice (once per
  pass) so that nothing needs atomics or B³ storage; memory: six B×B float32 matrices.
* SP: a row kernel (row norms of G_s, G_t, the loss, dG's row), a symmetrising kernel
  (M = dG + dGᵀ), dF = M·F.
* PKT: a row kernel (kernel row sums, probabilities, loss, dK's row), a row kernel for
  M = dG + dGᵀ (the norm terms on its diagonal), dF = M·F.

Memory traffic: O(B·D) for the GEMMs' inputs and the gradient, O(B²) per pass over the B×B
matrices (RKD angle: 2·B³ triplets from cache-resident tiles).

Launchers use torch ops and wrap_triton launches only, with no host synchronisation, so that they
run inside torch.library.triton_op. The launch configuration is chosen in one place,
``launch_config``; ``static_launches()`` lists the launches a GPU run can make, for the static
GPU check (kernels/__init__.py).
"""

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Launch configuration: the one place where block sizes and warps are chosen.
# ----------------------------------------------------------------------------------------------

# Row kernels walk a B×B row in chunks of at most this many entries; on the interpreter a small
# chunk keeps the chunked path exercised by small test shapes.
ROW_BLOCK_MAX_GPU = 1024
ROW_BLOCK_MAX_INTERPRETER = 8
# RKD angle tiles: rows j × columns k per program.
ANGLE_TILE_GPU = (32, 64)
ANGLE_TILE_INTERPRETER = (8, 8)
# Feature chunk of the exact recomputation of near-zero distances: its [ROW_BLOCK, BLOCK_D]
# tile holds at most 16 values a thread on a GPU (32 columns at a 1024-row block held 128 a
# thread and spilled 2-4 KB of stack on sm_80/sm_90).
FEATURE_BLOCK_MAX_GPU = 32
FEATURE_BLOCK_INTERPRETER = 4


def feature_block(row_block: int, warps: int) -> int:
    return max(1, min(FEATURE_BLOCK_MAX_GPU, 16 * 32 * warps // row_block))


def _row_warps(block: int) -> int:
    return 8 if block >= 1024 else 4 if block >= 256 else 2 if block >= 64 else 1


# 8 warps: at 4 the pair kernel's [32, 64] tiles (the accumulator and both h_jk, held across
# its loop over vertices) took 255 registers a thread and spilled.
ANGLE_WARPS = 8


def launch_config(n: int, device: torch.device) -> dict:
    """Block sizes and warps for a batch of n on ``device`` (CUDA, or CPU under the interpreter)."""
    gpu = device.type == "cuda"
    row = min(triton.next_power_of_2(max(n, 1)), ROW_BLOCK_MAX_GPU if gpu else ROW_BLOCK_MAX_INTERPRETER)
    bj, bk = ANGLE_TILE_GPU if gpu else ANGLE_TILE_INTERPRETER
    return {
        "ROW_BLOCK": row,
        "row_warps": _row_warps(row),
        "BLOCK_J": bj,
        "BLOCK_K": bk,
        "angle_warps": ANGLE_WARPS,
        "BLOCK_D": feature_block(row, _row_warps(row)) if gpu else FEATURE_BLOCK_INTERPRETER,
    }


def _row_shapes() -> list:
    """(ROW_BLOCK, row_warps) of every batch size on a GPU."""
    return sorted({(r, _row_warps(r)) for r in (launch_config(1 << e, torch.device("cuda"))["ROW_BLOCK"] for e in range(31))})


def static_launches() -> list:
    """The launches a GPU run can make (convention: kernels/__init__.py), 47 of them.

    Every row kernel, with every value of its switches (PASS, COMPUTE_GRAD), at the largest
    ROW_BLOCK of each warp count (32/1, 128/2, 512/4, 1024/8: the most elements per thread), on
    the float32 matrices the launchers make; the pair kernel also with a float64 Gram matrix and
    bf16 rows; the two angle kernels at their one tile. Not compiled: the row kernels at the
    smaller blocks (fewer live values per thread than those listed) and the pair kernel's other
    input dtypes (fp16 converts as bf16 does).
    """
    from . import StaticLaunch, largest_per_warp_count

    f32 = torch.float32
    n, d = 4099, 515  # odd: no divisibility specialisation
    out = []

    def add(kernel, args, warps, label, variant="", row_bytes=(0, 0)):
        out.append(StaticLaunch(kernel=kernel, args=args, num_warps=warps, label=label, variant=variant, row_bytes=row_bytes))

    for block, warps in largest_per_warp_count(_row_shapes()):
        label = f"BLOCK={block} · {warps} warp{'s' if warps > 1 else ''}"
        add(_pair_sq_dist_kernel, dict(gram_ptr=f32, x_ptr=f32, out_ptr=f32, n=n, d=d, tau=1e-3, scale=0.5,
                                       BLOCK=block, BLOCK_D=feature_block(block, warps)), warps, label, "fp32 Gram", (8, 0))
        add(_rkd_distance_sums_kernel, dict(ds_ptr=f32, dt_ptr=f32, sums_ptr=f32, n=n, BLOCK=block), warps, label, "", (8, 8))
        for pass_ in (1, 2):
            add(_rkd_distance_rows_kernel, dict(ds_ptr=f32, dt_ptr=f32, sums_ptr=f32, loss_ptr=f32, c_ptr=f32, n=n,
                                                PASS=pass_, BLOCK=block), warps, label, f"pass {pass_}", (8 + 4 * (pass_ - 1), 8))
        for grad in (False, True):
            add(_sp_rows_kernel, dict(gs_ptr=f32, gt_ptr=f32, loss_ptr=f32, n=n, k=1e-6, COMPUTE_GRAD=grad, BLOCK=block),
                warps, label, "grad" if grad else "loss only", (8 + 4 * grad, 4))
            add(_pkt_rows_kernel, dict(gs_ptr=f32, gt_ptr=f32, dk_ptr=f32 if grad else None, loss_ptr=f32, n=n, eps=1e-7,
                                       inv_b2=1e-6, COMPUTE_GRAD=grad, BLOCK=block),
                warps, label, "grad" if grad else "loss only", (8 + 4 * grad, 4))
        add(_symmetrise_kernel, dict(a_ptr=f32, out_ptr=f32, n=n, BLOCK=block), warps, label, "", (12, 0))
        add(_pkt_grad_kernel, dict(gs_ptr=f32, dk_ptr=f32, m_ptr=f32, n=n, eps=1e-7, BLOCK=block), warps, label, "", (16, 0))
        add(_angle_assemble_kernel, dict(p_ptr=f32, s_ptr=f32, t_ptr=f32, corr_ptr=f32, n=n, scale=1e-9, BLOCK=block),
            warps, label, "", (20, 0))
    block, warps = _row_shapes()[-1]
    label = f"BLOCK={block} · {warps} warps"
    add(_pair_sq_dist_kernel, dict(gram_ptr=torch.float64, x_ptr=torch.bfloat16, out_ptr=f32, n=n, d=d, tau=1e-3,
                                   scale=0.5, BLOCK=block, BLOCK_D=feature_block(block, warps)), warps, label, "fp64 Gram, bf16 rows", (12, 0))
    bj, bk = ANGLE_TILE_GPU
    label = f"BLOCK_J={bj} · BLOCK_K={bk} · {ANGLE_WARPS} warps"
    add(_angle_rows_kernel, dict(hs_ptr=f32, ht_ptr=f32, s_ptr=f32, t_ptr=f32, corr_ptr=f32, loss_ptr=f32, n=n, n_jb=129,
                                 BLOCK_J=bj, BLOCK_K=bk), ANGLE_WARPS, label, "", (8, 0))
    add(_angle_pairs_kernel, dict(hs_ptr=f32, ht_ptr=f32, p_ptr=f32, n=n, BLOCK_J=bj, BLOCK_K=bk), ANGLE_WARPS, label, "", (12, 0))
    return out


_NORM_EPS = 1e-12  # F.normalize's eps
_NORM_EPS2 = 1e-24
_PDIST_EPS = 1e-12  # torchdistill's clamp of squared distances


# ----------------------------------------------------------------------------------------------
# Squared distances
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pair_sq_dist_kernel(
    gram_ptr,  # [n, n] Gram matrix of the centred rows (float32 or float64); upper triangle read
    x_ptr,  # [n, d] the input rows (any float dtype), for the exact recomputation
    out_ptr,  # [n, n] float32: scale * d²
    n,
    d,
    tau,  # recompute where d² < tau (G_ii + G_jj): 8 (d + 2) u of the GEMM's type
    scale,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    g_i = tl.load(gram_ptr + i * (n + 1)).to(tl.float64)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        lo = tl.minimum(j, i)
        hi = tl.maximum(j, i)
        g_ij = tl.load(gram_ptr + lo * n + hi, mask=mask, other=0.0).to(tl.float64)
        g_j = tl.load(gram_ptr + j * (n + 1), mask=mask, other=0.0).to(tl.float64)
        d2 = g_i + g_j - 2.0 * g_ij
        refine = mask & (j != i) & (~(d2 >= tau * (g_i + g_j)))
        if tl.sum(refine.to(tl.int32), axis=0) > 0:
            acc = tl.zeros((BLOCK,), tl.float32)
            for k0 in range(0, d, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                km = ks < d
                xi = tl.load(x_ptr + i * d + ks, mask=km, other=0.0).to(tl.float32)
                xj = tl.load(x_ptr + j[:, None] * d + ks[None, :], mask=refine[:, None] & km[None, :], other=0.0).to(tl.float32)
                diff = xj - xi[None, :]
                acc += tl.sum(diff * diff, axis=1)
            d2 = tl.where(refine, acc.to(tl.float64), d2)
        d2 = tl.where(d2 < 0.0, 0.0, d2)  # NaN kept
        d2 = tl.where(j == i, 0.0, d2)
        tl.store(out_ptr + i * n + j, (d2 * scale).to(tl.float32), mask=mask)


def _centred(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mean = x.to(torch.float64).mean(0, keepdim=True)
    return (x.to(torch.float64) - mean).to(dtype) if dtype == torch.float64 else x.to(dtype) - mean.to(dtype)


def _sq_dists(x: torch.Tensor, gram_dtype: torch.dtype, scale: float, cfg: dict):
    """(scale · d² as [n, n] float32, the centred rows in float32)."""
    n, d = x.shape
    xc = _centred(x, gram_dtype)
    gram = torch.mm(xc, xc.t())
    out = torch.empty((n, n), dtype=torch.float32, device=x.device)
    unit = 2.0**-53 if gram_dtype == torch.float64 else 2.0**-24
    torch.library.wrap_triton(_pair_sq_dist_kernel)[(n,)](
        gram, x, out, n, d, 8.0 * (d + 2) * unit, scale, BLOCK=cfg["ROW_BLOCK"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["row_warps"]
    )
    return out, xc.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# RKD distance
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rkd_distance_sums_kernel(ds_ptr, dt_ptr, sums_ptr, n, BLOCK: tl.constexpr):
    """sums[i] = Σ_{j≠i} d^s_ij, sums[n + i] = Σ_{j≠i} d^t_ij, d = sqrt(max(d², 1e-12))."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        valid = (j < n) & (j != i)
        d2s = tl.load(ds_ptr + i * n + j, mask=valid, other=1.0)
        d2t = tl.load(dt_ptr + i * n + j, mask=valid, other=1.0)
        acc_s += tl.where(valid, tl.sqrt(tl.where(d2s < 1e-12, 1e-12, d2s)), 0.0)
        acc_t += tl.where(valid, tl.sqrt(tl.where(d2t < 1e-12, 1e-12, d2t)), 0.0)
    tl.store(sums_ptr + i, tl.sum(acc_s, axis=0))
    tl.store(sums_ptr + n + i, tl.sum(acc_t, axis=0))


@triton.jit
def _sum_vector(ptr, count, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, count, BLOCK):
        acc += tl.load(ptr + start + cols, mask=start + cols < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _rkd_distance_rows_kernel(
    ds_ptr,  # [n, n] student d² (PASS 2: overwritten by M's row i)
    dt_ptr,  # [n, n] teacher d²
    sums_ptr,  # [2n] row sums of d (student, teacher)
    loss_ptr,  # [n] per-row Σ_j huber(ψs − ψt)
    c_ptr,  # [n] per-row Σ_j clamp(ψs − ψt) ψs
    n,
    PASS: tl.constexpr,  # 1: loss and c rows; 2: M's row
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    pairs = n * (n - 1.0)
    mu_s = _sum_vector(sums_ptr, n, BLOCK) / pairs
    mu_t = _sum_vector(sums_ptr + n, n, BLOCK) / pairs
    if PASS == 1:
        acc_l = tl.zeros((BLOCK,), tl.float32)
        acc_c = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n, BLOCK):
            j = start + cols
            valid = (j < n) & (j != i)
            d2s = tl.load(ds_ptr + i * n + j, mask=valid, other=1.0)
            d2t = tl.load(dt_ptr + i * n + j, mask=valid, other=1.0)
            ps = tl.sqrt(tl.where(d2s < 1e-12, 1e-12, d2s)) / mu_s
            pt = tl.sqrt(tl.where(d2t < 1e-12, 1e-12, d2t)) / mu_t
            diff = ps - pt
            a = tl.abs(diff)
            acc_l += tl.where(valid, tl.where(a < 1.0, 0.5 * diff * diff, a - 0.5), 0.0)
            h = tl.where(diff > 1.0, 1.0, tl.where(diff < -1.0, -1.0, diff))
            acc_c += tl.where(valid, h * ps, 0.0)
        tl.store(loss_ptr + i, tl.sum(acc_l, axis=0))
        tl.store(c_ptr + i, tl.sum(acc_c, axis=0))
    else:
        c = _sum_vector(c_ptr, n, BLOCK) / pairs
        k = 4.0 / (n * n * 1.0) / (2.0 * mu_s)
        acc_z = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n, BLOCK):
            j = start + cols
            valid = (j < n) & (j != i)
            d2s = tl.load(ds_ptr + i * n + j, mask=valid, other=1.0)
            d2t = tl.load(dt_ptr + i * n + j, mask=valid, other=1.0)
            d = tl.sqrt(tl.where(d2s < 1e-12, 1e-12, d2s))
            pt = tl.sqrt(tl.where(d2t < 1e-12, 1e-12, d2t)) / mu_t
            diff = d / mu_s - pt
            h = tl.where(diff > 1.0, 1.0, tl.where(diff < -1.0, -1.0, diff))
            z = tl.where(valid & (d2s >= 1e-12), (h - c) * k / d, 0.0)
            acc_z += z
            tl.store(ds_ptr + i * n + j, -z, mask=valid)
        tl.store(ds_ptr + i * n + i, tl.sum(acc_z, axis=0))


def rkd_distance_forward(student: torch.Tensor, teacher: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::rkd_distance_forward on Triton: (float32 loss, grad in the student's dtype or [0])."""
    n = student.shape[0]
    cfg = launch_config(n, student.device)
    ds, rows = _sq_dists(student, torch.float32, 1.0, cfg)
    dt, _ = _sq_dists(teacher, torch.float32, 1.0, cfg)
    sums = torch.empty(2 * n, dtype=torch.float32, device=student.device)
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    c_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    meta = dict(BLOCK=cfg["ROW_BLOCK"], num_warps=cfg["row_warps"])
    torch.library.wrap_triton(_rkd_distance_sums_kernel)[(n,)](ds, dt, sums, n, **meta)
    torch.library.wrap_triton(_rkd_distance_rows_kernel)[(n,)](ds, dt, sums, loss_rows, c_rows, n, PASS=1, **meta)
    loss = (loss_rows.to(torch.float64).sum() / (n * n)).to(torch.float32)
    if not compute_grad:
        return loss, student.new_empty((0,))
    torch.library.wrap_triton(_rkd_distance_rows_kernel)[(n,)](ds, dt, sums, loss_rows, c_rows, n, PASS=2, **meta)
    return loss, torch.mm(ds, rows).to(student.dtype)


# ----------------------------------------------------------------------------------------------
# RKD angle
# ----------------------------------------------------------------------------------------------


@triton.jit
def _inv_norms(h):
    """(p, q) of half squared distances h: p = 1 / max(r, ε), q = [r ≥ ε] / r (NaN: p NaN, q 0)."""
    d2 = 2.0 * h
    r = tl.sqrt(d2)
    p = 1.0 / tl.where(r < 1e-12, 1e-12, r)
    q = tl.where(d2 >= 1e-24, 1.0 / tl.where(d2 >= 1e-24, r, 1.0), 0.0)
    return p, q


@triton.jit
def _angle_tile(hs_ij, hs_ik, hs_jk, qs_j, qs_k, ht_ij, ht_ik, ht_jk, qt_j, qt_k, diag):
    """The [J, K] tile of one vertex i: (cos_s, d = cos_s − cos_t, c = clamp(d, ±1))."""
    cs = ((hs_ij[:, None] + hs_ik[None, :]) - hs_jk) * (qs_j[:, None] * qs_k[None, :])
    ct = ((ht_ij[:, None] + ht_ik[None, :]) - ht_jk) * (qt_j[:, None] * qt_k[None, :])
    # cos(i, j, j) is exactly 1, or 0 for a degenerate x_j.
    cs = tl.where(diag, tl.where(qs_j[:, None] != 0.0, 1.0, 0.0), cs)
    ct = tl.where(diag, tl.where(qt_j[:, None] != 0.0, 1.0, 0.0), ct)
    d = cs - ct
    c = tl.where(d > 1.0, 1.0, tl.where(d < -1.0, -1.0, d))
    return cs, d, c


@triton.jit
def _angle_rows_kernel(
    hs_ptr,  # [n, n] h = d² / 2, student
    ht_ptr,  # [n, n] teacher
    s_ptr,  # [n, n] out: S_ij = Σ_k Ω^i_jk
    t_ptr,  # [n, n] out: T_ij = Σ_k Ω^i_kj
    corr_ptr,  # [n, n] out: the norm term of Ω^i_jj
    loss_ptr,  # [n, n_jb] out: Σ_{j in block, k} huber(cos_s − cos_t)
    n,
    n_jb,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    jb = tl.program_id(1)
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    mj = j < n
    hs_ij = tl.load(hs_ptr + i * n + j, mask=mj, other=0.0)
    ht_ij = tl.load(ht_ptr + i * n + j, mask=mj, other=0.0)
    ps_j, qs_j = _inv_norms(hs_ij)
    # Distinct names for the unused halves: a name assigned before the loop and again inside it
    # is loop-carried for the GPU compiler, which refuses its change of shape ([J] to [K]).
    pt_j, qt_j = _inv_norms(ht_ij)
    sig = tl.zeros((BLOCK_J,), tl.float32)
    tau = tl.zeros((BLOCK_J,), tl.float32)
    cc = tl.zeros((BLOCK_J,), tl.float32)
    lacc = tl.zeros((BLOCK_J,), tl.float32)
    for k0 in range(0, n, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mk = k < n
        hs_ik = tl.load(hs_ptr + i * n + k, mask=mk, other=0.0)
        ht_ik = tl.load(ht_ptr + i * n + k, mask=mk, other=0.0)
        ps_k, qs_k = _inv_norms(hs_ik)
        pt_k, qt_k = _inv_norms(ht_ik)
        m2 = mj[:, None] & mk[None, :]
        hs_jk = tl.load(hs_ptr + j[:, None] * n + k[None, :], mask=m2, other=0.0)
        ht_jk = tl.load(ht_ptr + j[:, None] * n + k[None, :], mask=m2, other=0.0)
        cs, d, c = _angle_tile(hs_ij, hs_ik, hs_jk, qs_j, qs_k, ht_ij, ht_ik, ht_jk, qt_j, qt_k, j[:, None] == k[None, :])
        lacc += tl.sum(c * (d - 0.5 * c), axis=1)
        sig += tl.sum(c * qs_k[None, :], axis=1)
        tau += tl.sum(c * tl.where(mk, ps_k, 0.0)[None, :], axis=1)
        cc += tl.sum(c * cs, axis=1)
    corr = tl.where(qs_j != 0.0, cc * ps_j * ps_j, 0.0)
    tl.store(s_ptr + i * n + j, ps_j * sig - corr, mask=mj)
    tl.store(t_ptr + i * n + j, qs_j * tau - corr, mask=mj)
    tl.store(corr_ptr + i * n + j, corr, mask=mj)
    tl.store(loss_ptr + i * n_jb + jb, tl.sum(lacc, axis=0))


@triton.jit
def _angle_pairs_kernel(
    hs_ptr,
    ht_ptr,
    p_ptr,  # [n, n] out: P_jk = Σ_i Ω^i_jk (without the diagonal norm terms)
    n,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mj = j < n
    mk = k < n
    m2 = mj[:, None] & mk[None, :]
    hs_jk = tl.load(hs_ptr + j[:, None] * n + k[None, :], mask=m2, other=0.0)
    ht_jk = tl.load(ht_ptr + j[:, None] * n + k[None, :], mask=m2, other=0.0)
    diag = j[:, None] == k[None, :]
    acc = tl.zeros((BLOCK_J, BLOCK_K), tl.float32)
    for i in range(0, n):
        hs_ij = tl.load(hs_ptr + i * n + j, mask=mj, other=0.0)
        ht_ij = tl.load(ht_ptr + i * n + j, mask=mj, other=0.0)
        hs_ik = tl.load(hs_ptr + i * n + k, mask=mk, other=0.0)
        ht_ik = tl.load(ht_ptr + i * n + k, mask=mk, other=0.0)
        ps_j, qs_j = _inv_norms(hs_ij)
        _, qt_j = _inv_norms(ht_ij)
        _, qs_k = _inv_norms(hs_ik)
        _, qt_k = _inv_norms(ht_ik)
        _, _, c = _angle_tile(hs_ij, hs_ik, hs_jk, qs_j, qs_k, ht_ij, ht_ik, ht_jk, qt_j, qt_k, diag)
        acc += c * (tl.where(mj, ps_j, 0.0)[:, None] * qs_k[None, :])
    tl.store(p_ptr + j[:, None] * n + k[None, :], acc, mask=m2)


@triton.jit
def _angle_assemble_kernel(
    p_ptr,  # [n, n] P; overwritten by M (each program its own row)
    s_ptr,
    t_ptr,
    corr_ptr,
    n,
    scale,  # 2 / B³
    BLOCK: tl.constexpr,
):
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    scale = tl.cast(scale, tl.float32)
    j = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_corr = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        k = start + cols
        mk = k < n
        p = tl.load(p_ptr + j * n + k, mask=mk, other=0.0)
        s_kj = tl.load(s_ptr + k * n + j, mask=mk, other=0.0)
        t_jk = tl.load(t_ptr + j * n + k, mask=mk, other=0.0)
        acc_s += tl.load(s_ptr + j * n + k, mask=mk, other=0.0)
        acc_corr += tl.load(corr_ptr + k * n + j, mask=mk, other=0.0)
        tl.store(p_ptr + j * n + k, (p - s_kj - t_jk) * scale, mask=mk & (k != j))
    p_jj = tl.load(p_ptr + j * n + j)
    s_jj = tl.load(s_ptr + j * n + j)
    t_jj = tl.load(t_ptr + j * n + j)
    diag = p_jj - s_jj - t_jj + tl.sum(acc_s, axis=0) - tl.sum(acc_corr, axis=0)
    tl.store(p_ptr + j * n + j, diag * scale)


def rkd_angle_forward(student: torch.Tensor, teacher: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::rkd_angle_forward on Triton: (float32 loss, grad in the student's dtype or [0])."""
    n = student.shape[0]
    device = student.device
    cfg = launch_config(n, device)
    hs, rows = _sq_dists(student, torch.float64, 0.5, cfg)
    ht, _ = _sq_dists(teacher, torch.float64, 0.5, cfg)
    bj, bk = cfg["BLOCK_J"], cfg["BLOCK_K"]
    n_jb = triton.cdiv(n, bj)
    s = torch.empty((n, n), dtype=torch.float32, device=device)
    t = torch.empty((n, n), dtype=torch.float32, device=device)
    corr = torch.empty((n, n), dtype=torch.float32, device=device)
    loss_parts = torch.empty((n, n_jb), dtype=torch.float32, device=device)
    torch.library.wrap_triton(_angle_rows_kernel)[(n, n_jb)](
        hs, ht, s, t, corr, loss_parts, n, n_jb, BLOCK_J=bj, BLOCK_K=bk, num_warps=cfg["angle_warps"]
    )
    loss = (loss_parts.to(torch.float64).sum() / float(n) ** 3).to(torch.float32)
    if not compute_grad:
        return loss, student.new_empty((0,))
    p = torch.empty((n, n), dtype=torch.float32, device=device)
    torch.library.wrap_triton(_angle_pairs_kernel)[(n_jb, triton.cdiv(n, bk))](hs, ht, p, n, BLOCK_J=bj, BLOCK_K=bk, num_warps=cfg["angle_warps"])
    torch.library.wrap_triton(_angle_assemble_kernel)[(n,)](
        p, s, t, corr, n, 2.0 / float(n) ** 3, BLOCK=cfg["ROW_BLOCK"], num_warps=cfg["row_warps"]
    )
    return loss, torch.mm(p, rows).to(student.dtype)


# ----------------------------------------------------------------------------------------------
# SP
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sp_rows_kernel(
    gs_ptr,  # [n, n] student Gram
    gt_ptr,  # [n, n] teacher Gram; with COMPUTE_GRAD, row i becomes dG's row i
    loss_ptr,  # [n] Σ_j (Ĝs − Ĝt)²
    n,
    k,  # 2 / B²
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    k = tl.cast(k, tl.float32)
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        a = tl.load(gs_ptr + i * n + j, mask=mask, other=0.0)
        b = tl.load(gt_ptr + i * n + j, mask=mask, other=0.0)
        acc_s += a * a
        acc_t += b * b
    ns = tl.sqrt(tl.sum(acc_s, axis=0))
    nt = tl.sqrt(tl.sum(acc_t, axis=0))
    ms = tl.where(ns < 1e-12, 1e-12, ns)
    mt = tl.where(nt < 1e-12, 1e-12, nt)
    acc_l = tl.zeros((BLOCK,), tl.float32)
    acc_dot = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        a = tl.load(gs_ptr + i * n + j, mask=mask, other=0.0)
        b = tl.load(gt_ptr + i * n + j, mask=mask, other=0.0)
        diff = a / ms - b / mt
        acc_l += diff * diff
        acc_dot += k * diff * a
    tl.store(loss_ptr + i, tl.sum(acc_l, axis=0))
    if COMPUTE_GRAD:
        dot = tl.sum(acc_dot, axis=0)
        coef = tl.where(ns >= 1e-12, dot / (ms * ms * ms), 0.0)  # ms = ns where it applies
        for start in range(0, n, BLOCK):
            j = start + cols
            mask = j < n
            a = tl.load(gs_ptr + i * n + j, mask=mask, other=0.0)
            b = tl.load(gt_ptr + i * n + j, mask=mask, other=0.0)
            r = k * (a / ms - b / mt)
            tl.store(gt_ptr + i * n + j, r / ms - coef * a, mask=mask)


@triton.jit
def _symmetrise_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = a + aᵀ (out must not alias a)."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        v = tl.load(a_ptr + i * n + j, mask=mask, other=0.0) + tl.load(a_ptr + j * n + i, mask=mask, other=0.0)
        tl.store(out_ptr + i * n + j, v, mask=mask)


def sp_forward(student: torch.Tensor, teacher: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::sp_forward on Triton: (float32 loss, grad in the student's dtype or [0])."""
    n = student.shape[0]
    cfg = launch_config(n, student.device)
    s = student.to(torch.float32)
    t = teacher.to(torch.float32)
    gs = torch.mm(s, s.t())
    gt = torch.mm(t, t.t())
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    meta = dict(BLOCK=cfg["ROW_BLOCK"], num_warps=cfg["row_warps"])
    torch.library.wrap_triton(_sp_rows_kernel)[(n,)](gs, gt, loss_rows, n, 2.0 / (n * n), COMPUTE_GRAD=compute_grad, **meta)
    loss = (loss_rows.to(torch.float64).sum() / (n * n)).to(torch.float32)
    if not compute_grad:
        return loss, student.new_empty((0,))
    torch.library.wrap_triton(_symmetrise_kernel)[(n,)](gt, gs, n, **meta)
    return loss, torch.mm(gs, s).to(student.dtype)


# ----------------------------------------------------------------------------------------------
# PKT
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pkt_rows_kernel(
    gs_ptr,  # [n, n] student Gram
    gt_ptr,  # [n, n] teacher Gram
    dk_ptr,  # [n, n] out (COMPUTE_GRAD): dL/dK, K the student's cosine kernel
    loss_ptr,  # [n] Σ_j P_t log((P_t + ε) / (P_s + ε))
    n,
    eps,
    inv_b2,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    eps = tl.cast(eps, tl.float32)
    inv_b2 = tl.cast(inv_b2, tl.float32)
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    ns_i = tl.sqrt(tl.load(gs_ptr + i * (n + 1))) + eps
    nt_i = tl.sqrt(tl.load(gt_ptr + i * (n + 1))) + eps
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        ns_j = tl.sqrt(tl.load(gs_ptr + j * (n + 1), mask=mask, other=1.0)) + eps
        nt_j = tl.sqrt(tl.load(gt_ptr + j * (n + 1), mask=mask, other=1.0)) + eps
        a = tl.load(gs_ptr + i * n + j, mask=mask, other=0.0)
        b = tl.load(gt_ptr + i * n + j, mask=mask, other=0.0)
        acc_s += tl.where(mask, (a / (ns_i * ns_j) + 1.0) * 0.5, 0.0)
        acc_t += tl.where(mask, (b / (nt_i * nt_j) + 1.0) * 0.5, 0.0)
    rs = tl.sum(acc_s, axis=0)
    rt = tl.sum(acc_t, axis=0)
    acc_l = tl.zeros((BLOCK,), tl.float32)
    acc_dot = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        ns_j = tl.sqrt(tl.load(gs_ptr + j * (n + 1), mask=mask, other=1.0)) + eps
        nt_j = tl.sqrt(tl.load(gt_ptr + j * (n + 1), mask=mask, other=1.0)) + eps
        ps = (tl.load(gs_ptr + i * n + j, mask=mask, other=0.0) / (ns_i * ns_j) + 1.0) * 0.5 / rs
        pt = (tl.load(gt_ptr + i * n + j, mask=mask, other=0.0) / (nt_i * nt_j) + 1.0) * 0.5 / rt
        acc_l += tl.where(mask, pt * tl.log((pt + eps) / (ps + eps)), 0.0)
        acc_dot += tl.where(mask, -pt / (ps + eps) * inv_b2 * ps, 0.0)
    tl.store(loss_ptr + i, tl.sum(acc_l, axis=0))
    if COMPUTE_GRAD:
        dot = tl.sum(acc_dot, axis=0)
        for start in range(0, n, BLOCK):
            j = start + cols
            mask = j < n
            ns_j = tl.sqrt(tl.load(gs_ptr + j * (n + 1), mask=mask, other=1.0)) + eps
            nt_j = tl.sqrt(tl.load(gt_ptr + j * (n + 1), mask=mask, other=1.0)) + eps
            ps = (tl.load(gs_ptr + i * n + j, mask=mask, other=0.0) / (ns_i * ns_j) + 1.0) * 0.5 / rs
            pt = (tl.load(gt_ptr + i * n + j, mask=mask, other=0.0) / (nt_i * nt_j) + 1.0) * 0.5 / rt
            tl.store(dk_ptr + i * n + j, (-pt / (ps + eps) * inv_b2 - dot) * 0.5 / rs, mask=mask)


@triton.jit
def _pkt_grad_kernel(
    gs_ptr,  # [n, n] student Gram
    dk_ptr,  # [n, n] dL/dK
    m_ptr,  # [n, n] out: M = dG + dGᵀ
    n,
    eps,
    BLOCK: tl.constexpr,
):
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    eps = tl.cast(eps, tl.float32)
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    root_i = tl.sqrt(tl.load(gs_ptr + i * (n + 1)))
    ns_i = root_i + eps
    acc_dn = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        ns_j = tl.sqrt(tl.load(gs_ptr + j * (n + 1), mask=mask, other=1.0)) + eps
        nn = ns_i * ns_j
        dsym = tl.load(dk_ptr + i * n + j, mask=mask, other=0.0) + tl.load(dk_ptr + j * n + i, mask=mask, other=0.0)
        acc_dn -= tl.where(mask, dsym * (tl.load(gs_ptr + i * n + j, mask=mask, other=0.0) / nn), 0.0)
        tl.store(m_ptr + i * n + j, dsym / nn, mask=mask & (j != i))
    dn = tl.sum(acc_dn, axis=0) / ns_i
    dk_ii = tl.load(dk_ptr + i * (n + 1))
    m_ii = 2.0 * dk_ii / (ns_i * ns_i) + tl.where(root_i > 0.0, dn / tl.where(root_i > 0.0, root_i, 1.0), 0.0)
    tl.store(m_ptr + i * (n + 1), m_ii)


def pkt_forward(student: torch.Tensor, teacher: torch.Tensor, eps: float, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::pkt_forward on Triton: (float32 loss, grad in the student's dtype or [0])."""
    n = student.shape[0]
    cfg = launch_config(n, student.device)
    s = student.to(torch.float32)
    t = teacher.to(torch.float32)
    gs = torch.mm(s, s.t())
    gt = torch.mm(t, t.t())
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    dk = torch.empty((n, n), dtype=torch.float32, device=student.device) if compute_grad else None
    meta = dict(BLOCK=cfg["ROW_BLOCK"], num_warps=cfg["row_warps"])
    torch.library.wrap_triton(_pkt_rows_kernel)[(n,)](gs, gt, dk, loss_rows, n, eps, 1.0 / (n * n), COMPUTE_GRAD=compute_grad, **meta)
    loss = (loss_rows.to(torch.float64).sum() / (n * n)).to(torch.float32)
    if not compute_grad:
        return loss, student.new_empty((0,))
    torch.library.wrap_triton(_pkt_grad_kernel)[(n,)](gs, dk, gt, n, eps, **meta)
    return loss, torch.mm(gt, s).to(student.dtype)
