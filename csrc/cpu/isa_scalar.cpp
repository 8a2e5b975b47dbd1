// Every CPU row kernel (cpu/kernels.h) compiled for scalar. Only the families' torch wrappers
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

namespace fastkd {
namespace scalar {
#include "cpu/storage.h"
#include "cpu/vec_scalar.h"
// The vector type of float computation; float64 input computes with VecScalar<double>.
using VecF = VecScalar<float>;
#include "cpu/kernels.h"
}  // namespace scalar
}  // namespace fastkd
