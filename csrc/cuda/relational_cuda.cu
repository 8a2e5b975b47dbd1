// Relational knowledge distillation (RKD distance, RKD angle, SP, PKT): CUDA.
//
// The same structure as the Triton kernels (kernels/relational.py), and the same math as the
// references (fastkd/ops/relational.py; RKD angle's gradient derivation is at the top of
// csrc/cpu/relational_kernel.h). Every op is GEMM (at::mm: cuBLAS), fused kernels, GEMM:
//
// * squared distances (RKD): G of the centred rows (float64 for RKD angle, whose cosines are
//   differences of distances; the compute type for RKD distance), then pair_sq_dist_kernel (a
//   block per row i): d² = G_ii + G_jj − 2 G_ij from G's upper triangle (exactly symmetric),
//   recomputed in double from the input rows where it is within the GEMM's rounding error of zero
//   (exact duplicates then get exactly 0, as the references' clamp and F.normalize kinks need) or
//   the pair is close (d² < (G_ii + G_jj) / 16: the Gram identity has lost more than ~16× its
//   rounding there; "Close pairs" in csrc/cpu/relational_cpu.cpp);
// * RKD distance: three row kernels (row sums of d; the loss and Σ H ψ; the Laplacian row of M,
//   close pairs left out), dE = M·E, and rkd_distance_close_kernel, which adds the close pairs'
//   terms Z_ij (x_i − x_j) from the input rows (M·E would lose ~|e| / |e_i − e_j| of their digits);
// * RKD angle: angle_rows_kernel (a block per vertex i and 8 rows j, a warp per row, looping over
//   k in chunks whose vertex-i quantities are staged in shared memory): the loss, S_ij, T_ij and the
//   norm terms; angle_pairs_kernel (a block per 32×32 (j, k) tile, looping over vertices i, 8 at a
//   time staged in shared memory): P_jk = Σ_i Ω^i_jk; angle_assemble_kernel:
//   M = (2/B³)(P − Sᵀ − T + diag(S·1)). The triplet math runs twice (once per pass): no atomics,
//   no B³ storage; six B×B matrices. For float input, thin vertices (longest difference > 4× the
//   shortest, student or teacher: collinear or 1-D batches, near duplicates; "Precision" atop
//   csrc/cpu/relational_kernel.h) run these kernels in double from unrounded h and the others in
//   float, each pass skipping the other's vertices; dE = (M_float + M_double)·E in double;
// * SP: a row kernel (norms, loss, dG's row) and a symmetrising kernel (M = dG + dGᵀ);
// * PKT: a row kernel (kernel row sums, probabilities, loss, dK's row) and a row kernel for M;
// then dE = M·E (at::mm). Compute type: float, or double for a float64 student.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "cuda_common.cuh"
#include "gpu_kernel_info.h"

