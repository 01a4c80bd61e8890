// AVX-512 VNNI depthwise conv of the step executor (kernel width <= 4), 16 channels per vector.
// The kw horizontal taps of one channel sit in the 4 bytes of one int32 lane, so one vpdpbusd
// adds a whole kernel row for 16 channels: per input row iy the executor builds
//   R[ox][c][t] = u[iy][ox * sw + t * dw][c]  (t < kw, 0 for the unused bytes),
// once per row and cached across the output rows that read it, and an output position costs kh
// vpdpbusd for the weighted sums and kh for the code sums (weights 1; none when every cw is
// 0, see QConv::cw_zero). The sums are the same
// integers as the scalar kernel's, from the codes minus their offset u = code - off:
//   acc = sum u w + off wsum[c],   xs = sum u + K off,
// and the epilogue is its double expression op for op (no FMA), on 8 lanes at a time:
//   y = ((acc - zw[c]) + (xs - K z) cw[c]) * sc[c] (+ bias[c]) -> fp32, + residual, activation.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/avx512_defined.h"
#include "common/lowbit_cpu_avx512.h"
#include "common/lowbit_fused_cpu.h"
#include "runtime/step_conv.h"

namespace eqk::steps {

namespace {

struct VnniArgs {
  const QConv* p;
  const uint8_t* u;  // codes - off, [B, Hp, Wp, C]
  const float* res;  // [B, OH, OW, C] or null
  float* y;          // [B, OH, OW, C], or null: rows go to the caller's row buffer
  int64_t C, Cpad, Hp, Wp, OH, OW;
  Activation act;
};

// 16 code bytes of one pixel's channels [c0, c0 + 16) (mask m) widened to int32 lanes.
EQK_TARGET_AVX512 inline __m512i pixel_lanes(const uint8_t* src, __mmask16 m) {
  return _mm512_maskz_cvtepu8_epi32(eqk::avx512::kAll16, _mm_maskz_loadu_epi8(m, src));
}

// R row of input row iy of image b: OW * Cpad int32 lanes of kw tap bytes.
EQK_TARGET_AVX512 void build_row(const VnniArgs& a, int64_t b, int64_t iy, uint32_t* R) {
  const QConv& p = *a.p;
  const uint8_t* row = a.u + (b * a.Hp + iy) * a.Wp * a.C;
  if (p.kw == 3 && p.sw == 1 && p.dw == 1) {
    // 3x3 at stride 1: R[ox] = u[ox] | u[ox + 1] << 8 | u[ox + 2] << 16, each pixel widened
    // once and slid along (the same lanes as below, with a third of the loads).
    for (int64_t c0 = 0; c0 < a.Cpad; c0 += 16) {
      const int64_t left = a.C - c0;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      __m512i p0 = pixel_lanes(row + c0, m), p1 = pixel_lanes(row + a.C + c0, m);
      for (int64_t ox = 0; ox < a.OW; ++ox) {
        const __m512i p2 = pixel_lanes(row + (ox + 2) * a.C + c0, m);
        using eqk::avx512::kAll16;
        const __m512i r = _mm512_ternarylogic_epi32(p0, _mm512_maskz_slli_epi32(kAll16, p1, 8),
                                                    _mm512_maskz_slli_epi32(kAll16, p2, 16),
                                                    0xFE);  // a | b | c
        _mm512_storeu_si512(R + ox * a.Cpad + c0, r);
        p0 = p1, p1 = p2;
      }
    }
    return;
  }
  for (int64_t ox = 0; ox < a.OW; ++ox) {
    const uint8_t* src = row + ox * p.sw * a.C;
    uint32_t* dst = R + ox * a.Cpad;
    for (int64_t c0 = 0; c0 < a.Cpad; c0 += 16) {
      const int64_t left = a.C - c0;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      __m512i v = _mm512_setzero_si512();
      for (int64_t t = 0; t < p.kw; ++t) {
        const __m128i bytes = _mm_maskz_loadu_epi8(m, src + t * p.dw * a.C + c0);
        const __m512i wide = _mm512_maskz_cvtepu8_epi32(eqk::avx512::kAll16, bytes);
        v = _mm512_or_si512(v, _mm512_maskz_slli_epi32(eqk::avx512::kAll16, wide,
                                                       static_cast<unsigned>(8 * t)));
      }
      _mm512_storeu_si512(dst + c0, v);
    }
  }
}

// Eight lanes of the double epilogue (lanes [h * 8, h * 8 + 8) of a 16-channel block).
template <bool kCw>
EQK_TARGET_AVX512 inline __m256 epilogue8(__m256i acc, __m256i xs, const QConv& p, int64_t c,
                                          __m512d kz) {
  using eqk::avx512::kAll8;
  __m512d t = _mm512_sub_pd(_mm512_maskz_cvtepi32_pd(kAll8, acc),
                            _mm512_loadu_pd(p.zw.data() + c));
  if (kCw) {
    const __m512d x = _mm512_sub_pd(_mm512_maskz_cvtepi32_pd(kAll8, xs), kz);
    t = _mm512_add_pd(t, _mm512_mul_pd(x, _mm512_loadu_pd(p.cw.data() + c)));
  }
  t = _mm512_mul_pd(t, _mm512_loadu_pd(p.sc.data() + c));
  if (!p.bias.empty()) t = _mm512_add_pd(t, _mm512_loadu_pd(p.bias.data() + c));
  return eqk::avx512::cvtpd_ps(t);
}

// Eight lanes of the integer epilogue (QConv::int_epi): vi = mult acc + xmul xs + dw_int, the
// same double as epilogue8's times mult, times sc_int = sc / mult.
EQK_TARGET_AVX512 inline __m256 epilogue8_int(__m256i vi, const QConv& p, int64_t c) {
  using eqk::avx512::kAll8;
  __m512d t = _mm512_mul_pd(_mm512_maskz_cvtepi32_pd(kAll8, vi),
                            _mm512_loadu_pd(p.sc_int.data() + c));
  if (!p.bias.empty()) t = _mm512_add_pd(t, _mm512_loadu_pd(p.bias.data() + c));
  return eqk::avx512::cvtpd_ps(t);
}

// Output row (b, oy) into yrow [OW, C] from the R rows of its kh taps. kMode 0: no code sums
// (cw_zero), 1: with them, 2: the integer epilogue with them, 3: without (xmul == 0).
template <int kMode>
EQK_TARGET_AVX512 void compute_row(const VnniArgs& a, int64_t b, int64_t oy,
                                   const uint32_t* const* R, float* yrow) {
  const QConv& p = *a.p;
  const int64_t K = p.kh * p.kw;
  const __m512i ones = _mm512_set1_epi32(0x01010101);
  const __m512i vmult = _mm512_set1_epi32(p.mult), vxmul = _mm512_set1_epi32(p.xmul);
  const __m512d kz = _mm512_set1_pd(static_cast<double>(K) * p.z);
  const __m512i k_off = _mm512_set1_epi32(static_cast<int32_t>(K * p.q.off));
  const __m512 lo = _mm512_set1_ps(a.act.lo), hi = _mm512_set1_ps(a.act.hi);
  const __m512 zero = _mm512_setzero_ps();
  const int64_t o_row = (b * a.OH + oy) * a.OW * a.C;
  for (int64_t c0 = 0; c0 < a.Cpad; c0 += 16) {
    const int64_t left = a.C - c0;
    const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    __m512i w[8];  // kh <= 8 rows in registers (checked by the caller)
    for (int64_t ta = 0; ta < p.kh; ++ta)
      w[ta] = _mm512_loadu_si512(p.dw_w4.data() + (ta * a.Cpad + c0) * 4);
    const __m512i corr = _mm512_loadu_si512(p.dw_corr.data() + c0);
    const __m512i dw_int =
        kMode >= 2 ? _mm512_loadu_si512(p.dw_int.data() + c0) : _mm512_setzero_si512();
    for (int64_t ox = 0; ox < a.OW; ++ox) {
      __m512i acc = corr, xs = k_off;
      for (int64_t ta = 0; ta < p.kh; ++ta) {
        const __m512i v = _mm512_loadu_si512(R[ta] + ox * a.Cpad + c0);
        acc = _mm512_dpbusd_epi32(acc, v, w[ta]);
        if (kMode == 1 || kMode == 2) xs = _mm512_dpbusd_epi32(xs, v, ones);
      }
      using eqk::avx512::extract_hi256, eqk::avx512::extract_lo256;
      __m256 f0, f1;
      if (kMode >= 2) {  // |vi| < 2^31 (bounded when int_epi was chosen)
        // kMode 3: cw == 0, so mult == 1
        __m512i vi = _mm512_add_epi32(kMode == 3 ? acc : _mm512_mullo_epi32(acc, vmult), dw_int);
        if (kMode == 2) vi = _mm512_add_epi32(vi, _mm512_mullo_epi32(xs, vxmul));
        f0 = epilogue8_int(extract_lo256(vi), p, c0);
        f1 = epilogue8_int(extract_hi256(vi), p, c0 + 8);
      } else {
        f0 = epilogue8<kMode == 1>(extract_lo256(acc), extract_lo256(xs), p, c0, kz);
        f1 = epilogue8<kMode == 1>(extract_hi256(acc), extract_hi256(xs), p, c0 + 8, kz);
      }
      const __m512 zero_ps = _mm512_setzero_ps();
      __m512 v = _mm512_mask_insertf32x8(zero_ps, eqk::avx512::kAll16, zero_ps, f0, 0);
      v = _mm512_mask_insertf32x8(v, eqk::avx512::kAll16, v, f1, 1);
      const int64_t o = o_row + ox * a.C + c0;
      if (a.res != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, a.res + o));
      // The scalar steps' v < 0 ? 0 : v and min(max(v, lo), hi) (no NaN reaches here; a
      // zero's sign may differ, which no later step distinguishes).
      if (a.act.kind == 1) v = eqk::avx512::max_ps(v, zero);
      if (a.act.kind == 2) v = eqk::avx512::min_ps(eqk::avx512::max_ps(v, lo), hi);
      _mm512_mask_storeu_ps(yrow + ox * a.C + c0, m, v);
    }
  }
}

}  // namespace

