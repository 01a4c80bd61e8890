// Bit-plane arithmetic shared by the CPU and CUDA kernels (DESIGN.md "Bit planes and the
// low-bit GEMM"). Everything here is __host__ __device__ so the CPU tests exercise the exact
// code the CUDA kernels run.
//
// Canonical layout: planes int32[n, N, W] with W = ceil(K / 32); plane 0 is the sign (most
// significant) plane; bit t of word j holds column 32*j + t; padding bits are zero.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define EQK_HD __host__ __device__ __forceinline__
#else
#define EQK_HD inline
#endif

namespace eqk {

EQK_HD int words_per_row(int64_t K) { return static_cast<int>((K + 31) / 32); }

// Bit `t` of plane word `w` as 0/1.
EQK_HD int plane_bit(uint32_t w, int t) { return static_cast<int>((w >> t) & 1u); }

// Code of column k from the first `bits` planes of one row: the two's-complement value
//   q_b = -2^(b-1) P_0 + sum_{j=1}^{b-1} 2^(b-1-j) P_j.
// `row_planes` points at plane 0's word for this row; consecutive planes are `plane_stride`
// words apart (N * W in the canonical layout).
EQK_HD int decode_code(const uint32_t* row_planes, int64_t plane_stride, int bits, int64_t k) {
  const int64_t word = k >> 5;
  const int t = static_cast<int>(k & 31);
  int value = -plane_bit(row_planes[word], t);  // sign plane, weight -2^(b-1) after shifts
  for (int j = 1; j < bits; ++j) value = value * 2 + plane_bit(row_planes[j * plane_stride + word], t);
  return value;
}

// Arithmetic right shift = floor(q / 2^k) for negative q too (C's `/` truncates toward zero).
EQK_HD int floor_shift(int q, int k) { return q >> k; }  // signed >> is arithmetic (guaranteed since C++20,
                                                           // every compiler we build with)

// The 8-bit code of a signed integer in [-128, 127] packed into a byte.
EQK_HD uint32_t byte_of(int v) { return static_cast<uint32_t>(v) & 0xFFu; }

// dp4a semantics: c + sum_{i<4} a.s8[i] * b.s8[i] (both signed). Used on the CPU to check the
// CUDA path's arithmetic; __dp4a is this exactly.
EQK_HD int dp4a_ss(uint32_t a, uint32_t b, int c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int i = 0; i < 4; ++i) {
    const int ai = static_cast<int8_t>((a >> (8 * i)) & 0xFFu);
    const int bi = static_cast<int8_t>((b >> (8 * i)) & 0xFFu);
    c += ai * bi;
  }
  return c;
#endif
}

// dp4a with unsigned a (activation codes in [0, 255]) and signed b (weight codes).
EQK_HD int dp4a_us(uint32_t a, uint32_t b, int c) {
#if defined(__CUDA_ARCH__)
  // The intrinsic has only s8*s8 and u8*u8 overloads; PTX has the mixed form.
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  for (int i = 0; i < 4; ++i) {
    const int ai = static_cast<int>((a >> (8 * i)) & 0xFFu);
    const int bi = static_cast<int8_t>((b >> (8 * i)) & 0xFFu);
    c += ai * bi;
  }
  return c;
#endif
}

// Positive compensation c_k = (1 - 2^-k) / 2 for k dropped bits (c_0 = 0), exact in float.
EQK_HD float compensation(int k) { return k <= 0 ? 0.0f : 0.5f * (1.0f - 1.0f / float(1 << k)); }

// Largest K chunk for which int32 accumulation of |xq| <= max_x, |q| <= max_w is exact.
EQK_HD int64_t exact_chunk(int64_t max_x, int64_t max_w) {
  const int64_t per = max_x * max_w;
  return per <= 0 ? (int64_t(1) << 40) : ((int64_t(1) << 31) - 1) / per;
}

}  // namespace eqk
