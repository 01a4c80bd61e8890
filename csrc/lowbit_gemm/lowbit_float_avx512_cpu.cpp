// AVX-512 kernels of the float-activation low-bit GEMM (interface: common/lowbit_float_cpu.h).
// Compiled with function target attributes; the driver calls them only when the running CPU
// has the ISA (common/cpu_features.h).
//
// Decode: 16 plane bits are a k-mask over 16 columns, so the raw b-bit pattern of 16 weights
// is b masked ORs of the plane's bit value (mask loads go to the load ports). For b <= 4 the
// pattern indexes a 16-entry table of the group's fp32 weights fl32((q + cz) * s) held in one
// register (vpermps), which folds sign extension, compensation, zero point and the per-group
// scale into one shuffle; wider codes sign-extend, convert and scale.
// GEMM: dot-product form (the panel holds weight rows along k), an MR x NR block of 16-lane
// accumulators, each reduced once per panel.
#include <immintrin.h>

#include <cstdint>

#include "common/lowbit_float_cpu.h"

#define EQK_TARGET_F512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define EQK_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace eqk::lowbit_float {
namespace {

// A panel row is `bits` short plane streams (kc/8 bytes each): too short for the hardware
// prefetchers to ramp up, so the row two ahead is fetched explicitly.
inline void prefetch_row(const Weights& w, int64_t n, int64_t k0, int64_t kc, int bits) {
  for (int j = 0; j < bits; ++j) {
    const char* p = reinterpret_cast<const char*>(w.row(j, n)) + k0 / 8;
    for (int64_t b = 0; b < kc / 8; b += 64) __builtin_prefetch(p + b);
  }
}

// Raw b-bit patterns of the 16 columns starting at 16-column chunk `c` of row n.
template <int BITS>
EQK_TARGET_F512 __attribute__((always_inline)) inline __m512i pattern16(
    const uint16_t* const* rows, int64_t c) {
  __m512i idx = _mm512_maskz_mov_epi32(_load_mask16((__mmask16*)(rows[0] + c)),
                                       _mm512_set1_epi32(1 << (BITS - 1)));
#pragma GCC unroll 8
  for (int j = 1; j < BITS; ++j)
    idx = _mm512_mask_or_epi32(idx, _load_mask16((__mmask16*)(rows[j] + c)), idx,
                               _mm512_set1_epi32(1 << (BITS - 1 - j)));
  return idx;
}

// The group's weight table (b <= 4): entry p = fl32((code(p) + cz) * s).
template <int BITS>
EQK_TARGET_F512 inline __m512 group_table(float s, float cz) {
  const __m512i p = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i q = _mm512_srai_epi32(_mm512_slli_epi32(p, 32 - BITS), 32 - BITS);
  return _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(cz)),
                       _mm512_set1_ps(s));
}

// Unscaled (q + cz) of 16 columns: table lookup for b <= 4, else sign-extend and convert.
template <int BITS, bool SCALED>
EQK_TARGET_F512 __attribute__((always_inline)) inline __m512 decode16(
    const uint16_t* const* rows, int64_t c, __m512 table, __m512 czv, __m512 sv) {
  const __m512i idx = pattern16<BITS>(rows, c);
  if constexpr (BITS <= 4) {
    return _mm512_permutexvar_ps(idx, table);
  } else {
    const __m512i q = _mm512_srai_epi32(_mm512_slli_epi32(idx, 32 - BITS), 32 - BITS);
    const __m512 t = _mm512_add_ps(_mm512_cvtepi32_ps(q), czv);
    return SCALED ? _mm512_mul_ps(t, sv) : t;
  }
}

