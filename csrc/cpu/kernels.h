// The row kernels of every CPU op family, included by each isa_*.cpp inside its namespace
// fastkd::<isa>, after the vector types and `VecF`. A new family adds its kernel header here and
// declares its entry points with FASTKD_PER_ISA (cpu_common.h); each header includes what it uses.
#pragma once

#include "cpu/kd_kernel.h"
#include "cpu/divergence_kernel.h"
#include "cpu/dkd_kernel.h"
#include "cpu/sparse_kd_kernel.h"
#include "cpu/relational_kernel.h"
#include "cpu/feature_kernel.h"
