// Fused temperature knowledge distillation (forward KL + optional hard-label CE): CUDA.
// kd_forward_kernel below; every other divergence and ensembles of teachers: kd_div_kernel (its
// math at its definition further down).
//
// One thread block per row. Per row, with p = softmax(t/T) (teacher), q = softmax(s/T) (student):
//
//   KL   = sum p (log p - log q)
//   CE   = logsumexp(s) - s[label]                        (T = 1; only with labels and a > 0)
//   loss = (1 - a) * c * KL + a * CE                      c = T^2 if t2_scale else 1
//   grad = scale * ((1 - a) * g * (q - p) + a * (softmax(s) - onehot(label)))
//                                                         g = T if t2_scale else 1/T
//   scale = 1 / (number of non-ignored rows) for "batchmean" (computed on the device), else 1.
//
// Pass 1: every thread keeps an online (max, sum) state over its strided elements, in base 2:
// x = (s - r_s) * log2(e)/T, y = (t - r_t) * log2(e)/T, with r_s, r_t the running maxima of the
// raw logits (0 while still -inf, so that -inf - -inf never occurs). It accumulates
//
//   S_s = sum 2^x,   S_t = sum 2^y,   A = sum_{2^y != 0} 2^y (y - x),   S_1 = sum e^(s - r_s)
//
// and KL = ln2 * (A / S_t + log2 S_s - log2 S_t). A is relative to both references, so a
// constant offset between teacher and student logits cancels inside each term instead of
// between two large numbers at the end; terms with 2^y == 0 (teacher -inf, masked vocabulary)
// are 0, not 0 * inf. When a reference grows from r to r', the sums are multiplied by
// 2^((r - r') log2(e)/T) and A also gains S_t times the shift of both references. The thread
// states are merged with the same rule (warp shuffles, then shared memory). NaN inputs
// propagate through the sums, whatever fmax does with NaN.
//
// Pass 2 re-reads the row, last chunk first (the one most likely still in L2), and writes the
// gradient. Ignored rows (label == ignore_index) read nothing: loss 0, gradient 0. A label
// outside [0, V) that is not ignore_index gives a NaN loss and a NaN gradient row.
//
// Memory traffic: read 2*N*V (student, teacher; pass 2 re-reads them, ideally from L2),
// write N*V (gradient) + N (row losses).
//
// Accumulation is in float, or in double when either input is double.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "cuda_common.cuh"
#include "gpu_kernel_info.h"
#include "kd_args.h"

namespace fastkd {
namespace {

using namespace cuda_common;

// Block sizes the launcher chooses from (the smallest whose chunk covers the row), recorded in
// the library for the static occupancy report. The largest is the kernel's __launch_bounds__;
// all are multiples of 32 (block_reduce needs whole warps).
#define FASTKD_KD_THREADS 64, 128, 256, 512
constexpr int kBlockThreads[] = {FASTKD_KD_THREADS};
// Reads and writes each row's student, teacher and gradient once, its label and its loss.
FASTKD_GPU_KERNEL_INFO(kd_forward_kernel, "V*(2*$0+$1)+$2+8", FASTKD_KD_THREADS);
// The same for one teacher; an ensemble of M teachers reads M teacher rows (V*(2*$0+M*$1)+$2+8),
// which a formula in V and the template arguments cannot say.
FASTKD_GPU_KERNEL_INFO(kd_div_kernel, "V*(2*$0+$1)+$2+8", FASTKD_KD_THREADS);
constexpr int kMaxThreads = kBlockThreads[std::size(kBlockThreads) - 1];
static_assert(valid_block_table(kBlockThreads), "kBlockThreads must be increasing multiples of 32");
constexpr int kMaxWarps = kMaxThreads / 32;
// Elements of each input a thread holds per chunk: kElems<VEC> / VEC loads of VEC elements.
// Scalar loads take fewer, to stay within the 128 registers that kMaxThreads threads allow.
template <int VEC>
constexpr int kElems = VEC == 1 ? 4 : 2 * VEC;

template <typename acc_t>
struct KdParams {
  int64_t vocab;
  int64_t ignore_index;
  acc_t x_scale;         // log2(e) / T
  acc_t soft_loss_coef;  // (1 - a) * (T or 1); the loss's T^2 is this times soft_loss_t
  acc_t soft_loss_t;     // T or 1: two factors, since T^2 alone overflows float from T ~ 1.8e19
  acc_t hard_weight;     // a
  acc_t soft_grad_coef;  // (1 - a) * (T or 1/T), before the reduction scale
  const acc_t* scale_ptr;  // device reduction scale (batchmean with labels), or null
  acc_t host_scale;        // reduction scale when scale_ptr is null
  GradScale<acc_t> gs;     // grad_scale (cuda_common.cuh)
  bool has_ce;             // labels given and a > 0
  bool same_t;             // T == 1: the CE softmax is the student softmax
};

// Online statistics of (part of) one row; see the comment at the top.
template <typename acc_t>
struct RowState {
  acc_t m_s, m_t;      // maxima of the raw student / teacher logits (-inf: nothing finite yet)
  acc_t sum_s, sum_t;  // sum 2^x, sum 2^y
  acc_t a;             // sum 2^y (y - x)
  acc_t sum_1;         // sum e^(s - r_s), for the CE when T != 1

