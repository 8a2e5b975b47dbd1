// Arguments of one fused temperature-KD pass over a block of rows, as plain data.
//
// Shared by the torch-facing wrappers (csrc/cpu/kd_cpu.cpp, csrc/cuda/kd_cuda.cu) and the
// per-instruction-set CPU kernels, which include no torch header: those are compiled with
// AVX-512/AVX2 code generation, and an inline torch function emitted there could be picked by
// the linker for the generic build too.
#pragma once
#include <cstdint>

namespace fastkd {

enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };

struct KdArgs {
  const void* student = nullptr;  // [N, V] contiguous, dtype student_dtype
  const void* teacher = nullptr;  // [N, V] contiguous, dtype teacher_dtype
  const int64_t* labels = nullptr;  // [N] or null
  void* grad = nullptr;           // [N, V] in student_dtype, or null when no gradient is wanted
  double* row_loss = nullptr;     // [N] per-row loss, before the reduction
  DType student_dtype = DType::Float32;
  DType teacher_dtype = DType::Float32;
  int64_t n_rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  // Coefficients in double: the compute type takes its precision from them (float64 input
  // computes in double and must not be rounded to float here), and T^2 alone leaves float's
  // range from T ~ 1.8e19.
  double inv_temperature = 1;  // 1 / T
  double soft_loss_coef = 1;   // (1 - hard_weight) * (T^2 or 1)
  double soft_grad_coef = 1;   // (1 - hard_weight) * (T or 1/T) * reduction scale
  double hard_weight = 0;      // CE weight in the loss
  double hard_grad_coef = 0;   // hard_weight * reduction scale
  bool stream_grad = false;     // write grad with non-temporal stores (it outgrows the caches)
};

}  // namespace fastkd
