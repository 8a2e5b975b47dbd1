// Fused decoupled knowledge distillation (Zhao et al. 2022, the mdistiller formulation): CUDA.
//
// One thread block per row. With y the row's label, a = s/T, b = t/T, R = the non-target classes:
//
//   q = softmax(a), p = softmax(b);  q^, p^ = the softmaxes over R only (target removed)
//   d_s = a_y - lse_R(a),  d_t = b_y - lse_R(b)        the target's log-odds against the rest
//   log q_y = logsigmoid(d_s), log(1 - q_y) = logsigmoid(-d_s)   (likewise p: no 1 - x, so a
//                                                                 target that dominates the row
//                                                                 or vanishes stays finite)
//   TCKD = p_y log(p_y / q_y) + (1 - p_y) log((1 - p_y) / (1 - q_y))
//   NCKD = sum_R p^ (log p^ - log q^)
//   loss = T^2 (alpha TCKD + beta NCKD)
//
// Gradient (derivation): TCKD depends on a only through z = d_s, the logit of a two-class
// softmax, so dTCKD/dz = q_y - p_y, with dz/da_y = 1 and dz/da_j = -q^_j on R. NCKD is a KL of
// softmaxes over R: dNCKD/da_j = q^_j - p^_j on R, 0 at y. With d/ds = (1/T) d/da and the T^2:
//
//   dloss/ds_y = T alpha (q_y - p_y)
//   dloss/ds_j = T [(beta + alpha (p_y - q_y)) q^_j - beta p^_j]        (j in R)
//
// times the reduction scale (1 / valid rows for "batchmean", computed on the device, else 1).
//
// Pass 1: every thread keeps an online (max, sum) state over its strided elements of R (the
// target is loaded as -inf: it is in no maximum or sum), in base 2 as kd_cuda.cu:
// x = (s - r_s) log2(e)/T, y = (t - r_t) log2(e)/T with r_s, r_t the running maxima of the raw
// non-target logits (0 while still -inf), accumulating
//
//   S_s = sum_R 2^x,   S_t = sum_R 2^y,   A = sum_{R, 2^y != 0} 2^y (y - x)
//
// merged across the block with the same rescaling rule (warp shuffles, then shared memory).
// Then NCKD = ln2 (A / S_t + log2 S_s - log2 S_t) and d_s = ln2 ((s_y - r_s) log2(e)/T - log2 S_s)
// (d_t likewise). NaN inputs propagate through the sums (non-target) or d_s, d_t (target).
//
// Pass 2 re-reads the row, last chunk first (the one most likely still in L2), and writes the
// gradient; the target's entry gets T alpha (q_y - p_y) * scale. Ignored rows (label ==
// ignore_index) read nothing: loss 0, gradient 0. A label outside [0, V) that is not
// ignore_index gives a NaN loss and a NaN gradient row.
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
#include <string_view>
#include <tuple>
#include <type_traits>

#include "cuda_common.cuh"
#include "gpu_kernel_info.h"

namespace fastkd {
namespace {

using namespace cuda_common;

// Block sizes the launcher chooses from (the smallest whose chunk covers the row), recorded in
// the library for the static occupancy report. The largest is the kernel's __launch_bounds__;
// all are multiples of 32 (block_reduce needs whole warps).
#define FASTKD_DKD_THREADS 64, 128, 256, 512
constexpr int kBlockThreads[] = {FASTKD_DKD_THREADS};
// Reads each row's student and teacher, writes its gradient, reads its label, writes its loss.
FASTKD_GPU_KERNEL_INFO(dkd_forward_kernel, "V*(2*$0+$1)+$2+8", FASTKD_DKD_THREADS);
constexpr int kMaxThreads = kBlockThreads[std::size(kBlockThreads) - 1];
static_assert(valid_block_table(kBlockThreads), "kBlockThreads must be increasing multiples of 32");
constexpr int kMaxWarps = kMaxThreads / 32;
// Elements of each input a thread holds per chunk: kElems<VEC> / VEC loads of VEC elements.
template <int VEC>
constexpr int kElems = VEC == 1 ? 4 : 2 * VEC;

// log(sigmoid(x)) for any x: -inf at -inf; NaN stays NaN (the comparison fails).
template <typename acc_t>
__device__ __forceinline__ acc_t log_sigmoid(acc_t x) {
  return x >= acc_t(0) ? -log1p_(exp_(-x)) : x - log1p_(exp_(x));
}

// p (log p - log q) with p = exp(log_p); 0 where p == 0 (not 0 * inf).
template <typename acc_t>
__device__ __forceinline__ acc_t plogp_ratio(acc_t log_p, acc_t log_q) {
  const acc_t p = exp_(log_p);
  return p == acc_t(0) ? acc_t(0) : p * (log_p - log_q);
}

template <typename acc_t>
struct DkdParams {
  int64_t vocab;
  int64_t ignore_index;
  acc_t x_scale;           // log2(e) / T
  acc_t temperature;       // T; the loss's T^2 is applied as two factors (T^2 overflows float from 1.8e19)
  acc_t alpha;             // TCKD weight
  acc_t beta;              // NCKD weight
  const acc_t* scale_ptr;  // device reduction scale ("batchmean"), or null for 1
  GradScale<acc_t> gs;     // grad_scale (cuda_common.cuh)
};

// Online statistics of (part of) one row's non-target entries; see the comment at the top.
template <typename acc_t>
struct RowState {
  acc_t m_s, m_t;      // maxima of the raw student / teacher logits (-inf: nothing finite yet)
  acc_t sum_s, sum_t;  // sum 2^x, sum 2^y
  acc_t a;             // sum 2^y (y - x)