  __device__ __forceinline__ static RowState empty() {
    return {neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  }
};

// a <- a merged with b. Each side is rescaled from its own references to the merged ones;
// 2^(-inf) = 0 takes care of a side that has seen nothing finite.
template <typename acc_t>
__device__ __forceinline__ void merge(RowState<acc_t>& a, const RowState<acc_t>& b, acc_t x_scale, bool sep_ce) {
  const acc_t m_s = max_(a.m_s, b.m_s);
  const acc_t m_t = max_(a.m_t, b.m_t);
  const acc_t r_s = ref_of(m_s);
  const acc_t r_t = ref_of(m_t);
  const acc_t fa_s = exp2_((a.m_s - r_s) * x_scale);
  const acc_t fb_s = exp2_((b.m_s - r_s) * x_scale);
  const acc_t fa_t = exp2_((a.m_t - r_t) * x_scale);
  const acc_t fb_t = exp2_((b.m_t - r_t) * x_scale);
  const acc_t da = ((ref_of(a.m_t) - r_t) - (ref_of(a.m_s) - r_s)) * x_scale;
  const acc_t db = ((ref_of(b.m_t) - r_t) - (ref_of(b.m_s) - r_s)) * x_scale;
  a.a = fa_t * (a.a + a.sum_t * da) + fb_t * (b.a + b.sum_t * db);
  a.sum_s = a.sum_s * fa_s + b.sum_s * fb_s;
  a.sum_t = a.sum_t * fa_t + b.sum_t * fb_t;
  if (sep_ce) {
    a.sum_1 = a.sum_1 * exp2_((a.m_s - r_s) * Consts<acc_t>::kLog2e) +
              b.sum_1 * exp2_((b.m_s - r_s) * Consts<acc_t>::kLog2e);
  }
  a.m_s = m_s;
  a.m_t = m_t;
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor(const RowState<acc_t>& st, int mask) {
  RowState<acc_t> o;
  o.m_s = __shfl_xor_sync(0xffffffffu, st.m_s, mask);
  o.m_t = __shfl_xor_sync(0xffffffffu, st.m_t, mask);
  o.sum_s = __shfl_xor_sync(0xffffffffu, st.sum_s, mask);
  o.sum_t = __shfl_xor_sync(0xffffffffu, st.sum_t, mask);
  o.a = __shfl_xor_sync(0xffffffffu, st.a, mask);
  o.sum_1 = __shfl_xor_sync(0xffffffffu, st.sum_1, mask);
  return o;
}

// Merges the states of all threads of the block; every thread gets the result.
// blockDim.x must be a multiple of 32 and at most kMaxThreads.
template <typename acc_t>
__device__ RowState<acc_t> block_reduce(RowState<acc_t> st, acc_t x_scale, bool sep_ce, RowState<acc_t>* smem) {
  for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl_xor(st, mask), x_scale, sep_ce);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : RowState<acc_t>::empty();
    for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl_xor(st, mask), x_scale, sep_ce);
    if (lane == 0) smem[kMaxWarps] = st;
  }
  __syncthreads();
  return smem[kMaxWarps];
}

// Loads this thread's kElems<VEC> elements of the chunk at `base`; past the row end: -inf.
// With VEC > 1 the host guarantees V % VEC == 0 and aligned rows, so a vector is all in or all out.
template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t vocab, int64_t base, acc_t (&out)[kElems<VEC>]) {
#pragma unroll
  for (int u = 0; u < kElems<VEC> / VEC; ++u) {
    const int64_t i = slot_index<VEC>(base, u);
    if (i < vocab) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(row + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[u * VEC + k] = load_as<acc_t>(&v.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[u * VEC + k] = neg_inf<acc_t>();
    }
  }
}

template <typename scalar_s, typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) kd_forward_kernel(const scalar_s* __restrict__ student,
                                                                 const scalar_t* __restrict__ teacher,
                                                                 const int64_t* __restrict__ labels,
                                                                 acc_t* __restrict__ row_loss,
                                                                 scalar_s* __restrict__ grad,
                                                                 const KdParams<acc_t> p) {
  __shared__ RowState<acc_t> smem[kMaxWarps + 1];
  const int64_t row = blockIdx.x;
  if (p.gs.skip(row)) return;  // the forward's gradient stands: no traffic (uniform per block)
  const int64_t vocab = p.vocab;
  const scalar_s* s_row = student + row * vocab;
  const scalar_t* t_row = teacher + row * vocab;
  scalar_s* g_row = grad == nullptr ? nullptr : grad + row * vocab;

  // The label is the same for the whole block, so these branches are uniform.
  int64_t label = -1;
  if (labels != nullptr) {
    label = labels[row];
    if (label == p.ignore_index || label < 0 || label >= vocab) {
      const bool bad = label != p.ignore_index;
      if (threadIdx.x == 0) row_loss[row] = bad ? quiet_nan<acc_t>() : acc_t(0);
      if (g_row != nullptr) {
        fill_row<VEC>(g_row, vocab, store_as<scalar_s>(bad ? quiet_nan<acc_t>() : acc_t(0)));
      }
      return;
    }
  }

  const acc_t xs = p.x_scale;
  const acc_t log2e = Consts<acc_t>::kLog2e;
  const bool sep_ce = p.has_ce && !p.same_t;
  constexpr int kE = kElems<VEC>;
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * kE;
  const int64_t n_chunks = (vocab + chunk - 1) / chunk;

  // Pass 1: per-thread online statistics, one rescale per chunk.
  RowState<acc_t> st = RowState<acc_t>::empty();
  for (int64_t c = 0; c < n_chunks; ++c) {
    acc_t sv[kE], tv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunk, sv);
    load_chunk<VEC>(t_row, vocab, c * chunk, tv);
    acc_t cm_s = sv[0], cm_t = tv[0];
#pragma unroll
    for (int k = 1; k < kE; ++k) {
      cm_s = max_(cm_s, sv[k]);
      cm_t = max_(cm_t, tv[k]);
    }
    const acc_t m_s = max_(st.m_s, cm_s);
    const acc_t m_t = max_(st.m_t, cm_t);
    const acc_t r_s = ref_of(m_s);
    const acc_t r_t = ref_of(m_t);
    const acc_t f_t = exp2_((st.m_t - r_t) * xs);
    st.a = f_t * (st.a + st.sum_t * (((ref_of(st.m_t) - r_t) - (ref_of(st.m_s) - r_s)) * xs));
    st.sum_t *= f_t;
    st.sum_s *= exp2_((st.m_s - r_s) * xs);
    if (sep_ce) st.sum_1 *= exp2_((st.m_s - r_s) * log2e);
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const acc_t x = (sv[k] - r_s) * xs;
      const acc_t y = (tv[k] - r_t) * xs;
      const acc_t e_t = exp2_(y);
      st.sum_s += exp2_(x);
      st.sum_t += e_t;
      st.a += e_t == acc_t(0) ? acc_t(0) : e_t * (y - x);
      if (sep_ce) st.sum_1 += exp2_((sv[k] - r_s) * log2e);
    }
    st.m_s = m_s;
    st.m_t = m_t;
  }

  const RowState<acc_t> tot = block_reduce(st, xs, sep_ce, smem);
  const acc_t r_s = ref_of(tot.m_s);
  const acc_t r_t = ref_of(tot.m_t);
  const acc_t sum_1 = p.same_t ? tot.sum_s : tot.sum_1;

  if (threadIdx.x == 0) {
    const acc_t kl = Consts<acc_t>::kLn2 * (tot.a / tot.sum_t + log2_(tot.sum_s) - log2_(tot.sum_t));
    acc_t loss = p.soft_loss_coef * (p.soft_loss_t * kl);
    if (p.has_ce) loss += p.hard_weight * (Consts<acc_t>::kLn2 * log2_(sum_1) + (r_s - load_as<acc_t>(s_row + label)));
    row_loss[row] = loss;
  }
  if (g_row == nullptr) return;

  // Pass 2: the gradient, last chunk first.
  const acc_t scale = (p.scale_ptr != nullptr ? static_cast<acc_t>(*p.scale_ptr) : p.host_scale) * p.gs.of(row);
  const acc_t k_soft = p.soft_grad_coef * scale;
  const acc_t k_hard = p.hard_weight * scale;
  const acc_t inv_s = acc_t(1) / tot.sum_s;
  const acc_t inv_t = acc_t(1) / tot.sum_t;
  const acc_t inv_1 = acc_t(1) / sum_1;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    acc_t sv[kE], tv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunk, sv);
    load_chunk<VEC>(t_row, vocab, c * chunk, tv);
