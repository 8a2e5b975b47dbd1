// Feature-matching losses (FitNets hint, attention transfer): CUDA.
//
// hint_forward, features flattened to rows [B, D] (one row per sample), e = s - t:
//
//   mse        sum e^2                                  grad 2e
//   l1         sum |e|                                  grad sign(e)   (sign(NaN) = 0, as torch)
//   smooth_l1  sum (|e| < 1 ? e^2/2 : |e| - 1/2)        grad clamp(e, -1, 1)
//   cosine     1 - cos, cos = <s,t>/(Ns Nt), Ns = max(|s|, 1e-8)      grad -v/Ns + cos u/|s|
//   normalized_mse  sum (u - v)^2, u = s/Ns, v = t/Nt, Ns = max(|s|, 1e-12)
//                                                       grad 2/Ns ((1 - [|s|>=eps]<u,u-v>) u - v)
//
// One thread block per chunk of kHintChunk entries of one row (a 1-D grid of B * n_chunks
// blocks, so that a few large samples still fill the GPU). cosine and normalized_mse first run
// hint_sums_kernel (each chunk's |s|^2, |t|^2, <s,t>, every product kept exactly as its rounded
// value and its fma rounding error); ATen combines them per row in float64
// (the norms and the gradient's two coefficients, [B] values). hint_kernel then writes each
// chunk's part of the row loss (for cosine/normalized_mse summed entry by entry as (u - v)^2,
// so 1 - cos = |u - v|^2 / 2 does not cancel when cos is near 1) and its gradient. ATen sums the
// chunk parts per row. Memory traffic: read 2 B*D (twice for cosine/normalized_mse), write B*D.
//
// attention_transfer_forward, student x [B, Cs, HW], teacher y [B, Ct, HW]:
//   Q[b, j] = mean_c |x[b, c, j]|^p           at_channel_mean_kernel, once for x and once for y
//   a = Q / max(|Q|, 1e-12); row loss = sum_j (a_s - a_t)^2; w = dL/dQs * p / Cs (ATen, float64)
//   grad[b, c, j] = w[b, j] |x|^(p-1) sign(x)  at_grad_kernel
// Memory traffic: read B*Cs*HW twice and B*Ct*HW once, write B*Cs*HW.
//
// Accumulation is in float, or in double for a float64 student (a teacher of another dtype is
// converted to the student's compute type first, as the reference does).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "cuda_common.cuh"
#include "gpu_kernel_info.h"

