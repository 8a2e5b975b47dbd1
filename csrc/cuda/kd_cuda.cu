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
// Pass 1: every thread keeps the online KL statistics of online_softmax.cuh (KlState: S_s, S_t
// and A over its strided entries, in base 2; docs/design.md#online-softmax) and, for the CE when
// T != 1, S_1 = sum e^(s - r_s) at the student's reference; block_allreduce merges them. Then
// KL = ln2 * (A / S_t + log2 S_s - log2 S_t).
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
#include "divergence.h"
#include "online_softmax.cuh"

namespace fastkd {
namespace {

using namespace cuda_common;
using namespace online_softmax;

// Reads and writes each row's student, teacher and gradient once, its label and its loss.
FASTKD_GPU_KERNEL_INFO(kd_forward_kernel, "V*(2*$0+$1)+$2+8", FASTKD_ROW_THREADS);
// The same for one teacher; an ensemble of M teachers reads M teacher rows (V*(2*$0+M*$1)+$2+8),
// which a formula in V and the template arguments cannot say.
FASTKD_GPU_KERNEL_INFO(kd_div_kernel, "V*(2*$0+$1)+$2+8", FASTKD_ROW_THREADS);

// The kd kernel's per-thread state: the KL statistics and, for the CE when T != 1,
// sum_1 = sum e^(s - r_s) at the student's reference.
template <typename acc_t>
struct KdState {
  KlState<acc_t> kl;
  acc_t sum_1;
};

// float64 asks for one block of 512 threads per SM, i.e. up to 128 registers: with only the
// thread bound, ptxas gave the sm_90 float64 kernel at one element per load 64 registers and it
// spilled (STACK 80 B) while its siblings took up to 126. float32 keeps the default (0: none).
template <typename acc_t>
constexpr int kMinBlocks = std::is_same_v<acc_t, double> ? 1 : 0;

template <typename scalar_s, typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kRowMaxThreads, kMinBlocks<acc_t>) kd_forward_kernel(
    const scalar_s* __restrict__ student, const scalar_t* __restrict__ teacher, const int64_t* __restrict__ labels,
    acc_t* __restrict__ row_loss, scalar_s* __restrict__ grad, const KdCoefs<acc_t> p) {
  __shared__ KdState<acc_t> smem[kRowMaxWarps + 1];
  LabelledRow<scalar_s, scalar_t> r;
  if (!start_row<VEC>(student, teacher, grad, labels, row_loss, p, r)) return;
  const auto [row, vocab, label, s_row, t_row, g_row] = r;

  const acc_t xs = p.x_scale;
  const acc_t log2e = Consts<acc_t>::kLog2e;
  const bool sep_ce = p.has_ce && !p.same_t;
  constexpr int kE = kRowElems<VEC>;
  const Chunks<VEC> chunks(vocab);

  // Pass 1: per-thread online statistics, one rescale per chunk.
  KdState<acc_t> st{KlState<acc_t>::empty(), acc_t(0)};
  for (int64_t c = 0; c < chunks.count; ++c) {
    acc_t sv[kE], tv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunks.size, sv);
    load_chunk<VEC>(t_row, vocab, c * chunks.size, tv);
    st.kl.add_chunk(sv, tv, xs, sep_ce, st.sum_1);
  }

  const KdState<acc_t> tot = block_allreduce<kRowMaxWarps>(
      st, KdState<acc_t>{KlState<acc_t>::empty(), acc_t(0)},
      [&](KdState<acc_t>& a, const KdState<acc_t>& b) {
        if (sep_ce) {
          a.sum_1 = merge_sums(a.sum_1, a.kl.m_s, b.sum_1, b.kl.m_s, ref_of(max_(a.kl.m_s, b.kl.m_s)), log2e);
        }
        a.kl.merge(b.kl, xs);
      },
      smem);
  const acc_t r_s = ref_of(tot.kl.m_s);
  const acc_t r_t = ref_of(tot.kl.m_t);
  const acc_t sum_1 = p.same_t ? tot.kl.sum_s : tot.sum_1;

  if (threadIdx.x == 0) {
    const acc_t kl = kl_of(tot.kl, log2_(tot.kl.sum_s), log2_(tot.kl.sum_t));
    row_loss[row] = p.row_loss(kl, sum_1, r_s, s_row, label);
  }
  if (g_row == nullptr) return;