#pragma unroll
    for (int u = 0; u < kE / VEC; ++u) {
      const int64_t i = slot_index<VEC>(c * chunk, u);
      if (i >= vocab) continue;
      Vec<scalar_s, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t s = sv[u * VEC + k];
        const acc_t q = exp2_((s - r_s) * xs) * inv_s;
        const acc_t pt = exp2_((tv[u * VEC + k] - r_t) * xs) * inv_t;
        acc_t g = k_soft * (q - pt);
        if (p.has_ce) {
          const acc_t sm = p.same_t ? q : exp2_((s - r_s) * log2e) * inv_1;
          g += k_hard * (sm - (i + k == label ? acc_t(1) : acc_t(0)));
        }
        out.v[k] = store_as<scalar_s>(g);
      }
      *reinterpret_cast<Vec<scalar_s, VEC>*>(g_row + i) = out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Every other divergence, and ensembles of teachers: kd_div_kernel.
//
// Per row (q = softmax(s/T); p = softmax(t/T), or the mixture sum_m w_m softmax(t_m/T)), every
// divergence's gradient is dL/d(s/T) = k q (x - c), c = sum q x (kl: q - p); x, k and the loss:
//
//   reverse_kl  L = sum q (lq - lp)                            x = lq - lp              k = 1
//   jsd         L = b sum p (lp - lm) + (1-b) sum q (lq - lm)  x = lq - lm              k = 1-b
//   tvd         L = 1/2 sum |p - q|                            x = sign(q - p)          k = 1/2
//   skew_kl     L = sum p (lp - lm), m = b p + (1-b) q         x = -p/m                 k = 1-b
//   skew_rkl    L = sum q (lq - lm), m = (1-b) p + b q         x = (lq - lm) - b q/m    k = 1
//   kl          (ensembles only here) L = sum p (lp - lq), gradient q - p
//
// Pass 1: online (max, sum) of the student (and of one teacher), merged across the block; for an
// ensemble, then per teacher m, its reference r_m and c_m = log2 w_m - log2 S_m, kept in shared
// memory. Pass 2: per entry, log2 q = (s - r_s) log2(e)/T - log2 S_s and log2 p exactly (one
// teacher: likewise; an ensemble: an online log-sum-exp over the teachers), log2 m as a
// log-sum-exp, max(A, B) + log2(1 + 2^-|A-B|), never the log of a sum of probabilities (finite
// where float32 probabilities underflow), and the skews' p/m, q/m from that 2^-|A-B|; the loss
// terms and q x are summed over the block. Pass 3 recomputes the per-entry values and writes the
// gradient. An entry where p and q are both 0 (masked vocabulary) contributes 0 and gets 0: its
// terms are taken only where their weight (p or q) is nonzero.
// Memory traffic: read 3 (M+1) N V (passes 2 and 3 re-read the row, from L2 while it stays
// there), write N V.
// ---------------------------------------------------------------------------------------------

enum : int { kDivKL = 0, kDivReverseKL = 1, kDivJSD = 2, kDivTVD = 3, kDivSkewKL = 4, kDivSkewReverseKL = 5 };
static_assert(kDivKL == int(Divergence::KL) && kDivReverseKL == int(Divergence::ReverseKL) && kDivJSD == int(Divergence::JSD) &&
                  kDivTVD == int(Divergence::TVD) && kDivSkewKL == int(Divergence::SkewKL) &&
                  kDivSkewReverseKL == int(Divergence::SkewReverseKL),
              "kd_div_kernel's divergence codes are kd_args.h's Divergence");

