// Depthwise integer conv of the step executor (groups == in == out channels): channels-last
// codes, the channels of one output position accumulated together (vectorized over channels),
// the per-layer depthwise kernel's exact sums and float64 epilogue
//   y = ((acc - z wsum[n]) + (xsum - K z) cw[n]) * (s_a s_b[n]) (+ bias[n]),
// rounded to fp32, then + residual and the activation as the conv steps do. Results equal the
// per-layer op's bit for bit (the per-layer kernel loops over channels per position instead).
// With AVX-512 VNNI, kernels up to 4 wide run step_depthwise_vnni_cpu.cpp instead.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/lowbit_cpu_dispatch.h"
#include "runtime/step_conv.h"

namespace eqk::steps {

namespace {

struct DwArgs {
  const QConv* p;
  const uint8_t* u;  // codes - off, [B, Hp, Wp, C]
  const float* res;  // [B, OH, OW, C] or null
  float* y;          // [B, OH, OW, C], or null: rows go to the caller's row buffer
  int64_t C, Hp, Wp, OH, OW;
  Activation act;
};

// One output row (b, oy) into yrow [OW, C]: int32 sums over the taps per channel, then the
// epilogue.
__attribute__((always_inline)) inline void dw_row_body(const DwArgs& a, int64_t b, int64_t oy,
                                                       int32_t* acc, int32_t* xs, float* yrow) {
  const QConv& p = *a.p;
  const int64_t C = a.C, ntaps = p.kh * p.kw, K = ntaps;
  const int32_t off = p.q.off;
  const double kz = static_cast<double>(K) * p.z;
  const bool has_bias = !p.bias.empty();
  for (int64_t ox = 0; ox < a.OW; ++ox) {
    for (int64_t n = 0; n < C; ++n) acc[n] = 0, xs[n] = 0;
    for (int64_t ta = 0; ta < p.kh; ++ta)
      for (int64_t tb = 0; tb < p.kw; ++tb) {
        const int64_t iy = oy * p.sh + ta * p.dh, ix = ox * p.sw + tb * p.dw;
        const uint8_t* src = a.u + ((b * a.Hp + iy) * a.Wp + ix) * C;
        const int32_t* w = p.dw_weights.data() + (ta * p.kw + tb) * C;
        for (int64_t n = 0; n < C; ++n) {
          const int32_t code = static_cast<int32_t>(src[n]) + off;
          acc[n] += code * w[n];
          xs[n] += code;
        }
      }
    const int64_t o = ((b * a.OH + oy) * a.OW + ox) * C;
    for (int64_t n = 0; n < C; ++n) {
      double t = (static_cast<double>(acc[n]) - p.zw[n]) +
                 (static_cast<double>(xs[n]) - kz) * p.cw[n];
      t = t * p.sc[n];
      if (has_bias) t = t + p.bias[n];
      float v = static_cast<float>(t);
      if (a.res != nullptr) v = v + a.res[o + n];
      if (a.act.kind == 1) v = v < 0.0f ? 0.0f : v;
      if (a.act.kind == 2) v = std::min(std::max(v, a.act.lo), a.act.hi);
      yrow[ox * C + n] = v;
    }
  }
}

__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"))) void dw_row_avx512(
    const DwArgs& a, int64_t b, int64_t oy, int32_t* acc, int32_t* xs, float* yrow) {
  dw_row_body(a, b, oy, acc, xs, yrow);
}
EQK_TARGET_AVX2 void dw_row_avx2(const DwArgs& a, int64_t b, int64_t oy, int32_t* acc,
                                 int32_t* xs, float* yrow) {
  dw_row_body(a, b, oy, acc, xs, yrow);
}
void dw_row_portable(const DwArgs& a, int64_t b, int64_t oy, int32_t* acc, int32_t* xs,
                     float* yrow) {
  dw_row_body(a, b, oy, acc, xs, yrow);
}

}  // namespace

at::Tensor run_depthwise(const QConv& p, int64_t B, const uint8_t* u, int64_t Hp, int64_t Wp,
                         const at::Tensor* residual, Activation act, int level, BufferPool& outs) {
  const int64_t C = p.N;
  const ConvOutput out = conv_output(p, B, Hp, Wp, residual, outs);
  const int64_t OH = out.OH, OW = out.OW;
  const bool out_codes = p.out.on;
  const at::Tensor& y = out.y;
  const float* rp = residual != nullptr ? out.residual.data_ptr<float>() : nullptr;
  float* yp = out_codes ? nullptr : y.data_ptr<float>();
  uint8_t* cp = out_codes ? y.data_ptr<uint8_t>() : nullptr;
  if (level >= 2 && depthwise_vnni_fits(p)) {
    run_depthwise_vnni(p, u, rp, yp, cp, B, Hp, Wp, OH, OW, act);
    return y;
  }
  const DwArgs a{&p, u, rp, yp, C, Hp, Wp, OH, OW, act};
  auto row = level >= 2 ? &dw_row_avx512 : level == 1 ? &dw_row_avx2 : &dw_row_portable;
  const int64_t grain =
      std::max<int64_t>(1, eqk::fused::kMinTaskMacs / std::max<int64_t>(1, OW * C * p.kh * p.kw));
  const int64_t OHp = OH + 2 * p.out.ph, OWp = OW + 2 * p.out.pw;
  at::parallel_for(0, B * OH, grain, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> acc(C), xs(C);
    std::vector<float> scratch(out_codes ? OW * C : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / OH, oy = i % OH;
      float* yrow = out_codes ? scratch.data() : yp + i * OW * C;
      row(a, b, oy, acc.data(), xs.data(), yrow);
      if (out_codes)  // the row's OW * C values are one run of the padded code layout
        store_codes(level, p, yrow, OW * C,
                    cp + ((b * OHp + oy + p.out.ph) * OWp + p.out.pw) * C);
    }
  });
  return y;
}

}  // namespace eqk::steps
