// Arguments of one fused decoupled-KD pass over a block of rows, as plain data (see dtype.h
// for why the per-instruction-set kernels see no torch type).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastkd {

struct DkdArgs {
  const void* student = nullptr;    // [N, V] contiguous, dtype student_dtype
  const void* teacher = nullptr;    // [N, V] contiguous, dtype teacher_dtype
  const int64_t* labels = nullptr;  // [N], never null
  void* grad = nullptr;             // [N, V] in student_dtype, or null when no gradient is wanted
  double* row_loss = nullptr;       // [N] per-row loss, before the reduction
  DType student_dtype = DType::Float32;
  DType teacher_dtype = DType::Float32;
  int64_t n_rows = 0;
  int64_t vocab = 0;  // >= 2
  int64_t ignore_index = -100;
  // Coefficients in double (float64 input computes in double; T^2 alone leaves float's range
  // from T ~ 1.8e19).
  double inv_temperature = 1;  // 1 / T
  double tckd_loss_coef = 1;   // alpha * T^2
  double nckd_loss_coef = 8;   // beta * T^2
  double alpha_grad_coef = 1;  // alpha * T * reduction scale
  double beta_grad_coef = 8;   // beta * T * reduction scale
  const double* grad_row_scale = nullptr;  // [N] per-row gradient factor, or null (dtype.h)
  bool stream_grad = false;    // write grad with non-temporal stores (it outgrows the caches)
};

}  // namespace fastkd
