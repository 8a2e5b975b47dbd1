// What the CUDA kernel files share: the accumulation type, precision-generic math, half/bf16
// conversion, vector loads and host-side checks. Each file brings it in with
// `using namespace fastkd::cuda_common;` inside its own anonymous namespace.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
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

// st of the lane `mask` away (lane ^ mask), moved as 32-bit words: any trivially copyable state.
template <typename State>
__device__ __forceinline__ State shfl_xor_state(const State& st, int mask) {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) % 4 == 0, "a state of 32-bit words");
  constexpr int kWords = sizeof(State) / 4;
  unsigned int w[kWords];
  std::memcpy(w, &st, sizeof(State));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], mask);
  State out;
  std::memcpy(&out, w, sizeof(State));
  return out;
}

// The states of all threads of the block merged, merge(a, b) folding b into a; every thread gets
// the result. A butterfly within each warp (masks 16 to 1), then the same over the warps' results
// in warp 0, `empty` standing in for missing warps: the order of the merges is fixed by the block
// size, so a row's result does not depend on timing. blockDim.x must be a multiple of 32 and at
// most 32 * MAX_WARPS; smem holds MAX_WARPS + 1 states. smem may go straight to the next
// block_allreduce (every thread has read the result before any can pass that call's first
// barrier); any other use of it needs a __syncthreads() first.
template <int MAX_WARPS, typename State, typename Merge>
__device__ State block_allreduce(State st, const State& empty, Merge merge, State* smem) {
  for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl_xor_state(st, mask));
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : empty;
    for (int mask = 16; mask > 0; mask >>= 1) merge(st, shfl_xor_state(st, mask));
    if (lane == 0) smem[MAX_WARPS] = st;
  }
  __syncthreads();
  return smem[MAX_WARPS];
}

// The sum over the block (block_allreduce's order); every thread gets it.
template <int MAX_WARPS, typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x, acc_t* smem) {
  return block_allreduce<MAX_WARPS>(x, acc_t(0), [](acc_t& a, acc_t b) { a += b; }, smem);
}

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

// A fused op's grad_scale (csrc/ops.cpp) as a kernel reads it: the backward's grad_output, one
// value (stride 0) or one per row (stride 1), multiplied into the gradient's coefficient before
// its one rounding to the student's dtype. skip_one: the rescale op, which rewrites the forward's
// gradient in place; a row whose scale is exactly 1 keeps it, and its block returns at once.
template <typename acc_t>
struct GradScale {
  const acc_t* ptr;  // null: no grad_scale (1)
  int64_t stride;
  bool skip_one;
  __device__ __forceinline__ acc_t of(int64_t row) const { return ptr == nullptr ? acc_t(1) : ptr[row * stride]; }
  __device__ __forceinline__ bool skip(int64_t row) const { return skip_one && ptr != nullptr && ptr[row * stride] == acc_t(1); }
};

// grad_scale checked (a float tensor of 1 or n_rows elements on `device`) and converted to the
// accumulation type, contiguous; undefined when absent. The conversion is a device op: no host
// synchronisation.
inline at::Tensor grad_scale_tensor(const std::optional<at::Tensor>& grad_scale, int64_t n_rows, const at::Device& device,
                                    at::ScalarType acc_dtype, const char* op) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return at::Tensor();
  const at::Tensor& s = *grad_scale;
  TORCH_CHECK(at::isFloatingType(s.scalar_type()) && (s.numel() == 1 || s.numel() == n_rows) && s.device() == device, op,
              "grad_scale must be a float tensor of 1 or ", n_rows, " (one per row) elements on ", device, ", got ",
              s.scalar_type(), " ", s.sizes(), " on ", s.device());
  return s.reshape({-1}).to(acc_dtype).contiguous();
}

template <typename acc_t>
GradScale<acc_t> grad_scale_of(const at::Tensor& t, bool skip_one) {
  if (!t.defined()) return GradScale<acc_t>{nullptr, 0, false};
  return GradScale<acc_t>{t.const_data_ptr<acc_t>(), t.numel() == 1 ? 0 : 1, skip_one};
}

// The gradient buffer of a call: `into` (the rescale op's target, checked to be the forward's
// gradient: shaped and typed like the student, contiguous) or a new tensor like the student.
inline at::Tensor grad_buffer(const at::Tensor& student, at::Tensor* into, const char* op) {
  if (into == nullptr) return at::empty_like(student);
  TORCH_CHECK(into->sizes() == student.sizes() && into->scalar_type() == student.scalar_type() && into->is_contiguous() &&
                  into->device() == student.device(),
              op, "grad must be the forward's gradient, contiguous ", student.scalar_type(), " ", student.sizes(), " on ",
              student.device(), ", got ", into->scalar_type(), " ", into->sizes(), " on ", into->device());
  return *into;
}

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<S>{}) with S the C++ type of st (float32, float16, bfloat16 or float64); else an error
// naming op (its prefix, "fastkd::<op> (cuda): ").
template <typename F>
void dispatch_dtype(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<at::Half>{}); break;
    case at::kBFloat16: f(Tag<at::BFloat16>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    default: TORCH_CHECK(false, op, "unsupported dtype ", st);
  }
}

// f(Tag<S>{}, Tag<T>{}) for a student of dtype s and a teacher of dtype t.
template <typename F>
void dispatch_dtypes(at::ScalarType s, at::ScalarType t, const char* op, F&& f) {
  dispatch_dtype(s, op, [&](auto s_tag) { dispatch_dtype(t, op, [&](auto t_tag) { f(s_tag, t_tag); }); });
}

inline bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble;
}

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace fastkd::cuda_common