namespace fastkd {
namespace {

using namespace cuda_common;

// Every kernel here runs blocks of this many threads (a multiple of 32: block_sum and the warp
// per row need whole warps).
#define FASTKD_RELATIONAL_THREADS 256
constexpr int kThreads = FASTKD_RELATIONAL_THREADS;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 1024 threads");

// Bytes per row for the static report. A row is a row of a B x B matrix, so V means B here, and
// $0 is the compute type (pair_sq_dist_kernel: $0 the Gram matrix, $2 the output). Every B x B
// row or column a block reads or writes counts once, re-reads within the block not again; vectors
// that every row reads (the Gram matrices' diagonals, the row sums) stay in L2 and are not counted.
// pair_sq_dist_kernel: G's upper triangle along row and column i, out's row (the rare fallback
// that recomputes a distance from two rows of x reads 2 D entries more).
FASTKD_GPU_KERNEL_INFO(pair_sq_dist_kernel, "V*($0+$2)", FASTKD_RELATIONAL_THREADS);
// ds and dt rows in, two sums out.
FASTKD_GPU_KERNEL_INFO(rkd_distance_sums_kernel, "V*2*$0+2*$0", FASTKD_RELATIONAL_THREADS);
// PASS 2 (with a gradient): ds and dt rows in, both rewritten; PASS 1 moves V*2*$0+2*$0.
FASTKD_GPU_KERNEL_INFO(rkd_distance_rows_kernel, "V*4*$0", FASTKD_RELATIONAL_THREADS);
// Z's row in (a row with a close pair also reads 2 D entries of x per partner and rewrites its D
// gradient entries).
FASTKD_GPU_KERNEL_INFO(rkd_distance_close_kernel, "V*$0", FASTKD_RELATIONAL_THREADS);
// hs and ht rows i in, S, T and corr rows out (and B/8 loss parts); the triplet loop's rows j
// (2 B^2 entries per vertex i, from L2: the kernel is bound by its B^3 arithmetic) are not affine
// in B.
FASTKD_GPU_KERNEL_INFO(angle_rows_kernel, "V*5*$0", FASTKD_RELATIONAL_THREADS);
// A row j of P: hs and ht entries (j, k) in, P's row out; the staged vertex quantities are read
// again for every tile, from L2.
FASTKD_GPU_KERNEL_INFO(angle_pairs_kernel, "V*3*$0", FASTKD_RELATIONAL_THREADS);
// P, S, T rows and S, corr columns in, P's row rewritten.
FASTKD_GPU_KERNEL_INFO(angle_assemble_kernel, "V*6*$0", FASTKD_RELATIONAL_THREADS);
// Gs and Gt rows in (re-read from L1/L2 by the later passes), dG's row over Gt's, the loss.
FASTKD_GPU_KERNEL_INFO(sp_rows_kernel, "V*3*$0+$0", FASTKD_RELATIONAL_THREADS);
// A row and a column in, a row out.
FASTKD_GPU_KERNEL_INFO(symmetrise_kernel, "V*3*$0", FASTKD_RELATIONAL_THREADS);
// Gs and Gt rows in, dK's row and the loss out.
FASTKD_GPU_KERNEL_INFO(pkt_rows_kernel, "V*3*$0+$0", FASTKD_RELATIONAL_THREADS);
// Gs's row, dK's row and column in, M's row out.
FASTKD_GPU_KERNEL_INFO(pkt_grad_kernel, "V*4*$0", FASTKD_RELATIONAL_THREADS);

constexpr double kPdistEps = 1e-12;  // torchdistill's clamp of squared distances
constexpr double kNormEps = 1e-12;   // F.normalize's eps
// A pair is close when d² < (G_ii + G_jj) · kCloseD2 on centred rows (as the cpu backend's).
constexpr double kCloseD2 = 1.0 / 16;
// A vertex is thin when its longest nonzero difference exceeds kThinRatio times its shortest.
constexpr double kThinRatio = 4.0;

template <typename T>
__device__ __forceinline__ double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_double<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ double to_double<float>(float v) {
  return static_cast<double>(v);
}

// The extension is compiled with --use_fast_math, which would make sqrtf, logf and float division
// approximate (2 ulp and more): the B² passes use correctly rounded sqrt and division (their cost
// is nothing beside the GEMMs), and PKT's log (of ratios near 1, where an absolute error of 1e-7
// is a large relative one) is taken in double.
__device__ __forceinline__ float sqrt_(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ float log_(float x) { return static_cast<float>(log(static_cast<double>(x))); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float div_(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_(double a, double b) { return a / b; }

// clamp(x, -1, 1), NaN kept.
template <typename C>
__device__ __forceinline__ C clamp1(C x) {
  return x > C(1) ? C(1) : (x < C(-1) ? C(-1) : x);
}

// Sum over the block (cuda_common.cuh's block_sum, in its own shared memory); every thread gets
// the result. Every kernel here calls it from all its threads.
template <typename C>
__device__ C block_sum(C v) {
  constexpr int kWarps = kThreads / 32;
  __shared__ C smem[kWarps + 1];
  return cuda_common::block_sum<kWarps>(v, smem);
}

template <typename C>
__device__ C sum_vector(const C* p, int64_t count) {
  C acc = 0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) acc += p[k];
  return block_sum(acc);
}

// -------------------------------------------------------------------------------------------
// Squared distances
// -------------------------------------------------------------------------------------------

template <typename G, typename X, typename O>
__global__ void pair_sq_dist_kernel(const G* __restrict__ gram, const X* __restrict__ x, O* __restrict__ out, int64_t n,
                                    int64_t d, double tau, double scale) {
  const int64_t i = blockIdx.x;
  const double g_i = static_cast<double>(gram[i * (n + 1)]);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t lo = j < i ? j : i, hi = j < i ? i : j;
    const double g_j = static_cast<double>(gram[j * (n + 1)]);
    double d2 = g_i + g_j - 2.0 * static_cast<double>(gram[lo * n + hi]);
    if (j != i && !(d2 >= tau * (g_i + g_j))) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) {
        const double diff = to_double(x[i * d + k]) - to_double(x[j * d + k]);
        acc += diff * diff;
      }
      d2 = acc;
    }
    if (d2 < 0) d2 = 0;  // NaN kept
    if (j == i) d2 = 0;
    out[i * n + j] = static_cast<O>(d2 * scale);
  }
}

// x − (mean of the rows), in `type` (the mean in double).
at::Tensor centred(const at::Tensor& x, at::ScalarType type) {
  at::Tensor mean = x.to(at::kDouble).mean(0, /*keepdim=*/true);
  if (type == at::kDouble) return x.to(at::kDouble) - mean;
  return x.to(type) - mean.to(type);
}

// scale · d² as a [n, n] tensor of `out_type`, from a Gram matrix of `gram_type`, close pairs
// recomputed from the rows; returns the centred rows in `out_type`, and the Gram's diagonal in
// `diag` when given.
at::Tensor sq_dists(const at::Tensor& x, at::ScalarType gram_type, at::ScalarType out_type, double scale, at::Tensor* out,
                    at::Tensor* diag = nullptr) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor xc = centred(x, gram_type);
  at::Tensor gram = at::mm(xc, xc.t());
  *out = at::empty({n, n}, x.options().dtype(out_type));
  if (diag) *diag = gram.diagonal().contiguous();
  const double u = gram_type == at::kDouble ? 0x1p-53 : 0x1p-24;
  const double tau = std::max(8.0 * double(d + 2) * u, kCloseD2);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gram_type, "pair_sq_dist_gram", [&] {
    using G = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_sq_dist_x", [&] {
      using X = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(out_type, "pair_sq_dist_out", [&] {
        pair_sq_dist_kernel<G, X, scalar_t><<<n, kThreads, 0, stream>>>(gram.const_data_ptr<G>(), x.const_data_ptr<X>(),
                                                                        out->mutable_data_ptr<scalar_t>(), n, d, tau, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return xc.to(out_type);
}

// -------------------------------------------------------------------------------------------
// RKD distance
// -------------------------------------------------------------------------------------------

template <typename C>
__device__ __forceinline__ C pdist(C d2) {
  return sqrt_(d2 < C(kPdistEps) ? C(kPdistEps) : d2);
}

template <typename C>
__global__ void rkd_distance_sums_kernel(const C* __restrict__ ds, const C* __restrict__ dt, C* __restrict__ sums, int64_t n) {
  const int64_t i = blockIdx.x;
  C as = 0, at_ = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (j == i) continue;
    as += pdist(ds[i * n + j]);
    at_ += pdist(dt[i * n + j]);
  }
  as = block_sum(as);
  at_ = block_sum(at_);
  if (threadIdx.x == 0) {
    sums[i] = as;
    sums[n + i] = at_;
  }
}

// PASS 1: per-row loss and Σ H ψ_s; PASS 2: M's row i over ds's row i, close pairs left out, and
// their Z_ij over dt's row i (0 elsewhere: dt's row i is read by this block only).
template <typename C, int PASS>
__global__ void rkd_distance_rows_kernel(C* __restrict__ ds, C* __restrict__ dt, const C* __restrict__ sums,
                                         C* __restrict__ loss_rows, C* __restrict__ c_rows, const C* __restrict__ g, int64_t n) {
  const int64_t i = blockIdx.x;
  const C pairs = C(n) * C(n - 1);
  const C mu_s = div_(sum_vector(sums, n), pairs);
  const C mu_t = div_(sum_vector(sums + n, n), pairs);
  if (PASS == 1) {
    C l = 0, c = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if (j == i) continue;
      const C ps = div_(pdist(ds[i * n + j]), mu_s), pt = div_(pdist(dt[i * n + j]), mu_t);
      const C diff = ps - pt, a = diff < C(0) ? -diff : diff;
      l += a < C(1) ? C(0.5) * diff * diff : a - C(0.5);
      c += clamp1(diff) * ps;
    }
    l = block_sum(l);
    c = block_sum(c);
    if (threadIdx.x == 0) {
      loss_rows[i] = l;
      c_rows[i] = c;
    }
  } else {
    const C c = div_(sum_vector(c_rows, n), pairs);
    const C k = div_(div_(C(4), C(n) * C(n)), C(2) * mu_s);
    const C g_i = g[i];
    C diag = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if (j == i) continue;
      const C d2 = ds[i * n + j];
      C z = 0;
      if (d2 >= C(kPdistEps)) {
        const C d = sqrt_(d2);
        z = div_((clamp1(div_(d, mu_s) - div_(pdist(dt[i * n + j]), mu_t)) - c) * k, d);
      }
      const bool close = d2 < C(kCloseD2) * (g_i + g[j]);
      ds[i * n + j] = close ? C(0) : -z;
      dt[i * n + j] = close ? z : C(0);
      if (!close) diag += z;
    }
    diag = block_sum(diag);
    if (threadIdx.x == 0) {
      ds[i * n + i] = diag;
      dt[i * n + i] = 0;
    }
  }
}

// A block per row i: grad_i += Σ_j z_ij (x_i − x_j) over its close pairs (z_ij ≠ 0 only there),
// from the input rows, in double (x_i − x_j is exact); a row without one exits after reading z.
template <typename C, typename X>
__global__ void rkd_distance_close_kernel(const C* __restrict__ z, const X* __restrict__ x, C* __restrict__ grad, int64_t n,
                                          int64_t d) {
  __shared__ C s_z[kThreads];
  __shared__ int64_t s_j[kThreads];
  __shared__ int s_warp[kThreads / 32];
  const int64_t i = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t j0 = 0; j0 < n; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    const C zj = j < n ? z[i * n + j] : C(0);
    const bool partner = zj != C(0);
    if (!__syncthreads_or(partner)) continue;  // uniform: every thread sees the same answer
    // The chunk's partners, compacted in index order (deterministic sums).
    const unsigned ballot = __ballot_sync(0xffffffffu, partner);
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    int base = 0, count = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      base += w < warp ? s_warp[w] : 0;
      count += s_warp[w];
    }
    if (partner) {
      const int slot = base + __popc(ballot & ((1u << lane) - 1u));
      s_z[slot] = zj;
      s_j[slot] = j;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const double xi = to_double(x[i * d + k]);
      double acc = 0;
      for (int c = 0; c < count; ++c) acc += static_cast<double>(s_z[c]) * (xi - to_double(x[s_j[c] * d + k]));
      grad[i * d + k] += static_cast<C>(acc);
    }
    __syncthreads();  // s_z, s_j and s_warp are rewritten by the next chunk
  }
}

