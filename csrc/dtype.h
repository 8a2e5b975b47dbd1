// The storage types a kernel reads and writes, as plain data: shared by the torch-facing
// wrappers and the kernels, which include no torch header (they are compiled per instruction
// set, and an inline torch function emitted there could be picked by the linker for the generic
// build too).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastkd {

enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };

// Row `row`'s gradient factor: grad_row_scale[row] (a per-row grad_output), or 1 without one.
inline double row_factor(const double* grad_row_scale, int64_t row) { return grad_row_scale ? grad_row_scale[row] : 1.0; }

}  // namespace fastkd

namespace fastkd {

// The bytes of one element of the compute type: double when either input is float64, else float.
inline size_t compute_size(DType a, DType b) {
  return a == DType::Float64 || b == DType::Float64 ? sizeof(double) : sizeof(float);
}

// The bytes of one per-thread scratch row of a softmax row kernel (csrc/cpu/softmax_rows.h):
// vocab entries of the compute type and one vector's padding (up to 64 lanes), rounded up to a
// cache line so that the next row starts on one.
inline size_t scratch_row_bytes(int64_t vocab, size_t compute_size) {
  return (size_t(vocab + 64) * compute_size + 63) / 64 * 64;
}

}  // namespace fastkd
