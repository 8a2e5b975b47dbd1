"""Relational knowledge distillation (RKD distance, RKD angle, SP, PKT): Triton.

Every op is GEMM (torch.mm: cuBLAS), fused kernels, GEMM, on [B, D] student and [B, Dt] teacher
embeddings; the math, shared with the CPU and CUDA backends, is docs/design.md#relational and,
for RKD angle's gradient derivation, the top of csrc/cpu/relational_kernel.h. Each kernel states
its part and the bytes it moves per launch. Loss and
sums in float32 (Triton refuses float64 input: the cpu and cuda backends compute it in float64).

* Squared distances (RKD): G = Ec·Ecᵀ of the centred rows (float32 for distance, float64 for angle,
  whose cosines are differences of distances), then ``_pair_sq_dist_kernel`` (a program per row):
  d² = G_ii + G_jj − 2 G_ij from G's upper triangle (so d² is exactly symmetric), recomputed from
  the input rows where it is within the GEMM's rounding error of zero (an exact duplicate then gets
  exactly 0, which the references' clamp and F.normalize kinks need) or the pair is close
  (d² < (G_ii + G_jj) / 16, where the Gram identity has lost more than ~16× its rounding).
* RKD distance: three row kernels (the μ row sums; ψ, the loss and Σ H ψ; the Laplacian row
  M_ij = −4 Z_ij, M_ii = 4 Σ_j Z_ij, close pairs left out), then dE = M·Ec, and
  ``_rkd_distance_close_kernel`` adds the close pairs' terms Z_ij (x_i − x_j) from the input rows
  (M·E would form them from Z_ij e_i and Z_ij e_j, losing ~|e| / |e_i − e_j| of their digits).
* RKD angle: ``_angle_rows_kernel`` (program per vertex i and block of rows j, looping over k):
  the loss and, per (i, j), S_ij = Σ_k Ω^i_jk and T_ij = Σ_k Ω^i_kj; ``_angle_pairs_kernel``
  (program per (j, k) tile, looping over vertices i): P_jk = Σ_i Ω^i_jk; ``_angle_assemble_kernel``:
  M = (2/B³)(P − Sᵀ − T + diag(S·1)); dE = M·Ec. The triplet math is computed twice (once per
  pass) so that nothing needs atomics or B³ storage. Thin vertices (longest difference > 4× the
  shortest: collinear or 1-D batches, near duplicates) lose ~ρ to ρ² digits in float32, so the
  three kernels run twice, in float32 over the other vertices and in float64 over the thin ones
  (each skipping the other's at a branch per vertex), and dE = (M_32 + M_64)·Ec in float64.
  Memory, at most: two B×B float64 h, one float32 M and four B×B float64 matrices (52 B² bytes;
  24 B² before the float64 pass).
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


def feature_block(row_block: int, warps: int, itemsize: int = 4) -> int:
    """Feature chunk of a [row_block, BLOCK_D] tile: 16 float32 values (8 float64) a thread."""
    return max(1, min(FEATURE_BLOCK_MAX_GPU, 16 * 32 * warps * 4 // (row_block * itemsize)))


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
    """The launches a GPU run can make (convention: kernels/__init__.py), 63 of them.

    Every row kernel, with every value of its switches (PASS, COMPUTE_GRAD), at the largest
    ROW_BLOCK of each warp count (32/1, 128/2, 512/4, 1024/8: the most elements per thread), on
    the float32 matrices the launchers make; the pair kernel with a float32 and a float64 Gram
    matrix (RKD distance, RKD angle) and the angle's assembly in float32 and float64 (its two
    passes) there too; the two angle triplet kernels at their one tile, in float32 and float64.
    Not compiled: the row kernels at the smaller blocks (fewer live values per thread than those
    listed) and the pair kernel's and close-pair kernel's other input dtypes (fp16 and bf16
    convert as they do at the largest block).
    """
    from . import StaticLaunch, largest_per_warp_count

    f32, f64 = torch.float32, torch.float64
    DTYPE = {f32: "fp32", f64: "fp64"}
    n, d = 4099, 515  # odd: no divisibility specialisation
    out = []

    def add(kernel, args, warps, label, variant="", row_bytes=(0, 0)):
        out.append(StaticLaunch(kernel=kernel, args=args, num_warps=warps, label=label, variant=variant, row_bytes=row_bytes))

    for block, warps in largest_per_warp_count(_row_shapes()):
        label = f"BLOCK={block} · {warps} warp{'s' if warps > 1 else ''}"
        add(_pair_sq_dist_kernel, dict(gram_ptr=f32, x_ptr=f32, out_ptr=f32, n=n, d=d, tau=1e-3, scale=0.5,
                                       BLOCK=block, BLOCK_D=feature_block(block, warps)), warps, label, "fp32 Gram", (8, 0))
        add(_pair_sq_dist_kernel, dict(gram_ptr=f64, x_ptr=f32, out_ptr=f64, n=n, d=d, tau=1e-3, scale=0.5,
                                       BLOCK=block, BLOCK_D=feature_block(block, warps, 8)), warps, label, "fp64 Gram", (16, 0))
        add(_rkd_distance_sums_kernel, dict(ds_ptr=f32, dt_ptr=f32, sums_ptr=f32, n=n, BLOCK=block), warps, label, "", (8, 8))
        for pass_ in (1, 2):
            add(_rkd_distance_rows_kernel, dict(ds_ptr=f32, dt_ptr=f32, sums_ptr=f32, loss_ptr=f32, c_ptr=f32, g_ptr=f32, n=n,
                                                PASS=pass_, BLOCK=block), warps, label, f"pass {pass_}", (8 + 8 * (pass_ - 1), 8))
        add(_rkd_distance_close_kernel, dict(z_ptr=f32, x_ptr=f32, grad_ptr=f32, n=n, d=d, BLOCK=block,
                                             BLOCK_D=feature_block(block, warps)), warps, label, "", (4, 0))
        for grad in (False, True):
            add(_sp_rows_kernel, dict(gs_ptr=f32, gt_ptr=f32, loss_ptr=f32, n=n, k=1e-6, COMPUTE_GRAD=grad, BLOCK=block),
                warps, label, "grad" if grad else "loss only", (8 + 4 * grad, 4))
            add(_pkt_rows_kernel, dict(gs_ptr=f32, gt_ptr=f32, dk_ptr=f32 if grad else None, loss_ptr=f32, n=n, eps=1e-7,
                                       inv_b2=1e-6, COMPUTE_GRAD=grad, BLOCK=block),
                warps, label, "grad" if grad else "loss only", (8 + 4 * grad, 4))
        add(_symmetrise_kernel, dict(a_ptr=f32, out_ptr=f32, n=n, BLOCK=block), warps, label, "", (12, 0))
        add(_pkt_grad_kernel, dict(gs_ptr=f32, dk_ptr=f32, m_ptr=f32, n=n, eps=1e-7, BLOCK=block), warps, label, "", (16, 0))
        for dt, size in ((f32, 4), (f64, 8)):
            add(_angle_assemble_kernel, dict(p_ptr=dt, s_ptr=dt, t_ptr=dt, corr_ptr=dt, n=n, scale=1e-9, BLOCK=block),
                warps, label, DTYPE[dt], (5 * size, 0))
    block, warps = _row_shapes()[-1]
    label = f"BLOCK={block} · {warps} warps"
    add(_pair_sq_dist_kernel, dict(gram_ptr=f64, x_ptr=torch.bfloat16, out_ptr=f64, n=n, d=d, tau=1e-3,
                                   scale=0.5, BLOCK=block, BLOCK_D=feature_block(block, warps, 8)), warps, label, "fp64 Gram, bf16 rows", (16, 0))
    add(_pair_sq_dist_kernel, dict(gram_ptr=f32, x_ptr=torch.bfloat16, out_ptr=f32, n=n, d=d, tau=1e-3,
                                   scale=1.0, BLOCK=block, BLOCK_D=feature_block(block, warps)), warps, label, "fp32 Gram, bf16 rows", (8, 0))
    add(_rkd_distance_close_kernel, dict(z_ptr=f32, x_ptr=torch.bfloat16, grad_ptr=f32, n=n, d=d, BLOCK=block,
                                         BLOCK_D=feature_block(block, warps)), warps, label, "bf16 rows", (4, 0))
    bj, bk = ANGLE_TILE_GPU
    label = f"BLOCK_J={bj} · BLOCK_K={bk} · {ANGLE_WARPS} warps"
    for dt, size in ((f32, 4), (f64, 8)):
        add(_angle_rows_kernel, dict(hs_ptr=dt, ht_ptr=dt, s_ptr=dt, t_ptr=dt, corr_ptr=dt, loss_ptr=dt, skip_ptr=torch.int8, n=n,
                                     n_jb=129, BLOCK_J=bj, BLOCK_K=bk), ANGLE_WARPS, label, DTYPE[dt], (2 * size, 0))
        add(_angle_pairs_kernel, dict(hs_ptr=dt, ht_ptr=dt, p_ptr=dt, skip_ptr=torch.int8, n=n, BLOCK_J=bj, BLOCK_K=bk),
            ANGLE_WARPS, label, DTYPE[dt], (3 * size, 0))
    return out


_NORM_EPS = 1e-12  # F.normalize's eps
_NORM_EPS2 = 1e-24
_PDIST_EPS = 1e-12  # torchdistill's clamp of squared distances


# ----------------------------------------------------------------------------------------------
# What the row kernels share
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_program(BLOCK: tl.constexpr):
    """The program's row i of the B×B matrices and a chunk's column offsets, both int64: i · n
    passes 2^31 from B = 46341."""
    return tl.program_id(0).to(tl.int64), tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _row_pair(a_ptr, b_ptr, i, j, mask, n, other):
    """Row i of two [n, n] matrices at columns j (``other`` where masked)."""
    return tl.load(a_ptr + i * n + j, mask=mask, other=other), tl.load(b_ptr + i * n + j, mask=mask, other=other)


@triton.jit
def _clamp1(x):
    """clamp(x, -1, 1), NaN kept: the smooth L1 loss's derivative."""
    return tl.where(x > 1.0, 1.0, tl.where(x < -1.0, -1.0, x))