// -------------------------------------------------------------------------------------------
// RKD angle
// -------------------------------------------------------------------------------------------

// p = 1 / max(r, ε) and q = [r ≥ ε] / r of a half squared distance h (NaN: p NaN, q 0).
template <typename C>
__device__ __forceinline__ void inv_norms(C h, C* p, C* q) {
  const C d2 = C(2) * h;
  const C r = sqrt_(d2);
  *p = div_(C(1), r < C(kNormEps) ? C(kNormEps) : r);
  *q = d2 >= C(kNormEps * kNormEps) ? div_(C(1), r) : C(0);
}

// One triplet (i, j, k): cos_s, d = cos_s − cos_t, c = clamp(d, ±1); cos(i, j, j) is exactly 1 or 0.
template <typename C>
__device__ __forceinline__ void triplet(C hs_ij, C hs_ik, C hs_jk, C qs_j, C qs_k, C ht_ij, C ht_ik, C ht_jk, C qt_j, C qt_k,
                                        bool same, C* cs, C* d, C* c) {
  C s = ((hs_ij + hs_ik) - hs_jk) * (qs_j * qs_k);
  C t = ((ht_ij + ht_ik) - ht_jk) * (qt_j * qt_k);
  if (same) {
    s = qs_j != C(0) ? C(1) : C(0);
    t = qt_j != C(0) ? C(1) : C(0);
  }
  *cs = s;
  *d = s - t;
  *c = clamp1(s - t);
}

