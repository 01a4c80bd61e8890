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
#include "runtime/step_buffer_pool.h"

namespace eqk::steps {

// What follows the (residual-added) fp32 result in the epilogue: kind 0 nothing, 1 ReLU
// (v < 0 ? 0 : v), 2 clamp to [lo, hi] (ReLU6, Hardtanh), each the fp32 operation that the
// separate step would do.
struct Activation {
  int kind = 0;
  float lo = 0.0f, hi = 0.0f;
};

// The activation codes a qconv_codes step writes instead of fp32 (step_codes_cpu.cpp): the
// consuming conv's quantizer and padding. Its output buffer is uint8 [B, OH + 2 ph, OW + 2 pw, N]
// holding code - q.off (the border: the code of real zero), the layout the consumer quantizes
// its fp32 input into, so the consumer reads it as is.
struct CodeTarget {
  bool on = false;
  eqk::fused::ActQuant q{};
  int64_t ph = 0, pw = 0;
};

// Whether two quantizers give the same code for every fp32 value (the same fp32 operations on
// the same constants).
inline bool same_codes(const eqk::fused::ActQuant& a, const eqk::fused::ActQuant& b) {
  return a.inv == b.inv && a.z == b.z && a.lo == b.lo && a.hi == b.hi && a.off == b.off;
}

struct QConv {
  at::Tensor packed, wsum;  // k4n16 int8 weights, int64 weight code row sums
  int64_t bits = 0, N = 0, kh = 0, kw = 0, sh = 0, sw = 0, ph = 0, pw = 0, dh = 0, dw = 0;
  int64_t groups = 1;
  eqk::fused::ActQuant q{};
  bool z_in_range = false;
  double z = 0.0;
  std::vector<double> corr, zw, czw, cw, sc, bias;  // per-channel epilogue terms (bias may be empty)
  // Every cw is 0 (symmetric weights, no compensation): the term (xsum - K z) cw adds +0 to
  // an integer-valued double that is never -0, so leaving it out (and the code sums with it)
  // gives the same bits.
  bool cw_zero = false;
  // |epilogue| is below 2^120 for any codes (bounded sums, finite terms): the fp32 output, and
  // its ReLU or clamp, is finite whatever the input was.
  bool finite_output = false;
  bool depthwise = false;            // groups == in == out channels: step_depthwise_cpu.cpp
  std::vector<int32_t> dw_weights;   // depthwise: weight codes [kh*kw][N]
  std::vector<int8_t> dw_w4;         // depthwise, VNNI: [kh][Npad16][4] kernel rows (kw <= 4)
  std::vector<int32_t> dw_corr;      // depthwise, VNNI: off * (weight code sum) [Npad16]
  // The epilogue in integers (prepare_int_epilogue, when exact): with cw = xmul / mult the same
  // for every channel (mult a power of two) and every sum below 2^31 in magnitude,
  // mult ((acc + czw) + x cw) is the int32 mult acc + czw_int[n] + xmul x (depthwise:
  // mult acc + xmul xs + dw_int[n]), and times sc_int = sc / mult (exact, a power of two) it
  // rounds to the same double as the float64 expression times sc.
  bool int_epi = false;
  int32_t mult = 1, xmul = 0;
  std::vector<int32_t> czw_int, dw_int;
  std::vector<double> sc_int;
  CodeTarget out;                    // qconv_codes: the next conv's codes instead of fp32
  // k4n16 with cin_real % 4 != 0 input channels (a stem's 3) and no code sums (cw_zero): the
  // weights again with the channels padded to cin_pad by zero weights, so that the implicit
  // VNNI GEMM runs on codes padded alike (exact: a zero weight adds 0 to every sum).
  at::Tensor packed_pad;
  int64_t cin_real = 0, cin_pad = 0;
};

// The VNNI depthwise kernel (step_depthwise_vnni_cpu.cpp): its weights and padded epilogue
// terms (called by make_qconv), whether a step has them, and the conv on padded codes u; the
// fp32 rows go to y, or with codes (p.out.on) to a per-row scratch and then as codes into the
// code buffer `codes` ([B, OH + 2 ph, OW + 2 pw, N], border already filled).
void prepare_depthwise_vnni(QConv& p);
bool depthwise_vnni_fits(const QConv& p);
void run_depthwise_vnni(const QConv& p, const uint8_t* u, const float* res, float* y,
                        uint8_t* codes, int64_t B, int64_t Hp, int64_t Wp, int64_t OH,
                        int64_t OW, Activation act);

// ints: bits, N, kh, kw, sh, sw, ph, pw, dh, dw, groups, qmin, qmax (the qconv step's).
std::shared_ptr<QConv> make_qconv(const at::Tensor& packed, const at::Tensor& wsum,
                                  const at::Tensor& scale, const at::Tensor& act_scale,
                                  const std::optional<at::Tensor>& zw,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& act_zp,
                                  const std::vector<int64_t>& ints, double scale_factor, double c);

// step_codes_cpu.cpp: the codes of x [B, C, H, W] (fp32) as p's padded channels-last bytes u
// [B, Hp, Wp, Cs] (Cs >= C: channels padded with the code of zero); an output code buffer of p.out's layout with its border filled; one row of n
// fp32 values stored as p.out's codes (the consumer's quantize_codes, so the same bytes).
void codes_nhwc(int level, const at::Tensor& x, const QConv& p, int64_t Hp, int64_t Wp,
                int64_t Cs, std::vector<uint8_t>& u);
// k4n16 weights of channels padded to a multiple of 4 (packed_pad; make_qconv calls it for
// convs without code sums).
void prepare_padded_channels(QConv& p);
// The integer epilogue's terms (QConv::int_epi), for K columns; make_qconv calls it.
void prepare_int_epilogue(QConv& p, int64_t K);
at::Tensor code_buffer(const QConv& p, int64_t B, int64_t OH, int64_t OW, BufferPool& outs);
void store_codes(int level, const QConv& p, const float* v, int64_t n, uint8_t* dst);

// What every integer conv kernel starts from: the output size of an input padded to Hp x Wp,
// the output (fp32 channels-last [B, N, OH, OW] from `outs`, or p.out's code buffer) and the
// residual operand, checked against it and made channels-last (undefined when there is none).
struct ConvOutput {
  int64_t OH = 0, OW = 0;
  at::Tensor y, residual;
};
ConvOutput conv_output(const QConv& p, int64_t B, int64_t Hp, int64_t Wp,
                       const at::Tensor* residual, BufferPool& outs);

// The depthwise conv of codes u (channels-last [B, Hp, Wp, C]): fp32 channels-last output from
// `outs`, or p.out's code buffer.
at::Tensor run_depthwise(const QConv& p, int64_t B, const uint8_t* u, int64_t Hp, int64_t Wp,
                         const at::Tensor* residual, Activation act, int level, BufferPool& outs);

// y = act(conv(x) [+ residual]) as a channels-last float32 [B, N, OH, OW] tensor, or as p.out's
// code buffer (qconv_codes). x is fp32 [B, C, H, W], or the uint8 code buffer a qconv_codes
// step wrote for this conv. The output comes from `pool` when given.
at::Tensor run_qconv(const QConv& p, const at::Tensor& x, const at::Tensor* residual,
                     Activation act, int64_t isa, BufferPool* pool = nullptr);

}  // namespace eqk::steps