namespace fastkd {
namespace {

using namespace cuda_common;

// Every kernel here runs blocks of this many threads (the attention tiles as kAtJ x kAtRows).
#define FASTKD_FEATURE_THREADS 256
constexpr int kThreads = FASTKD_FEATURE_THREADS;
constexpr int kWarps = kThreads / 32;
// Entries of a row one hint block handles (16 per thread).
constexpr int64_t kHintChunk = 16 * kThreads;
// Attention tiles: kAtJ spatial positions (one per thread of a warp) x kAtRows channel lanes.
constexpr int kAtJ = 32;
constexpr int kAtRows = kThreads / kAtJ;
static_assert(kThreads % 32 == 0 && kAtJ * kAtRows == kThreads, "whole warps, and attention tiles of kThreads threads");

// Bytes per row for the static report. hint: a row of [B, D], V = D; each of its chunks of
// kHintChunk entries also writes its partial sums (6, or 1 for hint_kernel), counted once here.
// hint_kernel reads s and t and writes the gradient; for cosine and normalized_mse it also reads
// the row's 4 parameters (4 * $2, not counted), after hint_sums_kernel has read s and t once more.
FASTKD_GPU_KERNEL_INFO(hint_sums_kernel, "V*($0+$1)+6*$2", FASTKD_FEATURE_THREADS);
FASTKD_GPU_KERNEL_INFO(hint_kernel, "V*(2*$0+$1)+$2", FASTKD_FEATURE_THREADS);
// Attention transfer: a row is one sample's feature map [C, HW], V = C * HW. The channel mean
// reads it and writes HW entries of q (HW * $1 on top); the gradient reads x and writes grad, its
// weights w[row, :] (HW * $1, shared by the channels) on top.
FASTKD_GPU_KERNEL_INFO(at_channel_mean_kernel, "V*$0", FASTKD_FEATURE_THREADS);
FASTKD_GPU_KERNEL_INFO(at_grad_kernel, "V*2*$0", FASTKD_FEATURE_THREADS);

constexpr double kCosineEps = 1e-8;
constexpr double kNormalizeEps = 1e-12;

enum HintKind : int { kMse = 0, kL1 = 1, kSmoothL1 = 2, kCosine = 3, kNormalizedMse = 4 };

template <typename acc_t>
__device__ __forceinline__ acc_t sign_of(acc_t x) {  // sign(NaN) = 0, as torch.sign
  return x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : acc_t(0));
}

// -- hint -----------------------------------------------------------------------------------

template <typename S, typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) hint_sums_kernel(const S* __restrict__ s, const T* __restrict__ t,
                                                             acc_t* __restrict__ part, int64_t dim, int64_t n_chunks,
                                                             const GradScale<acc_t> gs) {
  __shared__ acc_t smem[kWarps + 1];
  const int64_t pid = blockIdx.x;
  const int64_t row = pid / n_chunks;
  if (gs.skip(row)) return;  // the forward's gradient stands: no traffic (uniform per block)
  const int64_t lo = (pid % n_chunks) * kHintChunk;
  const int64_t hi = dim < lo + kHintChunk ? dim : lo + kHintChunk;
  const S* s_row = s + row * dim;
  const T* t_row = t + row * dim;
  // Each product as its rounded value plus its rounding error (fma(a, b, -a*b)), summed apart and
  // joined in double by the launcher: a row of one entry then gets cos = +-1 exactly.
  acc_t sum[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const acc_t x = load_as<acc_t>(s_row + i), y = load_as<acc_t>(t_row + i);
    const acc_t xx = x * x, yy = y * y, xy = x * y;
    sum[0] += xx;
    sum[1] += yy;
    sum[2] += xy;
    sum[3] += fma(x, x, -xx);
    sum[4] += fma(y, y, -yy);
    sum[5] += fma(x, y, -xy);
  }
#pragma unroll
  for (int k = 0; k < 6; ++k) {
    const acc_t total = block_sum<kWarps>(sum[k], smem);
    if (threadIdx.x == 0) part[pid * 6 + k] = total;
  }
}

template <typename S, typename T, typename acc_t, int KIND>
__global__ void __launch_bounds__(kThreads) hint_kernel(const S* __restrict__ s, const T* __restrict__ t,
                                                        S* __restrict__ grad, acc_t* __restrict__ part,
                                                        const acc_t* __restrict__ row_params, int64_t dim,
                                                        int64_t n_chunks, acc_t grad_coef, const GradScale<acc_t> gs) {
  __shared__ acc_t smem[kWarps + 1];
  const int64_t pid = blockIdx.x;
  const int64_t row = pid / n_chunks;
  if (gs.skip(row)) return;  // the forward's gradient stands: no traffic (uniform per block)
  // grad_scale: an elementwise kind's coefficient here; cosine and normalized_mse carry it in
  // row_params (the launcher).
  if constexpr (KIND != kCosine && KIND != kNormalizedMse) grad_coef *= gs.of(row);
  const int64_t lo = (pid % n_chunks) * kHintChunk;
  const int64_t hi = dim < lo + kHintChunk ? dim : lo + kHintChunk;
  const S* s_row = s + row * dim;
  const T* t_row = t + row * dim;
  S* g_row = grad == nullptr ? nullptr : grad + row * dim;
  acc_t n_s = 1, n_t = 1, c_u = 0, c_v = 0;
  if constexpr (KIND == kCosine || KIND == kNormalizedMse) {
    n_s = row_params[row * 4];
    n_t = row_params[row * 4 + 1];
    c_u = row_params[row * 4 + 2];
    c_v = row_params[row * 4 + 3];
  }
  acc_t loss = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const acc_t x = load_as<acc_t>(s_row + i), y = load_as<acc_t>(t_row + i);
    acc_t g;
    if constexpr (KIND == kMse) {
      const acc_t e = x - y;
      loss += e * e;
      g = (e + e) * grad_coef;
    } else if constexpr (KIND == kL1) {
      const acc_t e = x - y;
      loss += e < acc_t(0) ? -e : e;
      g = sign_of(e) * grad_coef;
    } else if constexpr (KIND == kSmoothL1) {
      const acc_t e = x - y;
      const acc_t a = e < acc_t(0) ? -e : e;
      const acc_t m = a > acc_t(1) ? acc_t(1) : a;  // NaN kept
      loss += acc_t(0.5) * m * m + (a - m);
      g = (e > acc_t(1) ? acc_t(1) : (e < acc_t(-1) ? acc_t(-1) : e)) * grad_coef;
    } else {
      // Divided, not multiplied by reciprocals, as the reference: equal directions give exactly 0.
      const acc_t u = x / n_s, v = y / n_t;
      const acc_t d = u - v;
      loss += d * d;
      g = c_u * u + c_v * v;
    }
    if (g_row != nullptr) g_row[i] = store_as<S>(g);
  }
  loss = block_sum<kWarps>(loss, smem);
  if (threadIdx.x == 0) part[pid] = loss;
}

