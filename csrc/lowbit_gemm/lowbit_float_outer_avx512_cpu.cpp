// AVX-512 outer-product panels of the float-activation low-bit GEMM (interface:
// common/lowbit_float_cpu.h). Compiled with function target attributes; the driver calls them
// only when the running CPU has the ISA.
//
// A panel holds kOuterNb = 32 output rows (n) across kc columns (k) with n fastest: one 64-byte
// vector holds 16 outputs' weights at one k (fp32) or one k pair (bf16, the VNNI pair layout
// vdpbf16ps multiplies). The microkernel keeps MR activation rows x 2 vectors (32 outputs) of
// fp32 sums in registers, broadcasts one activation (pair) per row and step and needs no
// horizontal reduction: per 64-byte weight load, MR FMAs / vdpbf16ps.
// The panel comes from the row-major decoders (lowbit_float_avx512_cpu.cpp) and a 16 x 16
// transpose of 32-bit elements (a weight, or a pair of bf16 weights).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "common/avx512_defined.h"
#include "common/lowbit_float_cpu.h"
#include "common/transpose16_avx512.h"

#define EQK_TARGET_F512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define EQK_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace eqk::lowbit_float {
namespace {

namespace av = eqk::avx512;

// dst[c * ldd + r] = src[r * lds + c] for r, c < 16 (32-bit elements).
EQK_TARGET_F512 void transpose16(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * lds);
  av::transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * ldd, r[i]);
}

EQK_TARGET_F512 __attribute__((always_inline)) inline void add_out(float* o, __mmask16 mask,
                                                                  __m512 v) {
  _mm512_mask_storeu_ps(o, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), v));
}

// fp32: out[m, 0..31] += sum_k x[m, k] panel[k][0..31] (weights already scaled).
template <int MR>
EQK_TARGET_F512 void outer_f32_block(const float* x, int64_t ldx, const float* panel, int64_t kc,
                                     float* out, int64_t ldo, __mmask16 m0, __mmask16 m1) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kOuterNb);
    const __m512 w1 = _mm512_loadu_ps(panel + k * kOuterNb + 16);
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    add_out(out + m * ldo, m0, acc[m][0]);
    add_out(out + m * ldo + 16, m1, acc[m][1]);
  }
}

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16: per group of gs_kc columns the exact products sum from zero (vdpbf16ps, fp32), and the
// group's sum is scaled by its fp32 step (sT[group][0..31]) into the running sum.
template <int MR>
EQK_TARGET_BF16 void outer_bf16_block(const uint16_t* x, int64_t ldx, const uint32_t* panel,
                                      int64_t kc, const float* sT, int64_t gs_kc, float* out,
                                      int64_t ldo, __mmask16 m0, __mmask16 m1) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t g0 = 0, gi = 0; g0 < kc; g0 += gs_kc, ++gi) {
    __m512 part[MR][2];
    for (int m = 0; m < MR; ++m) part[m][0] = part[m][1] = _mm512_setzero_ps();
    for (int64_t p = g0 / 2; p < (g0 + gs_kc) / 2; ++p) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * kOuterNb);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * kOuterNb + 16);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(load_pair(x + m * ldx + 2 * p));
        part[m][0] = _mm512_dpbf16_ps(part[m][0], xb, w0);
        part[m][1] = _mm512_dpbf16_ps(part[m][1], xb, w1);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(sT + gi * kOuterNb);
    const __m512 s1 = _mm512_loadu_ps(sT + gi * kOuterNb + 16);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_fmadd_ps(part[m][0], s0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(part[m][1], s1, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    add_out(out + m * ldo, m0, acc[m][0]);
    add_out(out + m * ldo + 16, m1, acc[m][1]);
  }
}

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n < 0 ? 0 : n)) - 1u);
}

}  // namespace

void pack_outer_avx512(const uint32_t* rows, int64_t cols, uint32_t* panel) {
  for (int64_t c = 0; c < cols; c += 16)
    transpose16(rows + c, cols, panel + c * kOuterNb, kOuterNb);
}

// 12 rows x 2 vectors: 24 accumulators, 2 weight vectors and a broadcast in the 32 registers.
void panel_outer_f32_avx512(const float* x, int64_t ldx, int64_t mb, const float* panel,
                            int64_t kc, int64_t nb, float* out, int64_t ldo) {
  const __mmask16 m0 = lanes(nb), m1 = lanes(nb - 16);
  int64_t m = 0;
  for (; m + 12 <= mb; m += 12)
    outer_f32_block<12>(x + m * ldx, ldx, panel, kc, out + m * ldo, ldo, m0, m1);
  const float* xr = x + m * ldx;
  float* o = out + m * ldo;
  switch (mb - m) {
#define EQK_CASE(R) \
  case R: outer_f32_block<R>(xr, ldx, panel, kc, o, ldo, m0, m1); break;
    EQK_CASE(11) EQK_CASE(10) EQK_CASE(9) EQK_CASE(8) EQK_CASE(7) EQK_CASE(6)
    EQK_CASE(5) EQK_CASE(4) EQK_CASE(3) EQK_CASE(2) EQK_CASE(1)
#undef EQK_CASE
    default: break;
  }
}

// 6 rows x 2 vectors: 12 group partials and 12 running sums, 2 weight vectors and a broadcast.
void panel_outer_bf16_avx512bf16(const uint16_t* x, int64_t ldx, int64_t mb,
                                 const uint32_t* panel, int64_t kc, const float* sT,
                                 int64_t gs_kc, int64_t nb, float* out, int64_t ldo) {
  const __mmask16 m0 = lanes(nb), m1 = lanes(nb - 16);
  int64_t m = 0;
  for (; m + 6 <= mb; m += 6)
    outer_bf16_block<6>(x + m * ldx, ldx, panel, kc, sT, gs_kc, out + m * ldo, ldo, m0, m1);
  const uint16_t* xr = x + m * ldx;
  float* o = out + m * ldo;
  switch (mb - m) {
#define EQK_CASE(R) \
  case R: outer_bf16_block<R>(xr, ldx, panel, kc, sT, gs_kc, o, ldo, m0, m1); break;
    EQK_CASE(5) EQK_CASE(4) EQK_CASE(3) EQK_CASE(2) EQK_CASE(1)
#undef EQK_CASE
    default: break;
  }
}

}  // namespace eqk::lowbit_float
