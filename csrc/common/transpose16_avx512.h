// The 16 x 16 transpose of 32-bit elements in sixteen AVX-512 registers, shared by the
// float-activation panels (fp32 weights, bf16 pairs, or nibble patterns of weight codes).
#pragma once
#include <immintrin.h>

#include "common/avx512_defined.h"

namespace eqk::avx512 {

template <int kImm>
EQK_AVX512_INLINE __m512i shuffle_lanes(__m512i a, __m512i b) {
  return _mm512_mask_shuffle_i32x4(a, kAll16, a, b, kImm);
}

// r[d] <- the 32-bit elements d of r[0..15], in place: unpacks of 32 and 64 bits transpose the
// 4 x 4 blocks inside each 128-bit lane, lane shuffles then move the 4 x 4 lanes.
EQK_AVX512_INLINE void transpose16(__m512i* r) {
  __m512i t[16];
  for (int j = 0; j < 8; ++j) {
    t[2 * j] = unpacklo_epi32(r[2 * j], r[2 * j + 1]);
    t[2 * j + 1] = unpackhi_epi32(r[2 * j], r[2 * j + 1]);
  }
  // r[4j + c], 128-bit lane L: rows 4j..4j+3 of element 4L + c
  for (int j = 0; j < 4; ++j) {
    r[4 * j] = unpacklo_epi64(t[4 * j], t[4 * j + 2]);
    r[4 * j + 1] = unpackhi_epi64(t[4 * j], t[4 * j + 2]);
    r[4 * j + 2] = unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
    r[4 * j + 3] = unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i s0 = shuffle_lanes<0x44>(r[c], r[4 + c]);
    const __m512i s1 = shuffle_lanes<0xEE>(r[c], r[4 + c]);
    const __m512i s2 = shuffle_lanes<0x44>(r[8 + c], r[12 + c]);
    const __m512i s3 = shuffle_lanes<0xEE>(r[8 + c], r[12 + c]);
    t[c] = shuffle_lanes<0x88>(s0, s2);
    t[4 + c] = shuffle_lanes<0xDD>(s0, s2);
    t[8 + c] = shuffle_lanes<0x88>(s1, s3);
    t[12 + c] = shuffle_lanes<0xDD>(s1, s3);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace eqk::avx512