template <typename acc_t>
struct DivParams {
  int64_t vocab;
  int64_t ignore_index;
  int64_t n_teachers;      // 1 unless mix
  int64_t teacher_stride;  // N * V
  acc_t x_scale;           // log2(e) / T
  acc_t soft_loss_coef;    // (1 - a) * (T or 1)
  acc_t soft_loss_t;       // T or 1
  acc_t hard_weight;       // a
  acc_t soft_grad_coef;    // (1 - a) * (T or 1/T) * k, before the reduction scale
  acc_t beta, log2_b, log2_1mb;  // b, log2 b, log2(1 - b) (0 where unused)
  acc_t log2_uniform;      // -log2(M)
  const acc_t* log2_w;     // [M] log2 of the teacher weights, or null (uniform)
  const acc_t* scale_ptr;  // device reduction scale (batchmean with labels), or null
  acc_t host_scale;        // reduction scale when scale_ptr is null
  GradScale<acc_t> gs;     // grad_scale (cuda_common.cuh)
  int divergence;
  bool mix, has_ce, same_t;
};

template <typename acc_t, int N>
struct Fields {
  acc_t v[N];
};

// Merges the Fields of every thread of the block with merge(a, b); every thread gets the result.
template <typename acc_t, int N, typename Merge>
__device__ Fields<acc_t, N> block_allreduce(Fields<acc_t, N> st, const Fields<acc_t, N>& empty, Merge merge,
                                            Fields<acc_t, N>* smem) {
  auto shfl = [](const Fields<acc_t, N>& f, int mask) {
    Fields<acc_t, N> o;
#pragma unroll
    for (int i = 0; i < N; ++i) o.v[i] = __shfl_xor_sync(0xffffffffu, f.v[i], mask);
    return o;
  };
  for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl(st, mask));
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : empty;
    for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl(st, mask));
    if (lane == 0) smem[kMaxWarps] = st;
  }
  __syncthreads();
  return smem[kMaxWarps];
}

// (m, s) <- (m, s) merged with (mb, sb): online sums of 2^((x - ref(m)) * scale).
template <typename acc_t>
__device__ __forceinline__ void merge_max_sum(acc_t& m, acc_t& s, acc_t mb, acc_t sb, acc_t scale) {
  const acc_t nm = max_(m, mb);
  const acc_t r = ref_of(nm);
  s = s * exp2_((m - r) * scale) + sb * exp2_((mb - r) * scale);
  m = nm;
}

// The loss term t1 and x of one entry (see the table above), from q, p and their base-2 logs.
template <typename acc_t>
__device__ __forceinline__ void div_terms(const DivParams<acc_t>& P, acc_t q, acc_t lq2, acc_t pp, acc_t lp2, acc_t& t1,
                                          acc_t& x) {
  const acc_t ln2 = Consts<acc_t>::kLn2;
  const acc_t zero = acc_t(0), one = acc_t(1);
  switch (P.divergence) {
    case kDivKL:
      x = pp;
      t1 = pp == zero ? zero : pp * (ln2 * (lp2 - lq2));
      break;
    case kDivReverseKL:
      x = ln2 * (lq2 - lp2);
      t1 = zero;
      break;
    case kDivTVD: {
      const acc_t d = q - pp;
      x = d > zero ? one : (d < zero ? -one : zero);
      t1 = d < zero ? -d : d;
      break;
    }
    default: {
      acc_t a, b;
      if (P.divergence == kDivSkewReverseKL) {
        a = P.log2_1mb + lp2;
        b = P.log2_b + lq2;
      } else {
        a = P.log2_b + lp2;
        b = P.log2_1mb + lq2;
      }
      const acc_t ab = a - b;
      const acc_t e = exp2_(ab < zero ? ab : -ab);  // NaN (both -inf) stays NaN
      const acc_t lm2 = max_(a, b) + log2_(one + e);
      if (P.divergence == kDivJSD) {
        x = ln2 * (lq2 - lm2);
        t1 = pp == zero ? zero : pp * (ln2 * (lp2 - lm2));
      } else if (P.divergence == kDivSkewKL) {
        x = -(ab < zero ? e : one) / (P.beta * (one + e));
        t1 = pp == zero ? zero : pp * (ln2 * (lp2 - lm2));
      } else {
        const acc_t d = ln2 * (lq2 - lm2);
        x = d - (ab > zero ? e : one) / (one + e);
        t1 = q == zero ? zero : q * d;
      }
    }
  }
}

