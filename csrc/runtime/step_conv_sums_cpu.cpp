// The integer sums of the step executor's k4n16 conv (step_conv_sums.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/lowbit_cpu_packed.h"
#include "runtime/step_conv_sums.h"

namespace eqk::steps {

namespace {

// Copies n bytes and returns their sum: 16-byte moves summed with psadbw (SSE2, the x86-64
// baseline) and a byte loop for the rest. (A byte loop over a run length known only at run
// time compiled to slow code, a memcpy call per run cost more than the GEMM.)
inline int32_t copy_and_sum(uint8_t* dst, const uint8_t* src, int64_t n) {
  int64_t i = 0;
  int32_t sum = 0;
#if defined(__SSE2__)
  __m128i acc = _mm_setzero_si128();
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), v);
    acc = _mm_add_epi64(acc, _mm_sad_epu8(v, _mm_setzero_si128()));
  }
  sum = static_cast<int32_t>(_mm_cvtsi128_si64(acc) +
                             _mm_cvtsi128_si64(_mm_unpackhi_epi64(acc, acc)));
#endif
  for (; i < n; ++i) {
    dst[i] = src[i];
    sum += src[i];
  }
  return sum;
}

}  // namespace

void im2col(const Im2col& g, int64_t l0, int64_t rows, int64_t gi, uint8_t* A, double* xz) {
  for (int64_t rr = 0; rr < rows; ++rr) {
    const int64_t l = l0 + rr, oy = l / g.OW, ox = l % g.OW;
    uint8_t* dst = A + rr * g.Kp;
    const uint8_t* src = g.ub + (oy * g.sh * g.Wp + ox * g.sw) * g.C + gi * g.cin_g;
    int32_t sum = 0;  // K * 255 < 2^31 (checked when the step was added)
    for (int64_t k = 0; k < g.ntaps; ++k)
      sum += copy_and_sum(dst + k * g.cin_g, src + g.taps[k], g.cin_g);
    const int64_t xs = sum + g.K * g.sub;  // sum of the codes
    xz[rr] = static_cast<double>(xs) - static_cast<double>(g.K) * g.z;
  }
}

namespace {

// Implicit GEMM (AVX-512 VNNI, cin_g % 4 == 0): the k4n16 GEMM of the per-layer kernel with
// each row's activation bytes read in place from the channels-last codes, tap by tap (row r,
// tap t: P[r] + taps[t]), instead of from an im2col copy. Same integer sums (exact in int32).
template <int MR, int NTB>
EQK_TARGET_AVX512 inline void implicit_tile(const uint8_t* const* P, const int64_t* taps,
                                            int64_t ntaps, int64_t K4t, const int8_t* Wp,
                                            int64_t Npad, int32_t* C, int64_t ldc) {
  __m512i acc[MR][NTB];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NTB; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t tap = 0; tap < ntaps; ++tap) {
    const int8_t* wt = Wp + tap * K4t * Npad * 4;
    const int64_t off = taps[tap];
    for (int64_t kk = 0; kk < K4t; ++kk) {
      const int8_t* w = wt + kk * Npad * 4;
      __m512i wv[NTB];
      for (int t = 0; t < NTB; ++t) wv[t] = _mm512_loadu_si512(w + 64 * t);
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, P[r] + off + 4 * kk, 4);
        const __m512i av = _mm512_set1_epi32(a4);
        for (int t = 0; t < NTB; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], av, wv[t]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NTB; ++t) _mm512_storeu_si512(C + r * ldc + 16 * t, acc[r][t]);
}