// -- attention transfer ---------------------------------------------------------------------

// |x|^p for P = 1..4, any other p >= 1 with pow (P = 0).
template <int P, typename acc_t>
__device__ __forceinline__ acc_t at_power(acc_t x, acc_t p) {
  const acc_t a = x < acc_t(0) ? -x : x;
  if constexpr (P == 1) return a;
  if constexpr (P == 2) return x * x;
  if constexpr (P == 3) return a * x * x;
  if constexpr (P == 4) return (x * x) * (x * x);
  if constexpr (P == 0) return a == acc_t(0) ? acc_t(0) : pow(a, p);
}

// |x|^(p-1) sign(x) (sign(NaN) = 0 for p = 1, as torch).
template <int P, typename acc_t>
__device__ __forceinline__ acc_t at_power_slope(acc_t x, acc_t p) {
  const acc_t a = x < acc_t(0) ? -x : x;
  if constexpr (P == 1) return sign_of(x);
  if constexpr (P == 2) return x;
  if constexpr (P == 3) return a * x;
  if constexpr (P == 4) return x * x * x;
  if constexpr (P == 0) {
    if (x != x) return x;
    if (a == acc_t(0)) return acc_t(0);
    const acc_t m = pow(a, p - acc_t(1));
    return x > acc_t(0) ? m : -m;
  }
}

// Block (kAtJ, kAtRows): q[row, j] = mean over c of |x[row, c, j]|^p for kAtJ positions j.
template <typename T, typename acc_t, int P>
__global__ void __launch_bounds__(kThreads) at_channel_mean_kernel(const T* __restrict__ x, acc_t* __restrict__ q,
                                                                   int64_t channels, int64_t spatial, int64_t n_jb,
                                                                   acc_t p, const GradScale<acc_t> gs) {
  __shared__ acc_t smem[kAtRows][kAtJ];
  const int64_t row = blockIdx.x / n_jb;
  if (gs.skip(row)) return;  // a rescale's row left as it is: q unwritten, never read (uniform per block)
  const int64_t j = (blockIdx.x % n_jb) * kAtJ + threadIdx.x;
  acc_t acc = 0;
  if (j < spatial) {
    const T* base = x + row * channels * spatial + j;
    for (int64_t c = threadIdx.y; c < channels; c += kAtRows) acc += at_power<P>(load_as<acc_t>(base + c * spatial), p);
  }
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < spatial) {
    acc_t total = 0;
    for (int r = 0; r < kAtRows; ++r) total += smem[r][threadIdx.x];
    q[row * spatial + j] = total / acc_t(channels);
  }
}

// grad[i] = w[row, j] * |x[i]|^(p-1) sign(x[i]) over all B * C * HW entries.
template <typename S, typename acc_t, int P>
__global__ void __launch_bounds__(kThreads) at_grad_kernel(const S* __restrict__ x, const acc_t* __restrict__ w,
                                                           S* __restrict__ grad, int64_t total, int64_t channels,
                                                           int64_t spatial, acc_t p, const GradScale<acc_t> gs) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / (channels * spatial);
    if (gs.skip(row)) continue;  // grad_scale is in w; a rescale leaves a row whose scale is 1
    const int64_t j = i % spatial;
    grad[i] = store_as<S>(w[row * spatial + j] * at_power_slope<P>(load_as<acc_t>(x + i), p));
  }
}

