// Activation codes of the step executor's integer convs: a conv's fp32 input quantized into the
// padded channels-last bytes its kernels read, and the code buffers of qconv_codes steps, whose
// epilogue stores the next conv's codes instead of fp32 (one byte per value written and read
// instead of four, and no quantize pass in the consumer). Both quantize with the same
// eqk::lowbit::quantize_codes on the same fp32 values, so the bytes are the same:
//   u = uint8(clamp(nearbyint(fl32(v * inv)) + z, qmin, qmax) - off).
// The fp32 values a qconv_codes step quantizes are finite by construction (checked when the
// step is added), which is why the consumer runs no finiteness pass.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/lowbit_cpu_packed.h"
#include "runtime/step_conv.h"

namespace eqk::steps {

// Codes of x [B, C, H, W] as channels-last padded bytes [B, Hp, Wp, Cs] (Cs >= C; border and
// channels past C: the code of real zero, minus sub). A channels-last x is quantized in whole
// rows of W*C values.
void codes_nhwc(int level, const at::Tensor& x_in, const QConv& p, int64_t Hp, int64_t Wp,
                int64_t Cs, std::vector<uint8_t>& u) {
  const bool rows = Cs == x_in.size(1) && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = rows ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto& q = p.q;
  // Without padding every byte is written below: no fill pass.
  if (p.ph == 0 && p.pw == 0 && Cs == C)
    u.resize(B * Hp * Wp * Cs);
  else
    u.assign(B * Hp * Wp * Cs, static_cast<uint8_t>(static_cast<int>(q.z) - q.off));
  const float* xp = x.data_ptr<float>();
  if (rows) {
    at::parallel_for(0, B * H, std::max<int64_t>(1, 16384 / (W * C)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H;
        uint8_t* dst = u.data() + ((b * Hp + h + p.ph) * Wp + p.pw) * C;
        eqk::lowbit::quantize_codes(level, xp + i * W * C, W * C, q.inv, q.z, q.lo, q.hi, q.off,
                                    dst);
      }
    });
    return;
  }
  at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / (H * W)), [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> row(W);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / C, ch = i % C;
      for (int64_t h = 0; h < H; ++h) {
        eqk::lowbit::quantize_codes(level, xp + (i * H + h) * W, W, q.inv, q.z, q.lo, q.hi,
                                    q.off, row.data());
        uint8_t* dst = u.data() + ((b * Hp + h + p.ph) * Wp + p.pw) * Cs + ch;
        for (int64_t w = 0; w < W; ++w) dst[w * Cs] = row[w];
      }
    }
  });
}

// The channel count a k4n16 weight tensor of K4 column groups was packed for, when the taps
// T >= 4 fix it (ceil(c T / 4) == K4 holds for at most one c then); 0 otherwise.
int64_t channels_of(int64_t K4, int64_t T) {
  if (T < 4) return 0;
  for (int64_t c = 1; c * T <= 4 * K4; ++c)
    if ((c * T + 3) / 4 == K4) return c;
  return 0;
}

void prepare_padded_channels(QConv& p) {
  const int64_t T = p.kh * p.kw, K4 = p.packed.size(1), Npad = p.packed.size(2);
  const int64_t cin = channels_of(K4, T), cpad = 4 * ((cin + 3) / 4), K4p = T * cpad / 4;
  if (cin == 0 || cin % 4 == 0 || 4 * K4p * 255 * (int64_t(1) << (p.bits - 1)) >= (int64_t(1) << 31))
    return;
  at::Tensor w = at::zeros({1, K4p, Npad, 4}, at::kChar);
  const int8_t* src = p.packed.data_ptr<int8_t>();
  int8_t* dst = w.data_ptr<int8_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < cin; ++c) {
      const int64_t k = t * cin + c, kp = t * cpad + c;  // (kh, kw, c) column order
      for (int64_t n = 0; n < Npad; ++n)
        dst[(kp / 4 * Npad + n) * 4 + kp % 4] = src[(k / 4 * Npad + n) * 4 + k % 4];
    }
  p.packed_pad = w;
  p.cin_real = cin;
  p.cin_pad = cpad;
}

void prepare_int_epilogue(QConv& p, int64_t K) {
  const int64_t N = p.N;
  const double cw0 = p.cw[0];
  for (int64_t n = 0; n < N; ++n)
    if (p.cw[n] != cw0) return;
  int64_t mult = 1;
  while (mult <= 1024 && std::nearbyint(cw0 * mult) != cw0 * mult) mult *= 2;
  if (mult > 1024 || std::abs(cw0 * mult) > 65536.0) return;
  const double xmul = cw0 * mult, dmult = static_cast<double>(mult);
  // |acc| <= K 255 2^(bits-1); |xs| <= K (255 + 128); |x| <= |xs| + K |z|.
  const double x_max = static_cast<double>(K) * (383.0 + std::abs(p.z));
  double bound = dmult * static_cast<double>(K) * 255.0 * static_cast<double>(1 << (p.bits - 1)) +
                 std::abs(xmul) * x_max;
  double extra = 0.0;
  std::vector<double> terms(N);
  for (int64_t n = 0; n < N; ++n) {
    // depthwise: mult acc + xmul xs - mult zw - xmul K z; k4n16: mult acc + mult czw + xmul x
    terms[n] = p.depthwise ? -dmult * p.zw[n] - xmul * static_cast<double>(K) * p.z
                           : dmult * p.czw[n];
    extra = std::max(extra, std::abs(terms[n]));
    const double s = p.sc[n] / dmult;
    if (s != 0.0 && std::fpclassify(s) != FP_NORMAL) return;  // scaling by 1/mult not exact
  }
  if (!(bound + extra + std::abs(xmul) * 383.0 * static_cast<double>(K) < 2147483647.0)) return;
  p.mult = static_cast<int32_t>(mult);
  p.xmul = static_cast<int32_t>(xmul);
  (p.depthwise ? p.dw_int : p.czw_int).resize(N);
  p.sc_int.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    (p.depthwise ? p.dw_int : p.czw_int)[n] = static_cast<int32_t>(terms[n]);
    p.sc_int[n] = p.sc[n] / dmult;
  }
  p.int_epi = true;
}

at::Tensor code_buffer(const QConv& p, int64_t B, int64_t OH, int64_t OW, BufferPool& outs) {
  const CodeTarget& t = p.out;
  const int64_t Hp = OH + 2 * t.ph, Wp = OW + 2 * t.pw, C = p.N;
  at::Tensor y = outs.bytes_nhwc(B, Hp, Wp, C, at::TensorOptions().device(at::kCPU));
  if (t.ph == 0 && t.pw == 0) return y;  // every byte is written by the conv
  const uint8_t zero = static_cast<uint8_t>(static_cast<int>(t.q.z) - t.q.off);
  uint8_t* u = y.data_ptr<uint8_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hp; ++h) {
      uint8_t* row = u + (b * Hp + h) * Wp * C;
      if (h < t.ph || h >= Hp - t.ph) {
        std::memset(row, zero, Wp * C);
      } else {
        std::memset(row, zero, t.pw * C);
        std::memset(row + (Wp - t.pw) * C, zero, t.pw * C);
      }
    }
  return y;
}

void store_codes(int level, const QConv& p, const float* v, int64_t n, uint8_t* dst) {
  const auto& q = p.out.q;
  eqk::lowbit::quantize_codes(level, v, n, q.inv, q.z, q.lo, q.hi, q.off, dst);
}

}  // namespace eqk::steps
