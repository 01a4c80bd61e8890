// The integer conv of the step executor (csrc/runtime/step_program_cpu.cpp): the arithmetic of
// the fused conv (csrc/lowbit_gemm/lowbit_fused_conv_cpu.cpp, k4n16 weights) operation for
// operation, so its results equal the per-layer op's bit for bit, with what a step list allows
// on top:
//   * the epilogue terms are computed once when the step is added, not per call;
//   * activations stay channels-last between steps: the input is read as NHWC runs when it is
//     a channels-last tensor (no scatter into the code buffer) and the output is written as a
//     channels-last tensor straight from the GEMM tile (no transpose); the step list's float
//     steps (ATen) take any memory format, so nothing else changes;
//   * a following residual add and ReLU or clamp (ReLU6) run in the epilogue on the fp32
//     result, the same fp32 operations the separate steps would do
//     (y = fl32(epilogue) + r; then y < 0 ? 0 : y, or min(max(y, lo), hi)).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/lowbit_cpu_packed.h"
#include "common/lowbit_fused_cpu.h"
#include "runtime/step_conv.h"
#include "runtime/step_conv_sums.h"

namespace eqk::steps {

namespace {

constexpr int64_t kRows = 64;  // output positions per task, as the per-layer kernel

// One block's epilogue, rows x cnt channels: the per-layer kernel's double expression
// ((acc + corr - zw) + xz * cw) * sc (+ bias), rounded to fp32, then + residual, then the
// activation (kAct: 0 none, 1 ReLU, 2 clamp to [lo, hi]). kMode 0: no code sums (cw_zero),
// 1: with them, 2: the same double from integers (QConv::int_epi), 3: that without code sums.
template <bool kBias, bool kRes, int kAct, int kMode>
__attribute__((always_inline)) inline void epilogue_body(const int32_t* C, int64_t ldc,
                                                         int64_t rows, int64_t cnt,
                                                         const QConv& p, int64_t n0,
                                                         const double* xz, const float* res,
                                                         float* out, int64_t ldo, float lo,
                                                         float hi) {
  const double* czw = p.czw.data() + n0;
  const double* cw = p.cw.data() + n0;
  const double* sc = (kMode >= 2 ? p.sc_int.data() : p.sc.data()) + n0;
  const int32_t* ci = kMode >= 2 ? p.czw_int.data() + n0 : nullptr;
  const int32_t m = p.mult;
  const double* bias = kBias ? p.bias.data() + n0 : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* c = C + r * ldc;
    float* o = out + r * ldo;
    const float* rr = kRes ? res + r * ldo : nullptr;
    const double x = kMode == 1 ? xz[r] : 0.0;
    // x = xs - K z is an integer (z is rounded); xmul x is exact in int32 (bounded when
    // int_epi was chosen).
    const int32_t xi = kMode == 2 && p.xmul != 0 ? static_cast<int32_t>(xz[r]) * p.xmul : 0;
    for (int64_t n = 0; n < cnt; ++n) {
      // czw = corr - zw: both integers below 2^53, so acc + corr - zw and acc + czw are
      // the same exact integer (one double add fewer per output).
      double t;
      if (kMode == 3)  // cw == 0: mult == 1, no code sums
        t = static_cast<double>(c[n] + ci[n]) * sc[n];
      else if (kMode == 2)
        t = static_cast<double>(c[n] * m + (ci[n] + xi)) * sc[n];
      else if (kMode == 1)
        t = ((static_cast<double>(c[n]) + czw[n]) + x * cw[n]) * sc[n];
      else
        t = (static_cast<double>(c[n]) + czw[n]) * sc[n];
      if (kBias) t = t + bias[n];
      float v = static_cast<float>(t);
      if (kRes) v = v + rr[n];
      if (kAct == 1) v = v < 0.0f ? 0.0f : v;
      if (kAct == 2) v = std::min(std::max(v, lo), hi);
      o[n] = v;
    }
  }
}

using EpilogueFn = void (*)(const int32_t*, int64_t, int64_t, int64_t, const QConv&, int64_t,
                            const double*, const float*, float*, int64_t, float, float);

template <bool kBias, bool kRes, int kAct, int kMode>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"))) void epilogue_avx512(
    const int32_t* C, int64_t ldc, int64_t rows, int64_t cnt, const QConv& p, int64_t n0,
    const double* xz, const float* res, float* out, int64_t ldo, float lo, float hi) {
  epilogue_body<kBias, kRes, kAct, kMode>(C, ldc, rows, cnt, p, n0, xz, res, out, ldo, lo, hi);
}

