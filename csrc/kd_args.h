// Arguments of one fused temperature-KD pass over a block of rows, as plain data.
//
// Shared by the torch-facing wrapper (csrc/cpu/kd_cpu.cpp) and the
// per-instruction-set CPU kernels, which include no torch header: those are compiled with
// AVX-512/AVX2 code generation, and an inline torch function emitted there could be picked by
// the linker for the generic build too.
#pragma once
#include <cstddef>
#include <cstdint>

#include "divergence.h"
#include "dtype.h"
#include "row_args.h"

namespace fastkd {

struct KdArgs : RowArgs, KdCoefs {
  const void* teacher = nullptr;  // [M, N, V] contiguous (M = n_teachers, 1 for [N, V]), dtype teacher_dtype
  DType teacher_dtype = DType::Float32;
  // Ensemble: p = sum_m w_m softmax(t_m / T). teacher_weights: [n_teachers] host doubles, or null
  // for uniform weights.
  int64_t n_teachers = 1;
  const double* teacher_weights = nullptr;
  Divergence divergence = Divergence::KL;
  double beta = 0;  // the divergence's beta (jsd, skew_kl, skew_reverse_kl), already defaulted
};

// The per-thread scratch of the divergence/ensemble row kernel (csrc/cpu/divergence_kernel.h):
// 2 scratch rows (e_s and e_t/x) for one teacher, 3 for an ensemble (e_s, P/x and one teacher's
// e_m), then 3 doubles per teacher.
inline size_t divergence_scratch_bytes(int64_t vocab, int64_t n_teachers, size_t compute_size) {
  return (n_teachers > 1 ? 3 : 2) * scratch_row_bytes(vocab, compute_size) + 3 * size_t(n_teachers) * sizeof(double);
}

}  // namespace fastkd
