// Arguments of one fused decoupled-KD pass over a block of rows, as plain data (see dtype.h
// for why the per-instruction-set kernels see no torch type).
#pragma once
#include <cstdint>

#include "dtype.h"
#include "row_args.h"

namespace fastkd {

// labels: [N], never null; vocab >= 2.
struct DkdArgs : RowArgs {
  const void* teacher = nullptr;  // [N, V] contiguous, dtype teacher_dtype
  DType teacher_dtype = DType::Float32;
  // Coefficients in double (float64 input computes in double; T^2 alone leaves float's range
  // from T ~ 1.8e19).
  double inv_temperature = 1;  // 1 / T
  double tckd_loss_coef = 1;   // alpha * T^2
  double nckd_loss_coef = 8;   // beta * T^2
  double alpha_grad_coef = 1;  // alpha * T * reduction scale
  double beta_grad_coef = 8;   // beta * T * reduction scale
};

}  // namespace fastkd
