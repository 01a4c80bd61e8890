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
// accumulators, each reduced once per panel (the outer-product form for 16 and more activation
// rows is in lowbit_float_outer_avx512_cpu.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/avx512_defined.h"
#include "common/lowbit_cpu_gfni.h"
#include "common/lowbit_float_cpu.h"

#define EQK_TARGET_F512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define EQK_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace eqk::lowbit_float {
namespace {

// Unmasked forms whose GCC 12 expansion merges into an undefined register (-Wmaybe-uninitialized
// at every use, see common/avx512_defined.h): the masked form with every lane selected.
constexpr __mmask16 kAll = 0xFFFF;
EQK_TARGET_F512 __attribute__((always_inline)) inline __m512i sext_low_bits(__m512i v,
                                                                       int bits) {
  const unsigned sh = 32u - static_cast<unsigned>(bits);
  return _mm512_mask_srai_epi32(v, kAll, _mm512_mask_slli_epi32(v, kAll, v, sh), sh);
}
EQK_TARGET_F512 __attribute__((always_inline)) inline __m512 to_ps(__m512i v) {
  return _mm512_mask_cvtepi32_ps(_mm512_setzero_ps(), kAll, v);
}
// Codes of 16 columns moved to the low bytes of 16 lanes (the rest don't matter to vpermps).
__attribute__((target("avx512f,avx512bw,avx512vbmi"), always_inline)) inline __m512i spread_codes(
    __m512i spread, __m512i codes) {
  return _mm512_mask_permutexvar_epi8(codes, ~__mmask64(0), spread, codes);
}
EQK_TARGET_F512 __attribute__((always_inline)) inline __m512 lookup(__m512i idx, __m512 table) {
  return _mm512_mask_permutexvar_ps(table, kAll, idx, table);
}

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
  const __m512i q = sext_low_bits(p, BITS);
  return _mm512_mul_ps(_mm512_add_ps(to_ps(q), _mm512_set1_ps(cz)),
                       _mm512_set1_ps(s));
}

// Unscaled (q + cz) of 16 columns: table lookup for b <= 4, else sign-extend and convert.
template <int BITS, bool SCALED>
EQK_TARGET_F512 __attribute__((always_inline)) inline __m512 decode16(
    const uint16_t* const* rows, int64_t c, __m512 table, __m512 czv, __m512 sv) {
  const __m512i idx = pattern16<BITS>(rows, c);
  if constexpr (BITS <= 4) {
    return lookup(idx, table);
  } else {
    const __m512i q = sext_low_bits(idx, BITS);
    const __m512 t = _mm512_add_ps(to_ps(q), czv);
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
    for (int n = 0; n < NR; ++n) out[m * ldo + n] += eqk::avx512::reduce_add_ps(acc[m][n]);
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
    for (int n = 0; n < NR; ++n) out[m * ldo + n] += eqk::avx512::reduce_add_ps(acc[m][n]);
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

// With VBMI and GFNI, b <= 4: one 64-byte load per plane covers 512 columns of a row, and
// two byte permutes and one gf2p8affineqb give the 64 sign-extended codes of 64 columns
// (lowbit_cpu_gfni.h: a canonical row's 8 consecutive 64-column blocks sit exactly where a
// tile's 8 rows do). A byte permute spreads 16 codes to the low bytes of 16 lanes, and the
// low 4 bits (the code mod 16) index the group's table; for bf16, 32 codes go to 16-bit lanes
// and one vpermw looks up 32 weights in the table's bf16 copy.
#define EQK_TARGET_GFNI_F                                                                 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,gfni,bmi2," \
                        "fma,avx512bf16")))

// The 16 fp32 entries as bf16, twice (vpermw indexes 32 entries).
EQK_TARGET_GFNI_F __attribute__((always_inline)) inline __m512i bf16_table(__m512 t) {
  return (__m512i)_mm512_cvtne2ps_pbh(t, t);
}

