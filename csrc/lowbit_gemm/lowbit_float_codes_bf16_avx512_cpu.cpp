// bf16 activations, b <= 4 (AVX512_BF16 + VBMI + GFNI), few activation rows: the weight codes
// are decoded in registers (common/lowbit_float_codes.h) and multiplied at once with vdpbf16ps,
// no panel (interface: common/lowbit_float_cpu.h).
//
// Why codes and not weights: with y = sum_k (q + cz) s x split as
//   y[m, n] = sum_g s[n, g] sum_{k in g} q x  +  sum_g s[n, g] cz[n, g] xsum[m, g],
// the table holds only the integer code q (exact in bf16), so it is the same for every group
// and row of the call (a table carrying cz had to be rebuilt per group); the per-group (c - z)
// terms are a small [M, N] correction from the activations' per-group sums. The products q x
// are exact in fp32, as in the panel path. Per 128 columns of a row, W4: 11 vector ops of
// decode, then 4 vdpbf16ps and one scaling FMA per activation row (the fp32 path converted bf16
// activations and ran 8 FMAs per row instead).
//
// The activations are permuted once per call to the decoder's column order (permute_x_codes):
// 32-bit lanes 4c..4c+3 of every code vector hold 32-column chunk c of the block, so one
// per-lane scale vector serves groups of 32 and 64 columns.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/avx512_defined.h"
#include "common/lowbit_float_codes.h"
#include "common/lowbit_float_cpu.h"

namespace eqk::lowbit_float {
namespace {

using namespace codes;

// Call-wide constants of one weight set.
struct CodesCall {
  const Weights* w;
  const uint16_t* x;  // permuted activations [M][kpad], inner order
  const float* xsum;  // [M][G]
  int64_t M, kpad;
};

// tot[m] += (sum of the NACC partials of row m) * sv, the partials restarted.
template <int MR, int NACC>
EQK_TARGET_CODES __attribute__((always_inline)) inline void flush(__m512 (*part)[NACC],
                                                                  __m512* tot, __m512 sv) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    __m512 p = part[m][0];
    for (int a = 1; a < NACC; ++a) p = _mm512_add_ps(p, part[m][a]);
    tot[m] = _mm512_fmadd_ps(p, sv, tot[m]);
    for (int a = 0; a < NACC; ++a) part[m][a] = _mm512_setzero_ps();
  }
}