// -- launchers ------------------------------------------------------------------------------

// A teacher of another dtype than the student is converted to the student's compute type
// (float32, or float64 for a float64 student), as the reference does; so the kernels are
// compiled for (S, S) and (16-bit S, float) only.
at::Tensor teacher_for(const at::Tensor& student, const at::Tensor& teacher) {
  if (teacher.scalar_type() == student.scalar_type()) return teacher;
  return teacher.to(student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// f(Tag<S>, Tag<T>) for a student and a teacher_for() it.
template <typename F>
void dispatch_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op, F&& f) {
  dispatch_dtype(student.scalar_type(), op, [&](auto s_tag) {
    using S = typename decltype(s_tag)::type;
    if (teacher.scalar_type() == student.scalar_type()) {
      f(s_tag, s_tag);
    } else if constexpr (std::is_same_v<S, at::Half> || std::is_same_v<S, at::BFloat16>) {
      f(s_tag, Tag<float>{});
    } else {
      TORCH_CHECK(false, op, "internal: teacher dtype ", teacher.scalar_type(), " for a ", student.scalar_type(), " student");
    }
  });
}

template <typename F>
void dispatch_p(double p, F&& f) {
  if (p == 1) return f(std::integral_constant<int, 1>{});
  if (p == 2) return f(std::integral_constant<int, 2>{});
  if (p == 3) return f(std::integral_constant<int, 3>{});
  if (p == 4) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 0>{});
}

void check_reduction(std::string_view reduction, const char* op) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
              "reduction must be 'mean', 'sum' or 'none', got '", std::string(reduction), "'");
}

double grad_coef_for(std::string_view reduction, double row_scale, int64_t n_rows) {
  return reduction == "none" ? row_scale : reduction == "sum" ? 1.0 : row_scale / double(n_rows);
}

// The op's loss from float64 raw row losses; float64 for a float64 student, else float32.
at::Tensor reduce_raw(const at::Tensor& raw, std::string_view reduction, double row_scale, at::ScalarType student) {
  const at::ScalarType loss_dtype = student == at::kDouble ? at::kDouble : at::kFloat;
  if (reduction == "none") return (raw * row_scale).to(loss_dtype);
  if (reduction == "sum") return raw.sum().to(loss_dtype);
  return (raw.sum() * (row_scale / double(raw.size(0)))).to(loss_dtype);
}

void check_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op) {
  TORCH_CHECK(student.is_cuda(), op, "student must be a CUDA tensor, got device ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), op, "teacher is on ", teacher.device(), ", student on ",
              student.device());
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), op, "student and teacher must be contiguous");
  TORCH_CHECK(is_float_dtype(student.scalar_type()), op, "student must be float32, float16, bfloat16 or float64, got ",
              student.scalar_type());
  TORCH_CHECK(is_float_dtype(teacher.scalar_type()), op, "teacher must be float32, float16, bfloat16 or float64, got ",
              teacher.scalar_type());
}

