// The fused KD row kernel (kd_kernel.h) compiled for avx2. Only kd_cpu.cpp calls into here,
// after checking at run time that the CPU has the instructions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kd_args.h"

// After the standard headers, so that none of their inline functions is compiled for this
// instruction set (the linker could otherwise keep that copy for every caller).
#pragma GCC target("avx2,fma,f16c")

namespace fastkd {
namespace avx2 {
#include "cpu/storage.h"
#include "cpu/vec_avx2.h"
#include "cpu/kd_kernel.h"
#include "cpu/kd_dispatch_dtypes.h"

void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch) { dispatch_dtypes<VecAvx2, false>(a, begin, end, scratch); }

}  // namespace avx2
}  // namespace fastkd
