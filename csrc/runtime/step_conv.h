// The step executor's integer conv (step_conv_cpu.cpp): the fused conv's arithmetic on weights
// and epilogue terms prepared once per step, channels-last activations, and an optional
// residual add and ReLU in the epilogue.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "common/lowbit_fused_cpu.h"

namespace eqk::steps {

struct QConv {
  at::Tensor packed, wsum;  // k4n16 int8 weights, int64 weight code row sums
  int64_t bits = 0, N = 0, kh = 0, kw = 0, sh = 0, sw = 0, ph = 0, pw = 0, dh = 0, dw = 0;
  int64_t groups = 1;
  eqk::fused::ActQuant q{};
  bool z_in_range = false;
  double z = 0.0;
  std::vector<double> corr, zw, czw, cw, sc, bias;  // per-channel epilogue terms (bias may be empty)
  bool depthwise = false;            // groups == in == out channels: step_depthwise_cpu.cpp
  std::vector<int32_t> dw_weights;   // depthwise: weight codes [kh*kw][N]
};

// ints: bits, N, kh, kw, sh, sw, ph, pw, dh, dw, groups, qmin, qmax (the qconv step's).
std::shared_ptr<QConv> make_qconv(const at::Tensor& packed, const at::Tensor& wsum,
                                  const at::Tensor& scale, const at::Tensor& act_scale,
                                  const std::optional<at::Tensor>& zw,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& act_zp,
                                  const std::vector<int64_t>& ints, double scale_factor, double c);

// The depthwise conv of x's codes u (channels-last, padded to Hp x Wp).
at::Tensor run_depthwise(const QConv& p, const at::Tensor& x, const std::vector<uint8_t>& u,
                         int64_t Hp, int64_t Wp, const at::Tensor* residual, bool relu,
                         int level);

// y = conv(x) [+ residual] [then ReLU] as a channels-last float32 [B, N, OH, OW] tensor.
at::Tensor run_qconv(const QConv& p, const at::Tensor& x, const at::Tensor* residual, bool relu,
                     int64_t isa);

}  // namespace eqk::steps