int hint_kind_code(std::string_view kind) {
  if (kind == "mse") return kMse;
  if (kind == "l1") return kL1;
  if (kind == "smooth_l1") return kSmoothL1;
  if (kind == "cosine") return kCosine;
  if (kind == "normalized_mse") return kNormalizedMse;
  return -1;
}

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> hint_impl(const at::Tensor& student, const at::Tensor& teacher_in, std::string_view kind,
                                             std::string_view reduction, bool compute_grad,
                                             const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  constexpr const char* kOp = "fastkd::hint_forward (cuda): ";
  const int code = hint_kind_code(kind);
  TORCH_CHECK(code >= 0, kOp, "kind must be mse, l1, smooth_l1, cosine or normalized_mse, got '", std::string(kind), "'");
  check_reduction(reduction, kOp);
  check_pair(student, teacher_in, kOp);
  TORCH_CHECK(student.dim() == 2 && teacher_in.sizes() == student.sizes(), kOp,
              "student and teacher must be [B, D] of the same shape, got ", student.sizes(), " and ", teacher_in.sizes());
  const at::Tensor teacher = teacher_for(student, teacher_in);
  const int64_t n_rows = student.size(0), dim = student.size(1);
  TORCH_CHECK(n_rows > 0 && dim > 0, kOp, "empty features: shape ", student.sizes());
  const int64_t n_chunks = (dim + kHintChunk - 1) / kHintChunk;
  TORCH_CHECK(n_rows * n_chunks <= std::numeric_limits<int32_t>::max(), kOp, "too many rows x chunks: ", n_rows * n_chunks);

  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = student.options().dtype(acc_dtype);
  at::Tensor grad = compute_grad ? grad_buffer(student, into, kOp) : at::empty({0}, student.options());
  at::Tensor part = at::empty({n_rows * n_chunks}, acc_opts);
  const at::Tensor gs_t = grad_scale_tensor(grad_scale, n_rows, student.device(), acc_dtype, kOp);
  const double row_scale = code == kCosine ? 1.0 : 1.0 / double(dim);
  const double grad_coef = grad_coef_for(reduction, row_scale, n_rows);
  const double eps = code == kCosine ? kCosineEps : kNormalizeEps;
  const dim3 grid(static_cast<unsigned int>(n_rows * n_chunks));

  at::Tensor ss, tt, st, n_s, n_t, c_s, c_t;
  dispatch_pair(student, teacher, kOp, [&](auto s_tag, auto t_tag) {
    {
      using S = typename decltype(s_tag)::type;
      using T = typename decltype(t_tag)::type;
      using acc_t = acc_type_t<S, T>;
      const S* s = student.const_data_ptr<S>();
      const T* t = teacher.const_data_ptr<T>();
      S* g = compute_grad ? grad.mutable_data_ptr<S>() : nullptr;
      const GradScale<acc_t> gs = grad_scale_of<acc_t>(gs_t, into != nullptr);
      at::Tensor row_params;
      if (code == kCosine || code == kNormalizedMse) {
        at::Tensor sums_part = at::empty({n_rows * n_chunks, 6}, acc_opts);
        hint_sums_kernel<S, T, acc_t><<<grid, kThreads, 0, stream>>>(s, t, sums_part.mutable_data_ptr<acc_t>(), dim, n_chunks, gs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const at::Tensor sums = sums_part.view({n_rows, n_chunks, 2, 3}).to(at::kDouble).sum(at::IntArrayRef{1, 2});
        ss = sums.select(1, 0), tt = sums.select(1, 1), st = sums.select(1, 2);
        n_s = ss.sqrt(), n_t = tt.sqrt();
        c_s = n_s.clamp_min(eps), c_t = n_t.clamp_min(eps);  // NaN stays NaN
        at::Tensor coef_u, coef_v;
        if (code == kCosine) {
          const at::Tensor cosine = st / (c_s * c_t);
          coef_u = at::where(n_s > 0, grad_coef * cosine / n_s, at::where(n_s == 0, at::zeros_like(n_s), n_s));
          coef_v = -grad_coef / c_s;
        } else {
          const at::Tensor ur = ss / (c_s * c_s) - st / (c_s * c_t);
          const at::Tensor keep = at::where(n_s >= eps, ur, at::where(n_s < eps, at::zeros_like(ur), n_s));
          coef_u = 2 * grad_coef / c_s * (1 - keep);
          coef_v = -2 * grad_coef / c_s;
        }
        if (gs_t.defined()) {  // grad_scale, per row, in float64 like the rest of the coefficients
          const at::Tensor go = gs_t.to(at::kDouble).expand({n_rows});
          coef_u = coef_u * go, coef_v = coef_v * go;
        }
        row_params = at::stack({c_s, c_t, coef_u, coef_v}, 1).to(acc_dtype).contiguous();
      }
      const acc_t* rp = row_params.defined() ? row_params.const_data_ptr<acc_t>() : nullptr;
      acc_t* pp = part.mutable_data_ptr<acc_t>();
      const acc_t gc = static_cast<acc_t>(grad_coef);
      switch (code) {
        case kMse: hint_kernel<S, T, acc_t, kMse><<<grid, kThreads, 0, stream>>>(s, t, g, pp, rp, dim, n_chunks, gc, gs); break;
        case kL1: hint_kernel<S, T, acc_t, kL1><<<grid, kThreads, 0, stream>>>(s, t, g, pp, rp, dim, n_chunks, gc, gs); break;
        case kSmoothL1:
          hint_kernel<S, T, acc_t, kSmoothL1><<<grid, kThreads, 0, stream>>>(s, t, g, pp, rp, dim, n_chunks, gc, gs);
          break;
        case kCosine: hint_kernel<S, T, acc_t, kCosine><<<grid, kThreads, 0, stream>>>(s, t, g, pp, rp, dim, n_chunks, gc, gs); break;
        default: hint_kernel<S, T, acc_t, kNormalizedMse><<<grid, kThreads, 0, stream>>>(s, t, g, pp, rp, dim, n_chunks, gc, gs);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  at::Tensor raw = part.view({n_rows, n_chunks}).to(at::kDouble).sum(1);
  if (code == kCosine) {
    // 1 - cos = |u - v|^2 / 2 + (1 - (|u|^2 + |v|^2) / 2), the second term 0 unless a norm was clamped
    const at::Tensor clamped = (n_s < kCosineEps).logical_or(n_t < kCosineEps);
    const at::Tensor correction = 1 - 0.5 * (ss / (c_s * c_s) + tt / (c_t * c_t));
    raw = 0.5 * raw + at::where(clamped, correction, at::zeros_like(correction));
  }
  return {reduce_raw(raw, reduction, row_scale, student.scalar_type()), into != nullptr ? at::empty({0}, student.options()) : grad};
}

std::tuple<at::Tensor, at::Tensor> attention_impl(const at::Tensor& student, const at::Tensor& teacher_in, double p,
                                                  std::string_view reduction, bool compute_grad,
                                                  const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  constexpr const char* kOp = "fastkd::attention_transfer_forward (cuda): ";
  check_reduction(reduction, kOp);
  check_pair(student, teacher_in, kOp);
  const at::Tensor teacher = teacher_for(student, teacher_in);
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3 && teacher.size(0) == student.size(0) &&
                  teacher.size(2) == student.size(2),
              kOp, "student [B, C_s, HW] and teacher [B, C_t, HW] must share B and HW, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(p >= 1 && std::isfinite(p), kOp, "p must be a finite number >= 1, got ", p);
  const int64_t n_rows = student.size(0), cs = student.size(1), ct = teacher.size(1), hw = student.size(2);
  TORCH_CHECK(n_rows > 0 && cs > 0 && ct > 0 && hw > 0, kOp, "empty feature map: ", student.sizes(), " and ", teacher.sizes());
  const int64_t n_jb = (hw + kAtJ - 1) / kAtJ;
  TORCH_CHECK(n_rows * n_jb <= std::numeric_limits<int32_t>::max(), kOp, "too many rows x spatial blocks");

  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool acc_double = student.scalar_type() == at::kDouble;
  const at::ScalarType acc_dtype = acc_double ? at::kDouble : at::kFloat;
  const auto acc_opts = student.options().dtype(acc_dtype);
  at::Tensor q_s = at::empty({n_rows, hw}, acc_opts), q_t = at::empty({n_rows, hw}, acc_opts);
  const dim3 block(kAtJ, kAtRows);
  const dim3 grid(static_cast<unsigned int>(n_rows * n_jb));
  const at::Tensor gs_t = grad_scale_tensor(grad_scale, n_rows, student.device(), acc_dtype, kOp);

  auto channel_mean = [&](const at::Tensor& x, at::Tensor& q) {
    dispatch_dtype(x.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      dispatch_p(p, [&](auto mode) {
        if constexpr (std::is_same_v<T, double>) {
          at_channel_mean_kernel<T, double, decltype(mode)::value><<<grid, block, 0, stream>>>(
              x.const_data_ptr<T>(), q.mutable_data_ptr<double>(), x.size(1), hw, n_jb, p,
              grad_scale_of<double>(gs_t, into != nullptr));
        } else {
          at_channel_mean_kernel<T, float, decltype(mode)::value><<<grid, block, 0, stream>>>(
              x.const_data_ptr<T>(), q.mutable_data_ptr<float>(), x.size(1), hw, n_jb, static_cast<float>(p),
              grad_scale_of<float>(gs_t, into != nullptr));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  };
  channel_mean(student, q_s);
  channel_mean(teacher, q_t);

  const at::Tensor qs = q_s.to(at::kDouble), qt = q_t.to(at::kDouble);
  const at::Tensor n_s = (qs * qs).sum(1).sqrt(), n_t = (qt * qt).sum(1).sqrt();
  const at::Tensor c_s = n_s.clamp_min(kNormalizeEps), c_t = n_t.clamp_min(kNormalizeEps);
  const at::Tensor a_s = qs / c_s.unsqueeze(1);
  const at::Tensor r = a_s - qt / c_t.unsqueeze(1);
  const at::Tensor raw = (r * r).sum(1);
  const double row_scale = 1.0 / double(hw);

  at::Tensor grad = compute_grad ? grad_buffer(student, into, kOp) : at::empty({0}, student.options());
  if (compute_grad) {
    const at::Tensor ar = (a_s * r).sum(1);
    const at::Tensor keep =
        at::where(n_s >= kNormalizeEps, ar, at::where(n_s < kNormalizeEps, at::zeros_like(ar), n_s));
    const double k = grad_coef_for(reduction, row_scale, n_rows) * 2.0 * p / double(cs);
    // grad_scale, per row, joins the float64 coefficients before w is rounded to acc_t.
    const at::Tensor coef = gs_t.defined() ? k / c_s * gs_t.to(at::kDouble).expand({n_rows}) : k / c_s;
    const at::Tensor w = (coef.unsqueeze(1) * (r - a_s * keep.unsqueeze(1))).to(acc_dtype).contiguous();
    const int64_t total = student.numel();
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
    dispatch_dtype(student.scalar_type(), kOp, [&](auto tag) {
      using S = typename decltype(tag)::type;
      dispatch_p(p, [&](auto mode) {
        if constexpr (std::is_same_v<S, double>) {
          at_grad_kernel<S, double, decltype(mode)::value><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
              student.const_data_ptr<S>(), w.const_data_ptr<double>(), grad.mutable_data_ptr<S>(), total, cs, hw, p,
              grad_scale_of<double>(gs_t, into != nullptr));
        } else {
          at_grad_kernel<S, float, decltype(mode)::value><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
              student.const_data_ptr<S>(), w.const_data_ptr<float>(), grad.mutable_data_ptr<S>(), total, cs, hw,
              static_cast<float>(p), grad_scale_of<float>(gs_t, into != nullptr));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {reduce_raw(raw, reduction, row_scale, student.scalar_type()), into != nullptr ? at::empty({0}, student.options()) : grad};
}

std::tuple<at::Tensor, at::Tensor> hint_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                     std::string_view kind, std::string_view reduction, bool compute_grad,
                                                     const std::optional<at::Tensor>& grad_scale) {
  return hint_impl(student, teacher, kind, reduction, compute_grad, grad_scale, nullptr);
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                   double p, std::string_view reduction, bool compute_grad,
                                                                   const std::optional<at::Tensor>& grad_scale) {
  return attention_impl(student, teacher, p, reduction, compute_grad, grad_scale, nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp): rows whose scale is 1 are left.
void hint_forward_rescale_cuda(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                               std::string_view kind, std::string_view reduction, const at::Tensor& grad_scale) {
  hint_impl(student, teacher, kind, reduction, true, grad_scale, &grad);
}

void attention_transfer_forward_rescale_cuda(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                             double p, std::string_view reduction, const at::Tensor& grad_scale) {
  attention_impl(student, teacher, p, reduction, true, grad_scale, &grad);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("hint_forward", &fastkd::hint_forward_cuda);
  m.impl("hint_forward_rescale_", &fastkd::hint_forward_rescale_cuda);  // grad_scale (csrc/ops.cpp)
  m.impl("attention_transfer_forward", &fastkd::attention_transfer_forward_cuda);
  m.impl("attention_transfer_forward_rescale_", &fastkd::attention_transfer_forward_rescale_cuda);
}