template <bool kBias, bool kRes, int kAct, int kMode>
EQK_TARGET_AVX2 void epilogue_avx2(const int32_t* C, int64_t ldc, int64_t rows, int64_t cnt,
                                   const QConv& p, int64_t n0, const double* xz,
                                   const float* res, float* out, int64_t ldo, float lo,
                                   float hi) {
  epilogue_body<kBias, kRes, kAct, kMode>(C, ldc, rows, cnt, p, n0, xz, res, out, ldo, lo, hi);
}

template <bool kBias, bool kRes, int kAct, int kMode>
void epilogue_portable(const int32_t* C, int64_t ldc, int64_t rows, int64_t cnt, const QConv& p,
                       int64_t n0, const double* xz, const float* res, float* out, int64_t ldo,
                       float lo, float hi) {
  epilogue_body<kBias, kRes, kAct, kMode>(C, ldc, rows, cnt, p, n0, xz, res, out, ldo, lo, hi);
}

template <bool kBias, bool kRes, int kAct, int kMode>
EpilogueFn pick_level(int level) {
  if (level >= 2) return &epilogue_avx512<kBias, kRes, kAct, kMode>;
  if (level == 1) return &epilogue_avx2<kBias, kRes, kAct, kMode>;
  return &epilogue_portable<kBias, kRes, kAct, kMode>;
}

template <bool kBias, bool kRes, int kMode>
EpilogueFn pick_act(int level, int act) {
  if (act == 1) return pick_level<kBias, kRes, 1, kMode>(level);
  if (act == 2) return pick_level<kBias, kRes, 2, kMode>(level);
  return pick_level<kBias, kRes, 0, kMode>(level);
}

template <int kMode>
EpilogueFn pick_bias_res(int level, bool bias, bool res, int act) {
  if (bias)
    return res ? pick_act<true, true, kMode>(level, act) : pick_act<true, false, kMode>(level, act);
  return res ? pick_act<false, true, kMode>(level, act) : pick_act<false, false, kMode>(level, act);
}

EpilogueFn pick_epilogue(int level, bool bias, bool res, int act, int mode) {
  if (mode == 3) return pick_bias_res<3>(level, bias, res, act);
  if (mode == 2) return pick_bias_res<2>(level, bias, res, act);
  return mode == 1 ? pick_bias_res<1>(level, bias, res, act)
                   : pick_bias_res<0>(level, bias, res, act);
}

}  // namespace