template <int BITS, bool BF16>
EQK_TARGET_GFNI_F void decode_gfni_t(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                     int64_t kc, void* panel_out) {
  static_assert(BITS <= 4, "the table lookup covers codes of at most 4 bits");
  eqk::lowbit::DecodeTable d;
  eqk::lowbit::make_decode_table(BITS, d);
  __m512i spread[4];
  for (int v = 0; v < 4; ++v) {
    alignas(64) uint8_t id[64] = {};
    for (int l = 0; l < 16; ++l) id[4 * l] = static_cast<uint8_t>(16 * v + l);
    spread[v] = _mm512_load_si512(id);
  }
  __m512i halves[2];
  for (int h = 0; h < 2; ++h) {
    alignas(64) uint8_t id[64] = {};
    for (int l = 0; l < 32; ++l) id[2 * l] = static_cast<uint8_t>(32 * h + l);
    halves[h] = _mm512_load_si512(id);
  }
  const int64_t row_bytes = 4 * w.W;
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t n = n0 + r;
    if (n + 2 < w.N) prefetch_row(w, n + 2, k0, kc, BITS);
    const float* srow = w.scale + n * w.G;
    const float* crow = w.cz + n * w.G;
    int64_t g = w.group(k0);
    int64_t g_end = g == w.G - 1 ? INT64_MAX : (g + 1) * w.gs;
    __m512 table = group_table<BITS>(BF16 ? 1.0f : srow[g], crow[g]);
    __m512i tbf = bf16_table(table);
    for (int64_t i = 0; i < kc; i += 512) {
      const int64_t byte0 = (k0 + i) / 8, avail = row_bytes - byte0;
      const __mmask64 lm = avail >= 64 ? ~__mmask64(0) : (__mmask64(1) << avail) - 1;
      __m512i z[2 * ((BITS + 1) / 2)];
      for (int j = 0; j < BITS; ++j)
        z[j] = _mm512_maskz_loadu_epi8(lm, reinterpret_cast<const char*>(w.row(j, n)) + byte0);
      if constexpr (BITS % 2 == 1) z[BITS] = z[0];
      const int64_t blocks = std::min<int64_t>(8, (kc - i + 63) / 64);
      for (int rb = 0; rb < blocks; ++rb) {
        const __m512i codes = eqk::lowbit::decode_row<BITS>(z, d, rb);
        const int64_t base = i + 64 * rb, nvec = std::min<int64_t>(4, (kc - base) / 16);
        if constexpr (BF16) {
          // 32 columns per vpermw: bytes 2l of the index are codes 32h + l, and the bf16 table
          // repeats the 16 entries in both halves (an index's low 5 bits are its code mod 32).
          uint16_t* out = static_cast<uint16_t*>(panel_out) + r * kc + base;
          for (int h = 0; 2 * h < nvec; ++h) {
            if (k0 + base + 32 * h >= g_end) {  // groups hold whole 32-column blocks
              ++g;
              g_end = g == w.G - 1 ? INT64_MAX : (g + 1) * w.gs;
              table = group_table<BITS>(1.0f, crow[g]);
              tbf = bf16_table(table);
            }
            const __m512i idx =
                _mm512_mask_permutexvar_epi8(codes, ~__mmask64(0), halves[h], codes);
            _mm512_storeu_si512(out + 32 * h,
                                _mm512_mask_permutexvar_epi16(tbf, ~__mmask32(0), idx, tbf));
          }
          continue;
        }
        __m512 wv[4];
        for (int v = 0; v < nvec; ++v) {
          if (k0 + base + 16 * v >= g_end) {  // groups hold whole 32-column blocks
            ++g;
            g_end = g == w.G - 1 ? INT64_MAX : (g + 1) * w.gs;
            table = group_table<BITS>(srow[g], crow[g]);
          }
          wv[v] = lookup(spread_codes(spread[v], codes), table);
        }
        float* out = static_cast<float*>(panel_out) + r * kc + base;
        for (int v = 0; v < nvec; ++v) _mm512_storeu_ps(out + 16 * v, wv[v]);
      }
    }
  }
}

