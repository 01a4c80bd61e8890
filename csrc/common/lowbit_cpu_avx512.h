// AVX-512 (F/BW/VL + VNNI + VPOPCNTDQ) bit-plane kernels, compiled with function target
// attributes and called only when cpu_features() reports the ISA (see lowbit_cpu_dispatch.h).
//
// Bit-serial integer GEMV: a 64-bit slice of plane j is a k-mask over 64 columns, so
// sum_k P_j[n,k] * w_j * x[k] is one masked byte move of the broadcast plane weight w_j and one
// VNNI dpbusd against the activation bytes. dpbusd multiplies unsigned by signed bytes:
//   * uint8 activations: u8 operand = x, s8 operand = masked weights (w_0 = -2^(b-1) >= -128);
//   * int8 activations:  u8 operand = masked weight magnitudes (2^(b-1-j) <= 128), s8 operand
//     = x; the sign plane accumulates separately and is subtracted at the end.
// Products are at most 255*128, four per lane: no intermediate overflow beyond int32 wrapping,
// and the final int32 is exact under the op's chunking rule (wrapping arithmetic is a ring).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "common/lowbit_cpu_portable.h"
#include "common/avx512_defined.h"

#define EQK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vpopcntdq,bmi2")))

namespace eqk::lowbit {

// 64 plane bits starting at word w (only the low 32 when w is the last, odd word).
inline uint64_t load_bits64(const uint32_t* row, int64_t w, int64_t W) {
  if (w + 1 < W) {
    uint64_t v;
    std::memcpy(&v, row + w, 8);
    return v;
  }
  return row[w];
}

// One plane slice of the bit-serial GEMV: acc += dpbusd(masked plane weight, x) (see above).
template <int BITS, bool SIGNED>
EQK_TARGET_AVX512 __attribute__((always_inline)) inline void step(int j, __mmask64 m, __m512i xv, __m512i& acc, __m512i& accs) {
  if constexpr (SIGNED) {
    const __m512i wv = _mm512_maskz_mov_epi8(m, _mm512_set1_epi8((char)(1 << (BITS - 1 - j))));
    if (j == 0)
      accs = _mm512_dpbusd_epi32(accs, wv, xv);
    else
      acc = _mm512_dpbusd_epi32(acc, wv, xv);
  } else {
    const int wj = j == 0 ? -(1 << (BITS - 1)) : (1 << (BITS - 1 - j));
    acc = _mm512_dpbusd_epi32(acc, xv, _mm512_maskz_mov_epi8(m, _mm512_set1_epi8((char)wj)));
  }
}

template <int BITS, bool SIGNED, int R>
EQK_TARGET_AVX512 inline void gemv_int_rows_avx512(const PlaneRows& P, const uint8_t* x,
                                                   int64_t n, int32_t* out) {
  const int64_t W = P.W, nblk = (W + 1) / 2, nfull = W / 2;
  __m512i acc[R][2], accs[R];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = accs[r] = _mm512_setzero_si512();
  const uint32_t* rows[R][BITS];
  const uint32_t* next[R][BITS];  // the next row group, prefetched while this one runs
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < BITS; ++j) {
      rows[r][j] = P.row(j, n + r);
      next[r][j] = P.row(j, n + R + r < P.N ? n + R + r : P.N - 1);
    }
  // Each plane row is short (K/8 bytes), so R*BITS short streams start per group and the
  // hardware prefetchers never ramp up: prefetch the next group one cache line per 8 blocks.
  // Full 64-column blocks: the k-masks load straight from memory (kmovq k, m64 is a load-port
  // uop; kmovq from a GPR would compete with the masked move for port 5).
  for (int64_t kb = 0; kb < nfull; ++kb) {
    const __m512i xv = _mm512_loadu_si512(x + 64 * kb);
    if ((kb & 7) == 0)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < BITS; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(next[r][j] + 2 * kb), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int j = 0; j < BITS; ++j) {
        const __mmask64 m = _load_mask64((__mmask64*)(rows[r][j] + 2 * kb));
        step<BITS, SIGNED>(j, m, xv, acc[r][j & 1], accs[r]);
      }
    }
  }
  if (nfull < nblk) {  // odd W: the last 32 columns
    const __m512i xv = _mm512_loadu_si512(x + 64 * nfull);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < BITS; ++j)
        step<BITS, SIGNED>(j, _cvtu64_mask64(rows[r][j][W - 1]), xv, acc[r][j & 1], accs[r]);
  }
  for (int r = 0; r < R; ++r) {
    const uint32_t pos = (uint32_t)avx512::reduce_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]));
    const uint32_t neg = (uint32_t)avx512::reduce_add_epi32(accs[r]);
    out[r] = (int32_t)(pos - neg);
  }
}

template <int BITS, bool SIGNED>
EQK_TARGET_AVX512 inline void gemv_int_avx512_t(const PlaneRows& P, const uint8_t* x, int64_t n0,
                                                int64_t n1, int32_t* out) {
  int64_t n = n0;
  constexpr int R = BITS <= 4 ? 4 : 2;
  for (; n + R <= n1; n += R) gemv_int_rows_avx512<BITS, SIGNED, R>(P, x, n, out + n);
  for (; n < n1; ++n) gemv_int_rows_avx512<BITS, SIGNED, 1>(P, x, n, out + n);
}

