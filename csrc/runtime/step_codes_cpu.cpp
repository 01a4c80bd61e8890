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
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/lowbit_cpu_packed.h"
#include "runtime/step_conv.h"

namespace eqk::steps {

// Codes of x [B, C, H, W] as channels-last padded bytes [B, Hp, Wp, C] (border: the code of
// real zero, minus sub). A channels-last x is quantized in whole rows of W*C values.
void codes_nhwc(int level, const at::Tensor& x, const QConv& p, int64_t Hp, int64_t Wp,
                std::vector<uint8_t>& u) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto& q = p.q;
  // Without padding every byte is written below: no fill pass.
  if (p.ph == 0 && p.pw == 0)
    u.resize(B * Hp * Wp * C);
  else
    u.assign(B * Hp * Wp * C, static_cast<uint8_t>(static_cast<int>(q.z) - q.off));
  const float* xp = x.data_ptr<float>();
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
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
        uint8_t* dst = u.data() + ((b * Hp + h + p.ph) * Wp + p.pw) * C + ch;
        for (int64_t w = 0; w < W; ++w) dst[w * C] = row[w];
      }
    }
  });
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
