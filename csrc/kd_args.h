// Arguments of one fused temperature-KD pass over a block of rows, as plain data.
//
// Shared by the torch-facing wrappers (csrc/cpu/kd_cpu.cpp, csrc/cuda/kd_cuda.cu) and the
// per-instruction-set CPU kernels, which include no torch header: those are compiled with
// AVX-512/AVX2 code generation, and an inline torch function emitted there could be picked by
// the linker for the generic build too.
#pragma once
#include <cstddef>
#include <cstdint>

#include "divergence.h"
#include "dtype.h"

namespace fastkd {

struct KdArgs {
  const void* student = nullptr;  // [N, V] contiguous, dtype student_dtype
  const void* teacher = nullptr;  // [M, N, V] contiguous (M = n_teachers, 1 for [N, V]), dtype teacher_dtype
  const int64_t* labels = nullptr;  // [N] or null
  void* grad = nullptr;           // [N, V] in student_dtype, or null when no gradient is wanted
  double* row_loss = nullptr;     // [N] per-row loss, before the reduction
  DType student_dtype = DType::Float32;
  DType teacher_dtype = DType::Float32;
  int64_t n_rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  // Ensemble: p = sum_m w_m softmax(t_m / T). teacher_weights: [n_teachers] host doubles, or null
  // for uniform weights.
  int64_t n_teachers = 1;
  const double* teacher_weights = nullptr;
  Divergence divergence = Divergence::KL;
  double beta = 0;  // the divergence's beta (jsd, skew_kl, skew_reverse_kl), already defaulted
  // Coefficients in double: the compute type takes its precision from them (float64 input
  // computes in double and must not be rounded to float here), and T^2 alone leaves float's
  // range from T ~ 1.8e19.
  double inv_temperature = 1;  // 1 / T
  double soft_loss_coef = 1;   // (1 - hard_weight) * (T^2 or 1)
  double soft_grad_coef = 1;   // (1 - hard_weight) * (T or 1/T) * reduction scale
  double hard_weight = 0;      // CE weight in the loss
  double hard_grad_coef = 0;   // hard_weight * reduction scale
  // Per-row factor of the gradient, [N] doubles (a per-row grad_output), or null for 1.
  const double* grad_row_scale = nullptr;
  bool stream_grad = false;     // write grad with non-temporal stores (it outgrows the caches)
};

// The per-thread scratch of the divergence/ensemble row kernel (csrc/cpu/divergence_kernel.h):
// 2 scratch rows (e_s and e_t/x) for one teacher, 3 for an ensemble (e_s, P/x and one teacher's
// e_m), then 3 doubles per teacher.
inline size_t divergence_scratch_bytes(int64_t vocab, int64_t n_teachers, size_t compute_size) {
  return (n_teachers > 1 ? 3 : 2) * scratch_row_bytes(vocab, compute_size) + 3 * size_t(n_teachers) * sizeof(double);
}

}  // namespace fastkd
