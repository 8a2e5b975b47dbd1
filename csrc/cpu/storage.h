// 16-bit float storage types and their scalar conversions to and from float.
//
// Included inside a per-ISA namespace (see kd_kernel.h): every definition here gets a
// different symbol in each instruction-set build, so the linker can never hand an AVX-512
// copy of an inline function to the generic build.
#pragma once

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

static inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float to_float(float x) { return x; }
static inline float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

static inline float to_float(f16_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal half: the value is mant * 2^-24, exact in float.
  const float v = float(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

template <class T>
static inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

template <>
inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}

template <>
inline f16_t from_float<f16_t>(float x) {
  // Round to nearest even, with subnormals, overflow to inf, NaN kept NaN.
  const uint32_t u = float_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // rounds past 65504
  if (a < 0x38800000u) {  // below the smallest normal half, 2^-14
    // Adding 0.5 makes the float's hardware rounding produce the subnormal half's mantissa.
    const float shifted = bits_float(a) + 0.5f;
    return f16_t{uint16_t(sign | uint16_t(float_bits(shifted) - float_bits(0.5f)))};
  }
  const uint32_t mant_odd = (a >> 13) & 1u;
  const uint32_t r = a + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return f16_t{uint16_t(sign | uint16_t(r >> 13))};
}

// Conversions between a storage type T and the compute type C (float, or double for float64).
template <class C>
static inline C to_compute(float x) { return C(x); }
template <class C>
static inline C to_compute(double x) { return C(x); }
template <class C>
static inline C to_compute(bf16_t x) { return C(to_float(x)); }
template <class C>
static inline C to_compute(f16_t x) { return C(to_float(x)); }

template <class T, class C>
static inline T from_compute(C x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return from_float<T>(float(x));
  }
}
