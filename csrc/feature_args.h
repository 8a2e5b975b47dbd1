// Arguments of the feature-matching losses (hint, attention transfer) as plain data.
//
// Shared by the torch-facing wrapper (csrc/cpu/feature_cpu.cpp) and the per-instruction-set CPU
// kernels (csrc/cpu/feature_kernel.h), which include no torch header (see dtype.h for why).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastkd {

// fastkd::hint_forward's `kind`. The first three are elementwise (a row may be split into
// chunks that are computed independently); the last two need per-row sums first.
enum class HintKind : int32_t { Mse = 0, L1 = 1, SmoothL1 = 2, Cosine = 3, NormalizedMse = 4 };

constexpr bool hint_kind_is_elementwise(HintKind k) { return k == HintKind::Mse || k == HintKind::L1 || k == HintKind::SmoothL1; }

// Eps of the reference's clamped norms: F.cosine_similarity's default and F.normalize's default.
constexpr double kCosineEps = 1e-8;
constexpr double kNormalizeEps = 1e-12;

// The fields both feature losses share: the inputs, the gradient and how it is scaled.
struct FeatureArgs {
  const void* student = nullptr;  // contiguous, dtype student_dtype
  const void* teacher = nullptr;  // contiguous, dtype teacher_dtype
  void* grad = nullptr;           // like student, or null when no gradient is wanted
  DType student_dtype = DType::Float32;
  DType teacher_dtype = DType::Float32;
  int64_t n_rows = 0;
  // Multiplies the gradient of a row's raw loss (HintArgs and AttentionArgs say which): the
  // reduction's scale, with the raw loss's own normalisation (a mean over entries) folded in.
  double grad_coef = 1;
  const double* grad_row_scale = nullptr;  // [n_rows] per-row gradient factor, or null (dtype.h)
  bool stream_grad = false;  // write grad with non-temporal stores (it outgrows the caches)
};

// One call of fastkd::hint_forward over [n_rows, dim] features. The work is split into tasks:
// task i covers row i / n_chunks, entries [c * chunk, min(dim, (c + 1) * chunk)) with
// c = i % n_chunks (n_chunks is 1 for cosine and normalized_mse). The raw row loss (whose
// gradient grad_coef multiplies) is, elementwise, the sum of the per-entry terms; cosine: 1 - cos;
// normalized_mse: the sum of squared differences.
struct HintArgs : FeatureArgs {
  double* task_loss = nullptr;  // [n_rows * n_chunks]: each task's part of its row's raw loss
  HintKind kind = HintKind::Mse;
  int64_t dim = 0;
  int64_t chunk = 0;
  int64_t n_chunks = 1;
};

// One call of fastkd::attention_transfer_forward: student [n_rows, s_channels, spatial],
// teacher [n_rows, t_channels, spatial], one task per row (sample).
struct AttentionArgs : FeatureArgs {
  double* row_loss = nullptr;  // [n_rows]: the raw row loss, sum over spatial of (a_s - a_t)^2
  int64_t s_channels = 0;
  int64_t t_channels = 0;
  int64_t spatial = 0;
  double p = 2;  // the exponent of |x|^p, >= 1
};

}  // namespace fastkd
