// One lane of plain C++: the portable path, and the float64 path (C = double).
#pragma once

#include "cpu/storage.h"

template <class C>
struct VecScalar {
  using scalar = C;
  static constexpr int L = 1;
  C v;

  static VecScalar set1(C x) { return {x}; }
  template <class T>
  static VecScalar load(const T* p) { return {to_compute<C>(*p)}; }
  template <class T>
  void store(T* p) const { *p = from_compute<T>(v); }
  template <class T>
  void stream(T* p) const { store(p); }
  // Orders the stream()s before later stores.
  static void fence() {}

  static VecScalar fma(VecScalar a, VecScalar b, VecScalar c) { return {a.v * b.v + c.v}; }
  static VecScalar max(VecScalar a, VecScalar x) { return {(x.v != x.v || x.v > a.v) ? x.v : a.v}; }
  static VecScalar zero_where_zero(VecScalar w, VecScalar value) { return {w.v == C(0) ? C(0) : value.v}; }
  C sum() const { return v; }
  C max() const { return v; }
  static VecScalar exp(VecScalar x) { return {std::exp(x.v)}; }
  static VecScalar log(VecScalar x) { return {std::log(x.v)}; }
  static VecScalar abs(VecScalar x) { return {std::fabs(x.v)}; }
  // -1, 0 or 1 (0 for 0 and NaN).
  static VecScalar sign(VecScalar x) { return {C(x.v > C(0)) - C(x.v < C(0))}; }
  // x < 0 ? if_neg : otherwise (NaN x: otherwise).
  static VecScalar where_neg(VecScalar x, VecScalar if_neg, VecScalar otherwise) { return {x.v < C(0) ? if_neg.v : otherwise.v}; }
  // Whether x < threshold where w != 0.
  static bool any_below_where(VecScalar x, C threshold, VecScalar w) { return x.v < threshold && w.v != C(0); }
};

template <class C>
static inline VecScalar<C> operator+(VecScalar<C> a, VecScalar<C> b) { return {a.v + b.v}; }
template <class C>
static inline VecScalar<C> operator-(VecScalar<C> a, VecScalar<C> b) { return {a.v - b.v}; }
template <class C>
static inline VecScalar<C> operator*(VecScalar<C> a, VecScalar<C> b) { return {a.v * b.v}; }
template <class C>
static inline VecScalar<C> operator/(VecScalar<C> a, VecScalar<C> b) { return {a.v / b.v}; }
