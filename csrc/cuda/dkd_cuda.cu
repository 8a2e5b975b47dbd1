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
// Pass 1: every thread keeps the online KL statistics of online_softmax.cuh (KlState, in base 2;
// docs/design.md#online-softmax) over its strided entries of R (the target is loaded as -inf: it
// is in no maximum or sum), merged across the block by block_allreduce. Then
// NCKD = ln2 (A / S_t + log2 S_s - log2 S_t) and d_s = ln2 ((s_y - r_s) log2(e)/T - log2 S_s)
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
#include "online_softmax.cuh"

namespace fastkd {
namespace {

using namespace cuda_common;
using namespace online_softmax;

// Reads each row's student and teacher, writes its gradient, reads its label, writes its loss.
FASTKD_GPU_KERNEL_INFO(dkd_forward_kernel, "V*(2*$0+$1)+$2+8", FASTKD_ROW_THREADS);

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
  acc_t x_scale;          // log2(e) / T
  acc_t temperature;      // T; the loss's T^2 is applied as two factors (T^2 overflows float from 1.8e19)
  acc_t alpha;            // TCKD weight
  acc_t beta;             // NCKD weight
  RowScale<acc_t> scale;  // the reduction scale ("batchmean") and grad_scale
};

template <typename scalar_s, typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kRowMaxThreads) dkd_forward_kernel(const scalar_s* __restrict__ student,
                                                                     const scalar_t* __restrict__ teacher,
                                                                     const int64_t* __restrict__ labels,
                                                                     acc_t* __restrict__ row_loss,
                                                                     scalar_s* __restrict__ grad,
                                                                     const DkdParams<acc_t> p) {
  __shared__ KlState<acc_t> smem[kRowMaxWarps + 1];
  LabelledRow<scalar_s, scalar_t> r;  // labels are required
  if (!start_row<VEC>(student, teacher, grad, labels, row_loss, p, r)) return;
  const auto [row, vocab, label, s_row, t_row, g_row] = r;

  const acc_t xs = p.x_scale;
  constexpr int kE = kRowElems<VEC>;
  const Chunks<VEC> chunks(vocab);

  // Pass 1: per-thread online statistics over the non-target entries (the target loads as -inf).
  KlState<acc_t> st = KlState<acc_t>::empty();
  for (int64_t c = 0; c < chunks.count; ++c) {
    acc_t sv[kE], tv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunks.size, sv, SkipIndex{label});
    load_chunk<VEC>(t_row, vocab, c * chunks.size, tv, SkipIndex{label});
    st.add_chunk(sv, tv, xs);
  }

  const KlState<acc_t> tot = block_allreduce<kRowMaxWarps>(
      st, KlState<acc_t>::empty(), [&](KlState<acc_t>& a, const KlState<acc_t>& b) { a.merge(b, xs); }, smem);
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
    acc_t nckd = kl_of(tot, log2_ss, log2_st);
    nckd = nckd < acc_t(0) ? acc_t(0) : nckd;  // KL >= 0 (rounding); NaN fails the test and stays
    acc_t tckd = plogp_ratio(ls_t, ls_s) + plogp_ratio(ls_t_not, ls_s_not);
    tckd = tckd < acc_t(0) ? acc_t(0) : tckd;
    row_loss[row] = ((p.alpha * tckd + p.beta * nckd) * p.temperature) * p.temperature;
  }
  if (g_row == nullptr) return;

  // Pass 2: the gradient, last chunk first.
  const acc_t scale = p.scale.of(row);
  const acc_t k = p.temperature * scale;
  // q_y - p_y, from whichever side of 1/2 keeps the digits.
  const acc_t dq = d_s + d_t > acc_t(0) ? exp_(ls_t_not) - exp_(ls_s_not) : exp_(ls_s) - exp_(ls_t);
  const acc_t k_q = k * (p.beta - p.alpha * dq) / tot.sum_s;
  const acc_t k_p = k * p.beta / tot.sum_t;
  const acc_t g_y = k * p.alpha * dq;
  // The loads keep pass 1's test for a skipped index (-1 matches none): the shape under which the
  // float64 kernels fit in 128 registers on sm_90 (without the test, ptxas spilled two of them).
  acc_t sv[kE], tv[kE];
  write_grad_row<VEC>(
      g_row, vocab, chunks,
      [&](int64_t base) {
        load_chunk<VEC>(s_row, vocab, base, sv, SkipIndex{-1});
        load_chunk<VEC>(t_row, vocab, base, tv, SkipIndex{-1});
      },
      [&](int e, int64_t j) {
        const acc_t g = k_q * exp2_((sv[e] - r_s) * xs) - k_p * exp2_((tv[e] - r_t) * xs);
        return j == label ? g_y : g;
      });
}

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> dkd_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                            double temperature, double alpha, double beta, int64_t ignore_index,
                                            std::string_view reduction, bool compute_grad,
                                            const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  constexpr const char* kOp = "fastkd::dkd_forward (cuda): ";
  check_row_reduction(reduction, kOp);
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
  TORCH_CHECK(checked_labels(labels, n_rows, student.device(), kOp) != nullptr, kOp, "labels are required");

  const c10::cuda::CUDAGuard guard(student.device());
  // Row losses and the batchmean scale in the accumulation type; the loss is returned in float32,
  // or float64 for a float64 student.
  const bool acc_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const at::ScalarType acc_dtype = acc_double ? at::kDouble : at::kFloat;
  const at::ScalarType loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RowOutputs out(student, acc_dtype, &labels, ignore_index, reduction, compute_grad, grad_scale, into, kOp);

  if (n_rows > 0) {
    dispatch_dtypes(student.scalar_type(), teacher.scalar_type(), kOp, [&](auto s_tag, auto t_tag) {
        using S = typename decltype(s_tag)::type;
        using T = typename decltype(t_tag)::type;
        using acc_t = acc_type_t<S, T>;
        DkdParams<acc_t> p;
        p.vocab = vocab;
        p.ignore_index = ignore_index;
        p.x_scale = static_cast<acc_t>(1.4426950408889634 / temperature);
        p.temperature = static_cast<acc_t>(temperature);
        p.alpha = static_cast<acc_t>(alpha);
        p.beta = static_cast<acc_t>(beta);
        p.scale = out.row_scale<acc_t>(into != nullptr);
        const S* s = student.const_data_ptr<S>();
        const T* t = teacher.const_data_ptr<T>();
        S* g = compute_grad ? out.grad.mutable_data_ptr<S>() : nullptr;
        acc_t* loss = out.row_loss.mutable_data_ptr<acc_t>();
        const int64_t* l = labels.const_data_ptr<int64_t>();
        // Vector loads need every row to start on a vector boundary in all three arrays.
        launch_rows<4>(n_rows, vocab, {{s, sizeof(S)}, {t, sizeof(T)}, {g, sizeof(S)}},
                       [&](auto vec, dim3 grid, int threads, cudaStream_t stream) {
                         dkd_forward_kernel<S, T, acc_t, decltype(vec)::value><<<grid, threads, 0, stream>>>(s, t, l, loss, g, p);
                       });
    });
  }
  return {out.loss(loss_dtype), into != nullptr ? at::empty({0}, student.options()) : out.grad};
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