constexpr int kRowsPerBlock = kThreads / 32;  // angle_rows_kernel: a warp per row j

// Grid (n, ceil(n / 8)): vertex i, rows j of the block. Writes S[i, j], T[i, j], corr[i, j] and
// loss_parts[i, blockIdx.y]; a vertex in `skip` (nonzero; null: none) runs no triplet and writes
// zeros (its triplets are another pass's).
template <typename C>
__global__ void angle_rows_kernel(const C* __restrict__ hs, const C* __restrict__ ht, C* __restrict__ s_out,
                                  C* __restrict__ t_out, C* __restrict__ corr_out, C* __restrict__ loss_parts,
                                  const int8_t* __restrict__ skip, int64_t n) {
  __shared__ C s_hs[kThreads], s_ht[kThreads], s_ps[kThreads], s_qs[kThreads], s_qt[kThreads];
  __shared__ C s_loss[kRowsPerBlock];
  const int64_t i = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t j = int64_t(blockIdx.y) * kRowsPerBlock + warp;
  const bool row = j < n;
  C hs_ij = 0, ht_ij = 0, ps_j = 0, qs_j = 0, qt_j = 0, unused;
  if (row) {
    hs_ij = hs[i * n + j];
    ht_ij = ht[i * n + j];
    inv_norms(hs_ij, &ps_j, &qs_j);
    inv_norms(ht_ij, &unused, &qt_j);
  }
  C sig = 0, tau = 0, cc = 0, l = 0;
  const int64_t k_end = skip != nullptr && skip[i] ? 0 : n;  // uniform over the block
  for (int64_t k0 = 0; k0 < k_end; k0 += kThreads) {
    const int64_t kt = k0 + threadIdx.x;
    if (kt < n) {
      s_hs[threadIdx.x] = hs[i * n + kt];
      s_ht[threadIdx.x] = ht[i * n + kt];
      inv_norms(s_hs[threadIdx.x], &s_ps[threadIdx.x], &s_qs[threadIdx.x]);
      inv_norms(s_ht[threadIdx.x], &unused, &s_qt[threadIdx.x]);
    }
    __syncthreads();
    const int64_t kn = n - k0 < kThreads ? n - k0 : kThreads;
    if (row) {
      for (int64_t kk = lane; kk < kn; kk += 32) {
        const int64_t k = k0 + kk;
        C cs, d, c;
        triplet(hs_ij, s_hs[kk], hs[j * n + k], qs_j, s_qs[kk], ht_ij, s_ht[kk], ht[j * n + k], qt_j, s_qt[kk], k == j, &cs, &d,
                &c);
        l += c * (d - C(0.5) * c);
        sig += c * s_qs[kk];
        tau += c * s_ps[kk];
        cc += c * cs;
      }
    }
    __syncthreads();
  }
  for (int off = 16; off > 0; off /= 2) {
    sig += __shfl_down_sync(0xffffffffu, sig, off);
    tau += __shfl_down_sync(0xffffffffu, tau, off);
    cc += __shfl_down_sync(0xffffffffu, cc, off);
    l += __shfl_down_sync(0xffffffffu, l, off);
  }
  if (lane == 0) {
    s_loss[warp] = row ? l : C(0);
    if (row) {
      const C corr = qs_j != C(0) ? cc * ps_j * ps_j : C(0);
      s_out[i * n + j] = ps_j * sig - corr;
      t_out[i * n + j] = qs_j * tau - corr;
      corr_out[i * n + j] = corr;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    C total = 0;
    for (int w = 0; w < kRowsPerBlock; ++w) total += s_loss[w];
    loss_parts[i * gridDim.y + blockIdx.y] = total;
  }
}

constexpr int kTile = 32;     // angle_pairs_kernel: a 32×32 (j, k) tile per block
constexpr int kVertices = 8;  // vertices i staged per step
// Its thread mapping (16×16 threads of 2×2 entries; one staged entry a thread) is for this block.
static_assert(kThreads == kVertices * kTile && kThreads * 4 == kTile * kTile, "angle_pairs_kernel assumes 256 threads");

// Grid (ceil(n/32), ceil(n/32)), 256 threads, each a 2×2 sub-tile. P[j, k] = Σ_i H^i_jk p_j q_k over
// the vertices i not in `skip` (nonzero; null: none), which are neither staged nor visited.
template <typename C>
__global__ void angle_pairs_kernel(const C* __restrict__ hs, const C* __restrict__ ht, C* __restrict__ p_out,
                                   const int8_t* __restrict__ skip, int64_t n) {
  __shared__ C j_hs[kVertices][kTile], j_ht[kVertices][kTile], j_ps[kVertices][kTile], j_qs[kVertices][kTile],
      j_qt[kVertices][kTile];
  __shared__ bool active[kVertices];
  __shared__ C k_hs[kVertices][kTile], k_ht[kVertices][kTile], k_qs[kVertices][kTile], k_qt[kVertices][kTile];
  const int64_t j0 = int64_t(blockIdx.x) * kTile, k0 = int64_t(blockIdx.y) * kTile;
  const int tj = (threadIdx.x / 16) * 2, tk = (threadIdx.x % 16) * 2;
  C hs_jk[2][2], ht_jk[2][2], acc[2][2];
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2; ++b) {
      const int64_t j = j0 + tj + a, k = k0 + tk + b;
      const bool in = j < n && k < n;
      hs_jk[a][b] = in ? hs[j * n + k] : C(0);
      ht_jk[a][b] = in ? ht[j * n + k] : C(0);
      acc[a][b] = 0;
    }
  }
  for (int64_t i0 = 0; i0 < n; i0 += kVertices) {
    {
      const int v = threadIdx.x / kTile, e = threadIdx.x % kTile;
      const int64_t i = i0 + v;
      const bool on = i < n && !(skip != nullptr && skip[i]);
      if (e == 0) active[v] = on;
      // A step whose 8 vertices are all skipped stages nothing (uniform: the same answer for all).
      if (!__syncthreads_or(on)) continue;
    }
    // 256 threads stage 8 vertices × 32 entries of the J and the K quantities.
    {
      const int v = threadIdx.x / kTile, e = threadIdx.x % kTile;
      const int64_t i = i0 + v;
      const int64_t j = j0 + e, k = k0 + e;
      C h, p, q, unused;
      h = (i < n && j < n) ? hs[i * n + j] : C(0);
      inv_norms(h, &p, &q);
      j_hs[v][e] = h;
      j_ps[v][e] = (i < n && j < n) ? p : C(0);
      j_qs[v][e] = q;
      h = (i < n && j < n) ? ht[i * n + j] : C(0);
      inv_norms(h, &unused, &q);
      j_ht[v][e] = h;
      j_qt[v][e] = q;
      h = (i < n && k < n) ? hs[i * n + k] : C(0);
      inv_norms(h, &unused, &q);
      k_hs[v][e] = h;
      k_qs[v][e] = q;
      h = (i < n && k < n) ? ht[i * n + k] : C(0);
      inv_norms(h, &unused, &q);
      k_ht[v][e] = h;
      k_qt[v][e] = q;
    }
    __syncthreads();
    const int nv = n - i0 < kVertices ? int(n - i0) : kVertices;
    for (int v = 0; v < nv; ++v) {
      if (!active[v]) continue;
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 2; ++b) {
          const int jj = tj + a, kk = tk + b;
          C cs, d, c;
          triplet(j_hs[v][jj], k_hs[v][kk], hs_jk[a][b], j_qs[v][jj], k_qs[v][kk], j_ht[v][jj], k_ht[v][kk], ht_jk[a][b],
                  j_qt[v][jj], k_qt[v][kk], j0 + jj == k0 + kk, &cs, &d, &c);
          acc[a][b] += c * (j_ps[v][jj] * k_qs[v][kk]);
        }
      }
    }
    __syncthreads();
  }
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2; ++b) {
      const int64_t j = j0 + tj + a, k = k0 + tk + b;
      if (j < n && k < n) p_out[j * n + k] = acc[a][b];
    }
  }
}

