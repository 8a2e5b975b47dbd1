// What the CUDA kernel files share: the accumulation type, precision-generic math, half/bf16
// conversion, vector loads and host-side checks. Each file brings it in with
// `using namespace fastkd::cuda_common;` inside its own anonymous namespace.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace fastkd::cuda_common {

// Accumulation type: float, or double when either input is double.
template <typename S, typename T = S>
using acc_type_t = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>;

template <typename acc_t>
struct Consts {
  static constexpr acc_t kLog2e = acc_t(1.4426950408889634);
  static constexpr acc_t kLn2 = acc_t(0.6931471805599453);
};

// One name per function for both precisions, so that a kernel templated on acc_t calls the
// float intrinsic for float (exp2f, not the double exp2 through a conversion).
__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// Reference point for a running maximum: the maximum itself, or 0 while it is still -inf.
template <typename acc_t>
__device__ __forceinline__ acc_t ref_of(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Half and BFloat16 convert through float (their own conversion operators).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_as(const T* p) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return *p;
  } else {
    return static_cast<acc_t>(static_cast<float>(*p));
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ T store_as(acc_t v) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return v;
  } else {
    return static_cast<T>(static_cast<float>(v));
  }
}

// N elements loaded or stored as one access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Index of the first of the VEC elements this thread handles in vector slot u of the chunk at
// `base` (one block per row, the row read in chunks of blockDim.x * VEC * slots).
template <int VEC>
__device__ __forceinline__ int64_t slot_index(int64_t base, int u) {
  return base + (static_cast<int64_t>(u) * blockDim.x + threadIdx.x) * VEC;
}

// Every entry of a row set to value (an ignored row's zero gradient, a broken row's NaN).
template <int VEC, typename T>
__device__ void fill_row(T* __restrict__ row, int64_t vocab, T value) {
  Vec<T, VEC> v;
#pragma unroll
  for (int k = 0; k < VEC; ++k) v.v[k] = value;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < vocab; i += static_cast<int64_t>(blockDim.x) * VEC) {
    *reinterpret_cast<Vec<T, VEC>*>(row + i) = v;
  }
}

inline bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble;
}

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace fastkd::cuda_common
