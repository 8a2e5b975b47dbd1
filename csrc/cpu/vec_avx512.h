// 16 float lanes in an AVX-512 register. Needs AVX512F and AVX512BW (both on every AVX-512 CPU
// since Skylake-SP); compiled only into kd_cpu_avx512.cpp.
#pragma once

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
};

// Free functions, not in-class friends: GCC 12 does not apply #pragma GCC target to friends
// defined inside the class, and their intrinsics then fail to inline.
static inline VecAvx512 operator+(VecAvx512 a, VecAvx512 b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline VecAvx512 operator-(VecAvx512 a, VecAvx512 b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline VecAvx512 operator*(VecAvx512 a, VecAvx512 b) { return {_mm512_mul_ps(a.v, b.v)}; }