template <typename scalar_s, typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) kd_div_kernel(const scalar_s* __restrict__ student,
                                                             const scalar_t* __restrict__ teacher,
                                                             const int64_t* __restrict__ labels,
                                                             acc_t* __restrict__ row_loss, scalar_s* __restrict__ grad,
                                                             const DivParams<acc_t> p) {
  // An ensemble's per-teacher reference and c_m: 2 * n_teachers entries of dynamic shared memory.
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ Fields<acc_t, 5> smem5[kMaxWarps + 1];
  __shared__ Fields<acc_t, 2> smem2[kMaxWarps + 1];
  acc_t* const t_ref = reinterpret_cast<acc_t*>(dyn_smem);
  acc_t* const t_c = t_ref + p.n_teachers;

  const int64_t row = blockIdx.x;
  if (p.gs.skip(row)) return;  // the forward's gradient stands: no traffic (uniform per block)
  const int64_t vocab = p.vocab;
  const scalar_s* s_row = student + row * vocab;
  const scalar_t* t_row = teacher + row * vocab;  // teacher 0; teacher m at + m * teacher_stride
  scalar_s* g_row = grad == nullptr ? nullptr : grad + row * vocab;

  int64_t label = -1;
  if (labels != nullptr) {
    label = labels[row];
    if (label == p.ignore_index || label < 0 || label >= vocab) {
      const bool bad = label != p.ignore_index;
      if (threadIdx.x == 0) row_loss[row] = bad ? quiet_nan<acc_t>() : acc_t(0);
      if (g_row != nullptr) fill_row<VEC>(g_row, vocab, store_as<scalar_s>(bad ? quiet_nan<acc_t>() : acc_t(0)));
      return;
    }
  }

  const acc_t xs = p.x_scale;
  const acc_t log2e = Consts<acc_t>::kLog2e;
  const bool sep_ce = p.has_ce && !p.same_t;
  constexpr int kE = kElems<VEC>;
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * kE;
  const int64_t n_chunks = (vocab + chunk - 1) / chunk;
  const acc_t ninf = neg_inf<acc_t>();

  // Pass 1: the student's (and one teacher's) maximum and sums: m_s, sum_s, sum_1, m_t, sum_t.
  Fields<acc_t, 5> st{{ninf, acc_t(0), acc_t(0), ninf, acc_t(0)}};
  for (int64_t c = 0; c < n_chunks; ++c) {
    acc_t sv[kE], tv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunk, sv);
    if (!p.mix) load_chunk<VEC>(t_row, vocab, c * chunk, tv);
    acc_t cm_s = sv[0], cm_t = p.mix ? ninf : tv[0];
#pragma unroll
    for (int k = 1; k < kE; ++k) {
      cm_s = max_(cm_s, sv[k]);
      if (!p.mix) cm_t = max_(cm_t, tv[k]);
    }
    const acc_t m_s = max_(st.v[0], cm_s), r_s = ref_of(m_s);
    st.v[1] *= exp2_((st.v[0] - r_s) * xs);
    if (sep_ce) st.v[2] *= exp2_((st.v[0] - r_s) * log2e);
    const acc_t m_t = max_(st.v[3], cm_t), r_t = ref_of(m_t);
    if (!p.mix) st.v[4] *= exp2_((st.v[3] - r_t) * xs);
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      st.v[1] += exp2_((sv[k] - r_s) * xs);
      if (sep_ce) st.v[2] += exp2_((sv[k] - r_s) * log2e);
      if (!p.mix) st.v[4] += exp2_((tv[k] - r_t) * xs);
    }
    st.v[0] = m_s;
    st.v[3] = m_t;
  }
  const Fields<acc_t, 5> empty5{{ninf, acc_t(0), acc_t(0), ninf, acc_t(0)}};
  const Fields<acc_t, 5> tot = block_allreduce(
      st, empty5,
      [&](Fields<acc_t, 5>& a, const Fields<acc_t, 5>& b) {
        acc_t m1 = a.v[0], s1 = a.v[2];
        merge_max_sum(a.v[0], a.v[1], b.v[0], b.v[1], xs);
        if (sep_ce) {
          merge_max_sum(m1, s1, b.v[0], b.v[2], log2e);
          a.v[2] = s1;
        }
        merge_max_sum(a.v[3], a.v[4], b.v[3], b.v[4], xs);
      },
      smem5);
  const acc_t r_s = ref_of(tot.v[0]);
  const acc_t r_t = ref_of(tot.v[3]);
  const acc_t log2_ss = log2_(tot.v[1]);
  const acc_t log2_st = log2_(tot.v[4]);
  const acc_t sum_1 = p.same_t ? tot.v[1] : tot.v[2];

  if (p.mix) {
    const Fields<acc_t, 2> empty2{{ninf, acc_t(0)}};
    for (int64_t m = 0; m < p.n_teachers; ++m) {
      const scalar_t* tm = t_row + m * p.teacher_stride;
      Fields<acc_t, 2> ms = empty2;
      for (int64_t c = 0; c < n_chunks; ++c) {
        acc_t tv[kE];
        load_chunk<VEC>(tm, vocab, c * chunk, tv);
        acc_t cm = tv[0];
#pragma unroll
        for (int k = 1; k < kE; ++k) cm = max_(cm, tv[k]);
        const acc_t nm = max_(ms.v[0], cm), r = ref_of(nm);
        ms.v[1] *= exp2_((ms.v[0] - r) * xs);
#pragma unroll
        for (int k = 0; k < kE; ++k) ms.v[1] += exp2_((tv[k] - r) * xs);
        ms.v[0] = nm;
      }
      const Fields<acc_t, 2> tm_tot = block_allreduce(
          ms, empty2, [&](Fields<acc_t, 2>& a, const Fields<acc_t, 2>& b) { merge_max_sum(a.v[0], a.v[1], b.v[0], b.v[1], xs); },
          smem2);
      if (threadIdx.x == 0) {
        t_ref[m] = ref_of(tm_tot.v[0]);
        t_c[m] = (p.log2_w != nullptr ? p.log2_w[m] : p.log2_uniform) - log2_(tm_tot.v[1]);
      }
    }
    __syncthreads();
  }

  // log2 q and log2 p of this thread's entries of chunk c.
  auto entries = [&](int64_t c, acc_t (&sv)[kE], acc_t (&lq2)[kE], acc_t (&lp2)[kE]) {
    load_chunk<VEC>(s_row, vocab, c * chunk, sv);
#pragma unroll
    for (int k = 0; k < kE; ++k) lq2[k] = (sv[k] - r_s) * xs - log2_ss;
    if (!p.mix) {
      acc_t tv[kE];
      load_chunk<VEC>(t_row, vocab, c * chunk, tv);
#pragma unroll
      for (int k = 0; k < kE; ++k) lp2[k] = (tv[k] - r_t) * xs - log2_st;
      return;
    }
    acc_t acc[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) lp2[k] = ninf, acc[k] = acc_t(0);
    for (int64_t m = 0; m < p.n_teachers; ++m) {
      acc_t tv[kE];
      load_chunk<VEC>(t_row + m * p.teacher_stride, vocab, c * chunk, tv);
      const acc_t rm = t_ref[m], cm = t_c[m];
#pragma unroll
      for (int k = 0; k < kE; ++k) {
        // Online log-sum-exp: lp2 holds the running maximum until the end.
        const acc_t v = cm + (tv[k] - rm) * xs;
        const acc_t nb = max_(lp2[k], v), ref = ref_of(nb);
        acc[k] = acc[k] * exp2_(lp2[k] - ref) + exp2_(v - ref);
        lp2[k] = nb;
      }
    }
#pragma unroll
    for (int k = 0; k < kE; ++k) lp2[k] += log2_(acc[k]);  // all -inf: -inf + log2(0); NaN: NaN
  };

  // Pass 2: the row's statistics.
  Fields<acc_t, 2> sums{{acc_t(0), acc_t(0)}};
  for (int64_t c = 0; c < n_chunks; ++c) {
    acc_t sv[kE], lq2[kE], lp2[kE];
    entries(c, sv, lq2, lp2);
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const acc_t q = exp2_(lq2[k]), pp = exp2_(lp2[k]);
      acc_t t1, x;
      div_terms(p, q, lq2[k], pp, lp2[k], t1, x);
      sums.v[0] += t1;
      if (p.divergence != kDivKL) sums.v[1] += q == acc_t(0) ? acc_t(0) : q * x;
    }
  }
  const Fields<acc_t, 2> zero2{{acc_t(0), acc_t(0)}};
  const Fields<acc_t, 2> red = block_allreduce(
      sums, zero2,
      [](Fields<acc_t, 2>& a, const Fields<acc_t, 2>& b) {
        a.v[0] += b.v[0];
        a.v[1] += b.v[1];
      },
      smem2);
  const acc_t cstat = red.v[1];

  if (threadIdx.x == 0) {
    acc_t soft;
    switch (p.divergence) {
      case kDivReverseKL: soft = cstat; break;
      case kDivJSD: soft = p.beta * red.v[0] + (acc_t(1) - p.beta) * cstat; break;
      case kDivTVD: soft = acc_t(0.5) * red.v[0]; break;
      default: soft = red.v[0];
    }
    soft = soft < acc_t(0) ? acc_t(0) : soft;  // >= 0; rounding can leave -1e-9 at p == q (NaN kept)
    acc_t loss = p.soft_loss_coef * (p.soft_loss_t * soft);
    if (p.has_ce) loss += p.hard_weight * (Consts<acc_t>::kLn2 * log2_(sum_1) + (r_s - load_as<acc_t>(s_row + label)));
    row_loss[row] = loss;
  }
  if (g_row == nullptr) return;

  // Pass 3: the gradient, last chunk first.
  const acc_t scale = (p.scale_ptr != nullptr ? static_cast<acc_t>(*p.scale_ptr) : p.host_scale) * p.gs.of(row);
  const acc_t k_soft = p.soft_grad_coef * scale;
  const acc_t k_hard = p.hard_weight * scale;
  const acc_t inv_1 = acc_t(1) / sum_1;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    acc_t sv[kE], lq2[kE], lp2[kE];
    entries(c, sv, lq2, lp2);
