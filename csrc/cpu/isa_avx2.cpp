// Every CPU row kernel (cpu/kernels.h) compiled for avx2. Only the families' torch wrappers
// call into here, through pick_isa() (cpu_common.h), after checking at run time that the CPU
// has the instructions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "dkd_args.h"
#include "feature_args.h"
#include "kd_args.h"
#include "sparse_kd_args.h"

// After the standard headers, so that none of their inline functions is compiled for this
// instruction set (the linker could otherwise keep that copy for every caller).
#pragma GCC target("avx2,fma,f16c")

namespace fastkd {
namespace avx2 {
#include "cpu/storage.h"
#include "cpu/vec_scalar.h"
#include "cpu/vec_avx2.h"
// The vector type of float computation; float64 input computes with VecScalar<double>.
using VecF = VecAvx2;
#include "cpu/kernels.h"
}  // namespace avx2
}  // namespace fastkd
