// The fused KD row kernel (kd_kernel.h) compiled for scalar. Only kd_cpu.cpp calls into here,
// after checking at run time that the CPU has the instructions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kd_args.h"

namespace fastkd {
namespace scalar {
#include "cpu/storage.h"
#include "cpu/vec_scalar.h"
#include "cpu/kd_kernel.h"
#include "cpu/kd_dispatch_dtypes.h"

// float64 input computes in double: a float64 gradcheck needs more than float's precision.
void kd_rows_double(const KdArgs& a, int64_t begin, int64_t end, void* scratch) {
  dispatch_dtypes<VecScalar<double>, true>(a, begin, end, scratch);
}

void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch) { dispatch_dtypes<VecScalar<float>, false>(a, begin, end, scratch); }

}  // namespace scalar
}  // namespace fastkd