  __device__ __forceinline__ static RowState empty() {
    return {neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
  }
};

// a <- a merged with b; each side rescaled from its own references to the merged ones.
template <typename acc_t>
__device__ __forceinline__ void merge(RowState<acc_t>& a, const RowState<acc_t>& b, acc_t x_scale) {
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
  return o;
}

// Merges the states of all threads of the block; every thread gets the result.
// blockDim.x must be a multiple of 32 and at most kMaxThreads.
template <typename acc_t>
__device__ RowState<acc_t> block_reduce(RowState<acc_t> st, acc_t x_scale, RowState<acc_t>* smem) {
  for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl_xor(st, mask), x_scale);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : RowState<acc_t>::empty();
    for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl_xor(st, mask), x_scale);
    if (lane == 0) smem[kMaxWarps] = st;
  }
  __syncthreads();
  return smem[kMaxWarps];
}

// Loads this thread's kElems<VEC> elements of the chunk at `base`; past the row end and at index
// `skip` (the target, or -1): -inf. With VEC > 1 the host guarantees V % VEC == 0 and aligned
// rows, so a vector is all in or all out.
template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t vocab, int64_t base, int64_t skip,
                                           acc_t (&out)[kElems<VEC>]) {
#pragma unroll
  for (int u = 0; u < kElems<VEC> / VEC; ++u) {
    const int64_t i = slot_index<VEC>(base, u);
    if (i < vocab) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(row + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[u * VEC + k] = i + k == skip ? neg_inf<acc_t>() : load_as<acc_t>(&v.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[u * VEC + k] = neg_inf<acc_t>();
    }
  }
}

template <typename scalar_s, typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) dkd_forward_kernel(const scalar_s* __restrict__ student,
                                                                  const scalar_t* __restrict__ teacher,
                                                                  const int64_t* __restrict__ labels,
                                                                  acc_t* __restrict__ row_loss,
                                                                  scalar_s* __restrict__ grad,
                                                                  const DkdParams<acc_t> p) {
  __shared__ RowState<acc_t> smem[kMaxWarps + 1];
  const int64_t row = blockIdx.x;
  if (p.gs.skip(row)) return;  // the forward's gradient stands: no traffic (uniform per block)
  const int64_t vocab = p.vocab;
  const scalar_s* s_row = student + row * vocab;
  const scalar_t* t_row = teacher + row * vocab;
  scalar_s* g_row = grad == nullptr ? nullptr : grad + row * vocab;

  // The label is the same for the whole block, so these branches are uniform.
  const int64_t label = labels[row];
  if (label == p.ignore_index || label < 0 || label >= vocab) {
    const bool bad = label != p.ignore_index;
    if (threadIdx.x == 0) row_loss[row] = bad ? quiet_nan<acc_t>() : acc_t(0);
    if (g_row != nullptr) fill_row<VEC>(g_row, vocab, store_as<scalar_s>(bad ? quiet_nan<acc_t>() : acc_t(0)));
    return;
  }

  const acc_t xs = p.x_scale;
  constexpr int kE = kElems<VEC>;
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * kE;
  const int64_t n_chunks = (vocab + chunk - 1) / chunk;

  // Pass 1: per-thread online statistics over the non-target entries, one rescale per chunk.
  RowState<acc_t> st = RowState<acc_t>::empty();
  for (int64_t c = 0; c < n_chunks; ++c) {
    acc_t sv[kE], tv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunk, label, sv);
    load_chunk<VEC>(t_row, vocab, c * chunk, label, tv);
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
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const acc_t x = (sv[k] - r_s) * xs;
      const acc_t y = (tv[k] - r_t) * xs;
      const acc_t e_t = exp2_(y);
      st.sum_s += exp2_(x);
      st.sum_t += e_t;
      st.a += e_t == acc_t(0) ? acc_t(0) : e_t * (y - x);
    }
    st.m_s = m_s;
    st.m_t = m_t;
  }

  const RowState<acc_t> tot = block_reduce(st, xs, smem);
  const acc_t r_s = ref_of(tot.m_s);
  const acc_t r_t = ref_of(tot.m_t);
  const acc_t log2_ss = log2_(tot.sum_s);
  const acc_t log2_st = log2_(tot.sum_t);
  const acc_t ln2 = Consts<acc_t>::kLn2;
  const acc_t d_s = ln2 * ((load_as<acc_t>(s_row + label) - r_s) * xs - log2_ss);
  const acc_t d_t = ln2 * ((load_as<acc_t>(t_row + label) - r_t) * xs - log2_st);
  const acc_t ls_s = log_sigmoid(d_s), ls_s_not = log_sigmoid(-d_s);
  const acc_t ls_t = log_sigmoid(d_t), ls_t_not = log_sigmoid(-d_t);

  if (threadIdx.x == 0) {
    acc_t nckd = ln2 * (tot.a / tot.sum_t + log2_ss - log2_st);
    nckd = nckd < acc_t(0) ? acc_t(0) : nckd;  // KL >= 0 (rounding); NaN fails the test and stays
    acc_t tckd = plogp_ratio(ls_t, ls_s) + plogp_ratio(ls_t_not, ls_s_not);
    tckd = tckd < acc_t(0) ? acc_t(0) : tckd;
    row_loss[row] = ((p.alpha * tckd + p.beta * nckd) * p.temperature) * p.temperature;
  }
  if (g_row == nullptr) return;

  // Pass 2: the gradient, last chunk first.
  const acc_t scale = (p.scale_ptr != nullptr ? *p.scale_ptr : acc_t(1)) * p.gs.of(row);
  const acc_t k = p.temperature * scale;
  // q_y - p_y, from whichever side of 1/2 keeps the digits.
  const acc_t dq = d_s + d_t > acc_t(0) ? exp_(ls_t_not) - exp_(ls_s_not) : exp_(ls_s) - exp_(ls_t);
  const acc_t k_q = k * (p.beta - p.alpha * dq) / tot.sum_s;
  const acc_t k_p = k * p.beta / tot.sum_t;
  const acc_t g_y = k * p.alpha * dq;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    acc_t sv[kE], tv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunk, -1, sv);
    load_chunk<VEC>(t_row, vocab, c * chunk, -1, tv);