template <int BITS>
EQK_TARGET_F512 void decode_f32_t(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                  int64_t kc, float* panel) {
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t n = n0 + r;
    const uint16_t* rows[BITS];
    for (int j = 0; j < BITS; ++j) rows[j] = reinterpret_cast<const uint16_t*>(w.row(j, n));
    const float* srow = w.scale + n * w.G;
    const float* crow = w.cz + n * w.G;
    float* out = panel + r * kc;
    if (n + 2 < w.N) prefetch_row(w, n + 2, k0, kc, BITS);
    for (int64_t i = 0, g = w.group(k0); i < kc; g = g + 1 < w.G ? g + 1 : g) {
      const int64_t end = w.group_end(g, k0, kc);
      const __m512 table = BITS <= 4 ? group_table<BITS>(srow[g], crow[g]) : _mm512_setzero_ps();
      const __m512 czv = _mm512_set1_ps(crow[g]), sv = _mm512_set1_ps(srow[g]);
      for (; i < end; i += 16)
        _mm512_storeu_ps(out + i, decode16<BITS, true>(rows, (k0 + i) / 16, table, czv, sv));
    }
  }
}

template <int MR, int NR>
EQK_TARGET_F512 void gemm_f32_block(const float* x, int64_t ldx, const float* panel, int64_t kc,
                                    float* out, int64_t ldo) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kc; i += 16) {
    __m512 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_loadu_ps(panel + n * kc + i);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + i);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m * ldo + n] += _mm512_reduce_add_ps(acc[m][n]);
}

template <int MR>
EQK_TARGET_F512 void gemm_f32_rows(const float* x, int64_t ldx, const float* panel, int64_t nb,
                                   int64_t kc, float* out, int64_t ldo) {
  int64_t n = 0;
  for (; n + 4 <= nb; n += 4) gemm_f32_block<MR, 4>(x, ldx, panel + n * kc, kc, out + n, ldo);
  for (; n < nb; ++n) gemm_f32_block<MR, 1>(x, ldx, panel + n * kc, kc, out + n, ldo);
}

// bf16: 32 columns per vdpbf16ps. Each group's products accumulate from zero and are scaled
// into the running sum, so the per-group scale costs one FMA per group and accumulator.
template <int MR, int NR>
EQK_TARGET_BF16 void gemm_bf16_block(const uint16_t* x, int64_t ldx, const uint16_t* panel,
                                     int64_t kc, const float* scale, int64_t ldg, int64_t gs_kc,
                                     float* out, int64_t ldo) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g0 = 0, gi = 0; g0 < kc; g0 += gs_kc, ++gi) {
    __m512 part[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) part[m][n] = _mm512_setzero_ps();
    for (int64_t i = g0; i < g0 + gs_kc; i += 32) {
      __m512bh wv[NR];
      for (int n = 0; n < NR; ++n) wv[n] = (__m512bh)_mm512_loadu_si512(panel + n * kc + i);
      for (int m = 0; m < MR; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + i);
        for (int n = 0; n < NR; ++n) part[m][n] = _mm512_dpbf16_ps(part[m][n], xv, wv[n]);
      }
    }
    for (int n = 0; n < NR; ++n) {
      const __m512 sv = _mm512_set1_ps(scale[n * ldg + gi]);
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_fmadd_ps(part[m][n], sv, acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m * ldo + n] += _mm512_reduce_add_ps(acc[m][n]);
}

template <int MR>
EQK_TARGET_BF16 void gemm_bf16_rows(const uint16_t* x, int64_t ldx, const uint16_t* panel,
                                    int64_t nb, int64_t kc, const float* scale, int64_t ldg,
                                    int64_t gs_kc, float* out, int64_t ldo) {
  int64_t n = 0;
  for (; n + 4 <= nb; n += 4)
    gemm_bf16_block<MR, 4>(x, ldx, panel + n * kc, kc, scale + n * ldg, ldg, gs_kc, out + n, ldo);
  for (; n < nb; ++n)
    gemm_bf16_block<MR, 1>(x, ldx, panel + n * kc, kc, scale + n * ldg, ldg, gs_kc, out + n, ldo);
}