template <int MR>
EQK_TARGET_AVX512 inline void implicit_rows(const uint8_t* const* P, const int64_t* taps,
                                            int64_t ntaps, int64_t K4t, const int8_t* Wp,
                                            int64_t Npad, int64_t t0, int ntb, int32_t* C,
                                            int64_t ldc) {
  const int8_t* w = Wp + 64 * t0;
  int32_t* c = C + 16 * t0;
  switch (ntb) {
    case 1: implicit_tile<MR, 1>(P, taps, ntaps, K4t, w, Npad, c, ldc); return;
    case 2: implicit_tile<MR, 2>(P, taps, ntaps, K4t, w, Npad, c, ldc); return;
    case 3: implicit_tile<MR, 3>(P, taps, ntaps, K4t, w, Npad, c, ldc); return;
    default: implicit_tile<MR, 4>(P, taps, ntaps, K4t, w, Npad, c, ldc); return;
  }
}

}  // namespace

EQK_TARGET_AVX512 void implicit_gemm(const uint8_t* const* P, int64_t rows, const int64_t* taps,
                                     int64_t ntaps, int64_t K4t, const int8_t* Wp, int64_t Npad,
                                     int64_t tile0, int64_t tile1, int32_t* C, int64_t ldc) {
  for (int64_t t0 = tile0; t0 < tile1; t0 += 4) {
    const int ntb = static_cast<int>(tile1 - t0 < 4 ? tile1 - t0 : 4);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
      implicit_rows<4>(P + r, taps, ntaps, K4t, Wp, Npad, t0, ntb, C + r * ldc, ldc);
    const int64_t left = rows - r;
    if (left == 3) implicit_rows<3>(P + r, taps, ntaps, K4t, Wp, Npad, t0, ntb, C + r * ldc, ldc);
    if (left == 2) implicit_rows<2>(P + r, taps, ntaps, K4t, Wp, Npad, t0, ntb, C + r * ldc, ldc);
    if (left == 1) implicit_rows<1>(P + r, taps, ntaps, K4t, Wp, Npad, t0, ntb, C + r * ldc, ldc);
  }
}

namespace {

// Per padded pixel in [i0, i1), the sum of its C code bytes (C % 8 == 0): psadbw sums of the
// 8-byte runs, C / 8 runs per pixel (a pixel's own copy_and_sum call cost as much as the GEMM
// of a 16-channel layer).
EQK_TARGET_AVX512 void pixel_sums(const uint8_t* u, int64_t i0, int64_t i1, int64_t C,
                                  int32_t* S) {
  const int64_t q = C / 8, n = (i1 - i0) * C;
  const uint8_t* p = u + i0 * C;
  alignas(64) int64_t t[8];
  int64_t run = 0, pix = i0;
  int32_t acc = 0;
  for (int64_t off = 0; off < n; off += 64) {
    const int64_t left = n - off;
    const __mmask64 m = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(m, p + off);
    _mm512_store_si512(t, _mm512_sad_epu8(v, _mm512_setzero_si512()));
    const int64_t cnt = std::min<int64_t>(8, left / 8);
    for (int64_t j = 0; j < cnt; ++j) {
      acc += static_cast<int32_t>(t[j]);
      if (++run == q) S[pix++] = acc, acc = 0, run = 0;
    }
  }
}

}  // namespace

// Per padded pixel and group, the sum of the group's cin_g code bytes (for the implicit path's
// code sums: a receptive field's sum is the sum of its taps' pixel sums).
void group_sums(const uint8_t* u, int64_t pixels, int64_t C, int64_t groups, int32_t* S) {
  const int64_t cin_g = C / groups;
  if (groups == 1 && C % 8 == 0) {  // only the implicit (AVX-512 VNNI) path calls this
    at::parallel_for(0, pixels, 4096, [&](int64_t i0, int64_t i1) { pixel_sums(u, i0, i1, C, S); });
    return;
  }
  at::parallel_for(0, pixels, 1024, [&](int64_t i0, int64_t i1) {
    uint8_t scratch[64];
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t g = 0; g < groups; ++g) {
        int32_t s = 0;
        for (int64_t c0 = 0; c0 < cin_g; c0 += 64) {
          const int64_t n = std::min<int64_t>(64, cin_g - c0);
          s += copy_and_sum(scratch, u + i * C + g * cin_g + c0, n);
        }
        S[i * groups + g] = s;
      }
  });
}

}  // namespace eqk::steps
