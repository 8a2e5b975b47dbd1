// 16 float lanes in an AVX-512 register. Needs AVX512F and AVX512BW (both on every AVX-512 CPU
// since Skylake-SP); compiled only into kd_cpu_avx512.cpp.
#pragma once

#include "cpu/storage.h"

struct VecAvx512 {
  using scalar = float;
  static constexpr int L = 16;
  __m512 v;

  static VecAvx512 set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecAvx512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecAvx512 load(const bf16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static VecAvx512 load(const f16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  // Round to nearest even; NaN stays (quiet) NaN.
  __m256i to_bf16() const {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
  }
  __m256i to_f16() const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }

  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16()); }
  void store(f16_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16()); }
  // Non-temporal stores (p aligned to L * sizeof(T)): written data bypasses the caches, which
  // saves the read-for-ownership of every output line when the output outgrows them.
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  void stream(bf16_t* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16()); }
  void stream(f16_t* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_f16()); }
  // Orders the stream()s before later stores.
  static void fence() { _mm_sfence(); }

  static VecAvx512 fma(VecAvx512 a, VecAvx512 b, VecAvx512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  // max(a, x), returning x where x is NaN (vmaxps returns its second operand then).
  static VecAvx512 max(VecAvx512 a, VecAvx512 x) { return {_mm512_max_ps(a.v, x.v)}; }
  // value where w != 0, else 0: drops 0 * inf terms of masked (-inf) entries; NaN w keeps value.
  static VecAvx512 zero_where_zero(VecAvx512 w, VecAvx512 value) {
    __mmask16 nz = _mm512_cmp_ps_mask(w.v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    return {_mm512_maskz_mov_ps(nz, value.v)};
  }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float max() const { return _mm512_reduce_max_ps(v); }

  // exp(x) for x <= 88: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, a degree-6
  // polynomial for e^r (relative error ~1e-7), and vscalefps for 2^n, which underflows to
  // exactly 0 for -inf (after the clamp to -104) and keeps NaN.
  static VecAvx512 exp(VecAvx512 x) {
    __m512 a = _mm512_min_ps(_mm512_set1_ps(88.f), _mm512_max_ps(_mm512_set1_ps(-104.f), x.v));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), a);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return {_mm512_scalef_ps(p, n)};
  }

  // log(x): x = 2^e m with m in [sqrt(1/2), sqrt(2)), Cephes' logf polynomial for log(m)
  // (relative error below 2e-7 on normal inputs). 0 -> -inf, +inf -> +inf, x < 0 or NaN -> NaN;
  // subnormal inputs are read as the smallest normal float (log = -87.34). The same steps as
  // VecAvx2::log, lane for lane.
  static VecAvx512 log(VecAvx512 x) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 xv = _mm512_max_ps(_mm512_set1_ps(1.17549435e-38f), x.v);
    const __m512i bits = _mm512_castps_si512(xv);
    __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
    __m512 m = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)));
    const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm512_mask_sub_ps(e, small, e, one);
    m = _mm512_mask_add_ps(_mm512_sub_ps(m, one), small, _mm512_sub_ps(m, one), m);
    const __m512 z = _mm512_mul_ps(m, m);
    __m512 p = _mm512_set1_ps(7.0376836292e-2f);
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(-1.1514610310e-1f));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(1.1676998740e-1f));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(-1.2420140846e-1f));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(1.4249322787e-1f));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(-1.6668057665e-1f));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(2.0000714765e-1f));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(-2.4999993993e-1f));
    p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(3.3333331174e-1f));
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, m), z);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
    __m512 r = _mm512_add_ps(m, y);
    r = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), r);
    const __m512 inf = _mm512_set1_ps(__builtin_inff());
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_EQ_OQ), _mm512_sub_ps(_mm512_setzero_ps(), inf));
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x.v, inf, _CMP_EQ_OQ), inf);
    return {_mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_NGE_UQ), _mm512_set1_ps(__builtin_nanf("")))};
  }
  static VecAvx512 abs(VecAvx512 x) { return {_mm512_abs_ps(x.v)}; }
  // -1, 0 or 1 (0 for 0 and NaN).
  static VecAvx512 sign(VecAvx512 x) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __mmask16 pos = _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __mmask16 neg = _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_LT_OQ);
    return {_mm512_sub_ps(_mm512_maskz_mov_ps(pos, one), _mm512_maskz_mov_ps(neg, one))};
  }
  // x < 0 ? if_neg : otherwise, lane by lane (NaN x: otherwise).
  static VecAvx512 where_neg(VecAvx512 x, VecAvx512 if_neg, VecAvx512 otherwise) {
    return {_mm512_mask_mov_ps(otherwise.v, _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_LT_OQ), if_neg.v)};
  }
  // Whether some lane has x < threshold and w != 0.
  static bool any_below_where(VecAvx512 x, float threshold, VecAvx512 w) {
    const __mmask16 below = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(threshold), _CMP_LT_OQ);
    return _mm512_mask_cmp_ps_mask(below, w.v, _mm512_setzero_ps(), _CMP_NEQ_OQ) != 0;
  }
};

// Free functions, not in-class friends: GCC 12 does not apply #pragma GCC target to friends
// defined inside the class, and their intrinsics then fail to inline.
static inline VecAvx512 operator+(VecAvx512 a, VecAvx512 b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline VecAvx512 operator-(VecAvx512 a, VecAvx512 b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline VecAvx512 operator*(VecAvx512 a, VecAvx512 b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline VecAvx512 operator/(VecAvx512 a, VecAvx512 b) { return {_mm512_div_ps(a.v, b.v)}; }