// Few activation rows: decode in registers and multiply at once (a panel would be written and
// read back for as few as one FMA per weight). Four accumulators per activation row hide the
// FMA latency. out[m * ldo + n] = full-row sums for rows [n0, n1).
template <int BITS, int MR>
EQK_TARGET_GFNI_F void gemv_gfni_t(const Weights& w, const float* x, int64_t ldx, int64_t n0,
                                   int64_t n1, float* out, int64_t ldo) {
  eqk::lowbit::DecodeTable d;
  eqk::lowbit::make_decode_table(BITS, d);
  __m512i spread[4];
  for (int v = 0; v < 4; ++v) {
    alignas(64) uint8_t id[64] = {};
    for (int l = 0; l < 16; ++l) id[4 * l] = static_cast<uint8_t>(16 * v + l);
    spread[v] = _mm512_load_si512(id);
  }
  const int64_t row_bytes = 4 * w.W, kp = 32 * w.W;
  for (int64_t n = n0; n < n1; ++n) {
    if (n + 2 < w.N) prefetch_row(w, n + 2, 0, kp, BITS);
    const float* srow = w.scale + n * w.G;
    const float* crow = w.cz + n * w.G;
    int64_t g = 0;
    int64_t g_end = w.G == 1 ? INT64_MAX : w.gs;
    __m512 table = group_table<BITS>(srow[0], crow[0]);
    __m512 acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < kp; i += 512) {
      const int64_t avail = row_bytes - i / 8;
      const __mmask64 lm = avail >= 64 ? ~__mmask64(0) : (__mmask64(1) << avail) - 1;
      __m512i z[2 * ((BITS + 1) / 2)];
      for (int j = 0; j < BITS; ++j)
        z[j] = _mm512_maskz_loadu_epi8(lm, reinterpret_cast<const char*>(w.row(j, n)) + i / 8);
      if constexpr (BITS % 2 == 1) z[BITS] = z[0];
      const int64_t blocks = std::min<int64_t>(8, (kp - i + 63) / 64);
      for (int rb = 0; rb < blocks; ++rb) {
        const __m512i codes = eqk::lowbit::decode_row<BITS>(z, d, rb);
        const int64_t base = i + 64 * rb, nvec = std::min<int64_t>(4, (kp - base) / 16);
        for (int v = 0; v < nvec; ++v) {
          if (base + 16 * v >= g_end) {
            ++g;
            g_end = g == w.G - 1 ? INT64_MAX : (g + 1) * w.gs;
            table = group_table<BITS>(srow[g], crow[g]);
          }
          const __m512 wv =
              lookup(spread_codes(spread[v], codes), table);
          for (int m = 0; m < MR; ++m)
            acc[m][v] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + base + 16 * v), wv,
                                        acc[m][v]);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      out[m * ldo + n] = eqk::avx512::reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
  }
}

bool use_gfni(const Weights& w) { return w.gfni_decode && w.bits <= 4; }

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
  if (use_gfni(w)) {
    switch (w.bits) {
      case 1: return decode_gfni_t<1, false>(w, n0, nb, k0, kc, panel);
      case 2: return decode_gfni_t<2, false>(w, n0, nb, k0, kc, panel);
      case 3: return decode_gfni_t<3, false>(w, n0, nb, k0, kc, panel);
      default: return decode_gfni_t<4, false>(w, n0, nb, k0, kc, panel);
    }
  }
#define EQK_CALL(B) decode_f32_t<B>(w, n0, nb, k0, kc, panel)
  EQK_BITS_SWITCH(EQK_CALL)
#undef EQK_CALL
}

void decode_panel_bf16_avx512bf16(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                  int64_t kc, uint16_t* panel) {
  if (use_gfni(w)) {
    switch (w.bits) {
      case 1: return decode_gfni_t<1, true>(w, n0, nb, k0, kc, panel);
      case 2: return decode_gfni_t<2, true>(w, n0, nb, k0, kc, panel);
      case 3: return decode_gfni_t<3, true>(w, n0, nb, k0, kc, panel);
      default: return decode_gfni_t<4, true>(w, n0, nb, k0, kc, panel);
    }
  }
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
  // 3 x 4 blocks: a per-group partial and a running sum of each pair fit the 32 registers.
  int64_t m = 0;
  for (; m + 3 <= mb; m += 3)
    gemm_bf16_rows<3>(x + m * ldx, ldx, panel, nb, kc, s, ldg, gs_kc, out + m * ldo, ldo);
  switch (mb - m) {
    case 2:
      gemm_bf16_rows<2>(x + m * ldx, ldx, panel, nb, kc, s, ldg, gs_kc, out + m * ldo, ldo);
      break;
    case 1:
      gemm_bf16_rows<1>(x + m * ldx, ldx, panel, nb, kc, s, ldg, gs_kc, out + m * ldo, ldo);
      break;
    default:
      break;
  }
}

}  // namespace eqk::lowbit_float

namespace eqk::lowbit_float {

bool gemv_regs_avx512(const Weights& w, const float* x, int64_t ldx, int64_t M, int64_t n0,
                      int64_t n1, float* out, int64_t ldo) {
  if (!use_gfni(w) || M < 1 || M > 4) return false;
#define EQK_M(B)                                                  \
  switch (M) {                                                    \
    case 1: gemv_gfni_t<B, 1>(w, x, ldx, n0, n1, out, ldo); break; \
    case 2: gemv_gfni_t<B, 2>(w, x, ldx, n0, n1, out, ldo); break; \
    case 3: gemv_gfni_t<B, 3>(w, x, ldx, n0, n1, out, ldo); break; \
    default: gemv_gfni_t<B, 4>(w, x, ldx, n0, n1, out, ldo); break; \
  }
  switch (w.bits) {
    case 1: EQK_M(1) break;
    case 2: EQK_M(2) break;
    case 3: EQK_M(3) break;
    default: EQK_M(4) break;
  }
#undef EQK_M
  return true;
}

}  // namespace eqk::lowbit_float