// A block per row j: M = scale (P − Sᵀ − T + diag(S·1)) over P's row j (the norm terms of Ω's
// diagonal, Σ_i corr[i, j], join M_jj).
template <typename C>
__global__ void angle_assemble_kernel(C* __restrict__ p, const C* __restrict__ s, const C* __restrict__ t,
                                      const C* __restrict__ corr, int64_t n, C scale) {
  const int64_t j = blockIdx.x;
  C acc_s = 0, acc_corr = 0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    acc_s += s[j * n + k];
    acc_corr += corr[k * n + j];
    if (k != j) p[j * n + k] = (p[j * n + k] - s[k * n + j] - t[j * n + k]) * scale;
  }
  acc_s = block_sum(acc_s);
  acc_corr = block_sum(acc_corr);
  if (threadIdx.x == 0) {
    p[j * n + j] = (p[j * n + j] - s[j * n + j] - t[j * n + j] + acc_s - acc_corr) * scale;
  }
}

// -------------------------------------------------------------------------------------------
// SP
// -------------------------------------------------------------------------------------------

// A block per row i; with grad, gt's row i becomes dG's row i.
template <typename C>
__global__ void sp_rows_kernel(const C* __restrict__ gs, C* __restrict__ gt, C* __restrict__ loss_rows, int64_t n, C k,
                               bool grad) {
  const int64_t i = blockIdx.x;
  C a2 = 0, b2 = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const C a = gs[i * n + j], b = gt[i * n + j];
    a2 += a * a;
    b2 += b * b;
  }
  const C ns = sqrt_(block_sum(a2)), nt = sqrt_(block_sum(b2));
  const C ms = ns < C(kNormEps) ? C(kNormEps) : ns, mt = nt < C(kNormEps) ? C(kNormEps) : nt;
  C l = 0, dot = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const C a = gs[i * n + j], diff = div_(a, ms) - div_(gt[i * n + j], mt);
    l += diff * diff;
    dot += k * diff * a;
  }
  l = block_sum(l);
  dot = block_sum(dot);
  if (threadIdx.x == 0) loss_rows[i] = l;
  if (!grad) return;
  const C coef = ns >= C(kNormEps) ? div_(dot, ms * ms * ms) : C(0);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const C a = gs[i * n + j];
    const C r = k * (div_(a, ms) - div_(gt[i * n + j], mt));
    gt[i * n + j] = div_(r, ms) - coef * a;
  }
}

