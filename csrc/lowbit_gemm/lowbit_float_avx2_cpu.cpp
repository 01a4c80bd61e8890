// AVX2 + FMA kernels of the float-activation low-bit GEMM (interface: common/lowbit_float_cpu.h),
// compiled with function target attributes and called only on CPUs that have them. AVX2 has
// no mask registers: each plane byte (8 columns) is broadcast, and-ed with the lane bits and
// compared, giving all-ones lanes where the plane bit is set.
#include <immintrin.h>

#include <cstdint>

#include "common/lowbit_float_cpu.h"

#define EQK_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace eqk::lowbit_float {
namespace {

template <int BITS>
EQK_TARGET_AVX2 void decode_f32_t(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                  int64_t kc, float* panel) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* rows[BITS];
    for (int j = 0; j < BITS; ++j) rows[j] = reinterpret_cast<const uint8_t*>(w.row(j, n));
    const float* srow = w.scale + n * w.G;
    const float* crow = w.cz + n * w.G;
    float* out = panel + r * kc;
    for (int64_t i = 0, g = w.group(k0); i < kc; g = g + 1 < w.G ? g + 1 : g) {
      const int64_t end = w.group_end(g, k0, kc);
      const __m256 czv = _mm256_set1_ps(crow[g]), sv = _mm256_set1_ps(srow[g]);
      for (; i < end; i += 8) {
      const int64_t byte = (k0 + i) / 8;
      __m256i idx = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int j = 0; j < BITS; ++j) {
        const __m256i b = _mm256_and_si256(_mm256_set1_epi32(rows[j][byte]), lane_bit);
        const __m256i set = _mm256_cmpeq_epi32(b, lane_bit);
        idx = _mm256_or_si256(idx, _mm256_and_si256(set, _mm256_set1_epi32(1 << (BITS - 1 - j))));
      }
      const __m256i q = _mm256_srai_epi32(_mm256_slli_epi32(idx, 32 - BITS), 32 - BITS);
      const __m256 t = _mm256_add_ps(_mm256_cvtepi32_ps(q), czv);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(t, sv));
      }
    }
  }
}

EQK_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR, int NR>
EQK_TARGET_AVX2 void gemm_f32_block(const float* x, int64_t ldx, const float* panel, int64_t kc,
                                    float* out, int64_t ldo) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t i = 0; i < kc; i += 8) {
    __m256 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm256_loadu_ps(panel + n * kc + i);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + i);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m * ldo + n] += hsum(acc[m][n]);
}

template <int MR>
EQK_TARGET_AVX2 void gemm_f32_rows(const float* x, int64_t ldx, const float* panel, int64_t nb,
                                   int64_t kc, float* out, int64_t ldo) {
  int64_t n = 0;
  for (; n + 3 <= nb; n += 3) gemm_f32_block<MR, 3>(x, ldx, panel + n * kc, kc, out + n, ldo);
  for (; n < nb; ++n) gemm_f32_block<MR, 1>(x, ldx, panel + n * kc, kc, out + n, ldo);
}

}  // namespace

void decode_panel_f32_avx2(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                           float* panel) {
  switch (w.bits) {
    case 1: decode_f32_t<1>(w, n0, nb, k0, kc, panel); break;
    case 2: decode_f32_t<2>(w, n0, nb, k0, kc, panel); break;
    case 3: decode_f32_t<3>(w, n0, nb, k0, kc, panel); break;
    case 4: decode_f32_t<4>(w, n0, nb, k0, kc, panel); break;
    case 5: decode_f32_t<5>(w, n0, nb, k0, kc, panel); break;
    case 6: decode_f32_t<6>(w, n0, nb, k0, kc, panel); break;
    case 7: decode_f32_t<7>(w, n0, nb, k0, kc, panel); break;
    default: decode_f32_t<8>(w, n0, nb, k0, kc, panel); break;
  }
}

void panel_gemm_f32_avx2(const float* x, int64_t ldx, int64_t mb, const float* panel, int64_t nb,
                         int64_t kc, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= mb; m += 4) gemm_f32_rows<4>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo);
  switch (mb - m) {
    case 3: gemm_f32_rows<3>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo); break;
    case 2: gemm_f32_rows<2>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo); break;
    case 1: gemm_f32_rows<1>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo); break;
    default: break;
  }
}

}  // namespace eqk::lowbit_float