std::shared_ptr<QConv> make_qconv(const at::Tensor& packed, const at::Tensor& wsum,
                                  const at::Tensor& scale, const at::Tensor& act_scale,
                                  const std::optional<at::Tensor>& zw,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& act_zp,
                                  const std::vector<int64_t>& n, double scale_factor, double c) {
  auto p = std::make_shared<QConv>();
  p->packed = packed;
  p->wsum = wsum;
  p->bits = n[0];
  p->N = n[1];
  p->kh = n[2], p->kw = n[3], p->sh = n[4], p->sw = n[5], p->ph = n[6], p->pw = n[7];
  p->dh = n[8], p->dw = n[9], p->groups = n[10];
  p->q = eqk::fused::act_quant(act_scale, act_zp, n[11], n[12]);
  p->z_in_range = p->q.z >= p->q.lo && p->q.z <= p->q.hi;
  p->depthwise = packed.dim() == 2;
  if (p->depthwise) {  // decoded int8 [N, kh*kw] -> int32 [kh*kw][N]
    const int64_t taps = p->kh * p->kw;
    const int8_t* d = packed.data_ptr<int8_t>();
    p->dw_weights.resize(taps * p->N);
    for (int64_t n = 0; n < p->N; ++n)
      for (int64_t t = 0; t < taps; ++t) p->dw_weights[t * p->N + n] = d[n * taps + t];
  }
  // K matters only to Epilogue::operator(), which the steps do not call.
  const int64_t K = p->depthwise ? p->kh * p->kw : 4 * packed.size(1);
  const eqk::fused::Epilogue e =
      eqk::fused::make_epilogue(p->N, K, wsum, scale, scale_factor, c, zw, bias, p->q);
  const int64_t N = p->N;
  p->corr.resize(N), p->zw.resize(N), p->sc.resize(N);
  for (int64_t i = 0; i < N; ++i) {  // the per-layer kernel's per-channel terms
    p->corr[i] = static_cast<double>(static_cast<int64_t>(p->q.off) * e.wsum[i]);
    p->zw[i] = e.z * static_cast<double>(e.wsum[i]);
    p->sc[i] = e.sa * static_cast<double>(e.sb[i]);
  }
  p->czw.resize(N);
  for (int64_t i = 0; i < N; ++i) p->czw[i] = p->corr[i] - p->zw[i];
  p->cw = e.cw;
  p->cw_zero = std::all_of(p->cw.begin(), p->cw.end(), [](double v) { return v == 0.0; });
  p->bias = e.bias;
  p->z = e.z;
  // |code| <= 255 and |weight code| <= 128: |acc|, |code sum| below K 2^16 and K 2^8.
  const double acc_max = static_cast<double>(K) * 65536.0;
  const double xs_max = static_cast<double>(K) * 256.0;
  double bound = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    const double xz = xs_max + std::abs(static_cast<double>(K) * p->z);
    double b = (acc_max + std::abs(p->corr[i]) + std::abs(p->zw[i]) + xz * std::abs(p->cw[i])) *
               std::abs(p->sc[i]);
    if (!p->bias.empty()) b += std::abs(p->bias[i]);
    bound = std::max(bound, b);
  }
  p->finite_output = std::isfinite(bound) && bound < 1.3e36;  // 2^120
  if (!p->depthwise && p->groups == 1 && p->cw_zero) prepare_padded_channels(*p);
  prepare_int_epilogue(*p, std::max(K, p->cin_pad * p->kh * p->kw));
  if (p->depthwise) prepare_depthwise_vnni(*p);
  return p;
}