#pragma unroll
    for (int u = 0; u < kE / VEC; ++u) {
      const int64_t i = slot_index<VEC>(c * chunk, u);
      if (i >= vocab) continue;
      Vec<scalar_s, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t g = k_q * exp2_((sv[u * VEC + e] - r_s) * xs) - k_p * exp2_((tv[u * VEC + e] - r_t) * xs);
        out.v[e] = store_as<scalar_s>(i + e == label ? g_y : g);
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
    default: TORCH_CHECK(false, "fastkd::dkd_forward (cuda): unsupported dtype ", st);
  }
}

template <typename S, typename T>
void launch(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels, at::Tensor& row_loss, S* grad,
            const DkdParams<acc_type_t<S, T>>& p) {
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
    dkd_forward_kernel<S, T, acc_t, kVec><<<grid, threads, 0, stream>>>(s, t, labels, loss, grad, p);
  } else {
    dkd_forward_kernel<S, T, acc_t, 1><<<grid, threads, 0, stream>>>(s, t, labels, loss, grad, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> dkd_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                            double temperature, double alpha, double beta, int64_t ignore_index,
                                            std::string_view reduction, bool compute_grad,
                                            const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  constexpr const char* kOp = "fastkd::dkd_forward (cuda): ";
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "batchmean", kOp,
              "reduction must be 'none', 'sum' or 'batchmean', got '", std::string(reduction), "'");
  TORCH_CHECK(student.is_cuda(), kOp, "student must be a CUDA tensor, got device ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), kOp, "teacher is on ", teacher.device(), ", student on ",
              student.device());
  TORCH_CHECK(student.dim() == 2, kOp, "student must be 2-D [N, V], got shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), kOp, "teacher shape ", teacher.sizes(),
              " does not match student shape ", student.sizes());
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), kOp, "student and teacher must be contiguous");
  TORCH_CHECK(is_float_dtype(student.scalar_type()), kOp,
              "student must be float32, float16, bfloat16 or float64, got ", student.scalar_type());
  TORCH_CHECK(is_float_dtype(teacher.scalar_type()), kOp,
              "teacher must be float32, float16, bfloat16 or float64, got ", teacher.scalar_type());
  TORCH_CHECK(student.size(1) >= 2, kOp, "DKD needs at least 2 classes, got V = ", student.size(1));
  TORCH_CHECK(temperature > 0, kOp, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(alpha >= 0 && std::isfinite(alpha), kOp, "alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK(beta >= 0 && std::isfinite(beta), kOp, "beta must be finite and >= 0, got ", beta);
  const int64_t n_rows = student.size(0);
  const int64_t vocab = student.size(1);
  TORCH_CHECK(n_rows <= std::numeric_limits<int32_t>::max(), kOp, "at most 2^31 - 1 rows, got ", n_rows);
  TORCH_CHECK(labels.scalar_type() == at::kLong, kOp, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n_rows, kOp, "labels must have shape [", n_rows, "], got ",
              labels.sizes());
  TORCH_CHECK(labels.device() == student.device(), kOp, "labels are on ", labels.device(), ", student on ",
              student.device());
  TORCH_CHECK(labels.is_contiguous(), kOp, "labels must be contiguous");

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
  at::Tensor scale_t;
  if (reduction == "batchmean") scale_t = labels.ne(ignore_index).sum().clamp_min(1).to(acc_dtype).reciprocal();

  if (n_rows > 0) {
    const double log2e = 1.4426950408889634;
    dispatch_dtype(student.scalar_type(), [&](auto s_tag) {
      dispatch_dtype(teacher.scalar_type(), [&](auto t_tag) {
        using S = typename decltype(s_tag)::type;
        using T = typename decltype(t_tag)::type;
        using acc_t = acc_type_t<S, T>;
        DkdParams<acc_t> p;
        p.vocab = vocab;
        p.ignore_index = ignore_index;
        p.x_scale = static_cast<acc_t>(log2e / temperature);
        p.temperature = static_cast<acc_t>(temperature);
        p.alpha = static_cast<acc_t>(alpha);
        p.beta = static_cast<acc_t>(beta);
        p.scale_ptr = scale_t.defined() ? scale_t.const_data_ptr<acc_t>() : nullptr;
        p.gs = grad_scale_of<acc_t>(gs, into != nullptr);
        launch<S, T>(student, teacher, labels.const_data_ptr<int64_t>(), row_loss,
                     compute_grad ? grad.mutable_data_ptr<S>() : nullptr, p);
      });
    });
  }

  at::Tensor loss;
  if (reduction == "none") {
    loss = row_loss;
  } else if (reduction == "sum") {
    loss = row_loss.sum();
  } else {
    loss = row_loss.sum() * scale_t;
  }
  return {loss.to(loss_dtype), into != nullptr ? at::empty({0}, opts) : grad};
}

std::tuple<at::Tensor, at::Tensor> dkd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const at::Tensor& labels, double temperature, double alpha, double beta,
                                                    int64_t ignore_index, std::string_view reduction, bool compute_grad,
                                                    const std::optional<at::Tensor>& grad_scale) {
  return dkd_impl(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, compute_grad, grad_scale,
                  nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp): blocks whose scale is 1 return.
void dkd_forward_rescale_cuda(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& labels, double temperature, double alpha, double beta,
                              int64_t ignore_index, std::string_view reduction, const at::Tensor& grad_scale) {
  dkd_impl(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, true, grad_scale, &grad);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("dkd_forward", &fastkd::dkd_forward_cuda);
  m.impl("dkd_forward_rescale_", &fastkd::dkd_forward_rescale_cuda);
}
