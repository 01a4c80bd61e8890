// Outer-product panels of bf16 weight codes (interface: common/lowbit_float_cpu.h), for the
// panel_outer_bf16_avx512bf16 microkernel (lowbit_float_outer_avx512_cpu.cpp).
//
// The panel wants, per vector, 16 output rows' bf16 pairs at one pair of columns. Decoding
// row-major and transposing the bf16 pairs (16 x 16 transposes of 32-bit elements, 4 per 128
// columns of 16 rows) costs as much as the decode; here the transpose runs on the nibble
// patterns, 4x denser, before the table lookup: one 16 x 16 transpose of 32-bit elements per
// 128 columns of 16 rows. After it, 32-bit lane r of transposed vector d holds 32-bit lane d
// of row r's nibbles, so the lookup of nibble s gives, in lane r, row r's codes at block
// columns code_column(s, 2d) and code_column(s, 2d + 1): the pair layout directly. Pairs are
// stored in the outer order (chunk c = d / 4 of the block first, then s, then d mod 4), which
// keeps every 32-column chunk's 16 pairs contiguous for the microkernel's per-group sums.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/avx512_defined.h"
#include "common/lowbit_float_codes.h"
#include "common/lowbit_float_cpu.h"
#include "common/transpose16_avx512.h"

namespace eqk::lowbit_float {
namespace {

using namespace codes;
namespace av = eqk::avx512;
constexpr __mmask16 kAll = 0xFFFF;

using av::transpose16;

// 16 rows from n0 (rn of them real, the rest zero) x kc columns from k0 into panel lanes r0..
// r0 + 15; nib: kc / 128 * 16 vectors of scratch (64 bytes each). Rows are decoded one at a
// time (each plane a contiguous stream), then each block is transposed and looked up.
template <int BITS>
EQK_TARGET_CODES void decode16_t(const Weights& w, const NibbleDecode& d, int64_t n0, int64_t rn,
                                 int64_t k0, int64_t kc, uint32_t* nib, uint32_t* panel) {
  const int64_t nblk = kc / kBlock;
  for (int64_t r = 0; r < 16; ++r) {
    if (r >= rn) {
      for (int64_t b = 0; b < nblk; ++b)
        _mm512_storeu_si512(nib + (b * 16 + r) * 16, _mm512_setzero_si512());
      continue;
    }
    const int64_t n = n0 + r;
    for (int64_t ks = 0; ks < kc; ks += kSuper) {
      if (n + 2 < w.N)  // a line per plane per 512 columns, spread over the row's work
        for (int j = 0; j < BITS; ++j)
          __builtin_prefetch(reinterpret_cast<const char*>(w.row(j, n + 2)) + (k0 + ks) / 8);
      // this row's scales and cz of the chunk (for outer_code_scales after the decode); 512
      // columns hold at most 16 groups, one line
      const int64_t g = w.group(k0 + ks);
      __builtin_prefetch(w.scale + n * w.G + g);
      __builtin_prefetch(w.cz + n * w.G + g);
      __m512i z[4];
      load_planes<BITS>(w, n, k0 + ks, z);
      const int64_t tn = std::min<int64_t>(4, (kc - ks) / kBlock);
      for (int t = 0; t < tn; ++t)
        _mm512_storeu_si512(nib + ((ks / kBlock + t) * 16 + r) * 16, nibbles<BITS>(z, d, t));
    }
  }
  for (int64_t b = 0; b < nblk; ++b) {
    __m512i v[16];
    for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(nib + (b * 16 + i) * 16);
    transpose16(v);
    uint32_t* pb = panel + b * (kBlock / 2) * kOuterNb;
    for (int dd = 0; dd < 16; ++dd)
      for (int s = 0; s < 4; ++s) {
        const int64_t pair = 16 * (dd / 4) + 4 * s + dd % 4;
        _mm512_storeu_si512(pb + pair * kOuterNb, (__m512i)lookup_codes(v[dd], s, d.table));
      }
  }
}

template <int BITS>
EQK_TARGET_CODES void decode_outer_t(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                     int64_t kc, uint32_t* panel) {
  NibbleDecode d;
  make_nibble_decode(BITS, d);
  std::vector<uint32_t> nib(static_cast<size_t>(kc / kBlock * 16 * 16));
  for (int64_t r0 = 0; r0 < kOuterNb; r0 += 16) {
    const int64_t rn = std::max<int64_t>(0, std::min<int64_t>(16, nb - r0));
    decode16_t<BITS>(w, d, n0 + r0, rn, k0, kc, nib.data(), panel + r0);
  }
}

EQK_TARGET_CODES void add_outer_correction_t(const float* xsum, int64_t ldxs, int64_t M,
                                             const float* sczT, int64_t ngroups, int64_t nb,
                                             float* out, int64_t ldo) {
  const __mmask16 m0 = nb >= 16 ? kAll : static_cast<__mmask16>((1u << nb) - 1);
  const __mmask16 m1 =
      nb >= 32 ? kAll : nb <= 16 ? 0 : static_cast<__mmask16>((1u << (nb - 16)) - 1);
  for (int64_t m = 0; m < M; ++m) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t g = 0; g < ngroups; ++g) {
      const __m512 xs = _mm512_set1_ps(xsum[m * ldxs + g]);
      a0 = _mm512_fmadd_ps(xs, _mm512_loadu_ps(sczT + g * kOuterNb), a0);
      a1 = _mm512_fmadd_ps(xs, _mm512_loadu_ps(sczT + g * kOuterNb + 16), a1);
    }
    float* o = out + m * ldo;
    _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, o), a0));
    _mm512_mask_storeu_ps(o + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, o + 16), a1));
  }
}