bool depthwise_vnni_fits(const QConv& p) {
  return p.depthwise && p.kw <= 4 && p.kh <= 8 && !p.dw_w4.empty();
}

void prepare_depthwise_vnni(QConv& p) {
  if (p.kw > 4 || p.kh > 8) return;
  const int64_t C = p.N, Cpad = 16 * ((C + 15) / 16);
  p.dw_w4.assign(p.kh * Cpad * 4, 0);
  // The epilogue reads 16 lanes per block: the per-channel terms padded with zeros.
  p.dw_corr.assign(Cpad, 0);
  for (int64_t c = 0; c < C; ++c) {
    int32_t wsum = 0;
    for (int64_t ta = 0; ta < p.kh; ++ta)
      for (int64_t tb = 0; tb < p.kw; ++tb) {
        const int32_t w = p.dw_weights[(ta * p.kw + tb) * C + c];
        p.dw_w4[(ta * Cpad + c) * 4 + tb] = static_cast<int8_t>(w);
        wsum += w;
      }
    p.dw_corr[c] = static_cast<int32_t>(p.q.off) * wsum;
  }
  for (auto* v : {&p.zw, &p.cw, &p.sc}) v->resize(Cpad, 0.0);
  if (p.int_epi) p.dw_int.resize(Cpad, 0), p.sc_int.resize(Cpad, 0.0);
  if (!p.bias.empty()) p.bias.resize(Cpad, 0.0);
}