#pragma unroll
    for (int u = 0; u < kE / VEC; ++u) {
      const int64_t i = slot_index<VEC>(c * chunk, u);
      if (i >= vocab) continue;
      Vec<scalar_s, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int e = u * VEC + k;
        const acc_t q = exp2_(lq2[e]), pp = exp2_(lp2[e]);
        acc_t t1, x;
        div_terms(p, q, lq2[e], pp, lp2[e], t1, x);
        acc_t g = p.divergence == kDivKL ? k_soft * (q - x) : (q == acc_t(0) ? acc_t(0) : k_soft * q * (x - cstat));
        if (p.has_ce) {
          const acc_t sm = p.same_t ? q : exp2_((sv[e] - r_s) * log2e) * inv_1;
          g += k_hard * (sm - (i + k == label ? acc_t(1) : acc_t(0)));
        }
        out.v[k] = store_as<scalar_s>(g);
      }
      *reinterpret_cast<Vec<scalar_s, VEC>*>(g_row + i) = out;
    }
  }
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<at::Half>{}); break;
    case at::kBFloat16: f(Tag<at::BFloat16>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    default: TORCH_CHECK(false, "fastkd::kd_forward (cuda): unsupported dtype ", st);
  }
}

template <typename S, typename T>
void launch(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, at::Tensor& row_loss,
            S* grad, const KdParams<acc_type_t<S, T>>& p) {
  using acc_t = acc_type_t<S, T>;
  constexpr int kVec = 4;
  const int64_t n_rows = student.size(0);
  const int64_t vocab = p.vocab;
  const S* s = student.const_data_ptr<S>();
  const T* t = teacher.const_data_ptr<T>();
  // Vector loads need every row to start on a vector boundary in all three arrays.
  const bool vec = vocab % kVec == 0 && aligned(s, kVec * sizeof(S)) && aligned(t, kVec * sizeof(T)) &&
                   (grad == nullptr || aligned(grad, kVec * sizeof(S)));
  const int threads = block_for_row(kBlockThreads, vocab, vec ? kElems<kVec> : kElems<1>);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(n_rows));
  acc_t* loss = row_loss.mutable_data_ptr<acc_t>();
  if (vec) {
    kd_forward_kernel<S, T, acc_t, kVec><<<grid, threads, 0, stream>>>(s, t, labels, loss, grad, p);
  } else {
    kd_forward_kernel<S, T, acc_t, 1><<<grid, threads, 0, stream>>>(s, t, labels, loss, grad, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename T>
void launch_div(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, at::Tensor& row_loss,
                S* grad, const DivParams<acc_type_t<S, T>>& p) {
  using acc_t = acc_type_t<S, T>;
  // Double accumulation holds twice the registers per element: with 4-wide loads (8 elements a
  // thread) the divergence kernel spills at the 128 registers kMaxThreads allows (the static
  // check, fastkd/gpu_static.py, measured 8-32 bytes of stack), with 2-wide loads it does not.
  constexpr int kVec = std::is_same_v<acc_t, double> ? 2 : 4;
  const int64_t n_rows = student.size(0);
  const int64_t vocab = p.vocab;
  const S* s = student.const_data_ptr<S>();
  const T* t = teacher.const_data_ptr<T>();
  // Vector loads need every row of every teacher to start on a vector boundary: V % kVec == 0
  // and aligned bases give that (the teacher stride N V is then a multiple of kVec too).
  const bool vec = vocab % kVec == 0 && aligned(s, kVec * sizeof(S)) && aligned(t, kVec * sizeof(T)) &&
                   (grad == nullptr || aligned(grad, kVec * sizeof(S)));
  const int threads = block_for_row(kBlockThreads, vocab, vec ? kElems<kVec> : kElems<1>);
  const size_t smem = p.mix ? 2 * static_cast<size_t>(p.n_teachers) * sizeof(acc_t) : 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(n_rows));
  acc_t* loss = row_loss.mutable_data_ptr<acc_t>();
  if (vec) {
    kd_div_kernel<S, T, acc_t, kVec><<<grid, threads, smem, stream>>>(s, t, labels, loss, grad, p);
  } else {
    kd_div_kernel<S, T, acc_t, 1><<<grid, threads, smem, stream>>>(s, t, labels, loss, grad, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> kd_impl(const at::Tensor& student, const at::Tensor& teacher,
                                           const std::optional<at::Tensor>& labels_opt,
                                           const std::optional<at::Tensor>& weights_opt, std::string_view divergence,
                                           double beta, double temperature, double hard_weight, int64_t ignore_index,
                                           std::string_view reduction, bool t2_scale, bool compute_grad,
                                           const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  constexpr const char* kOp = "fastkd::kd_forward (cuda): ";
  double b = beta;
  const Divergence dv = parse_divergence(divergence, &b, "fastkd::kd_forward (cuda)");
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "batchmean", kOp,
              "reduction must be 'none', 'sum' or 'batchmean', got '", std::string(reduction), "'");
  TORCH_CHECK(student.is_cuda(), kOp, "student must be a CUDA tensor, got device ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), kOp, "teacher is on ", teacher.device(), ", student on ",
              student.device());
  TORCH_CHECK(student.dim() == 2, kOp, "student must be 2-D [N, V], got shape ", student.sizes());
  const bool mix = teacher.dim() == 3;
  TORCH_CHECK(mix ? teacher.sizes().slice(1) == student.sizes() : teacher.sizes() == student.sizes(), kOp,
              "teacher shape ", teacher.sizes(), " is neither the student's ", student.sizes(), " nor [M, ",
              student.size(0), ", ", student.size(1), "]");
  const int64_t n_teachers = mix ? teacher.size(0) : 1;
  TORCH_CHECK(n_teachers >= 1 && n_teachers <= 1024, kOp, "between 1 and 1024 teachers, got ", n_teachers);
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), kOp, "student and teacher must be contiguous");
  TORCH_CHECK(is_float_dtype(student.scalar_type()), kOp,
              "student must be float32, float16, bfloat16 or float64, got ", student.scalar_type());
  TORCH_CHECK(is_float_dtype(teacher.scalar_type()), kOp,
              "teacher must be float32, float16, bfloat16 or float64, got ", teacher.scalar_type());
  TORCH_CHECK(temperature > 0, kOp, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_weight >= 0 && hard_weight <= 1, kOp, "hard_weight must be in [0, 1], got ", hard_weight);
  const at::Tensor* weights = weights_opt.has_value() && weights_opt->defined() ? &*weights_opt : nullptr;
  if (weights != nullptr) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == n_teachers && at::isFloatingType(weights->scalar_type()) &&
                    weights->device() == student.device(),
                kOp, "teacher_weights must be a float tensor of shape [", n_teachers, "] on ", student.device(), ", got ",
                weights->scalar_type(), " ", weights->sizes(), " on ", weights->device());
  }
  const int64_t n_rows = student.size(0);
  const int64_t vocab = student.size(1);
  TORCH_CHECK(n_rows <= std::numeric_limits<int32_t>::max(), kOp, "at most 2^31 - 1 rows, got ", n_rows);
  const at::Tensor* labels = labels_opt.has_value() && labels_opt->defined() ? &*labels_opt : nullptr;
  if (labels != nullptr) {
    TORCH_CHECK(labels->scalar_type() == at::kLong, kOp, "labels must be int64, got ", labels->scalar_type());
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n_rows, kOp, "labels must have shape [", n_rows,
                "], got ", labels->sizes());
    TORCH_CHECK(labels->device() == student.device(), kOp, "labels are on ", labels->device(), ", student on ",
                student.device());
    TORCH_CHECK(labels->is_contiguous(), kOp, "labels must be contiguous");
  }

  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options();
  // Row losses and the batchmean scale in the accumulation type; the loss is returned in float32,
  // or float64 for a float64 student.
  const bool acc_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const at::ScalarType acc_dtype = acc_double ? at::kDouble : at::kFloat;
  const at::ScalarType loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({n_rows}, opts.dtype(acc_dtype));
  at::Tensor grad = compute_grad ? grad_buffer(student, into, kOp) : at::empty({0}, opts);
  const at::Tensor gs = grad_scale_tensor(grad_scale, n_rows, student.device(), acc_dtype, kOp);

  // batchmean divides by the number of non-ignored rows, known only on the device. With none of
  // them every row loss and gradient row is 0, so any finite scale will do: clamp to 1.
  const bool batchmean = reduction == "batchmean";
  at::Tensor scale_t;
  if (batchmean && labels != nullptr) scale_t = labels->ne(ignore_index).sum().clamp_min(1).to(acc_dtype).reciprocal();
  const double host_scale = batchmean && labels == nullptr ? 1.0 / static_cast<double>(n_rows) : 1.0;

  if (n_rows > 0 && (mix || dv != Divergence::KL)) {
    const double log2e = 1.4426950408889634;
    const bool has_beta = dv == Divergence::JSD || dv == Divergence::SkewKL || dv == Divergence::SkewReverseKL;
    const double factor = dv == Divergence::JSD || dv == Divergence::SkewKL ? 1.0 - b : dv == Divergence::TVD ? 0.5 : 1.0;
    // log2 of the weights on the device, in the accumulation type: no host synchronisation.
    const at::Tensor log2_w = weights != nullptr ? weights->to(acc_dtype).log2().contiguous() : at::Tensor();
    dispatch_dtype(student.scalar_type(), [&](auto s_tag) {
      dispatch_dtype(teacher.scalar_type(), [&](auto t_tag) {
        using S = typename decltype(s_tag)::type;
        using T = typename decltype(t_tag)::type;
        using acc_t = acc_type_t<S, T>;
        DivParams<acc_t> p;
        p.vocab = vocab;
        p.ignore_index = ignore_index;
        p.n_teachers = n_teachers;
        p.teacher_stride = n_rows * vocab;
        p.x_scale = static_cast<acc_t>(log2e / temperature);
        p.soft_loss_coef = static_cast<acc_t>((1.0 - hard_weight) * (t2_scale ? temperature : 1.0));
        p.soft_loss_t = static_cast<acc_t>(t2_scale ? temperature : 1.0);
        p.hard_weight = static_cast<acc_t>(hard_weight);
        p.soft_grad_coef = static_cast<acc_t>((1.0 - hard_weight) * (t2_scale ? temperature : 1.0 / temperature) * factor);
        p.beta = static_cast<acc_t>(b);
        p.log2_b = static_cast<acc_t>(has_beta ? std::log2(b) : 0.0);
        p.log2_1mb = static_cast<acc_t>(has_beta ? std::log2(1.0 - b) : 0.0);
        p.log2_uniform = static_cast<acc_t>(-std::log2(static_cast<double>(n_teachers)));
        p.log2_w = log2_w.defined() ? log2_w.const_data_ptr<acc_t>() : nullptr;
        p.scale_ptr = scale_t.defined() ? scale_t.const_data_ptr<acc_t>() : nullptr;
        p.host_scale = static_cast<acc_t>(host_scale);
        p.gs = grad_scale_of<acc_t>(gs, into != nullptr);
        p.divergence = static_cast<int>(dv);
        p.mix = mix;
        p.has_ce = labels != nullptr && hard_weight > 0;
        p.same_t = temperature == 1.0;
        launch_div<S, T>(student, teacher, labels != nullptr ? labels->const_data_ptr<int64_t>() : nullptr, row_loss,
                         compute_grad ? grad.mutable_data_ptr<S>() : nullptr, p);
      });
    });
  } else if (n_rows > 0) {
    const double log2e = 1.4426950408889634;
    dispatch_dtype(student.scalar_type(), [&](auto s_tag) {
      dispatch_dtype(teacher.scalar_type(), [&](auto t_tag) {
        using S = typename decltype(s_tag)::type;
        using T = typename decltype(t_tag)::type;
        using acc_t = acc_type_t<S, T>;
        KdParams<acc_t> p;
        p.vocab = vocab;
        p.ignore_index = ignore_index;
        p.x_scale = static_cast<acc_t>(log2e / temperature);
        p.soft_loss_coef = static_cast<acc_t>((1.0 - hard_weight) * (t2_scale ? temperature : 1.0));
        p.soft_loss_t = static_cast<acc_t>(t2_scale ? temperature : 1.0);
        p.hard_weight = static_cast<acc_t>(hard_weight);
        p.soft_grad_coef = static_cast<acc_t>((1.0 - hard_weight) * (t2_scale ? temperature : 1.0 / temperature));
        p.scale_ptr = scale_t.defined() ? scale_t.const_data_ptr<acc_t>() : nullptr;
        p.host_scale = static_cast<acc_t>(host_scale);
        p.gs = grad_scale_of<acc_t>(gs, into != nullptr);
        p.has_ce = labels != nullptr && hard_weight > 0;
        p.same_t = temperature == 1.0;
        launch<S, T>(student, teacher, labels != nullptr ? labels->const_data_ptr<int64_t>() : nullptr, row_loss,
                     compute_grad ? grad.mutable_data_ptr<S>() : nullptr, p);
      });
    });
  }

  at::Tensor loss;
  if (reduction == "none") {
    loss = row_loss;
  } else if (reduction == "sum") {
    loss = row_loss.sum();
  } else if (scale_t.defined()) {
    loss = row_loss.sum() * scale_t;
  } else {
    loss = row_loss.sum() / static_cast<double>(n_rows);
  }
  return {loss.to(loss_dtype), into != nullptr ? at::empty({0}, opts) : grad};
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels,
                                                   const std::optional<at::Tensor>& weights, std::string_view divergence,
                                                   double beta, double temperature, double hard_weight,
                                                   int64_t ignore_index, std::string_view reduction, bool t2_scale,
                                                   bool compute_grad, const std::optional<at::Tensor>& grad_scale) {
  return kd_impl(student, teacher, labels, weights, divergence, beta, temperature, hard_weight, ignore_index, reduction,
                 t2_scale, compute_grad, grad_scale, nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp): blocks whose scale is 1 return.
void kd_forward_rescale_cuda(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights,
                             std::string_view divergence, double beta, double temperature, double hard_weight,
                             int64_t ignore_index, std::string_view reduction, bool t2_scale, const at::Tensor& grad_scale) {
  kd_impl(student, teacher, labels, weights, divergence, beta, temperature, hard_weight, ignore_index, reduction, t2_scale,
          true, grad_scale, &grad);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_forward", &fastkd::kd_forward_cuda);
  m.impl("kd_forward_rescale_", &fastkd::kd_forward_rescale_cuda);
}