// sT[gi * kOuterNb + r] = s[n0 + r, g0 + gi] and sczT = s cz there, for r < kOuterNb and
// gi < ng (zero for r >= nb or gi >= ng_real): 16 x 16 transposes of the row-major scales.
EQK_TARGET_CODES void outer_scales_t(const Weights& w, int64_t n0, int64_t nb, int64_t g0,
                                     int64_t ng, int64_t ng_real, float* sT, float* sczT) {
  for (int64_t r0 = 0; r0 < kOuterNb; r0 += 16)
    for (int64_t j0 = 0; j0 < ng; j0 += 16) {
      const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(16, ng_real - j0));
      const __mmask16 k = static_cast<__mmask16>((1u << cols) - 1);
      __m512i sv[16], cv[16];
      for (int64_t i = 0; i < 16; ++i) {
        const bool real = r0 + i < nb;
        const int64_t at = (n0 + r0 + i) * w.G + g0 + j0;
        const __mmask16 kr = real ? k : 0;  // rows past N: zero, nothing read
        sv[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(kr, w.scale + (real ? at : 0)));
        cv[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(kr, w.cz + (real ? at : 0)));
      }
      transpose16(sv);
      transpose16(cv);
      for (int64_t j = 0; j < std::min<int64_t>(16, ng - j0); ++j) {
        const __m512 s = _mm512_castsi512_ps(sv[j]);
        _mm512_storeu_ps(sT + (j0 + j) * kOuterNb + r0, s);
        _mm512_storeu_ps(sczT + (j0 + j) * kOuterNb + r0,
                         _mm512_mul_ps(s, _mm512_castsi512_ps(cv[j])));
      }
    }
}

}  // namespace

void outer_code_scales(const Weights& w, int64_t n0, int64_t nb, int64_t g0, int64_t ng,
                       int64_t ng_real, float* sT, float* sczT) {
  outer_scales_t(w, n0, nb, g0, ng, ng_real, sT, sczT);
}

void add_outer_correction(const float* xsum, int64_t ldxs, int64_t M, const float* sczT,
                          int64_t ngroups, int64_t nb, float* out, int64_t ldo) {
  add_outer_correction_t(xsum, ldxs, M, sczT, ngroups, nb, out, ldo);
}

void decode_outer_codes(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                        uint32_t* panel) {
  switch (w.bits) {
    case 1: return decode_outer_t<1>(w, n0, nb, k0, kc, panel);
    case 2: return decode_outer_t<2>(w, n0, nb, k0, kc, panel);
    case 3: return decode_outer_t<3>(w, n0, nb, k0, kc, panel);
    default: return decode_outer_t<4>(w, n0, nb, k0, kc, panel);
  }
}

}  // namespace eqk::lowbit_float