template <typename C>
__global__ void symmetrise_kernel(const C* __restrict__ a, C* __restrict__ out, int64_t n) {
  const int64_t i = blockIdx.x;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) out[i * n + j] = a[i * n + j] + a[j * n + i];
}

// -------------------------------------------------------------------------------------------
// PKT
// -------------------------------------------------------------------------------------------

template <typename C>
__global__ void pkt_rows_kernel(const C* __restrict__ gs, const C* __restrict__ gt, C* __restrict__ dk, C* __restrict__ loss_rows,
                                int64_t n, C eps, C inv_b2) {
  const int64_t i = blockIdx.x;
  const C ns_i = sqrt_(gs[i * (n + 1)]) + eps, nt_i = sqrt_(gt[i * (n + 1)]) + eps;
  auto kernels = [&](int64_t j, C* ks, C* kt) {
    *ks = (div_(gs[i * n + j], ns_i * (sqrt_(gs[j * (n + 1)]) + eps)) + C(1)) * C(0.5);
    *kt = (div_(gt[i * n + j], nt_i * (sqrt_(gt[j * (n + 1)]) + eps)) + C(1)) * C(0.5);
  };
  C rs = 0, rt = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    C ks, kt;
    kernels(j, &ks, &kt);
    rs += ks;
    rt += kt;
  }
  rs = block_sum(rs);
  rt = block_sum(rt);
  C l = 0, dot = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    C ks, kt;
    kernels(j, &ks, &kt);
    const C ps = div_(ks, rs), pt = div_(kt, rt);
    l += pt * log_(div_(pt + eps, ps + eps));
    dot += -div_(pt, ps + eps) * inv_b2 * ps;
  }
  l = block_sum(l);
  dot = block_sum(dot);
  if (threadIdx.x == 0) loss_rows[i] = l;
  if (dk == nullptr) return;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    C ks, kt;
    kernels(j, &ks, &kt);
    const C ps = div_(ks, rs), pt = div_(kt, rt);
    dk[i * n + j] = div_((-div_(pt, ps + eps) * inv_b2 - dot) * C(0.5), rs);
  }
}

template <typename C>
__global__ void pkt_grad_kernel(const C* __restrict__ gs, const C* __restrict__ dk, C* __restrict__ m, int64_t n, C eps) {
  const int64_t i = blockIdx.x;
  const C root_i = sqrt_(gs[i * (n + 1)]);
  const C ns_i = root_i + eps;
  C dn = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const C nn = ns_i * (sqrt_(gs[j * (n + 1)]) + eps);
    const C dsym = dk[i * n + j] + dk[j * n + i];
    dn -= dsym * div_(gs[i * n + j], nn);
    if (j != i) m[i * n + j] = div_(dsym, nn);
  }
  dn = div_(block_sum(dn), ns_i);
  if (threadIdx.x == 0) m[i * (n + 1)] = div_(C(2) * dk[i * (n + 1)], ns_i * ns_i) + (root_i > C(0) ? div_(dn, root_i) : C(0));
}

// -------------------------------------------------------------------------------------------
// Host side
// -------------------------------------------------------------------------------------------

void check_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op, int64_t min_batch) {
  TORCH_CHECK(student.is_cuda(), "fastkd::", op, " (cuda): student must be a CUDA tensor, got device ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), "fastkd::", op, " (cuda): teacher is on ", teacher.device(), ", student on ",
              student.device());
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::", op, ": student must be contiguous [B, D], got shape ",
              student.sizes());
  TORCH_CHECK(teacher.dim() == 2 && teacher.is_contiguous(), "fastkd::", op, ": teacher must be contiguous [B, Dt], got shape ",
              teacher.sizes());
  TORCH_CHECK(teacher.size(0) == student.size(0), "fastkd::", op, ": teacher has ", teacher.size(0), " rows but student has ",
              student.size(0));
  TORCH_CHECK(student.size(0) >= min_batch, "fastkd::", op, ": needs a batch of at least ", min_batch, ", got ", student.size(0));
  TORCH_CHECK(student.size(1) > 0 && teacher.size(1) > 0, "fastkd::", op, ": embeddings must have at least one feature");
  TORCH_CHECK(student.size(0) <= (int64_t(1) << 31) - 1, "fastkd::", op, ": at most 2^31 - 1 rows");
  TORCH_CHECK(is_float_dtype(student.scalar_type()), "fastkd::", op, ": student must be float32, float16, bfloat16 or float64, got ",
              student.scalar_type());
  TORCH_CHECK(is_float_dtype(teacher.scalar_type()), "fastkd::", op, ": teacher must be float32, float16, bfloat16 or float64, got ",
              teacher.scalar_type());
}

