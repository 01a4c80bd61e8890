// AVX-512 operations with a defined merge source.
//
// GCC 12 implements many unmasked AVX-512 intrinsics (min/max, roundscale, conversions,
// unpacks, extracts and casts to 256 bits, the reductions) as the masked builtins with an all-ones mask and an
// `_mm*_undefined_*()` merge source, a deliberately self-initialized variable; once inlined,
// -Wmaybe-uninitialized reports it at every use. These wrappers call the masked intrinsics with
// every lane selected and a defined merge source: the same instruction and the same result.
// The reductions store the lanes and add them in the order GCC's `_mm512_reduce_add_*` do
// (integer sums wrap modulo 2^32 / 2^64 like theirs; the float tree is theirs, add for add).
#pragma once
#include <immintrin.h>

#include <cstdint>

#define EQK_AVX512_INLINE \
  __attribute__((target("avx512f"), always_inline)) inline

namespace eqk::avx512 {

constexpr __mmask16 kAll16 = 0xFFFF;
constexpr __mmask8 kAll8 = 0xFF;

EQK_AVX512_INLINE __m512 min_ps(__m512 a, __m512 b) { return _mm512_mask_min_ps(a, kAll16, a, b); }
EQK_AVX512_INLINE __m512 max_ps(__m512 a, __m512 b) { return _mm512_mask_max_ps(a, kAll16, a, b); }

template <int kImm>
EQK_AVX512_INLINE __m512 roundscale_ps(__m512 a) {
  return _mm512_mask_roundscale_ps(a, kAll16, a, kImm);
}

EQK_AVX512_INLINE __m512i cvttps_epi32(__m512 a) {
  return _mm512_mask_cvttps_epi32(_mm512_setzero_si512(), kAll16, a);
}
EQK_AVX512_INLINE __m128i cvtepi32_epi8(__m512i a) {
  return _mm512_mask_cvtepi32_epi8(_mm_setzero_si128(), kAll16, a);
}
EQK_AVX512_INLINE __m512i cvtepi32_epi64(__m256i a) {
  return _mm512_mask_cvtepi32_epi64(_mm512_setzero_si512(), kAll8, a);
}
EQK_AVX512_INLINE __m256 cvtpd_ps(__m512d a) {
  return _mm512_mask_cvtpd_ps(_mm256_setzero_ps(), kAll8, a);
}

// The lower / upper 256 bits (GCC's _mm512_castsi512_si256 is an extract with an undefined
// merge source too).
EQK_AVX512_INLINE __m256i extract_lo256(__m512i a) {
  return _mm512_mask_extracti64x4_epi64(_mm256_setzero_si256(), 0xF, a, 0);
}
EQK_AVX512_INLINE __m256i extract_hi256(__m512i a) {
  return _mm512_mask_extracti64x4_epi64(_mm256_setzero_si256(), 0xF, a, 1);
}

EQK_AVX512_INLINE __m512i unpacklo_epi32(__m512i a, __m512i b) {
  return _mm512_mask_unpacklo_epi32(a, kAll16, a, b);
}
EQK_AVX512_INLINE __m512i unpackhi_epi32(__m512i a, __m512i b) {
  return _mm512_mask_unpackhi_epi32(a, kAll16, a, b);
}
EQK_AVX512_INLINE __m512i unpacklo_epi64(__m512i a, __m512i b) {
  return _mm512_mask_unpacklo_epi64(a, kAll8, a, b);
}
EQK_AVX512_INLINE __m512i unpackhi_epi64(__m512i a, __m512i b) {
  return _mm512_mask_unpackhi_epi64(a, kAll8, a, b);
}

// Sum of the 16 int32 lanes, modulo 2^32 (as _mm512_reduce_add_epi32).
EQK_AVX512_INLINE int32_t reduce_add_epi32(__m512i v) {
  alignas(64) uint32_t t[16];
  _mm512_store_si512(t, v);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += t[i];
  return static_cast<int32_t>(s);
}

// Sum of the 8 int64 lanes, modulo 2^64 (as _mm512_reduce_add_epi64).
EQK_AVX512_INLINE int64_t reduce_add_epi64(__m512i v) {
  alignas(64) uint64_t t[8];
  _mm512_store_si512(t, v);
  uint64_t s = 0;
  for (int i = 0; i < 8; ++i) s += t[i];
  return static_cast<int64_t>(s);
}

// Sum of the 16 float lanes in _mm512_reduce_add_ps's order: halves, quarters, then
// (l0 + l2) + (l1 + l3).
EQK_AVX512_INLINE float reduce_add_ps(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float h[8], q[4];
  for (int i = 0; i < 8; ++i) h[i] = t[8 + i] + t[i];
  for (int i = 0; i < 4; ++i) q[i] = h[4 + i] + h[i];
  return (q[0] + q[2]) + (q[1] + q[3]);
}

}  // namespace eqk::avx512