void run_depthwise_vnni(const QConv& p, const uint8_t* u, const float* res, float* y,
                        uint8_t* codes, int64_t B, int64_t Hp, int64_t Wp, int64_t OH,
                        int64_t OW, Activation act) {
  const int64_t C = p.N, Cpad = 16 * ((C + 15) / 16);
  const VnniArgs a{&p, u, res, y, C, Cpad, Hp, Wp, OH, OW, act};
  // Rows of a task stay in one image; the R rows of the last `span` input rows are cached
  // (slot iy % span: distinct within one output row's taps).
  const int64_t span = (p.kh - 1) * p.dh + 1;
  const int64_t grain =
      std::max<int64_t>(1, eqk::fused::kMinTaskMacs / std::max<int64_t>(1, OW * C * p.kh * p.kw));
  at::parallel_for(0, B * OH, grain, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> cache(span * OW * Cpad);
    std::vector<int64_t> key(span, -1);
    std::vector<float> scratch(codes != nullptr ? OW * C : 0);
    const int64_t OHp = OH + 2 * p.out.ph, OWp = OW + 2 * p.out.pw;
    const uint32_t* R[8];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / OH, oy = i % OH;
      for (int64_t ta = 0; ta < p.kh; ++ta) {
        const int64_t iy = oy * p.sh + ta * p.dh, slot = iy % span, k = b * Hp + iy;
        uint32_t* r = cache.data() + slot * OW * Cpad;
        if (key[slot] != k) build_row(a, b, iy, r), key[slot] = k;
        R[ta] = r;
      }
      float* yrow = codes != nullptr ? scratch.data() : y + i * OW * C;
      if (p.int_epi)
        (p.xmul != 0 ? compute_row<2> : compute_row<3>)(a, b, oy, R, yrow);
      else
        (p.cw_zero ? compute_row<0> : compute_row<1>)(a, b, oy, R, yrow);
      if (codes != nullptr)  // the row's OW * C values are one run of the padded code layout
        store_codes(2, p, yrow, OW * C, codes + ((b * OHp + oy + p.out.ph) * OWp + p.out.pw) * C);
    }
  });
}

}  // namespace eqk::steps
