// Loads and stores of a row's partial last vector, and a row filled with one value: what every
// CPU row kernel uses at a row's edges. Included inside namespace fastkd::<isa> (see kernels.h)
// after the vector types.
#pragma once

#include "cpu/storage.h"

// The first `count` entries of p (count < V::L) in the compute type, the other lanes `pad`.
template <class V, class T>
static inline V load_tail(const T* p, int64_t count, typename V::scalar pad) {
  using C = typename V::scalar;
  alignas(64) C buf[V::L];
  for (int i = 0; i < V::L; ++i) buf[i] = i < count ? C(to_compute<C>(p[i])) : pad;
  return V::load(buf);
}

// The first `count` lanes of x into p, each rounded once to T.
template <class V, class T>
static inline void store_tail(V x, T* p, int64_t count) {
  using C = typename V::scalar;
  alignas(64) C buf[V::L];
  x.store(buf);
  for (int64_t i = 0; i < count; ++i) p[i] = from_compute<T>(buf[i]);
}

template <class T>
static inline void fill_row(T* p, int64_t n, float value) {
  const T x = from_compute<T>(value);
  for (int64_t i = 0; i < n; ++i) p[i] = x;
}
