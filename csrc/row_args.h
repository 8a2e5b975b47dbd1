// The argument fields every fused softmax row op shares (KdArgs, SparseKdArgs, DkdArgs), as
// plain data: the student, its labels, the outputs and the rows' shape, all filled the same way
// by the CPU driver (cpu::RowCall::fill, csrc/cpu/cpu_common.h); and the temperature-KD
// coefficients of kd and sparse kd. See dtype.h for why the kernels see no torch type.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastkd {

struct RowArgs {
  const void* student = nullptr;    // [N, V] contiguous, dtype student_dtype
  const int64_t* labels = nullptr;  // [N] or null
  void* grad = nullptr;             // [N, V] in student_dtype, or null when no gradient is wanted
  double* row_loss = nullptr;       // [N] per-row loss, before the reduction
  DType student_dtype = DType::Float32;
  int64_t n_rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  const double* grad_row_scale = nullptr;  // [N] per-row gradient factor, or null (dtype.h)
  bool stream_grad = false;  // write grad with non-temporal stores (it outgrows the caches)
};

// Set by cpu::set_kd_coefs. In double: the compute type takes its precision from them (float64
// input computes in double and must not be rounded to float here), and T^2 alone leaves float's
// range from T ~ 1.8e19.
struct KdCoefs {
  double inv_temperature = 1;  // 1 / T
  double soft_loss_coef = 1;   // (1 - hard_weight) * (T^2 or 1)
  double soft_grad_coef = 1;   // (1 - hard_weight) * (T or 1/T) * reduction scale
  double hard_weight = 0;      // CE weight in the loss
  double hard_grad_coef = 0;   // hard_weight * reduction scale
};

}  // namespace fastkd
