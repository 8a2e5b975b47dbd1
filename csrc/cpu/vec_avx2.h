// 8 float lanes in an AVX2 register (with FMA and F16C, present on every AVX2 CPU in practice);
// compiled only into kd_cpu_avx2.cpp.
#pragma once

#include "cpu/storage.h"

struct VecAvx2 {
  using scalar = float;
  static constexpr int L = 8;
  __m256 v;

  static VecAvx2 set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecAvx2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecAvx2 load(const bf16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static VecAvx2 load(const f16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  __m128i to_bf16() const {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    // Pack the eight 32-bit halves to 16 bits; packus works per 128-bit lane, hence the permute.
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  }
  __m128i to_f16() const { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }

  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16_t* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16()); }
  void store(f16_t* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16()); }
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  void stream(bf16_t* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16()); }
  void stream(f16_t* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_f16()); }
  // Orders the stream()s before later stores.
  static void fence() { _mm_sfence(); }

  static VecAvx2 fma(VecAvx2 a, VecAvx2 b, VecAvx2 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecAvx2 max(VecAvx2 a, VecAvx2 x) { return {_mm256_max_ps(a.v, x.v)}; }
  static VecAvx2 zero_where_zero(VecAvx2 w, VecAvx2 value) {
    __m256 nz = _mm256_cmp_ps(w.v, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    return {_mm256_and_ps(nz, value.v)};
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float max() const {
    alignas(32) float buf[8];
    _mm256_store_ps(buf, v);
    float m = buf[0];
    for (int i = 1; i < 8; ++i) m = buf[i] > m || buf[i] != buf[i] ? buf[i] : m;
    return m;
  }

  // exp(x) for x <= 88: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, and a degree-6
  // polynomial for e^r (relative error below 2.3e-7, as VecAvx512::exp). Without vscalefps, 2^n
  // is built in the exponent field: n comes from the 1.5 * 2^23 rounding constant, whose float
  // bits then hold n in their low bits, so 2^n's bits are (bits + 127 - bits(1.5 * 2^23)) << 23.
  // x is clamped below at -88.06, where n = -127: an exponent field of 0, so 2^n reads as 0 and
  // -inf (masked vocabulary) and everything below about -88 give exactly 0 with no compare and
  // mask; a NaN x stays NaN through the polynomial. 14 operations (the compare-and-mask
  // version took 18; the kernels spend most of their arithmetic here, two exps per entry).
  static VecAvx2 exp(VecAvx2 x) {
    const __m256 magic = _mm256_set1_ps(12582912.f);
    // max(c, x) and min(c, x) return x when it is NaN.
    const __m256 a = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-88.06f), x.v));
    const __m256 t = _mm256_fmadd_ps(a, _mm256_set1_ps(1.44269504088896341f), magic);
    const __m256 n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), a);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23);
    return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};
  }

  // log(x), as VecAvx512::log: x = 2^e m with m in [sqrt(1/2), sqrt(2)), Cephes' logf polynomial
  // for log(m) (relative error below 2e-7 on normal inputs; tests/test_kd_divergences.py checks
  // the kernels that use it against float64). 0 -> -inf, +inf -> +inf, x < 0 or NaN -> NaN;
  // subnormal inputs are read as the smallest normal float (log = -87.34).
  static VecAvx2 log(VecAvx2 x) {
    const __m256 one = _mm256_set1_ps(1.f);
    // max(min_normal, x) keeps a NaN x (vmaxps returns its second operand when either is NaN).
    const __m256 xv = _mm256_max_ps(_mm256_set1_ps(1.17549435e-38f), x.v);
    const __m256i bits = _mm256_castps_si256(xv);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    __m256 m = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    // m in [0.5, 1): below sqrt(1/2) take 2m and e - 1, so that m - 1 lies in [-0.29, 0.41].
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
    m = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(m, small));
    const __m256 z = _mm256_mul_ps(m, m);
    __m256 p = _mm256_set1_ps(7.0376836292e-2f);
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.1514610310e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.1676998740e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.2420140846e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.4249322787e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.6668057665e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(2.0000714765e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-2.4999993993e-1f));
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(3.3333331174e-1f));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
    __m256 r = _mm256_add_ps(m, y);
    r = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), r);
    const __m256 inf = _mm256_set1_ps(__builtin_inff());
    r = _mm256_blendv_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), inf), _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_EQ_OQ));
    r = _mm256_blendv_ps(r, inf, _mm256_cmp_ps(x.v, inf, _CMP_EQ_OQ));
    // x < 0 or NaN: all bits set, a NaN.
    return {_mm256_or_ps(r, _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_NGE_UQ))};
  }
  static VecAvx2 abs(VecAvx2 x) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), x.v)}; }
  // -1, 0 or 1 (0 for 0 and NaN).
  static VecAvx2 sign(VecAvx2 x) {
    const __m256 one = _mm256_set1_ps(1.f);
    const __m256 pos = _mm256_and_ps(_mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_GT_OQ), one);
    const __m256 neg = _mm256_and_ps(_mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_LT_OQ), one);
    return {_mm256_sub_ps(pos, neg)};
  }
  // x < 0 ? if_neg : otherwise, lane by lane (NaN x: otherwise).
  static VecAvx2 where_neg(VecAvx2 x, VecAvx2 if_neg, VecAvx2 otherwise) {
    return {_mm256_blendv_ps(otherwise.v, if_neg.v, _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_LT_OQ))};
  }
  // Whether some lane has x < threshold and w != 0.
  static bool any_below_where(VecAvx2 x, float threshold, VecAvx2 w) {
    const __m256 below = _mm256_cmp_ps(x.v, _mm256_set1_ps(threshold), _CMP_LT_OQ);
    const __m256 nz = _mm256_cmp_ps(w.v, _mm256_setzero_ps(), _CMP_NEQ_OQ);
    return _mm256_movemask_ps(_mm256_and_ps(below, nz)) != 0;
  }
};

// Free functions, not in-class friends: GCC 12 does not apply #pragma GCC target to friends
// defined inside the class, and their intrinsics then fail to inline.
static inline VecAvx2 operator+(VecAvx2 a, VecAvx2 b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline VecAvx2 operator-(VecAvx2 a, VecAvx2 b) { return {_mm256_sub_ps(a.v, b.v)}; }
static inline VecAvx2 operator*(VecAvx2 a, VecAvx2 b) { return {_mm256_mul_ps(a.v, b.v)}; }
static inline VecAvx2 operator/(VecAvx2 a, VecAvx2 b) { return {_mm256_div_ps(a.v, b.v)}; }