def _row_meta(cfg: dict) -> dict:
    """The launch parameters of a row kernel."""
    return dict(BLOCK=cfg["ROW_BLOCK"], num_warps=cfg["row_warps"])


def _mean_of_rows(loss_rows: torch.Tensor, n: int) -> torch.Tensor:
    """The float32 loss Σ_i loss_rows[i] / B², summed in float64."""
    return (loss_rows.to(torch.float64).sum() / (n * n)).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Squared distances
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pair_sq_dist_kernel(
    gram_ptr,  # [n, n] Gram matrix of the centred rows (float32 or float64); upper triangle read
    x_ptr,  # [n, d] the input rows (any float dtype), for the exact recomputation
    out_ptr,  # [n, n] scale * d², in the Gram's dtype
    n,
    d,
    tau,  # recompute where d² < tau (G_ii + G_jj): max(8 (d + 2) u of the GEMM's type, 1/16)
    scale,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Squared distances of the rows (docs/design.md#relational): one program per row i,
    d²_ij = G_ii + G_jj − 2 G_ij from G's upper triangle (exactly symmetric), recomputed from the
    input rows where within tau (G_ii + G_jj) of zero; scale · d² out, 0 on the diagonal.

    Bytes moved per launch: reads B² Gram entries (and the diagonal, from cache), writes B²
    entries, in the Gram's dtype; plus 2 D input elements per recomputed pair (none in a random
    batch of more than a few dimensions)."""
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    i, cols = _row_program(BLOCK)
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
            # In the Gram's type: a float64 Gram feeds RKD angle's float64 pass, whose thin
            # vertices need their short sides to float64 accuracy.
            acc = tl.zeros((BLOCK,), gram_ptr.dtype.element_ty)
            for k0 in range(0, d, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                km = ks < d
                xi = tl.load(x_ptr + i * d + ks, mask=km, other=0.0).to(acc.dtype)
                xj = tl.load(x_ptr + j[:, None] * d + ks[None, :], mask=refine[:, None] & km[None, :], other=0.0).to(acc.dtype)
                diff = xj - xi[None, :]
                acc += tl.sum(diff * diff, axis=1)
            d2 = tl.where(refine, acc.to(tl.float64), d2)
        d2 = tl.where(d2 < 0.0, 0.0, d2)  # NaN kept
        d2 = tl.where(j == i, 0.0, d2)
        tl.store(out_ptr + i * n + j, (d2 * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _centred(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mean = x.to(torch.float64).mean(0, keepdim=True)
    return (x.to(torch.float64) - mean).to(dtype) if dtype == torch.float64 else x.to(dtype) - mean.to(dtype)


# A pair is close when d² < (G_ii + G_jj) · CLOSE_D2 on centred rows: the Gram identity has lost
# more than ~1/CLOSE_D2 of its digits there, so its d² is recomputed from the rows, and RKD
# distance takes its gradient term from the row difference (see "Close pairs" in
# csrc/cpu/relational_cpu.cpp). A random batch in more than a few dimensions has none.
CLOSE_D2 = 1.0 / 16


def _sq_dists(x: torch.Tensor, gram_dtype: torch.dtype, scale: float, cfg: dict):
    """(scale · d² as [n, n] in gram_dtype, the centred rows in gram_dtype, the Gram's diagonal).
    Pairs within the GEMM's rounding error of zero, and close pairs, are recomputed from the
    rows (in gram_dtype)."""
    n, d = x.shape
    xc = _centred(x, gram_dtype)
    gram = torch.mm(xc, xc.t())
    out = torch.empty((n, n), dtype=gram_dtype, device=x.device)
    unit = 2.0**-53 if gram_dtype == torch.float64 else 2.0**-24
    block_d = cfg["BLOCK_D"] if gram_dtype == torch.float32 else max(1, cfg["BLOCK_D"] // 2)
    torch.library.wrap_triton(_pair_sq_dist_kernel)[(n,)](
        gram, x, out, n, d, max(8.0 * (d + 2) * unit, CLOSE_D2), scale, BLOCK=cfg["ROW_BLOCK"], BLOCK_D=block_d,
        num_warps=cfg["row_warps"]
    )
    return out, xc, gram.diagonal().contiguous()


# ----------------------------------------------------------------------------------------------
# RKD distance
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pdist(d2):
    """torchdistill's distance sqrt(max(d², 1e-12)) (NaN kept)."""
    return tl.sqrt(tl.where(d2 < 1e-12, 1e-12, d2))


@triton.jit
def _rkd_distance_chunk(ds_ptr, dt_ptr, i, j, n):
    """Row i's off-diagonal entries at columns j: (valid, d²_s, d²_t), 1 where not valid."""
    valid = (j < n) & (j != i)
    d2s, d2t = _row_pair(ds_ptr, dt_ptr, i, j, valid, n, 1.0)
    return valid, d2s, d2t


@triton.jit
def _rkd_distance_psi(d2s, d2t, mu_s, mu_t):
    """(d_s, ψ_s = d_s / μ_s, ψ_s − ψ_t, its clamp to ±1)."""
    d = _pdist(d2s)
    ps = d / mu_s
    diff = ps - _pdist(d2t) / mu_t
    return d, ps, diff, _clamp1(diff)


@triton.jit
def _rkd_distance_sums_kernel(ds_ptr, dt_ptr, sums_ptr, n, BLOCK: tl.constexpr):
    """RKD distance's μ (docs/design.md#relational), one program per row: sums[i] = Σ_{j≠i} d^s_ij,
    sums[n + i] = Σ_{j≠i} d^t_ij, d = sqrt(max(d², 1e-12)).

    Bytes moved per launch: reads 2 B² float32 (d²_s, d²_t), writes 2 B."""
    i, cols = _row_program(BLOCK)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        valid, d2s, d2t = _rkd_distance_chunk(ds_ptr, dt_ptr, i, start + cols, n)
        acc_s += tl.where(valid, _pdist(d2s), 0.0)
        acc_t += tl.where(valid, _pdist(d2t), 0.0)
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
    ds_ptr,  # [n, n] student d² (PASS 2: overwritten by M's row i, close pairs left out)
    dt_ptr,  # [n, n] teacher d² (PASS 2: overwritten by row i of Z on close pairs, 0 elsewhere)
    sums_ptr,  # [2n] row sums of d (student, teacher)
    loss_ptr,  # [n] per-row Σ_j huber(ψs − ψt)
    c_ptr,  # [n] per-row Σ_j clamp(ψs − ψt) ψs
    g_ptr,  # [n] the student Gram's diagonal (PASS 2: which pairs are close)
    n,
    PASS: tl.constexpr,  # 1: loss and c rows; 2: M's row
    BLOCK: tl.constexpr,
):
    """RKD distance's loss (PASS 1) and M (PASS 2), one program per row (docs/design.md#relational:
    ψ = d / μ, Z = ∂L/∂d², dE = 4 (diag(Z·1) − Z) E; the kernel writes M = −4 Z off the diagonal,
    4 Σ_j Z_ij on it, with k = 4 / B² / (2 μ_s) folded into Z).

    Bytes moved per launch: PASS 1 reads 2 B² float32 and writes 2 B; PASS 2 reads 2 B² and B (the
    Gram's diagonal) and writes 2 B² (M over d²_s, the close pairs' Z over d²_t). Each program also
    reads the 2 B row sums (and B row terms for c), from cache."""
    i, cols = _row_program(BLOCK)
    pairs = n * (n - 1.0)
    mu_s = _sum_vector(sums_ptr, n, BLOCK) / pairs
    mu_t = _sum_vector(sums_ptr + n, n, BLOCK) / pairs
    if PASS == 1:
        acc_l = tl.zeros((BLOCK,), tl.float32)
        acc_c = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n, BLOCK):
            valid, d2s, d2t = _rkd_distance_chunk(ds_ptr, dt_ptr, i, start + cols, n)
            _, ps, diff, h = _rkd_distance_psi(d2s, d2t, mu_s, mu_t)
            a = tl.abs(diff)
            acc_l += tl.where(valid, tl.where(a < 1.0, 0.5 * diff * diff, a - 0.5), 0.0)
            acc_c += tl.where(valid, h * ps, 0.0)
        tl.store(loss_ptr + i, tl.sum(acc_l, axis=0))
        tl.store(c_ptr + i, tl.sum(acc_c, axis=0))
    else:
        c = _sum_vector(c_ptr, n, BLOCK) / pairs
        k = 4.0 / (n * n * 1.0) / (2.0 * mu_s)
        g_i = tl.load(g_ptr + i)
        acc_z = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n, BLOCK):
            j = start + cols
            valid, d2s, d2t = _rkd_distance_chunk(ds_ptr, dt_ptr, i, j, n)
            d, _, _, h = _rkd_distance_psi(d2s, d2t, mu_s, mu_t)
            z = tl.where(valid & (d2s >= 1e-12), (h - c) * k / d, 0.0)
            # A close pair (CLOSE_D2 = 1/16) leaves M: M·E would form z (e_i − e_j) from z e_i and
            # z e_j, losing ~|e| / |e_i − e_j| of its digits; _rkd_distance_close_kernel adds it
            # from the row difference. Row i of dt is read by this program only, so it can hold Z.
            close = d2s < 0.0625 * (g_i + tl.load(g_ptr + j, mask=valid, other=0.0))
            acc_z += tl.where(close, 0.0, z)
            tl.store(ds_ptr + i * n + j, tl.where(close, 0.0, -z), mask=valid)
            tl.store(dt_ptr + i * n + j, tl.where(close, z, 0.0), mask=valid)
        tl.store(ds_ptr + i * n + i, tl.sum(acc_z, axis=0))
        tl.store(dt_ptr + i * n + i, 0.0)


