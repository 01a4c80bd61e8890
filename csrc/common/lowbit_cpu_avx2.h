// AVX2 bit-plane kernels (function target attributes; called only when the CPU has AVX2).
//
// AVX2 has no mask registers: 32 plane bits become a 32-byte 0x00/0xFF mask with a byte
// shuffle and a compare. The integer GEMV multiplies with maddubs (u8 x s8 -> saturating s16
// pairs), so every pair must stay within int16: non-sign planes use weights <= 64
// (uint8 activations: 2*255*64 = 32640; int8 activations, weight as the u8 operand:
// 2*64*128 = 16384), and the sign plane uses weight 1 in its own accumulator, scaled by
// 2^(b-1) at the end.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "common/lowbit_cpu_portable.h"

#define EQK_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2,popcnt")))

namespace eqk::lowbit {

// Byte i of the result is 0xFF when bit i of `bits` is set.
EQK_TARGET_AVX2 inline __m256i expand_bits32(uint32_t bits) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                        2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
}

EQK_TARGET_AVX2 inline uint32_t hsum_epi32(__m256i v) {
  alignas(32) uint32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  uint32_t s = 0;
  for (int i = 0; i < 8; ++i) s += t[i];  // wrapping, exact under the op's chunking rule
  return s;
}

template <int BITS, bool SIGNED>
EQK_TARGET_AVX2 inline void gemv_int_avx2_t(const PlaneRows& P, const uint8_t* x, int64_t n0,
                                            int64_t n1, int32_t* out) {
  const __m256i ones16 = _mm256_set1_epi16(1), one8 = _mm256_set1_epi8(1);
  for (int64_t n = n0; n < n1; ++n) {
    __m256i acc = _mm256_setzero_si256(), accs = _mm256_setzero_si256();
    const uint32_t* rows[BITS];
    for (int j = 0; j < BITS; ++j) rows[j] = P.row(j, n);
    for (int64_t w = 0; w < P.W; ++w) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * w));
#pragma GCC unroll 8
      for (int j = 0; j < BITS; ++j) {
        const __m256i m = expand_bits32(rows[j][w]);
        const __m256i wm = _mm256_and_si256(m, j == 0 ? one8 : _mm256_set1_epi8((char)(1 << (BITS - 1 - j))));
        const __m256i p = SIGNED ? _mm256_maddubs_epi16(wm, xv) : _mm256_maddubs_epi16(xv, wm);
        if (j == 0)
          accs = _mm256_add_epi32(accs, _mm256_madd_epi16(p, ones16));
        else
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones16));
      }
    }
    out[n] = (int32_t)(hsum_epi32(acc) - (hsum_epi32(accs) << (BITS - 1)));
  }
}

// out[n] for n in [n0, n1): one activation row x (zero-padded to 32 W bytes).
EQK_TARGET_AVX2 inline void gemv_int_avx2(const PlaneRows& P, const uint8_t* x, bool x_signed,
                                          int64_t n0, int64_t n1, int32_t* out) {
#define EQK_CASE(B)                                   \
  case B:                                             \
    if (x_signed)                                     \
      gemv_int_avx2_t<B, true>(P, x, n0, n1, out);    \
    else                                              \
      gemv_int_avx2_t<B, false>(P, x, n0, n1, out);   \
    return;
  switch (P.bits) {
    EQK_CASE(1) EQK_CASE(2) EQK_CASE(3) EQK_CASE(4) EQK_CASE(5) EQK_CASE(6) EQK_CASE(7) EQK_CASE(8)
  }
#undef EQK_CASE
}

// Bit-serial float GEMV: per plane, x is masked 8 columns at a time and summed; the plane sums
// are combined with the plane weights at the end in a fixed order. x zero-padded to 32 W.
template <int BITS>
EQK_TARGET_AVX2 inline float gemv_float_row_avx2(const PlaneRows& P, const float* x, int64_t n) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256 acc[BITS];
  const uint8_t* rows[BITS];
  for (int j = 0; j < BITS; ++j) {
    acc[j] = _mm256_setzero_ps();
    rows[j] = reinterpret_cast<const uint8_t*>(P.row(j, n));
  }
  for (int64_t g = 0; g < 4 * P.W; ++g) {
    const __m256 xv = _mm256_loadu_ps(x + 8 * g);
#pragma GCC unroll 8
    for (int j = 0; j < BITS; ++j) {
      const __m256i v = _mm256_and_si256(_mm256_set1_epi32(rows[j][g]), sel);
      const __m256 m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel));
      acc[j] = _mm256_add_ps(acc[j], _mm256_and_ps(m, xv));
    }
  }
  float total = 0.0f;
  for (int j = 0; j < BITS; ++j) {
    alignas(32) float t[8];
    _mm256_store_ps(t, acc[j]);
    const float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    total += float(plane_weight(BITS, j)) * s;
  }
  return total;
}

EQK_TARGET_AVX2 inline void gemv_float_avx2(const PlaneRows& P, const float* x, int64_t n0,
                                            int64_t n1, float* out) {
#define EQK_CASE(B) \
  case B:           \
    for (int64_t n = n0; n < n1; ++n) out[n] = gemv_float_row_avx2<B>(P, x, n); \
    return;
  switch (P.bits) {
    EQK_CASE(1) EQK_CASE(2) EQK_CASE(3) EQK_CASE(4) EQK_CASE(5) EQK_CASE(6) EQK_CASE(7) EQK_CASE(8)
  }
#undef EQK_CASE
}

// Rows [n0, n1) decoded to int8 (row stride ldo, ncols <= 32 W): wrapping int8 adds of the
// masked plane weights.
EQK_TARGET_AVX2 inline void decode_rows_avx2(const PlaneRows& P, int64_t n0, int64_t n1,
                                             int64_t ncols, int8_t* out, int64_t ldo) {
  __m256i wv[8];
  for (int j = 0; j < P.bits; ++j) wv[j] = _mm256_set1_epi8((char)plane_weight(P.bits, j));
  for (int64_t n = n0; n < n1; ++n) {
    int8_t* o = out + (n - n0) * ldo;
    for (int64_t w = 0; 32 * w < ncols; ++w) {
      __m256i q = _mm256_setzero_si256();
      for (int j = 0; j < P.bits; ++j)
        q = _mm256_add_epi8(q, _mm256_and_si256(expand_bits32(P.row(j, n)[w]), wv[j]));
      const int64_t left = ncols - 32 * w;
      if (left >= 32) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32 * w), q);
      } else {
        alignas(32) int8_t t[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), q);
        std::memcpy(o + 32 * w, t, left);
      }
    }
  }
}

EQK_TARGET_AVX2 inline void rowsums_avx2(const PlaneRows& P, int64_t n0, int64_t n1,
                                         int64_t* out) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t s = 0;
    for (int j = 0; j < P.bits; ++j) {
      const uint32_t* r = P.row(j, n);
      int64_t c = 0;
      for (int64_t w = 0; w < P.W; ++w) c += __builtin_popcount(r[w]);
      s += (int64_t)plane_weight(P.bits, j) * c;
    }
    out[n] = s;
  }
}

}  // namespace eqk::lowbit