// Activation rows m0 .. m0 + MR - 1 against weight row n: out[m, n] = y[m, n]. Per (m, n):
// NACC partials of exact code products (vdpbf16ps) and a running sum; per group (wide: whole
// 128-column blocks) or per block (narrow: per-lane scales cs, one per 32 columns, lanes
// 4c..4c+3 = chunk c) the partials are scaled into the sum. NACC > 1 where flushes are rare:
// independent chains hide the vdpbf16ps latency when few rows share a decoded block.
template <int BITS, int MR, bool NARROW, int NACC>
EQK_TARGET_CODES void tile_t(const CodesCall& c, const NibbleDecode& d, int64_t n, int64_t m0,
                             const float* cs, float* out, int64_t ldo) {
  const Weights& w = *c.w;
  const float* srow = w.scale + n * w.G;
  const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 tot[MR], part[MR][NACC];
  for (int m = 0; m < MR; ++m) {
    tot[m] = _mm512_setzero_ps();
    for (int a = 0; a < NACC; ++a) part[m][a] = _mm512_setzero_ps();
  }
  const uint16_t* x0 = c.x + m0 * c.kpad;
  int64_t g = 0;
  for (int64_t ks = 0; ks < c.kpad; ks += kSuper) {
    // The row two ahead, a line per plane, scale and cz row per 512 columns: a row is a few
    // short streams that the hardware prefetchers do not pick up, and a burst of prefetches
    // at the row's start would overflow the miss buffers.
    if (m0 == 0 && n + 2 < w.N) {
      for (int j = 0; j < BITS; ++j)
        __builtin_prefetch(reinterpret_cast<const char*>(w.row(j, n + 2)) + ks / 8);
      if (ks / 8 < 4 * w.G) {
        __builtin_prefetch(reinterpret_cast<const char*>(w.scale + (n + 2) * w.G) + ks / 8);
        __builtin_prefetch(reinterpret_cast<const char*>(w.cz + (n + 2) * w.G) + ks / 8);
      }
    }
    __m512i z[4];
    load_planes<BITS>(w, n, ks, z);
    const int64_t nblk = std::min<int64_t>(4, (c.kpad - ks) / kBlock);
    for (int t = 0; t < nblk; ++t) {
      const int64_t kb = ks + kBlock * t;
      const __m512i nib = nibbles<BITS>(z, d, t);
      __m512bh wv[4];
      for (int s = 0; s < 4; ++s) wv[s] = lookup_codes(nib, s, d.table);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const uint16_t* xm = x0 + m * c.kpad + kb;
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s)
          part[m][s % NACC] = _mm512_dpbf16_ps(
              part[m][s % NACC], (__m512bh)_mm512_loadu_si512(xm + 32 * s), wv[s]);
      }
      if constexpr (NARROW) {
        // chunks past the row (K % 128 != 0) read no scale: their codes and x are zero
        const int64_t left = w.W - kb / 32;
        const __mmask16 lanes = left >= 4 ? 0xF : static_cast<__mmask16>((1u << left) - 1);
        const __m512 s4 = _mm512_maskz_loadu_ps(lanes, cs + kb / 32);
        flush<MR, NACC>(part, tot, _mm512_mask_permutexvar_ps(s4, 0xFFFF, quads, s4));
      } else if (kb + kBlock >= c.kpad || (w.G > 1 && kb + kBlock >= (g + 1) * w.gs)) {
        flush<MR, NACC>(part, tot, _mm512_set1_ps(srow[g]));
        ++g;
      }
    }
  }
  // The (c - z) term, sum_g s cz xsum[m, g], into the same lanes before the one reduction.
  const float* crow = w.cz + n * w.G;
  for (int64_t j = 0; j < w.G; j += 16) {
    const __mmask16 k = w.G - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (w.G - j)) - 1);
    const __m512 scz =
        _mm512_mul_ps(_mm512_maskz_loadu_ps(k, srow + j), _mm512_maskz_loadu_ps(k, crow + j));
    for (int m = 0; m < MR; ++m) {
      const __m512 xs = _mm512_maskz_loadu_ps(k, c.xsum + (m0 + m) * w.G + j);
      tot[m] = _mm512_fmadd_ps(scz, xs, tot[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[(m0 + m) * ldo + n] = eqk::avx512::reduce_add_ps(tot[m]);
}

template <int BITS, bool NARROW>
EQK_TARGET_CODES void rows_t(const CodesCall& c, int64_t n0, int64_t n1, float* out,
                             int64_t ldo) {
  const Weights& w = *c.w;
  NibbleDecode d;
  make_nibble_decode(BITS, d);
  // Narrow groups other than 32 columns: the row's scales expanded to one per 32 columns.
  std::vector<float> cs_buf(NARROW && w.gs != 32 ? c.kpad / 32 : 0);
  // One flush per group of 256 or more columns (or per row): several partials per row.
  const bool rare = !NARROW && (w.G == 1 || w.gs >= 2 * kBlock);
  for (int64_t n = n0; n < n1; ++n) {
    const float* cs = w.scale + n * w.G;
    if (NARROW && w.gs != 32) {
      for (int64_t ch = 0; ch < c.kpad / 32; ++ch)
        cs_buf[ch] = w.scale[n * w.G + std::min<int64_t>(ch * 32 / w.gs, w.G - 1)];
      cs = cs_buf.data();
    }
    int64_t m = 0;
    for (; m + 7 <= c.M; m += 7) tile_t<BITS, 7, NARROW, 1>(c, d, n, m, cs, out, ldo);
    switch (c.M - m) {
#define EQK_CASE(R, A)                                         \
  case R:                                                     \
    if (rare) tile_t<BITS, R, NARROW, A>(c, d, n, m, cs, out, ldo); \
    else tile_t<BITS, R, NARROW, 1>(c, d, n, m, cs, out, ldo);     \
    break;
      EQK_CASE(6, 2) EQK_CASE(5, 2) EQK_CASE(4, 2) EQK_CASE(3, 2)
      EQK_CASE(2, 4) EQK_CASE(1, 4)
#undef EQK_CASE
      default: break;
    }
  }
}

// Inner order: xp[m, 128 t + 32 s + i] = x[m, 128 t + code_column(s, i)]; outer order (the
// pair layout of the outer panels): xp[m, 128 t + 32 c + 8 s + j] = x[m, 128 t + 32 c +
// code_column(s, j)], j < 8 (chunk c's 16 pairs contiguous). Zero past K. xsum[m, g] = the fp32
// sum of group g's activations (vdpbf16ps against ones: the same exact products).
EQK_TARGET_CODES void permute_x_t(const uint16_t* x, int64_t M, int64_t K, const Weights& w,
                                  int64_t kpad, bool outer, uint16_t* xp, float* xsum) {
  // Inner: lanes 0-15 of every code vector come from columns 0-63 of the block, 16-31 from
  // 64-127 (two 2-source permutes and a blend).
  __m512i idx[4];
  for (int s = 0; s < 4; ++s) {
    alignas(64) uint16_t id[32];
    for (int i = 0; i < 32; ++i) id[i] = static_cast<uint16_t>(code_column(s, i) & 63);
    idx[s] = _mm512_load_si512(id);
  }
  alignas(64) uint16_t oid[32];
  for (int i = 0; i < 32; ++i) oid[i] = static_cast<uint16_t>(code_column(i / 8, i % 8));
  const __m512i idx_outer = _mm512_load_si512(oid);
  const __m512i ones = _mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * K;
    uint16_t* o = xp + m * kpad;
    float* xs = xsum + m * w.G;
    for (int64_t g = 0; g < w.G; ++g) xs[g] = 0.0f;
    for (int64_t kb = 0; kb < kpad; kb += kBlock) {
      __m512i in[4];
      for (int v = 0; v < 4; ++v) {
        const int64_t left = K - kb - 32 * v;
        const __mmask32 k = left >= 32 ? ~__mmask32(0)
                            : left <= 0 ? __mmask32(0)
                                        : static_cast<__mmask32>((uint64_t(1) << left) - 1);
        in[v] = _mm512_maskz_loadu_epi16(k, xr + kb + 32 * v);
        if (outer) {
          const __m512i xv = _mm512_mask_permutexvar_epi16(in[v], ~__mmask32(0), idx_outer, in[v]);
          _mm512_storeu_si512(o + kb + 32 * v, xv);
        }
      }
      __m512 chunk = _mm512_setzero_ps();
      for (int s = 0; s < 4; ++s) {
        const __m512i lo = _mm512_permutex2var_epi16(in[0], idx[s], in[1]);
        const __m512i hi = _mm512_permutex2var_epi16(in[2], idx[s], in[3]);
        const __m512i xv = _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi);
        if (!outer) _mm512_storeu_si512(o + kb + 32 * s, xv);
        chunk = _mm512_dpbf16_ps(chunk, (__m512bh)xv, (__m512bh)ones);
      }
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, chunk);
      for (int q = 0; q < 4 && kb + 32 * q < K; ++q) {
        const float sum = (lanes[4 * q] + lanes[4 * q + 1]) + (lanes[4 * q + 2] + lanes[4 * q + 3]);
        xs[w.group(kb + 32 * q)] += sum;
      }
    }
  }
}

}  // namespace

void permute_x_codes(const uint16_t* x, int64_t M, int64_t K, const Weights& w, int64_t kpad,
                     bool outer, uint16_t* xp, float* xsum) {
  permute_x_t(x, M, K, w, kpad, outer, xp, xsum);
}

void rows_codes_bf16(const Weights& w, const uint16_t* xp, const float* xsum, int64_t M,
                     int64_t kpad, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const CodesCall c{&w, xp, xsum, M, kpad};
  // Groups that are not whole 128-column blocks take per-lane scales.
  const bool narrow = w.G > 1 && w.gs % kBlock != 0;
#define EQK_CALL(B)                             \
  if (narrow) rows_t<B, true>(c, n0, n1, out, ldo); \
  else rows_t<B, false>(c, n0, n1, out, ldo);
  switch (w.bits) {
    case 1: EQK_CALL(1) break;
    case 2: EQK_CALL(2) break;
    case 3: EQK_CALL(3) break;
    default: EQK_CALL(4) break;
  }
#undef EQK_CALL
}

}  // namespace eqk::lowbit_float