@triton.jit
def _rkd_distance_close_kernel(
    z_ptr,  # [n, n] Z on close pairs, 0 elsewhere
    x_ptr,  # [n, d] the student's input rows (any float dtype)
    grad_ptr,  # [n, d] float32: M·E, to which row i's close-pair terms are added
    n,
    d,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """RKD distance's close pairs (docs/design.md#relational): grad_i += Σ_j z_ij (x_i − x_j) over
    row i's close pairs, from the input rows; a row without one exits early.

    Bytes moved per launch: reads B² float32 (Z); a row with close pairs also reads, per D chunk,
    its Z row again, its own chunk, the chunks of its partners, and reads and writes its D float32
    gradient entries."""
    i, cols = _row_program(BLOCK)
    count = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, n, BLOCK):
        j = start + cols
        count += (tl.load(z_ptr + i * n + j, mask=j < n, other=0.0) != 0.0).to(tl.int32)
    if tl.sum(count, axis=0) > 0:
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            km = ks < d
            xi = tl.load(x_ptr + i * d + ks, mask=km, other=0.0).to(tl.float32)
            acc = tl.zeros((BLOCK_D,), tl.float32)
            for start in range(0, n, BLOCK):
                j = start + cols
                z = tl.load(z_ptr + i * n + j, mask=j < n, other=0.0)
                nz = z != 0.0
                if tl.sum(nz.to(tl.int32), axis=0) > 0:
                    xj = tl.load(x_ptr + j[:, None] * d + ks[None, :], mask=nz[:, None] & km[None, :], other=0.0).to(tl.float32)
                    acc += tl.sum(tl.where(nz[:, None], z[:, None] * (xi[None, :] - xj), 0.0), axis=0)
            g = tl.load(grad_ptr + i * d + ks, mask=km, other=0.0)
            tl.store(grad_ptr + i * d + ks, g + acc, mask=km)


