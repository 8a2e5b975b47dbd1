// Arguments of one fused sparse-teacher KD pass over a block of rows, as plain data.
//
// Shared by the torch-facing wrapper (csrc/cpu/sparse_kd_cpu.cpp) and the per-instruction-set
// CPU kernels (csrc/cpu/sparse_kd_kernel.h), which include no torch header (see dtype.h).
#pragma once
#include <cstddef>
#include <cstdint>

#include "dtype.h"
#include "row_args.h"

namespace fastkd {

struct SparseKdArgs : RowArgs, KdCoefs {
  const void* values = nullptr;   // [N, k] contiguous, dtype values_dtype: the teacher's kept values
  const void* indices = nullptr;  // [N, k] contiguous int64 (or int32 when indices_int32)
  bool indices_int32 = false;
  DType values_dtype = DType::Float32;
  int64_t k = 0;
  // tail="uniform": the values are full-vocabulary log-probabilities and the missing mass
  // 1 - sum exp(value) is spread evenly over the V - k entries not kept; else the teacher is
  // renormalised over its k entries.
  bool uniform_tail = false;
};

// Bytes of per-thread scratch the row kernel needs for rows of `vocab` entries computed in a type
// of `compute_size` bytes: the row's exponentials (vocab + 64 entries), then one int64 stamp per
// vocabulary entry (which row last kept it), 8-byte aligned.
inline size_t sparse_kd_exp_bytes(int64_t vocab, size_t compute_size) {
  return ((size_t(vocab) + 64) * compute_size + 7) / 8 * 8;
}
inline size_t sparse_kd_scratch_bytes(int64_t vocab, size_t compute_size) {
  return sparse_kd_exp_bytes(vocab, compute_size) + size_t(vocab) * sizeof(int64_t);
}

}  // namespace fastkd
