// Kernels of the fused integer low-bit path (csrc/lowbit_gemm/lowbit_fused_cpu.cpp): activation
// quantization to byte codes, and an int8 GEMM over weights repacked once per planes tensor
// (DESIGN.md "Bit planes and the low-bit GEMM": "Kernels may repack each plane into a kernel
// layout at load time"; the repacked weights are a cache, the planes stay canonical).
//
// Packed weight layout ("k4n16"): int8 [K4][Npad][4], K4 = ceil(K/4), Npad = 16*ceil(N/16),
// element [kk][n][i] = q_b[n, 4*kk + i] (zero past K and past N). One 64-byte row [kk][16t..]
// is 16 output channels x 4 columns: exactly one VNNI dpbusd operand.
//
// Activations enter as unsigned bytes u = code - off (off = -128 for a signed code range, so
// u = code + 128; off = 0 for an unsigned range): dpbusd multiplies unsigned by signed bytes,
// and the caller restores sum code*q = sum u*q + off * sum q. Products are at most 255*128,
// int32 sums exact while K*255*2^(bits-1) < 2^31 (the Python op checks).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/lowbit_cpu_avx2.h"
#include "common/lowbit_cpu_avx512.h"
#include "common/avx512_defined.h"

namespace eqk::lowbit {

// ------------------------------------------------------------------------------------------
// Quantization: out[i] = uint8(clamp(nearbyint(fl32(x[i] * inv)) + z, qmin, qmax) - sub), all
// in fp32 exactly as fake_quant's forward (round half to even under the default rounding
// mode; + z and the clamp are exact for in-range values, and monotone otherwise). Returns the
// sum of the codes (before - sub).

inline int64_t quantize_portable(const float* x, int64_t n, float inv, float z, float lo,
                                 float hi, int sub, uint8_t* out) {
  int64_t s = 0;
  for (int64_t i = 0; i < n; ++i) {
    float r = std::nearbyint(x[i] * inv) + z;
    r = r < lo ? lo : (r > hi ? hi : r);
    const int code = static_cast<int>(r);
    s += code;
    out[i] = static_cast<uint8_t>(code - sub);
  }
  return s;
}

EQK_TARGET_AVX2 inline int64_t quantize_avx2(const float* x, int64_t n, float inv, float z,
                                             float lo, float hi, int sub, uint8_t* out) {
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z);
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const __m256i vsub = _mm256_set1_epi32(sub);
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
    v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
    const __m256i code = _mm256_cvttps_epi32(v);
    acc = _mm256_add_epi32(acc, code);  // |code| <= 255: no overflow below 2^23 elements/call
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_sub_epi32(code, vsub));
    for (int j = 0; j < 8; ++j) out[i + j] = static_cast<uint8_t>(t[j]);
  }
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
  int64_t s = 0;
  for (int j = 0; j < 8; ++j) s += t[j];
  return s + quantize_portable(x + i, n - i, inv, z, lo, hi, sub, out + i);
}

EQK_TARGET_AVX512 inline int64_t quantize_avx512(const float* x, int64_t n, float inv, float z,
                                                 float lo, float hi, int sub, uint8_t* out) {
  const __m512 vinv = _mm512_set1_ps(inv), vz = _mm512_set1_ps(z);
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const __m512i vsub = _mm512_set1_epi32(sub);
  __m512i acc = _mm512_setzero_si512();  // |code| <= 255: the int32 sum is exact below 2^23 elements
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
    v = _mm512_add_ps(avx512::roundscale_ps<_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC>(v), vz);
    v = avx512::min_ps(avx512::max_ps(v, vlo), vhi);
    const __m512i code = avx512::cvttps_epi32(v);
    acc = _mm512_add_epi32(acc, code);
    // code - sub lies in [0, 255]: the low byte of each int32 lane
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     avx512::cvtepi32_epi8(_mm512_sub_epi32(code, vsub)));
  }
  return avx512::reduce_add_epi32(acc) +
         quantize_portable(x + i, n - i, inv, z, lo, hi, sub, out + i);
}

inline int64_t quantize_codes(int level, const float* x, int64_t n, float inv, float z, float lo,
                              float hi, int sub, uint8_t* out) {
  if (level >= 2) return quantize_avx512(x, n, inv, z, lo, hi, sub, out);
  if (level >= 1) return quantize_avx2(x, n, inv, z, lo, hi, sub, out);
  return quantize_portable(x, n, inv, z, lo, hi, sub, out);
}

// ------------------------------------------------------------------------------------------
// GEMM on k4n16 weights: C[r, n] = sum_k A[r, k] * Wp[k/4][n][k%4] for r < rows, n < Npad.
// A: unsigned bytes, row stride lda >= 4*K4 (columns past K must be finite bytes; the weights
// there are zero). C row stride ldc >= Npad.

inline void packed_gemm_portable(const uint8_t* A, int64_t lda, int64_t rows, const int8_t* Wp,
                                 int64_t K4, int64_t Npad, int32_t* C, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* c = C + r * ldc;
    for (int64_t n = 0; n < Npad; ++n) c[n] = 0;
    for (int64_t kk = 0; kk < K4; ++kk) {
      const uint8_t* a = A + r * lda + 4 * kk;
      const int8_t* w = Wp + kk * Npad * 4;
      for (int64_t n = 0; n < Npad; ++n)
        c[n] += a[0] * w[4 * n] + a[1] * w[4 * n + 1] + a[2] * w[4 * n + 2] + a[3] * w[4 * n + 3];
    }
  }
}

