// bf16 weight codes decoded from canonical planes with VBMI + GFNI, for the vdpbf16ps kernels
// of bf16 activations (lowbit_float_codes_{bf16,outer}_avx512_cpu.cpp).
//
// 128 columns of one weight row at a time: one 64-byte load per plane covers 512 columns; a
// byte permute (vpermt2b) gathers, into each qword, the plane bytes of two 8-column groups
// (rows 7..4 of the 8x8 bit matrix the first, rows 3..0 the second), and one gf2p8affineqb
// transposes them (as in lowbit_cpu_gfni.h), leaving the raw b-bit patterns of 128 columns as
// nibbles. Nibble s of every 16-bit lane (shifted down by 4s) indexes a 32-entry vpermw table
// of bf16 codes (the 16 entries twice, so bit 4 does not matter): 4 vectors of 32 bf16 codes
// in 4 + 3 + 4 vector ops at W4 (2 + 3 + 4 at W1-W2). The table holds only the integer code
// (exact in bf16), so it is the same for every group, row and call.
//
// The nibble order is not the column order: code vector s, bf16 lane i holds block column
// code_column(s, i); the kernels permute the activations to match, once per call. The two
// columns of every vdpbf16ps pair (lanes 2j, 2j + 1) lie in one 32-column chunk, j / 4.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common/lowbit_float_cpu.h"

#define EQK_TARGET_CODES                                                                   \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,gfni,bmi2,fma," \
                        "avx512bf16")))

namespace eqk::lowbit_float::codes {

constexpr int64_t kBlock = 128;  // columns per decode
constexpr int64_t kSuper = 512;  // columns per 64-byte plane load

constexpr int code_column(int s, int i) {
  return 16 * (i / 4) + 2 * (i % 4) + 8 * (s & 1) + (s >> 1);
}

struct NibbleDecode {
  __m512i idx[4];     // vpermt2b indices of block t of a superblock
  __mmask64 mask[2];  // bytes that take a plane of pair p (zero: planes past `bits`)
  __m512i table;      // 32 bf16 codes, entry e = the code of pattern e mod 16
};

EQK_TARGET_CODES inline void make_nibble_decode(int bits, NibbleDecode& d) {
  d.mask[0] = d.mask[1] = 0;
  for (int t = 0; t < 4; ++t) {
    alignas(64) uint8_t id[64];
    for (int q = 0; q < 8; ++q)
      for (int r = 0; r < 8; ++r) {
        // Matrix row r becomes bit 7 - r of every output byte: rows 7..4 the low nibble
        // (8-column group 2q of the block), rows 3..0 the high one (group 2q + 1), plane j at
        // bit bits - 1 - j of its nibble (the raw pattern; rows of no plane stay zero).
        const int j = r >= 4 ? r - (8 - bits) : r - (4 - bits);
        const int group8 = 16 * t + 2 * q + (r >= 4 ? 0 : 1);
        id[8 * q + r] = static_cast<uint8_t>((j & 1 ? 64 : 0) + group8);
        if (t == 0 && j >= 0) d.mask[j / 2] |= uint64_t(1) << (8 * q + r);
      }
    d.idx[t] = _mm512_load_si512(id);
  }
  alignas(64) uint16_t tb[32];
  for (int e = 0; e < 32; ++e) {
    const int p = e & 15;
    const float v = p < (1 << bits) ? static_cast<float>(code_of_pattern(p, bits)) : 0.0f;
    uint32_t u;
    __builtin_memcpy(&u, &v, sizeof u);
    tb[e] = static_cast<uint16_t>(u >> 16);  // small integers are exact in bf16
  }
  d.table = _mm512_load_si512(tb);
}

// The 512 columns of row n from column ks on, one register per plane (zero past the row;
// pair p = z[2p], z[2p + 1]).
template <int BITS>
EQK_TARGET_CODES __attribute__((always_inline)) inline void load_planes(const Weights& w,
                                                                        int64_t n, int64_t ks,
                                                                        __m512i* z) {
  const int64_t byte0 = ks / 8, avail = 4 * w.W - byte0;
  const __mmask64 lm = avail >= 64 ? ~__mmask64(0) : (__mmask64(1) << avail) - 1;
  for (int j = 0; j < BITS; ++j)
    z[j] = _mm512_maskz_loadu_epi8(lm, reinterpret_cast<const char*>(w.row(j, n)) + byte0);
  for (int j = BITS; j < 4; ++j) z[j] = z[0];
}

// The nibble patterns of block t (columns 128 t .. 128 t + 127 of the loaded 512).
template <int BITS>
EQK_TARGET_CODES __attribute__((always_inline)) inline __m512i nibbles(const __m512i* z,
                                                                       const NibbleDecode& d,
                                                                       int t) {
  __m512i a = _mm512_maskz_permutex2var_epi8(d.mask[0], z[0], d.idx[t], z[1]);
  if constexpr (BITS > 2)
    a = _mm512_or_si512(a, _mm512_maskz_permutex2var_epi8(d.mask[1], z[2], d.idx[t], z[3]));
  return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64(0x8040201008040201LL), a, 0);
}

// Code vector s of nibble patterns `nib`: bf16 lane i = the code in nibble s of 16-bit lane i.
EQK_TARGET_CODES __attribute__((always_inline)) inline __m512bh lookup_codes(__m512i nib, int s,
                                                                             __m512i table) {
  const __m512i idx = s == 0 ? nib : _mm512_srli_epi16(nib, 4 * s);
  return (__m512bh)_mm512_mask_permutexvar_epi16(table, ~__mmask32(0), idx, table);
}

}  // namespace eqk::lowbit_float::codes
