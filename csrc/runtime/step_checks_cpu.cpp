// The checks of a step's parameters when it is added to a step program (step_kinds.h), and
// the finiteness pass that runs before a quantized step reads a float input.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <vector>

#include "common/lowbit_cpu_dispatch.h"
#include "runtime/step_kinds.h"

namespace eqk::steps {

namespace {

// Whether n floats (as bits) are all finite (exponent bits not all ones); compiled per ISA so
// that the loop vectorizes (it runs before every quantized step).
__attribute__((always_inline)) inline bool finite_body(const uint32_t* p, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= ((p[i] & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}
__attribute__((target("avx512f,avx512bw"))) bool finite_avx512(const uint32_t* p, int64_t n) {
  return finite_body(p, n);
}
__attribute__((target("avx2"))) bool finite_avx2(const uint32_t* p, int64_t n) {
  return finite_body(p, n);
}
bool finite_portable(const uint32_t* p, int64_t n) { return finite_body(p, n); }

}  // namespace

bool all_finite(const at::Tensor& t, int64_t isa) {
  const bool dense = t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.scalar_type() != at::kFloat || !dense) return at::isfinite(t).all().item<bool>();
  const uint32_t* p = reinterpret_cast<const uint32_t*>(t.data_ptr<float>());
  const int level = eqk::lowbit::kernel_level(isa);
  if (level >= 2) return finite_avx512(p, t.numel());
  if (level == 1) return finite_avx2(p, t.numel());
  return finite_portable(p, t.numel());
}

namespace {

void check_epilogue(const char* name, const std::optional<at::Tensor>& wsum,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& zw,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& act_scale,
                           const std::optional<at::Tensor>& act_zp, int64_t N, int64_t qmin,
                           int64_t qmax) {
  TORCH_CHECK(wsum->scalar_type() == at::kLong && wsum->numel() == N && wsum->is_contiguous(),
              name, ": wsum must be contiguous int64 [N]");
  TORCH_CHECK(scale->numel() == 1 || scale->numel() == N, name, ": scale must hold 1 or N values");
  TORCH_CHECK(!zw.has_value() || zw->numel() == N, name, ": weight zero point must hold N values");
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, name, ": bias must hold N values");
  TORCH_CHECK(act_scale->numel() == 1 && (!act_zp.has_value() || act_zp->numel() == 1), name,
              ": act scale and zero point must hold one value");
  TORCH_CHECK(qmin >= -128 && qmax <= 255 && qmin < qmax && (qmin >= 0 || qmax <= 127), name,
              ": act_quant_min/max must fit uint8 or int8");
}

}  // namespace

void check_step_params(Kind k, const char* name, const std::vector<std::optional<at::Tensor>>& t,
                       const std::vector<int64_t>& ints, const std::vector<double>& f) {
  auto is_float = [](const std::optional<at::Tensor>& v) {
    return !v.has_value() || v->scalar_type() == at::kFloat;
  };
  switch (k) {
    case Kind::qconv:
    case Kind::qconv_codes: {
      const at::Tensor& packed = *t[0];
      const int64_t bits = ints[0], N = ints[1], groups = ints[10], qmin = ints[11];
      const int64_t qmax = ints[12];
      TORCH_CHECK(bits >= 1 && bits <= 8 && N >= 1 && groups >= 1 && N % groups == 0, name,
                  ": bits must be in 1..8, out channels >= 1 and divisible by groups");
      TORCH_CHECK(ints[13] >= 0 && ints[13] <= 2, name,
                  ": activation must be 0 (none), 1 (ReLU) or 2 (clamp)");
      TORCH_CHECK(ints[13] != 2 || f[2] <= f[3], name, ": clamp lo must be <= hi");
      for (int i = 2; i < 10; ++i)
        TORCH_CHECK(ints[i] >= (i >= 6 && i < 8 ? 0 : 1), name,
                    ": kernel, stride, dilation must be >= 1 and padding >= 0");
      TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous(), name,
                  ": packed weights must be contiguous int8");
      if (packed.dim() == 4) {  // k4n16: exact int32 sums of K unsigned bytes
        const int64_t n_g = N / groups, npad = 16 * ((n_g + 15) / 16);
        TORCH_CHECK(packed.size(0) == groups && packed.size(2) == npad && packed.size(3) == 4,
                    name, ": packed weights must be int8 [groups, K4, Npad, 4]");
        TORCH_CHECK(4 * packed.size(1) * 255 * (int64_t(1) << (bits - 1)) < (int64_t(1) << 31),
                    name, ": K too long for exact int32 accumulation at ", bits, " bits");
      } else {
        TORCH_CHECK(packed.dim() == 2 && packed.size(0) == N && packed.size(1) == ints[2] * ints[3],
                    name, ": depthwise packed weights must be int8 [N, kh*kw]");
      }
      check_epilogue(name, t[1], t[2], t[4], t[5], t[3], t[6], N, qmin, qmax);
      if (k == Kind::qconv_codes) {
        TORCH_CHECK(t[7]->numel() == 1 && (!t[8].has_value() || t[8]->numel() == 1), name,
                    ": the output act scale and zero point must hold one value");
        TORCH_CHECK(ints[14] >= -128 && ints[15] <= 255 && ints[14] < ints[15] &&
                        (ints[14] >= 0 || ints[15] <= 127),
                    name, ": the output act_quant_min/max must fit uint8 or int8");
        TORCH_CHECK(ints[16] >= 0 && ints[17] >= 0, name, ": the output padding must be >= 0");
      }
      break;
    }
    case Kind::qlinear: {
      const at::Tensor& planes = *t[0];
      const int64_t bits = ints[0];
      TORCH_CHECK(planes.scalar_type() == at::kInt && planes.dim() == 3 &&
                      planes.is_contiguous() && bits >= 1 && bits <= 8 && planes.size(0) >= bits,
                  name, ": planes must be contiguous int32 [>= bits, N, W], bits in 1..8");
      const int64_t amax = std::max(std::abs(ints[1]), std::abs(ints[2]));
      TORCH_CHECK(32 * planes.size(2) * amax * (int64_t(1) << (bits - 1)) < (int64_t(1) << 31),
                  name, ": K too long for exact int32 accumulation at ", bits, " bits");
      check_epilogue(name, t[1], t[2], t[5], t[6], t[3], t[7], planes.size(1), ints[1],
                     ints[2]);
      break;
    }
    case Kind::conv:
      TORCH_CHECK(t[0]->dim() == 4 && is_float(t[0]) && is_float(t[1]), name,
                  ": weight must be float32 [Cout, Cin/groups, kh, kw], bias float32");
      TORCH_CHECK(ints[0] >= 1 && ints[1] >= 1 && ints[2] >= 0 && ints[3] >= 0 &&
                      ints[4] >= 1 && ints[5] >= 1 && ints[6] >= 1,
                  name, ": stride, dilation, groups >= 1 and padding >= 0");
      break;
    case Kind::linear:
      TORCH_CHECK(t[0]->dim() == 2 && is_float(t[0]) && is_float(t[1]), name,
                  ": weight must be float32 [N, K], bias float32");
      break;
    case Kind::affine:
      TORCH_CHECK(is_float(t[0]) && is_float(t[1]) && t[0]->dim() == 1 &&
                      t[1]->sizes() == t[0]->sizes(),
                  name, ": mul and add must be float32 [C]");
      break;
    case Kind::clamp:
      TORCH_CHECK(f[0] <= f[1], name, ": lo must be <= hi");
      break;
    case Kind::max_pool2d:
    case Kind::avg_pool2d:
      for (int i = 0; i < 6; ++i)
        TORCH_CHECK(ints[i] >= (i < 4 ? 1 : 0), name,
                    ": kernel and stride must be >= 1, padding >= 0");
      TORCH_CHECK(k == Kind::avg_pool2d || (ints[6] >= 1 && ints[7] >= 1), name,
                  ": dilation must be >= 1");
      break;
    case Kind::adaptive_avg_pool2d:
      TORCH_CHECK(ints[0] >= 1 && ints[1] >= 1, name, ": output size must be >= 1");
      break;
    case Kind::slice:
      TORCH_CHECK(ints[3] >= 1, name, ": step must be >= 1");
      break;
    case Kind::pad:
      TORCH_CHECK(!ints.empty() && ints.size() % 2 == 0 && ints.size() <= 8, name,
                  ": pads must be 2, 4, 6 or 8 ints");
      break;
    default:
      break;
  }
}

}  // namespace eqk::steps