def rkd_distance_forward(student: torch.Tensor, teacher: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::rkd_distance_forward on Triton: (float32 loss, grad in the student's dtype or [0])."""
    n = student.shape[0]
    cfg = launch_config(n, student.device)
    ds, rows, g = _sq_dists(student, torch.float32, 1.0, cfg)
    dt, _, _ = _sq_dists(teacher, torch.float32, 1.0, cfg)
    sums = torch.empty(2 * n, dtype=torch.float32, device=student.device)
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    c_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    meta = _row_meta(cfg)
    torch.library.wrap_triton(_rkd_distance_sums_kernel)[(n,)](ds, dt, sums, n, **meta)
    torch.library.wrap_triton(_rkd_distance_rows_kernel)[(n,)](ds, dt, sums, loss_rows, c_rows, g, n, PASS=1, **meta)
    loss = _mean_of_rows(loss_rows, n)
    if not compute_grad:
        return loss, student.new_empty((0,))
    torch.library.wrap_triton(_rkd_distance_rows_kernel)[(n,)](ds, dt, sums, loss_rows, c_rows, g, n, PASS=2, **meta)
    grad = torch.mm(ds, rows)
    torch.library.wrap_triton(_rkd_distance_close_kernel)[(n,)](dt, student, grad, n, student.shape[1], BLOCK_D=cfg["BLOCK_D"], **meta)
    return loss, grad.to(student.dtype)


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
    return cs, d, _clamp1(d)


@triton.jit
def _angle_rows_kernel(
    hs_ptr,  # [n, n] h = d² / 2, student
    ht_ptr,  # [n, n] teacher
    s_ptr,  # [n, n] out: S_ij = Σ_k Ω^i_jk
    t_ptr,  # [n, n] out: T_ij = Σ_k Ω^i_kj
    corr_ptr,  # [n, n] out: the norm term of Ω^i_jj
    loss_ptr,  # [n, n_jb] out: Σ_{j in block, k} huber(cos_s − cos_t)
    skip_ptr,  # [n] int8: vertices this pass leaves out (1), whose rows it writes as zeros
    n,
    n_jb,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """RKD angle's first triplet pass (docs/design.md#relational; the derivation of Ω, S and T is
    atop csrc/cpu/relational_kernel.h): one program per vertex i and block of BLOCK_J rows j, looping
    over k: the loss's partial sum, S_ij = Σ_k Ω^i_jk, T_ij = Σ_k Ω^i_kj and Ω^i_jj's norm term.

    Bytes moved per launch (elements of h's dtype): reads 2 B³ (the [BLOCK_J, BLOCK_K] tiles of h_s
    and h_t, once per vertex: from L2) and 2 B² / BLOCK_J · B (vertex i's rows); writes 3 B² (S, T,
    the norm terms) and B · n_jb loss parts."""
    # Computes in h's type (float32, or float64 for the thin vertices' pass).
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
    sig = tl.zeros((BLOCK_J,), hs_ptr.dtype.element_ty)
    tau = tl.zeros((BLOCK_J,), hs_ptr.dtype.element_ty)
    cc = tl.zeros((BLOCK_J,), hs_ptr.dtype.element_ty)
    lacc = tl.zeros((BLOCK_J,), hs_ptr.dtype.element_ty)
    # A skipped vertex's loop runs no iteration: its S, T, corr and loss are zeros.
    k_end = tl.where(tl.load(skip_ptr + i) == 0, n, 0)
    for k0 in range(0, k_end, BLOCK_K):
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
    p_ptr,  # [n, n] out: P_jk = Σ_i Ω^i_jk (without the diagonal norm terms), i not skipped
    skip_ptr,  # [n] int8: vertices this pass leaves out (1)
    n,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """RKD angle's second triplet pass (docs/design.md#relational): one program per [BLOCK_J,
    BLOCK_K] tile of (j, k), looping over the vertices i: P_jk = Σ_i Ω^i_jk, the triplet math
    recomputed so that nothing needs atomics or B³ storage.

    Bytes moved per launch (elements of h's dtype): reads 2 B² (the tiles of h_s, h_t, once) and
    2 B³ (1/BLOCK_J + 1/BLOCK_K) (vertex i's rows at the tile's j and k, from L2); writes B²."""
    # Computes in h's type (float32, or float64 for the thin vertices' pass).
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mj = j < n
    mk = k < n
    m2 = mj[:, None] & mk[None, :]
    hs_jk = tl.load(hs_ptr + j[:, None] * n + k[None, :], mask=m2, other=0.0)
    ht_jk = tl.load(ht_ptr + j[:, None] * n + k[None, :], mask=m2, other=0.0)
    diag = j[:, None] == k[None, :]
    acc = tl.zeros((BLOCK_J, BLOCK_K), hs_ptr.dtype.element_ty)
    for i in range(0, n):
        if tl.load(skip_ptr + i) == 0:
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
    """RKD angle's M = (2/B³)(P − Sᵀ − T + diag(S·1)), P's diagonal less the norm terms Σ_i corr_ij,
    one program per row j, in place over P (docs/design.md#relational).

    Bytes moved per launch: reads 5 B² (P; S by row and by column; T; the norm terms by column) and
    writes B² entries of P's dtype."""
    # In P's type (float32, or float64 for the thin vertices' pass); float scalars in that type
    # whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    scale = tl.cast(scale, p_ptr.dtype.element_ty)
    j, cols = _row_program(BLOCK)
    acc_s = tl.zeros((BLOCK,), p_ptr.dtype.element_ty)
    acc_corr = tl.zeros((BLOCK,), p_ptr.dtype.element_ty)
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


# A vertex is thin when its longest nonzero difference exceeds THIN_RATIO times its shortest, in
# the student or the teacher: its cosines, the norm terms and its share of M·E lose ~ρ to ρ² times
# their rounding (the derivation: "Precision" atop csrc/cpu/relational_kernel.h), so its triplets
# run in float64. Collinear and 1-D batches are thin everywhere, a near-duplicate pair at its two
# vertices; a random batch in more than a handful of dimensions nowhere.
THIN_RATIO = 4.0


def _thin_vertices(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    """[n] bool: the thin vertices, from h = d² / 2 (degenerate and NaN differences do not count).
    Torch ops only: the launcher must not synchronise with the host."""
    n = hs.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=hs.device)
    thin = torch.zeros(n, dtype=torch.bool, device=hs.device)
    for h in (hs, ht):
        ok = off & (2.0 * h >= _NORM_EPS2)
        lo = torch.where(ok, h, torch.inf).amin(1)
        hi = torch.where(ok, h, 0.0).amax(1)
        thin |= hi > THIN_RATIO**2 * lo  # h is a square
    return thin


def _angle_pass(hs: torch.Tensor, ht: torch.Tensor, skip: torch.Tensor, compute_grad: bool, cfg: dict):
    """The triplet kernels over the vertices not in ``skip``, in h's dtype: (the loss's partial
    sum before the 1/B³, M or None)."""
    n = hs.shape[0]
    device, dtype = hs.device, hs.dtype
    bj, bk = cfg["BLOCK_J"], cfg["BLOCK_K"]
    n_jb = triton.cdiv(n, bj)
    s = torch.empty((n, n), dtype=dtype, device=device)
    t = torch.empty((n, n), dtype=dtype, device=device)
    corr = torch.empty((n, n), dtype=dtype, device=device)
    loss_parts = torch.empty((n, n_jb), dtype=dtype, device=device)
    torch.library.wrap_triton(_angle_rows_kernel)[(n, n_jb)](
        hs, ht, s, t, corr, loss_parts, skip, n, n_jb, BLOCK_J=bj, BLOCK_K=bk, num_warps=cfg["angle_warps"]
    )
    loss = loss_parts.to(torch.float64).sum()
    if not compute_grad:
        return loss, None
    p = torch.empty((n, n), dtype=dtype, device=device)
    torch.library.wrap_triton(_angle_pairs_kernel)[(n_jb, triton.cdiv(n, bk))](
        hs, ht, p, skip, n, BLOCK_J=bj, BLOCK_K=bk, num_warps=cfg["angle_warps"]
    )
    torch.library.wrap_triton(_angle_assemble_kernel)[(n,)](
        p, s, t, corr, n, 2.0 / float(n) ** 3, BLOCK=cfg["ROW_BLOCK"], num_warps=cfg["row_warps"]
    )
    return loss, p


def rkd_angle_forward(student: torch.Tensor, teacher: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::rkd_angle_forward on Triton: (float32 loss, grad in the student's dtype or [0]).

    Two passes of the triplet kernels: float32 over the vertices that are not thin, float64 over
    the thin ones (h from the float64 Gram, unrounded). A pass skips its left-out vertices at the
    cost of a branch each, so a batch without thin vertices pays for the float64 pass only its
    O(B²) launches and the float64 GEMM; M = M_32 + M_64 and dE = M·E in float64, rounded once.
    """
    n = student.shape[0]
    cfg = launch_config(n, student.device)
    hs, rows, _ = _sq_dists(student, torch.float64, 0.5, cfg)
    ht, _, _ = _sq_dists(teacher, torch.float64, 0.5, cfg)
    thin = _thin_vertices(hs, ht)
    loss32, m32 = _angle_pass(hs.to(torch.float32), ht.to(torch.float32), thin.to(torch.int8), compute_grad, cfg)
    loss64, m64 = _angle_pass(hs, ht, (~thin).to(torch.int8), compute_grad, cfg)
    loss = ((loss32 + loss64) / float(n) ** 3).to(torch.float32)
    if not compute_grad:
        return loss, student.new_empty((0,))
    return loss, torch.mm(m64.add_(m32), rows).to(student.dtype)


# ----------------------------------------------------------------------------------------------
# SP
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sp_chunk(gs_ptr, gt_ptr, i, j, n, ms, mt):
    """Row i of G_s at columns j, and Ĝ_s − Ĝ_t there (Ĝ_i = G_i / m_i)."""
    a, b = _row_pair(gs_ptr, gt_ptr, i, j, j < n, n, 0.0)
    return a, a / ms - b / mt


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
    """SP's loss and dG, one program per row (docs/design.md#relational): the row norms of G_s and
    G_t, Ĝ = G / max(‖G_i‖, ε), the row loss Σ_j (Ĝ_s − Ĝ_t)² and, with COMPUTE_GRAD,
    dG_i = R_i / m_i − [‖G_i‖ ≥ ε] (R_i · G_i) G_i / ‖G_i‖³, R = 2 (Ĝ_s − Ĝ_t) / B², over G_t's row.

    Bytes moved per launch: reads 2 B² float32 (the two Gram rows; the second and third pass find
    them in L1/L2), writes B row losses and, with COMPUTE_GRAD, B² (dG)."""
    # Float scalars in fp32 whoever launches: torch.compile passes them as fp64 (kernels/__init__.py).
    k = tl.cast(k, tl.float32)
    i, cols = _row_program(BLOCK)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        a, b = _row_pair(gs_ptr, gt_ptr, i, j, j < n, n, 0.0)
        acc_s += a * a
        acc_t += b * b
    ns = tl.sqrt(tl.sum(acc_s, axis=0))
    nt = tl.sqrt(tl.sum(acc_t, axis=0))
    ms = tl.where(ns < 1e-12, 1e-12, ns)
    mt = tl.where(nt < 1e-12, 1e-12, nt)
    acc_l = tl.zeros((BLOCK,), tl.float32)
    acc_dot = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        a, diff = _sp_chunk(gs_ptr, gt_ptr, i, start + cols, n, ms, mt)
        acc_l += diff * diff
        acc_dot += k * diff * a
    tl.store(loss_ptr + i, tl.sum(acc_l, axis=0))
    if COMPUTE_GRAD:
        dot = tl.sum(acc_dot, axis=0)
        coef = tl.where(ns >= 1e-12, dot / (ms * ms * ms), 0.0)  # ms = ns where it applies
        for start in range(0, n, BLOCK):
            j = start + cols
            a, diff = _sp_chunk(gs_ptr, gt_ptr, i, j, n, ms, mt)
            tl.store(gt_ptr + i * n + j, (k * diff) / ms - coef * a, mask=j < n)


@triton.jit
def _symmetrise_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = a + aᵀ (out must not alias a): SP's M = dG + dGᵀ, one program per row.

    Bytes moved per launch: reads 2 B² float32 (a by row and by column), writes B²."""
    i, cols = _row_program(BLOCK)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        v = tl.load(a_ptr + i * n + j, mask=mask, other=0.0) + tl.load(a_ptr + j * n + i, mask=mask, other=0.0)
        tl.store(out_ptr + i * n + j, v, mask=mask)


def _gram_pair(student: torch.Tensor, teacher: torch.Tensor):
    """SP's and PKT's start: the student's float32 rows, G_s and G_t (cuBLAS), the [B] row-loss
    vector and the row kernels' launch parameters."""
    n = student.shape[0]
    s = student.to(torch.float32)
    t = teacher.to(torch.float32)
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    return s, torch.mm(s, s.t()), torch.mm(t, t.t()), loss_rows, _row_meta(launch_config(n, student.device))


def sp_forward(student: torch.Tensor, teacher: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastkd::sp_forward on Triton: (float32 loss, grad in the student's dtype or [0])."""
    n = student.shape[0]
    s, gs, gt, loss_rows, meta = _gram_pair(student, teacher)
    torch.library.wrap_triton(_sp_rows_kernel)[(n,)](gs, gt, loss_rows, n, 2.0 / (n * n), COMPUTE_GRAD=compute_grad, **meta)
    loss = _mean_of_rows(loss_rows, n)
    if not compute_grad:
        return loss, student.new_empty((0,))
    torch.library.wrap_triton(_symmetrise_kernel)[(n,)](gt, gs, n, **meta)
    return loss, torch.mm(gs, s).to(student.dtype)


# ----------------------------------------------------------------------------------------------
# PKT
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pkt_norm(g_ptr, j, mask, n, eps):
    """ñ_j = sqrt(G_jj) + ε (1 + ε where masked)."""
    return tl.sqrt(tl.load(g_ptr + j * (n + 1), mask=mask, other=1.0)) + eps


@triton.jit
def _pkt_row(gs_ptr, n, eps, BLOCK: tl.constexpr):
    """The start of both PKT row kernels: (i, cols) as _row_program's, ε in fp32 whoever launches
    (torch.compile passes it as fp64: kernels/__init__.py), and sqrt(G_ii) of the student."""
    i, cols = _row_program(BLOCK)
    return i, cols, tl.cast(eps, tl.float32), tl.sqrt(tl.load(gs_ptr + i * (n + 1)))


@triton.jit
def _pkt_halves(gs_ptr, gt_ptr, i, j, n, ns_i, nt_i, eps):
    """(mask, K' = (K + 1) / 2 of the student and of the teacher) at row i, columns j, with
    K_ij = G_ij / (ñ_i ñ_j)."""
    mask = j < n
    a, b = _row_pair(gs_ptr, gt_ptr, i, j, mask, n, 0.0)
    ks = (a / (ns_i * _pkt_norm(gs_ptr, j, mask, n, eps)) + 1.0) * 0.5
    kt = (b / (nt_i * _pkt_norm(gt_ptr, j, mask, n, eps)) + 1.0) * 0.5
    return mask, ks, kt


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
    """PKT's loss and dK, one program per row (docs/design.md#relational): K_ij = G_ij / (ñ_i ñ_j),
    ñ = sqrt(G_ii) + ε, K' = (K + 1) / 2 and its row sums, P = K' / r for the student and the
    teacher, the row loss Σ_j P_t log((P_t + ε) / (P_s + ε)) and, with COMPUTE_GRAD,
    dK_ij = (dP_ij − Σ_m dP_im P_im) / (2 r_i), dP = −P_t / (P_s + ε) / B².

    Bytes moved per launch: reads 2 B² float32 (the two Gram rows, in three passes: the later ones
    from L1/L2) and the 2 B diagonals (from cache), writes B row losses and, with COMPUTE_GRAD, B²
    (dK)."""
    i, cols, eps, root_i = _pkt_row(gs_ptr, n, eps, BLOCK)
    inv_b2 = tl.cast(inv_b2, tl.float32)  # fp32, as eps
    ns_i = root_i + eps
    nt_i = tl.sqrt(tl.load(gt_ptr + i * (n + 1))) + eps
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        mask, ks, kt = _pkt_halves(gs_ptr, gt_ptr, i, start + cols, n, ns_i, nt_i, eps)
        acc_s += tl.where(mask, ks, 0.0)
        acc_t += tl.where(mask, kt, 0.0)
    rs = tl.sum(acc_s, axis=0)
    rt = tl.sum(acc_t, axis=0)
    acc_l = tl.zeros((BLOCK,), tl.float32)
    acc_dot = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        mask, ks, kt = _pkt_halves(gs_ptr, gt_ptr, i, start + cols, n, ns_i, nt_i, eps)
        ps = ks / rs
        pt = kt / rt
        acc_l += tl.where(mask, pt * tl.log((pt + eps) / (ps + eps)), 0.0)
        acc_dot += tl.where(mask, -pt / (ps + eps) * inv_b2 * ps, 0.0)
    tl.store(loss_ptr + i, tl.sum(acc_l, axis=0))
    if COMPUTE_GRAD:
        dot = tl.sum(acc_dot, axis=0)
        for start in range(0, n, BLOCK):
            j = start + cols
            mask, ks, kt = _pkt_halves(gs_ptr, gt_ptr, i, j, n, ns_i, nt_i, eps)
            ps = ks / rs
            pt = kt / rt
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
    """PKT's M = dG + dGᵀ, one program per row (docs/design.md#relational):
    M_ij = (dK_ij + dK_ji) / (ñ_i ñ_j) off the diagonal, and on it 2 dK_ii / ñ_i² plus the norm
    term [G_ii > 0] dñ_i / sqrt(G_ii), dñ_i = −Σ_j (dK_ij + dK_ji) K_ij / ñ_i.

    Bytes moved per launch: reads 3 B² float32 (G_s, dK by row and by column) and the B diagonal
    (from cache), writes B²."""
    i, cols, eps, root_i = _pkt_row(gs_ptr, n, eps, BLOCK)
    ns_i = root_i + eps
    acc_dn = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        j = start + cols
        mask = j < n
        nn = ns_i * _pkt_norm(gs_ptr, j, mask, n, eps)
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
    s, gs, gt, loss_rows, meta = _gram_pair(student, teacher)
    dk = torch.empty((n, n), dtype=torch.float32, device=student.device) if compute_grad else None
    torch.library.wrap_triton(_pkt_rows_kernel)[(n,)](gs, gt, dk, loss_rows, n, eps, 1.0 / (n * n), COMPUTE_GRAD=compute_grad, **meta)
    loss = _mean_of_rows(loss_rows, n)
    if not compute_grad:
        return loss, student.new_empty((0,))
    torch.library.wrap_triton(_pkt_grad_kernel)[(n,)](gs, dk, gt, n, eps, **meta)
    return loss, torch.mm(gt, s).to(student.dtype)