  // Pass 2: the gradient, last chunk first.
  const auto [k_soft, k_hard] = p.grad_coefs(row);
  const acc_t inv_s = acc_t(1) / tot.kl.sum_s;
  const acc_t inv_t = acc_t(1) / tot.kl.sum_t;
  const acc_t inv_1 = acc_t(1) / sum_1;
  acc_t sv[kE], tv[kE];
  write_grad_row<VEC>(
      g_row, vocab, chunks,
      [&](int64_t base) {
        load_chunk<VEC>(s_row, vocab, base, sv);
        load_chunk<VEC>(t_row, vocab, base, tv);
      },
      [&](int e, int64_t j) {
        const acc_t s = sv[e];
        const acc_t q = exp2_((s - r_s) * xs) * inv_s;
        const acc_t pt = exp2_((tv[e] - r_t) * xs) * inv_t;
        acc_t g = k_soft * (q - pt);
        if (p.has_ce) g += ce_grad(k_hard, s, q, j == label, p.same_t, r_s, inv_1);
        return g;
      });
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
//   hellinger   L = 1/2 sum (sqrt p - sqrt q)^2                x = -sqrt(p/q)           k = 1/2
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

enum : int {
  kDivKL = 0, kDivReverseKL = 1, kDivJSD = 2, kDivTVD = 3, kDivSkewKL = 4, kDivSkewReverseKL = 5, kDivHellinger = 6
};
static_assert(kDivKL == int(Divergence::KL) && kDivReverseKL == int(Divergence::ReverseKL) && kDivJSD == int(Divergence::JSD) &&
                  kDivTVD == int(Divergence::TVD) && kDivSkewKL == int(Divergence::SkewKL) &&
                  kDivSkewReverseKL == int(Divergence::SkewReverseKL) && kDivHellinger == int(Divergence::Hellinger),
              "kd_div_kernel's divergence codes are divergence.h's Divergence");

template <typename acc_t>
struct DivParams : KdCoefs<acc_t> {
  int64_t n_teachers;      // 1 unless mix
  int64_t teacher_stride;  // N * V
  acc_t beta, log2_b, log2_1mb;  // b, log2 b, log2(1 - b) (0 where unused)
  acc_t log2_uniform;      // -log2(M)
  const acc_t* log2_w;     // [M] log2 of the teacher weights, or null (uniform)
  int divergence;
  bool mix;
};

// Pass 1's per-thread state: the student's online log-sum-exp (with sum_1 for the CE) and one
// teacher's (an ensemble's teachers come after, one at a time).
template <typename acc_t>
struct DivState {
  StudentLse<acc_t> s;
  Lse<acc_t> t;
};

// The loss terms and sum q x of pass 2.
template <typename acc_t>
struct DivSums {
  acc_t t1, qx;
};

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
    case kDivHellinger: {
      // x = -sqrt(p/q) is -inf at q = 0, where the callers take q x = 0.
      const acc_t sp = exp2_(acc_t(0.5) * lp2), sq = exp2_(acc_t(0.5) * lq2);
      x = -sp / sq;
      t1 = (sp - sq) * (sp - sq);
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
__global__ void __launch_bounds__(kRowMaxThreads) kd_div_kernel(const scalar_s* __restrict__ student,
                                                                const scalar_t* __restrict__ teacher,
                                                                const int64_t* __restrict__ labels,
                                                                acc_t* __restrict__ row_loss, scalar_s* __restrict__ grad,
                                                                const DivParams<acc_t> p) {
  // An ensemble's per-teacher reference and c_m: 2 * n_teachers entries of dynamic shared memory.
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ DivState<acc_t> smem_state[kRowMaxWarps + 1];
  __shared__ Lse<acc_t> smem_lse[kRowMaxWarps + 1];
  __shared__ DivSums<acc_t> smem_sums[kRowMaxWarps + 1];
  acc_t* const t_ref = reinterpret_cast<acc_t*>(dyn_smem);
  acc_t* const t_c = t_ref + p.n_teachers;

  LabelledRow<scalar_s, scalar_t> r;
  if (!start_row<VEC>(student, teacher, grad, labels, row_loss, p, r)) return;
  // t_row: teacher 0; teacher m at + m * teacher_stride.
  const auto [row, vocab, label, s_row, t_row, g_row] = r;

  const acc_t xs = p.x_scale;
  const bool sep_ce = p.has_ce && !p.same_t;
  constexpr int kE = kRowElems<VEC>;
  const Chunks<VEC> chunks(vocab);
  const acc_t ninf = neg_inf<acc_t>();

  // Pass 1: the student's (and one teacher's) maximum and sums.
  const DivState<acc_t> empty{StudentLse<acc_t>::empty(), Lse<acc_t>::empty()};
  DivState<acc_t> st = empty;
  for (int64_t c = 0; c < chunks.count; ++c) {
    acc_t sv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunks.size, sv);
    st.s.add_chunk(sv, xs, sep_ce);
    if (!p.mix) {
      acc_t tv[kE];
      load_chunk<VEC>(t_row, vocab, c * chunks.size, tv);
      st.t.add_chunk(tv, xs);
    }
  }
  const DivState<acc_t> tot = block_allreduce<kRowMaxWarps>(
      st, empty,
      [&](DivState<acc_t>& a, const DivState<acc_t>& b) {
        a.s.merge(b.s, xs, sep_ce);
        a.t.merge(b.t, xs);
      },
      smem_state);
  const acc_t r_s = ref_of(tot.s.lse.m);
  const acc_t r_t = ref_of(tot.t.m);
  const acc_t log2_ss = log2_(tot.s.lse.sum);
  const acc_t log2_st = log2_(tot.t.sum);
  const acc_t sum_1 = p.same_t ? tot.s.lse.sum : tot.s.sum_1;

  if (p.mix) {
    for (int64_t m = 0; m < p.n_teachers; ++m) {
      const scalar_t* tm = t_row + m * p.teacher_stride;
      Lse<acc_t> ms = Lse<acc_t>::empty();
      for (int64_t c = 0; c < chunks.count; ++c) {
        acc_t tv[kE];
        load_chunk<VEC>(tm, vocab, c * chunks.size, tv);
        ms.add_chunk(tv, xs);
      }
      const Lse<acc_t> tm_tot = block_allreduce<kRowMaxWarps>(
          ms, Lse<acc_t>::empty(), [&](Lse<acc_t>& a, const Lse<acc_t>& b) { a.merge(b, xs); }, smem_lse);
      if (threadIdx.x == 0) {
        t_ref[m] = ref_of(tm_tot.m);
        t_c[m] = (p.log2_w != nullptr ? p.log2_w[m] : p.log2_uniform) - log2_(tm_tot.sum);
      }
    }
    __syncthreads();
  }

  // log2 q and log2 p of this thread's entries of the chunk at base.
  auto entries = [&](int64_t base, acc_t (&sv)[kE], acc_t (&lq2)[kE], acc_t (&lp2)[kE]) {
    load_chunk<VEC>(s_row, vocab, base, sv);
#pragma unroll
    for (int k = 0; k < kE; ++k) lq2[k] = (sv[k] - r_s) * xs - log2_ss;
    if (!p.mix) {
      acc_t tv[kE];
      load_chunk<VEC>(t_row, vocab, base, tv);
#pragma unroll
      for (int k = 0; k < kE; ++k) lp2[k] = (tv[k] - r_t) * xs - log2_st;
      return;
    }
    acc_t acc[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) lp2[k] = ninf, acc[k] = acc_t(0);
    for (int64_t m = 0; m < p.n_teachers; ++m) {
      acc_t tv[kE];
      load_chunk<VEC>(t_row + m * p.teacher_stride, vocab, base, tv);
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
  DivSums<acc_t> sums{acc_t(0), acc_t(0)};
  for (int64_t c = 0; c < chunks.count; ++c) {
    acc_t sv[kE], lq2[kE], lp2[kE];
    entries(c * chunks.size, sv, lq2, lp2);
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const acc_t q = exp2_(lq2[k]), pp = exp2_(lp2[k]);
      acc_t t1, x;
      div_terms(p, q, lq2[k], pp, lp2[k], t1, x);
      sums.t1 += t1;
      if (p.divergence != kDivKL) sums.qx += q == acc_t(0) ? acc_t(0) : q * x;
    }
  }
  const DivSums<acc_t> red = block_allreduce<kRowMaxWarps>(
      sums, DivSums<acc_t>{acc_t(0), acc_t(0)},
      [](DivSums<acc_t>& a, const DivSums<acc_t>& b) {
        a.t1 += b.t1;
        a.qx += b.qx;
      },
      smem_sums);
  const acc_t cstat = red.qx;

  if (threadIdx.x == 0) {
    acc_t soft;
    switch (p.divergence) {
      case kDivReverseKL: soft = cstat; break;
      case kDivJSD: soft = p.beta * red.t1 + (acc_t(1) - p.beta) * cstat; break;
      case kDivTVD:
      case kDivHellinger: soft = acc_t(0.5) * red.t1; break;
      default: soft = red.t1;
    }
    soft = soft < acc_t(0) ? acc_t(0) : soft;  // >= 0; rounding can leave -1e-9 at p == q (NaN kept)
    row_loss[row] = p.row_loss(soft, sum_1, r_s, s_row, label);
  }
  if (g_row == nullptr) return;

  // Pass 3: the gradient, last chunk first.
  const auto [k_soft, k_hard] = p.grad_coefs(row);
  const acc_t inv_1 = acc_t(1) / sum_1;
  acc_t sv[kE], lq2[kE], lp2[kE];
  write_grad_row<VEC>(
      g_row, vocab, chunks, [&](int64_t base) { entries(base, sv, lq2, lp2); },
      [&](int e, int64_t j) {
        const acc_t q = exp2_(lq2[e]), pp = exp2_(lp2[e]);
        acc_t t1, x;
        div_terms(p, q, lq2[e], pp, lp2[e], t1, x);
        acc_t g = p.divergence == kDivKL ? k_soft * (q - x) : (q == acc_t(0) ? acc_t(0) : k_soft * q * (x - cstat));
        if (p.has_ce) g += ce_grad(k_hard, sv[e], q, j == label, p.same_t, r_s, inv_1);
        return g;
      });
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
  check_row_reduction(reduction, kOp);
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
  const at::Tensor* labels = checked_labels(labels_opt, n_rows, student.device(), kOp);

  const c10::cuda::CUDAGuard guard(student.device());
  // Row losses and the batchmean scale in the accumulation type; the loss is returned in float32,
  // or float64 for a float64 student.
  const bool acc_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const at::ScalarType acc_dtype = acc_double ? at::kDouble : at::kFloat;
  const at::ScalarType loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RowOutputs out(student, acc_dtype, labels, ignore_index, reduction, compute_grad, grad_scale, into, kOp);
  const int64_t* label_ptr = labels != nullptr ? labels->const_data_ptr<int64_t>() : nullptr;

  const bool plain_kl = !mix && dv == Divergence::KL;
  // The divergence's rules (whether it takes beta, its gradient factor) are divergence.h's, as on
  // the CPU: decided once for every backend.
  const bool has_beta = divergence_has_beta(dv);
  const double factor = divergence_grad_factor(dv, b);
  // log2 of the weights on the device, in the accumulation type: no host synchronisation.
  const at::Tensor log2_w = weights != nullptr && !plain_kl ? weights->to(acc_dtype).log2().contiguous() : at::Tensor();
  if (n_rows > 0) {
    dispatch_dtypes(student.scalar_type(), teacher.scalar_type(), kOp, [&](auto s_tag, auto t_tag) {
        using S = typename decltype(s_tag)::type;
        using T = typename decltype(t_tag)::type;
        using acc_t = acc_type_t<S, T>;
        const KdCoefs<acc_t> coefs = kd_coefs<acc_t>(vocab, ignore_index, temperature, hard_weight, t2_scale, factor,
                                                     labels != nullptr, out.row_scale<acc_t>(into != nullptr));
        const S* s = student.const_data_ptr<S>();
        const T* t = teacher.const_data_ptr<T>();
        S* g = compute_grad ? out.grad.mutable_data_ptr<S>() : nullptr;
        acc_t* loss = out.row_loss.mutable_data_ptr<acc_t>();
        // Vector loads need every row (of every teacher: the stride N V is then a multiple of the
        // width too) to start on a vector boundary in all three arrays.
        const std::initializer_list<Base> bases = {{s, sizeof(S)}, {t, sizeof(T)}, {g, sizeof(S)}};
        if (plain_kl) {
          launch_rows<4>(n_rows, vocab, bases, [&](auto vec, dim3 grid, int threads, cudaStream_t stream) {
            kd_forward_kernel<S, T, acc_t, decltype(vec)::value><<<grid, threads, 0, stream>>>(s, t, label_ptr, loss, g, coefs);
          });
          return;
        }
        DivParams<acc_t> p;
        static_cast<KdCoefs<acc_t>&>(p) = coefs;
        p.n_teachers = n_teachers;
        p.teacher_stride = n_rows * vocab;
        p.beta = static_cast<acc_t>(b);
        p.log2_b = static_cast<acc_t>(has_beta ? std::log2(b) : 0.0);
        p.log2_1mb = static_cast<acc_t>(has_beta ? std::log2(1.0 - b) : 0.0);
        p.log2_uniform = static_cast<acc_t>(-std::log2(static_cast<double>(n_teachers)));
        p.log2_w = log2_w.defined() ? log2_w.const_data_ptr<acc_t>() : nullptr;
        p.divergence = static_cast<int>(dv);
        p.mix = mix;
        const size_t smem = mix ? 2 * static_cast<size_t>(n_teachers) * sizeof(acc_t) : 0;
        // Double accumulation holds twice the registers per element: with 4-wide loads (8 elements
        // a thread) the divergence kernel spills at the 128 registers 512 threads allow (the static
        // check, tests/test_gpu_static.py, measured 8-32 bytes of stack), with 2-wide loads it does not.
        launch_rows<std::is_same_v<acc_t, double> ? 2 : 4>(n_rows, vocab, bases,
                                                           [&](auto vec, dim3 grid, int threads, cudaStream_t stream) {
          kd_div_kernel<S, T, acc_t, decltype(vec)::value><<<grid, threads, smem, stream>>>(s, t, label_ptr, loss, g, p);
        });
    });
  }
  return {out.loss(loss_dtype), into != nullptr ? at::empty({0}, student.options()) : out.grad};
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