// out[n] for n in [n0, n1): one activation row x (zero-padded to 64 * ceil(W/2) bytes).
EQK_TARGET_AVX512 inline void gemv_int_avx512(const PlaneRows& P, const uint8_t* x, bool x_signed,
                                              int64_t n0, int64_t n1, int32_t* out) {
#define EQK_CASE(B)                                                      \
  case B:                                                                \
    if (x_signed)                                                        \
      gemv_int_avx512_t<B, true>(P, x, n0, n1, out);                     \
    else                                                                 \
      gemv_int_avx512_t<B, false>(P, x, n0, n1, out);                    \
    return;
  switch (P.bits) {
    EQK_CASE(1) EQK_CASE(2) EQK_CASE(3) EQK_CASE(4) EQK_CASE(5) EQK_CASE(6) EQK_CASE(7) EQK_CASE(8)
  }
#undef EQK_CASE
}

// Bit-serial float GEMV: per-plane masked adds of x (16 columns per 16 plane bits), combined
// with the plane weights at the end in a fixed order. x zero-padded to 32 W floats.
template <int BITS>
EQK_TARGET_AVX512 inline float gemv_float_row_avx512(const PlaneRows& P, const float* x,
                                                     int64_t n) {
  const int64_t groups = 2 * P.W;  // 16 columns each
  __m512 acc[BITS][2];
  const uint16_t* rows[BITS];
  const char* next[BITS];  // the next row, prefetched (see gemv_int_rows_avx512)
  for (int j = 0; j < BITS; ++j) {
    acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    rows[j] = reinterpret_cast<const uint16_t*>(P.row(j, n));
    next[j] = reinterpret_cast<const char*>(P.row(j, n + 1 < P.N ? n + 1 : n));
  }
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    if ((g & 31) == 0)
      for (int j = 0; j < BITS; ++j) _mm_prefetch(next[j] + 2 * g, _MM_HINT_T0);
    const __m512 x0 = _mm512_loadu_ps(x + 16 * g), x1 = _mm512_loadu_ps(x + 16 * g + 16);
#pragma GCC unroll 8
    for (int j = 0; j < BITS; ++j) {
      const __mmask16 m0 = _load_mask16((__mmask16*)(rows[j] + g));
      const __mmask16 m1 = _load_mask16((__mmask16*)(rows[j] + g + 1));
      acc[j][0] = _mm512_mask_add_ps(acc[j][0], m0, acc[j][0], x0);
      acc[j][1] = _mm512_mask_add_ps(acc[j][1], m1, acc[j][1], x1);
    }
  }
  float total = 0.0f;
  for (int j = 0; j < BITS; ++j) {
    const float s = avx512::reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
    total += float(plane_weight(BITS, j)) * s;
  }
  return total;
}

EQK_TARGET_AVX512 inline void gemv_float_avx512(const PlaneRows& P, const float* x, int64_t n0,
                                                int64_t n1, float* out) {
#define EQK_CASE(B) \
  case B:           \
    for (int64_t n = n0; n < n1; ++n) out[n] = gemv_float_row_avx512<B>(P, x, n); \
    return;
  switch (P.bits) {
    EQK_CASE(1) EQK_CASE(2) EQK_CASE(3) EQK_CASE(4) EQK_CASE(5) EQK_CASE(6) EQK_CASE(7) EQK_CASE(8)
  }
#undef EQK_CASE
}

// Rows [n0, n1) decoded to int8 (out row stride ldo, ncols <= 32 W columns written):
// q = sum_j masked adds of the plane weight, in wrapping int8 (the result is in range).
EQK_TARGET_AVX512 inline void decode_rows_avx512(const PlaneRows& P, int64_t n0, int64_t n1,
                                                 int64_t ncols, int8_t* out, int64_t ldo) {
  __m512i wv[8];
  for (int j = 0; j < P.bits; ++j) wv[j] = _mm512_set1_epi8((char)plane_weight(P.bits, j));
  for (int64_t n = n0; n < n1; ++n) {
    int8_t* o = out + (n - n0) * ldo;
    for (int64_t k0 = 0; k0 < ncols; k0 += 64) {
      __m512i q = _mm512_setzero_si512();
      for (int j = 0; j < P.bits; ++j) {
        const __mmask64 m = _cvtu64_mask64(load_bits64(P.row(j, n), k0 / 32, P.W));
        q = _mm512_mask_add_epi8(q, m, q, wv[j]);
      }
      const int64_t left = ncols - k0;
      if (left >= 64)
        _mm512_storeu_si512(o + k0, q);
      else
        _mm512_mask_storeu_epi8(o + k0, _bzhi_u64(~0ull, (unsigned)left), q);
    }
  }
}

// sum_k q_b[n, k] from VPOPCNTDQ counts of each plane row.
EQK_TARGET_AVX512 inline void rowsums_avx512(const PlaneRows& P, int64_t n0, int64_t n1,
                                             int64_t* out) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t s = 0;
    for (int j = 0; j < P.bits; ++j) {
      const uint32_t* r = P.row(j, n);
      __m512i c = _mm512_setzero_si512();
      for (int64_t w = 0; w < P.W; w += 16) {
        const int64_t left = P.W - w;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        c = _mm512_add_epi64(c, _mm512_popcnt_epi64(_mm512_maskz_loadu_epi32(m, r + w)));
      }
      s += (int64_t)plane_weight(P.bits, j) * avx512::reduce_add_epi64(c);
    }
    out[n] = s;
  }
}

}  // namespace eqk::lowbit