// MR rows x NTB tiles of 16 channels, all of K: MR*NTB accumulators, one broadcast of 4
// activation bytes per row and one 64-byte weight load per tile and k-group.
template <int MR, int NTB>
EQK_TARGET_AVX512 inline void packed_tile_avx512(const uint8_t* A, int64_t lda, const int8_t* Wp,
                                                 int64_t K4, int64_t Npad, int32_t* C,
                                                 int64_t ldc) {
  __m512i acc[MR][NTB];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NTB; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < K4; ++kk) {
    const int8_t* w = Wp + kk * Npad * 4;
    __m512i wv[NTB];
    for (int t = 0; t < NTB; ++t) wv[t] = _mm512_loadu_si512(w + 64 * t);
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, A + r * lda + 4 * kk, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      for (int t = 0; t < NTB; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], av, wv[t]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NTB; ++t) _mm512_storeu_si512(C + r * ldc + 16 * t, acc[r][t]);
}

template <int MR>
EQK_TARGET_AVX512 inline void packed_rows_avx512(const uint8_t* A, int64_t lda, const int8_t* Wp,
                                                 int64_t K4, int64_t Npad, int64_t t0, int ntb,
                                                 int32_t* C, int64_t ldc) {
  const int8_t* w = Wp + 64 * t0;
  int32_t* c = C + 16 * t0;
  switch (ntb) {
    case 1: packed_tile_avx512<MR, 1>(A, lda, w, K4, Npad, c, ldc); return;
    case 2: packed_tile_avx512<MR, 2>(A, lda, w, K4, Npad, c, ldc); return;
    case 3: packed_tile_avx512<MR, 3>(A, lda, w, K4, Npad, c, ldc); return;
    default: packed_tile_avx512<MR, 4>(A, lda, w, K4, Npad, c, ldc); return;
  }
}

EQK_TARGET_AVX512 inline void packed_gemm_avx512(const uint8_t* A, int64_t lda, int64_t rows,
                                                 const int8_t* Wp, int64_t K4, int64_t Npad,
                                                 int32_t* C, int64_t ldc) {
  const int64_t NT = Npad / 16;
  for (int64_t t0 = 0; t0 < NT; t0 += 4) {
    const int ntb = static_cast<int>(NT - t0 < 4 ? NT - t0 : 4);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
      packed_rows_avx512<4>(A + r * lda, lda, Wp, K4, Npad, t0, ntb, C + r * ldc, ldc);
    const int64_t left = rows - r;
    if (left == 3) packed_rows_avx512<3>(A + r * lda, lda, Wp, K4, Npad, t0, ntb, C + r * ldc, ldc);
    if (left == 2) packed_rows_avx512<2>(A + r * lda, lda, Wp, K4, Npad, t0, ntb, C + r * ldc, ldc);
    if (left == 1) packed_rows_avx512<1>(A + r * lda, lda, Wp, K4, Npad, t0, ntb, C + r * ldc, ldc);
  }
}

// AVX2: maddubs (u8 x s8 -> saturating s16 pairs) is exact only while 2*255*max|q| <= 32767,
// i.e. for weights of at most 7 bits (|q| <= 64); 8-bit weights take the portable loop. A
// 16-channel tile is two 8-channel halves; MR x 2*NTB accumulators fit the 16 ymm registers.
template <int MR, int NTB>
EQK_TARGET_AVX2 inline void packed_tile_avx2(const uint8_t* A, int64_t lda, const int8_t* Wp,
                                             int64_t K4, int64_t Npad, int32_t* C, int64_t ldc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2 * NTB];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < 2 * NTB; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t kk = 0; kk < K4; ++kk) {
    const int8_t* w = Wp + kk * Npad * 4;
    __m256i wv[2 * NTB];
    for (int t = 0; t < 2 * NTB; ++t)
      wv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * t));
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, A + r * lda + 4 * kk, 4);
      const __m256i av = _mm256_set1_epi32(a4);
      for (int t = 0; t < 2 * NTB; ++t)
        acc[r][t] = _mm256_add_epi32(
            acc[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(av, wv[t]), ones));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < 2 * NTB; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + r * ldc + 8 * t), acc[r][t]);
}

EQK_TARGET_AVX2 inline void packed_gemm_avx2(const uint8_t* A, int64_t lda, int64_t rows,
                                             const int8_t* Wp, int64_t K4, int64_t Npad,
                                             int32_t* C, int64_t ldc) {
  const int64_t NT = Npad / 16;
  for (int64_t t0 = 0; t0 < NT; t0 += 2) {
    const int8_t* w = Wp + 64 * t0;
    const bool two = NT - t0 >= 2;
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) {
      if (two)
        packed_tile_avx2<2, 2>(A + r * lda, lda, w, K4, Npad, C + r * ldc + 16 * t0, ldc);
      else
        packed_tile_avx2<2, 1>(A + r * lda, lda, w, K4, Npad, C + r * ldc + 16 * t0, ldc);
    }
    if (r < rows) {
      if (two)
        packed_tile_avx2<1, 2>(A + r * lda, lda, w, K4, Npad, C + r * ldc + 16 * t0, ldc);
      else
        packed_tile_avx2<1, 1>(A + r * lda, lda, w, K4, Npad, C + r * ldc + 16 * t0, ldc);
    }
  }
}

// bits: the weight width (decides whether the AVX2 maddubs kernel is exact).
inline void packed_gemm(int level, int bits, const uint8_t* A, int64_t lda, int64_t rows,
                        const int8_t* Wp, int64_t K4, int64_t Npad, int32_t* C, int64_t ldc) {
  if (level >= 2)
    packed_gemm_avx512(A, lda, rows, Wp, K4, Npad, C, ldc);
  else if (level == 1 && bits <= 7)
    packed_gemm_avx2(A, lda, rows, Wp, K4, Npad, C, ldc);
  else
    packed_gemm_portable(A, lda, rows, Wp, K4, Npad, C, ldc);
}

}  // namespace eqk::lowbit
