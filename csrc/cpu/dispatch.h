// Storage-type dispatch for the row kernels (included per instruction set, see kernels.h).
#pragma once

#include "cpu/storage.h"

template <class T>
struct Storage {
  using type = T;
};

// The compute type of a pair of storage types: double when either is double, else float.
template <class TS, class TT>
constexpr bool kComputeDouble = std::is_same_v<TS, double> || std::is_same_v<TT, double>;

// The vector type the pair computes with: VecScalar<double> for float64 input, else this
// instruction set's float vector.
template <class TS, class TT>
using VecFor = std::conditional_t<kComputeDouble<TS, TT>, VecScalar<double>, VecF>;

template <class F>
static inline void with_storage(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(Storage<float>{});
    case DType::BFloat16: return f(Storage<bf16_t>{});
    case DType::Float16: return f(Storage<f16_t>{});
    case DType::Float64: return f(Storage<double>{});
  }
}

// Calls f(Storage<TS>{}, Storage<TT>{}) for the storage types of a student and a teacher.
template <class F>
static inline void with_storage(DType student, DType teacher, F&& f) {
  with_storage(student, [&](auto s) { with_storage(teacher, [&](auto t) { f(s, t); }); });
}