template <int BITS>
EQK_TARGET_BF16 void decode_bf16_t(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                   int64_t kc, uint16_t* panel) {
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t n = n0 + r;
    const uint16_t* rows[BITS];
    for (int j = 0; j < BITS; ++j) rows[j] = reinterpret_cast<const uint16_t*>(w.row(j, n));
    const float* crow = w.cz + n * w.G;
    uint16_t* out = panel + r * kc;
    const __m512 one = _mm512_set1_ps(1.0f);
    if (n + 2 < w.N) prefetch_row(w, n + 2, k0, kc, BITS);
    // a group holds whole 32-column blocks
    for (int64_t i = 0, g = w.group(k0); i < kc; g = g + 1 < w.G ? g + 1 : g) {
      const int64_t end = w.group_end(g, k0, kc);
      const __m512 table = BITS <= 4 ? group_table<BITS>(1.0f, crow[g]) : _mm512_setzero_ps();
      const __m512 czv = _mm512_set1_ps(crow[g]);
      for (; i < end; i += 32) {
        const int64_t c = (k0 + i) / 16;
        const __m512 lo = decode16<BITS, false>(rows, c, table, czv, one);
        const __m512 hi = decode16<BITS, false>(rows, c + 1, table, czv, one);
        _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
}

}  // namespace

#define EQK_BITS_SWITCH(CALL)                                                             \
  switch (w.bits) {                                                                       \
    case 1: CALL(1); break;                                                               \
    case 2: CALL(2); break;                                                               \
    case 3: CALL(3); break;                                                               \
    case 4: CALL(4); break;                                                               \
    case 5: CALL(5); break;                                                               \
    case 6: CALL(6); break;                                                               \
    case 7: CALL(7); break;                                                               \
    default: CALL(8); break;                                                              \
  }

void decode_panel_f32_avx512(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                             float* panel) {
#define EQK_CALL(B) decode_f32_t<B>(w, n0, nb, k0, kc, panel)
  EQK_BITS_SWITCH(EQK_CALL)
#undef EQK_CALL
}

void decode_panel_bf16_avx512bf16(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                  int64_t kc, uint16_t* panel) {
#define EQK_CALL(B) decode_bf16_t<B>(w, n0, nb, k0, kc, panel)
  EQK_BITS_SWITCH(EQK_CALL)
#undef EQK_CALL
}

void panel_gemm_f32_avx512(const float* x, int64_t ldx, int64_t mb, const float* panel,
                           int64_t nb, int64_t kc, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= mb; m += 4) gemm_f32_rows<4>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo);
  switch (mb - m) {
    case 3: gemm_f32_rows<3>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo); break;
    case 2: gemm_f32_rows<2>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo); break;
    case 1: gemm_f32_rows<1>(x + m * ldx, ldx, panel, nb, kc, out + m * ldo, ldo); break;
    default: break;
  }
}

void panel_gemm_bf16_avx512bf16(const uint16_t* x, int64_t ldx, int64_t mb, const uint16_t* panel,
                                int64_t nb, int64_t kc, const Weights& w, int64_t n0, int64_t g0,
                                int64_t gs_kc, float* out, int64_t ldo) {
  const float* s = w.scale + n0 * w.G + g0;
  const int64_t ldg = w.G;
  int64_t m = 0;
  for (; m + 4 <= mb; m += 4)
    gemm_bf16_rows<4>(x + m * ldx, ldx, panel, nb, kc, s, ldg, gs_kc, out + m * ldo, ldo);
  switch (mb - m) {
    case 3: gemm_bf16_rows<3>(x + m * ldx, ldx, panel, nb, kc, s, ldg, gs_kc, out + m * ldo, ldo); break;
    case 2: gemm_bf16_rows<2>(x + m * ldx, ldx, panel, nb, kc, s, ldg, gs_kc, out + m * ldo, ldo); break;
    case 1: gemm_bf16_rows<1>(x + m * ldx, ldx, panel, nb, kc, s, ldg, gs_kc, out + m * ldo, ldo); break;
    default: break;
  }
}

}  // namespace eqk::lowbit_float