at::ScalarType compute_type(const at::Tensor& student) { return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor loss_of(const at::Tensor& parts, double divisor, const at::Tensor& student) {
  return (parts.to(at::kDouble).sum() / divisor).to(compute_type(student));
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_cuda(const at::Tensor& student, const at::Tensor& teacher, bool compute_grad) {
  check_pair(student, teacher, "rkd_distance_forward", 2);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::ScalarType type = compute_type(student);
  const int64_t n = student.size(0);
  at::Tensor ds, dt, g;
  at::Tensor rows = sq_dists(student, type, type, 1.0, &ds, &g);
  sq_dists(teacher, type, type, 1.0, &dt);
  at::Tensor sums = at::empty({2 * n}, ds.options());
  at::Tensor loss_rows = at::empty({n}, ds.options());
  at::Tensor c_rows = at::empty({n}, ds.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(type, "rkd_distance_cuda", [&] {
    using C = scalar_t;
    rkd_distance_sums_kernel<C><<<n, kThreads, 0, stream>>>(ds.const_data_ptr<C>(), dt.const_data_ptr<C>(), sums.mutable_data_ptr<C>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rkd_distance_rows_kernel<C, 1><<<n, kThreads, 0, stream>>>(ds.mutable_data_ptr<C>(), dt.mutable_data_ptr<C>(),
                                                               sums.const_data_ptr<C>(), loss_rows.mutable_data_ptr<C>(),
                                                               c_rows.mutable_data_ptr<C>(), g.const_data_ptr<C>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (compute_grad) {
      rkd_distance_rows_kernel<C, 2><<<n, kThreads, 0, stream>>>(ds.mutable_data_ptr<C>(), dt.mutable_data_ptr<C>(),
                                                                 sums.const_data_ptr<C>(), loss_rows.mutable_data_ptr<C>(),
                                                                 c_rows.mutable_data_ptr<C>(), g.const_data_ptr<C>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor loss = loss_of(loss_rows, double(n) * double(n), student);
  if (!compute_grad) return {loss, at::empty({0}, student.options())};
  at::Tensor grad = at::mm(ds, rows);
  // The close pairs' terms (Z over dt), from the input rows.
  AT_DISPATCH_FLOATING_TYPES(type, "rkd_distance_close", [&] {
    using C = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "rkd_distance_close_x", [&] {
      rkd_distance_close_kernel<C, scalar_t><<<n, kThreads, 0, stream>>>(dt.const_data_ptr<C>(), student.const_data_ptr<scalar_t>(),
                                                                         grad.mutable_data_ptr<C>(), n, student.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, grad.to(student.scalar_type())};
}

// [n] int8: the thin vertices (1), from h = d² / 2 of student and teacher (degenerate and NaN
// differences do not count); device ops only.
at::Tensor thin_vertices(const at::Tensor& hs, const at::Tensor& ht) {
  const int64_t n = hs.size(0);
  at::Tensor off = at::eye(n, hs.options().dtype(at::kBool)).logical_not_();
  at::Tensor thin = at::zeros({n}, hs.options().dtype(at::kBool));
  for (const at::Tensor* h : {&hs, &ht}) {
    at::Tensor ok = off.logical_and(h->mul(2.0).ge(kNormEps * kNormEps));
    at::Tensor lo = at::where(ok, *h, std::numeric_limits<double>::infinity()).amin(1);
    at::Tensor hi = at::where(ok, *h, 0.0).amax(1);
    thin.logical_or_(hi.gt(lo.mul(kThinRatio * kThinRatio)));  // h is a square
  }
  return thin.to(at::kChar);
}

// The triplet kernels over the vertices not in `skip` (null: all), in h's type. Returns the loss's
// partial sums ([n, n_jb]); with the gradient, M in *m.
at::Tensor angle_pass(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& skip, bool compute_grad, at::Tensor* m) {
  const int64_t n = hs.size(0);
  const int64_t n_jb = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(n_jb <= 65535, "fastkd::rkd_angle_forward (cuda): at most ", 65535 * kRowsPerBlock, " rows, got ", n);
  at::Tensor s = at::empty({n, n}, hs.options()), t = at::empty({n, n}, hs.options()), corr = at::empty({n, n}, hs.options());
  at::Tensor loss_parts = at::empty({n, n_jb}, hs.options());
  const int8_t* skip_ptr = skip.defined() ? skip.const_data_ptr<int8_t>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rkd_angle_cuda", [&] {
    using C = scalar_t;
    angle_rows_kernel<C><<<dim3(n, n_jb), kThreads, 0, stream>>>(hs.const_data_ptr<C>(), ht.const_data_ptr<C>(), s.mutable_data_ptr<C>(),
                                                                 t.mutable_data_ptr<C>(), corr.mutable_data_ptr<C>(),
                                                                 loss_parts.mutable_data_ptr<C>(), skip_ptr, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (compute_grad) {
      *m = at::empty({n, n}, hs.options());
      const int64_t tiles = (n + kTile - 1) / kTile;
      angle_pairs_kernel<C><<<dim3(tiles, tiles), kThreads, 0, stream>>>(hs.const_data_ptr<C>(), ht.const_data_ptr<C>(),
                                                                        m->mutable_data_ptr<C>(), skip_ptr, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const double n3 = double(n) * double(n) * double(n);
      angle_assemble_kernel<C><<<n, kThreads, 0, stream>>>(m->mutable_data_ptr<C>(), s.const_data_ptr<C>(), t.const_data_ptr<C>(),
                                                           corr.const_data_ptr<C>(), n, C(2.0 / n3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return loss_parts;
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_cuda(const at::Tensor& student, const at::Tensor& teacher, bool compute_grad) {
  check_pair(student, teacher, "rkd_angle_forward", 2);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::ScalarType type = compute_type(student);
  const int64_t n = student.size(0);
  const double n3 = double(n) * double(n) * double(n);
  // h = d² / 2 in double, unrounded (the thin vertices' pass needs it), and the centred rows.
  at::Tensor hs, ht;
  at::Tensor rows = sq_dists(student, at::kDouble, at::kDouble, 0.5, &hs);
  sq_dists(teacher, at::kDouble, at::kDouble, 0.5, &ht);
  at::Tensor m;
  if (type == at::kDouble) {
    at::Tensor loss = loss_of(angle_pass(hs, ht, at::Tensor(), compute_grad, &m), n3, student);
    return {loss, compute_grad ? at::mm(m, rows) : at::empty({0}, student.options())};
  }
  // Float input: two passes, in float over the vertices that are not thin and in double over the
  // thin ones. A pass skips the other's vertices at a branch each, so a batch without thin
  // vertices pays for the double pass only its O(B²) launches and a double GEMM.
  at::Tensor thin = thin_vertices(hs, ht);
  at::Tensor m32;
  at::Tensor parts32 = angle_pass(hs.to(at::kFloat), ht.to(at::kFloat), thin, compute_grad, &m32);
  at::Tensor parts64 = angle_pass(hs, ht, thin.logical_not().to(at::kChar), compute_grad, &m);
  at::Tensor loss = ((parts32.to(at::kDouble).sum() + parts64.sum()) / n3).to(at::kFloat);
  if (!compute_grad) return {loss, at::empty({0}, student.options())};
  return {loss, at::mm(m.add_(m32), rows).to(student.scalar_type())};  // rounded once
}

// SP and PKT, around their row kernels: the Gram matrices Gs = S Sᵀ and Gt = T Tᵀ of the rows in
// the compute type, then kernels(gs, gt, loss_rows, stream), which writes each row's loss part and
// returns M (in a buffer it may take from gs or gt) with dL/dS = M S when compute_grad; the loss is
// the parts' sum over B², the gradient M S rounded once to the student's dtype.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> gram_loss(const at::Tensor& student, const at::Tensor& teacher, bool compute_grad,
                                             Kernels&& kernels) {
  const c10::cuda::CUDAGuard guard(student.device());
  const at::ScalarType type = compute_type(student);
  const int64_t n = student.size(0);
  at::Tensor sf = student.to(type), tf = teacher.to(type);
  at::Tensor gs = at::mm(sf, sf.t()), gt = at::mm(tf, tf.t());
  at::Tensor loss_rows = at::empty({n}, gs.options());
  const at::Tensor m = kernels(gs, gt, loss_rows, at::cuda::getCurrentCUDAStream());
  at::Tensor loss = loss_of(loss_rows, double(n) * double(n), student);
  at::Tensor grad = compute_grad ? at::mm(m, sf).to(student.scalar_type()) : at::empty({0}, student.options());
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> sp_cuda(const at::Tensor& student, const at::Tensor& teacher, bool compute_grad) {
  check_pair(student, teacher, "sp_forward", 1);
  return gram_loss(student, teacher, compute_grad, [&](at::Tensor& gs, at::Tensor& gt, at::Tensor& loss_rows, cudaStream_t stream) {
    const int64_t n = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "sp_cuda", [&] {
      using C = scalar_t;
      sp_rows_kernel<C><<<n, kThreads, 0, stream>>>(gs.const_data_ptr<C>(), gt.mutable_data_ptr<C>(), loss_rows.mutable_data_ptr<C>(), n,
                                                    C(2.0 / (double(n) * double(n))), compute_grad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (compute_grad) {
        symmetrise_kernel<C><<<n, kThreads, 0, stream>>>(gt.const_data_ptr<C>(), gs.mutable_data_ptr<C>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    return gs;  // M = dG + dGᵀ, symmetrised into gs
  });
}

std::tuple<at::Tensor, at::Tensor> pkt_cuda(const at::Tensor& student, const at::Tensor& teacher, double eps, bool compute_grad) {
  check_pair(student, teacher, "pkt_forward", 1);
  TORCH_CHECK(eps > 0, "fastkd::pkt_forward: eps must be > 0, got ", eps);
  return gram_loss(student, teacher, compute_grad, [&](at::Tensor& gs, at::Tensor& gt, at::Tensor& loss_rows, cudaStream_t stream) {
    const int64_t n = gs.size(0);
    at::Tensor dk = compute_grad ? at::empty({n, n}, gs.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "pkt_cuda", [&] {
      using C = scalar_t;
      pkt_rows_kernel<C><<<n, kThreads, 0, stream>>>(gs.const_data_ptr<C>(), gt.const_data_ptr<C>(),
                                                     compute_grad ? dk.mutable_data_ptr<C>() : nullptr, loss_rows.mutable_data_ptr<C>(), n,
                                                     C(eps), C(1.0 / (double(n) * double(n))));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (compute_grad) {
        // gt is free once the row kernel has run: it receives M.
        pkt_grad_kernel<C><<<n, kThreads, 0, stream>>>(gs.const_data_ptr<C>(), dk.const_data_ptr<C>(), gt.mutable_data_ptr<C>(), n, C(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    return gt;
  });
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("rkd_distance_forward", &fastkd::rkd_distance_cuda);
  m.impl("rkd_angle_forward", &fastkd::rkd_angle_cuda);
  m.impl("sp_forward", &fastkd::sp_cuda);
  m.impl("pkt_forward", &fastkd::pkt_cuda);
}