ConvOutput conv_output(const QConv& p, int64_t B, int64_t Hp, int64_t Wp,
                       const at::Tensor* residual, BufferPool& outs) {
  ConvOutput o;
  o.OH = (Hp - p.dh * (p.kh - 1) - 1) / p.sh + 1;
  o.OW = (Wp - p.dw * (p.kw - 1) - 1) / p.sw + 1;
  TORCH_CHECK(o.OH >= 1 && o.OW >= 1, "qconv: input smaller than the dilated kernel");
  o.y = p.out.on ? code_buffer(p, B, o.OH, o.OW, outs)
                 : outs.channels_last(B, p.N, o.OH, o.OW, at::TensorOptions());
  if (residual != nullptr) {
    TORCH_CHECK(!p.out.on && residual->sizes() == o.y.sizes() &&
                    residual->scalar_type() == at::kFloat,
                "qconv: the residual must be float32 of the output's shape");
    o.residual = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  return o;
}

at::Tensor run_qconv(const QConv& p, const at::Tensor& x_in, const at::Tensor* residual,
                     Activation act, int64_t isa, BufferPool* pool) {
  // A uint8 input is the code buffer of a qconv_codes step made for this conv (checked when
  // the steps were added): [B, Hp, Wp, C] in this conv's padding, read as is.
  const bool in_codes = x_in.scalar_type() == at::kByte;
  TORCH_CHECK(x_in.dim() == 4 && (in_codes || x_in.scalar_type() == at::kFloat),
              "qconv: x must be a float32 [B, C, H, W] tensor");
  TORCH_CHECK(p.z_in_range, "qconv: the activation zero point lies outside its range");
  BufferPool none;
  BufferPool& outs = pool != nullptr ? *pool : none;
  const at::Tensor x = in_codes || x_in.is_contiguous(at::MemoryFormat::ChannelsLast)
                           ? x_in
                           : x_in.contiguous();
  const int64_t B = x.size(0), C = in_codes ? x.size(3) : x.size(1);
  const int64_t Hp = in_codes ? x.size(1) : x.size(2) + 2 * p.ph;
  const int64_t Wp = in_codes ? x.size(2) : x.size(3) + 2 * p.pw;
  TORCH_CHECK(C % p.groups == 0, "qconv: input channels ", C, " not divisible by groups");
  const int level = eqk::lowbit::kernel_level(isa);
  // A stem's few channels padded to a multiple of 4 (zero weights): the implicit GEMM runs.
  const bool pad_ch = level >= 2 && !in_codes && p.cin_pad > 0 && C == p.cin_real;
  const int64_t Cs = pad_ch ? p.cin_pad : C;  // channels of the code layout
  const at::Tensor& packed = pad_ch ? p.packed_pad : p.packed;
  const int64_t groups = p.groups, N = p.N, cin_g = Cs / groups, n_g = N / groups;
  TORCH_CHECK(!in_codes || x.is_contiguous(), "qconv: the code buffer must be contiguous");
  // Reused across calls and layers on this thread: a fresh buffer per call page-faulted.
  static thread_local std::vector<uint8_t> u;
  if (!in_codes) codes_nhwc(level, x, p, Hp, Wp, Cs, u);
  const uint8_t* codes = in_codes ? x.data_ptr<uint8_t>() : u.data();  // workers must not
                                                                         // name the thread_local
  if (p.depthwise) {
    TORCH_CHECK(C == groups && N == groups, "qconv: depthwise weights need ", groups,
                " input channels, got ", C);
    return run_depthwise(p, B, codes, Hp, Wp, residual, act, level, outs);
  }
  const int64_t K = cin_g * p.kh * p.kw, K4 = (K + 3) / 4, Kp = 4 * K4;
  const int64_t Npad = 16 * ((n_g + 15) / 16);
  TORCH_CHECK(packed.numel() == groups * K4 * Npad * 4, "qconv: the input's ", C,
              " channels do not match the packed weights");
  const ConvOutput out = conv_output(p, B, Hp, Wp, residual, outs);
  const int64_t OH = out.OH, OW = out.OW, L = OH * OW;
  const bool out_codes = p.out.on;
  const at::Tensor& y = out.y;
  const bool implicit = level >= 2 && cin_g % 4 == 0;
  static thread_local std::vector<int32_t> sums;
  if (implicit && !p.cw_zero) {
    sums.resize(B * Hp * Wp * groups);
    group_sums(codes, B * Hp * Wp, Cs, groups, sums.data());
  }
  const int32_t* S = sums.data();
  const EpilogueFn epi =
      pick_epilogue(level, !p.bias.empty(), residual != nullptr, act.kind,
                    p.int_epi ? (p.xmul == 0 ? 3 : 2) : p.cw_zero ? 0 : 1);
  // Code output: each tile's fp32 epilogue goes to a task-local scratch and from there, row by
  // row, into the consumer's padded layout.
  const int64_t OWp = OW + 2 * p.out.pw, OHp = OH + 2 * p.out.ph;
  uint8_t* cp = out_codes ? y.data_ptr<uint8_t>() : nullptr;
  const int8_t* wp = packed.data_ptr<int8_t>();
  float* yp = out_codes ? nullptr : y.data_ptr<float>();
  const float* rp = residual != nullptr ? out.residual.data_ptr<float>() : nullptr;
  const int64_t sub = p.q.off;
  const int64_t blocks = (L + kRows - 1) / kRows;
  int64_t grain = std::max<int64_t>(1, eqk::fused::kMinTaskMacs / (kRows * N * K));
  // Few position blocks (small late layers at batch 1): split the output channels too, so
  // that every thread gets work; each output element is still computed by one task.
  const int64_t NT = Npad / 16, threads = at::get_num_threads();
  int64_t split = 1;
  if (implicit && groups == 1 && threads > 1 && B * blocks < 2 * threads) {
    split = std::min(NT, (2 * threads + B * blocks - 1) / (B * blocks));
    grain = 1;
  }
  const int64_t per_task = (NT + split - 1) / split;
  at::parallel_for(0, B * blocks * split, grain, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> A(kRows * Kp, 0);
    std::vector<int32_t> Cbuf(kRows * Npad);
    std::vector<double> xz(kRows);
    std::vector<float> F(out_codes ? kRows * Npad : 0);
    std::vector<int64_t> taps(p.kh * p.kw);
    for (int64_t a = 0; a < p.kh; ++a)
      for (int64_t bb = 0; bb < p.kw; ++bb)
        taps[a * p.kw + bb] = (a * p.dh * Wp + bb * p.dw) * Cs;
    const int64_t ntaps = p.kh * p.kw;
    std::vector<int64_t> tap_sums(ntaps);  // offsets of the taps in the group sums
    for (int64_t k = 0; k < ntaps; ++k) tap_sums[k] = taps[k] / Cs * groups;
    // One group with undilated rows: a kernel row's kw taps are kw * Cs contiguous bytes, and
    // the k4n16 columns (kh, kw, cin) run over them in the same order, so the implicit GEMM
    // takes one tap of kw * Cs / 4 column groups per kernel row (fewer tap iterations).
    const bool row_taps = groups == 1 && p.dw == 1;
    std::vector<int64_t> gemm_taps(row_taps ? p.kh : ntaps);
    for (int64_t k = 0; k < static_cast<int64_t>(gemm_taps.size()); ++k)
      gemm_taps[k] = row_taps ? taps[k * p.kw] : taps[k];
    const int64_t gemm_k4 = row_taps ? p.kw * cin_g / 4 : cin_g / 4;
    std::vector<const uint8_t*> P(kRows);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t t = task / split, part = task % split;
      const int64_t tile0 = part * per_task, tile1 = std::min(NT, tile0 + per_task);
      if (tile0 >= tile1) continue;
      const int64_t b = t / blocks, l0 = (t % blocks) * kRows;
      const int64_t rows = std::min(kRows, L - l0);
      const Im2col g{codes + b * Hp * Wp * Cs, Cs, Wp, OW, cin_g, K, Kp, sub, p.sh, p.sw,
                     taps.data(), ntaps, p.z};
      for (int64_t gi = 0; gi < groups; ++gi) {
        if (implicit) {
          const int32_t* Sb = S + b * Hp * Wp * groups + gi;
          int64_t oy = l0 / OW, ox = l0 % OW;
          for (int64_t rr = 0; rr < rows; ++rr) {
            const int64_t pix = oy * p.sh * Wp + ox * p.sw;
            P[rr] = g.ub + pix * Cs + gi * cin_g;
            if (p.cw_zero) {  // the code sums are not needed
              if (++ox == OW) ox = 0, ++oy;
              continue;
            }
            const int32_t* sp = Sb + pix * groups;
            int32_t s = 0;  // K * 255 < 2^31 (checked when the step was added)
            for (int64_t k = 0; k < ntaps; ++k) s += sp[tap_sums[k]];
            const int64_t xs = s + K * sub;  // sum of the codes
            xz[rr] = static_cast<double>(xs) - static_cast<double>(K) * p.z;
            if (++ox == OW) ox = 0, ++oy;
          }
          implicit_gemm(P.data(), rows, gemm_taps.data(), static_cast<int64_t>(gemm_taps.size()),
                        gemm_k4, wp + gi * K4 * Npad * 4,
                        Npad, tile0, tile1, Cbuf.data(), Npad);
        } else {
          im2col(g, l0, rows, gi, A.data(), xz.data());
          eqk::lowbit::packed_gemm(level, static_cast<int>(p.bits), A.data(), Kp, rows,
                                   wp + gi * K4 * Npad * 4, K4, Npad, Cbuf.data(), Npad);
        }
        const int64_t c0 = 16 * tile0, cnt = std::min(16 * tile1, n_g) - c0;  // this task's
        const int64_t n0 = gi * n_g + c0, off = (b * L + l0) * N + n0;
        if (!out_codes) {
          epi(Cbuf.data() + c0, Npad, rows, cnt, p, n0, xz.data(),
              rp == nullptr ? nullptr : rp + off, yp + off, N, act.lo, act.hi);
          continue;
        }
        epi(Cbuf.data() + c0, Npad, rows, cnt, p, n0, xz.data(), nullptr, F.data(), cnt,
            act.lo, act.hi);
        // With all channels in the tile, the positions of one output row are one byte run.
        int64_t oy = l0 / OW, ox = l0 % OW;
        for (int64_t rr = 0; rr < rows;) {
          const int64_t run = cnt == N ? std::min(rows - rr, OW - ox) : 1;
          uint8_t* dst = cp + ((b * OHp + oy + p.out.ph) * OWp + ox + p.out.pw) * N + n0;
          store_codes(level, p, F.data() + rr * cnt, run * cnt, dst);
          rr += run, ox += run;
          if (ox == OW) ox = 0, ++oy;
        }
      }
    }
  });
  return y;
}

}  // namespace eqk::steps
