// Shared pieces of the fused C++ integer low-bit path (csrc/lowbit_gemm/lowbit_fused_cpu.cpp:
// weight packing and linear; lowbit_fused_conv_cpu.cpp: conv2d): plane views, the activation
// quantization parameters and the per-channel float64 epilogue
//   y[m, n] = s_a s_b[n] (acc - z_a wsum[n] + (c - z_w[n]) (xsum[m] - K z_a)) + bias[n]
// in the same order as the Python reference (eqkernels/ops/_lowbit_gemm_paths.py `epilogue`),
// so the results equal the reference's exactly for fp32 inputs.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/bitplane_math.h"
#include "common/lowbit_cpu_dispatch.h"

namespace eqk::fused {

using eqk::lowbit::PlaneRows;

// Below this many rows the linear op runs the bit-serial GEMV from the planes (exposed to
// Python as _C.LOWBIT_DECODED_MIN_M: the op decides from it which kernel weights to cache).
constexpr int64_t kDecodedMinM = 16;
// Integer multiply-adds one parallel task should carry at least (a parallel region costs
// ~10-20 us; ResNet-20 at batch 1 has layers of ~1-5 M MACs).
constexpr int64_t kMinTaskMacs = int64_t(1) << 19;

// Kernel layouts of lowbit_pack_weights_cpu (exposed to Python as _C.PACKED_LAYOUTS).
enum class PackedLayout : int64_t {
  decoded = 0,  // int8 [N, K] (linear, or conv with cin_g == 1)
  k4n16 = 1,    // per group, columns in (kh, kw, cin_g) order: int8 [groups, K4, Npad_g, 4]
  tiled = 2,    // tiled planes (lowbit_cpu_gfni.h): int64 [bits, ceil(N/8), ceil(K/64), 8]
};

inline PlaneRows plane_rows(const at::Tensor& planes, int64_t bits, int64_t K) {
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              "planes must be a contiguous int32 [planes, N, W] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && planes.size(0) >= bits, "bits must be in 1..",
              planes.size(0), ", got ", bits);
  TORCH_CHECK(planes.size(2) == eqk::words_per_row(K), "planes hold ", planes.size(2),
              " words per row, K=", K, " needs ", eqk::words_per_row(K));
  return PlaneRows{reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), planes.size(1),
                   planes.size(2), static_cast<int>(bits)};
}

// The values of a small CPU tensor as double, read in place for the common dtypes (a dtype
// conversion op per argument and call cost as much as a small layer's GEMM).
inline std::vector<double> as_doubles(const at::Tensor& t_in, int64_t N, const char* name) {
  TORCH_CHECK(t_in.numel() == 1 || t_in.numel() == N, name, " must hold 1 or N=", N, " values");
  const at::Tensor t = t_in.contiguous();
  const int64_t cnt = t.numel();
  std::vector<double> vals(cnt);
  switch (t.scalar_type()) {
    case at::kFloat:
      std::copy_n(t.data_ptr<float>(), cnt, vals.begin());
      break;
    case at::kDouble:
      std::copy_n(t.data_ptr<double>(), cnt, vals.begin());
      break;
    case at::kInt:
      std::copy_n(t.data_ptr<int32_t>(), cnt, vals.begin());
      break;
    case at::kLong: {
      const int64_t* p = t.data_ptr<int64_t>();
      for (int64_t i = 0; i < cnt; ++i) vals[i] = static_cast<double>(p[i]);
      break;
    }
    default: {
      const at::Tensor d = t.to(at::kDouble);
      const double* p = d.data_ptr<double>();
      for (int64_t i = 0; i < cnt; ++i) vals[i] = p[i];
    }
  }
  std::vector<double> out(N);
  for (int64_t n = 0; n < N; ++n) out[n] = vals[cnt == 1 ? 0 : n];
  return out;
}

// Activation quantization parameters, read from the op's tensors as the reference does:
// inv = fl32(1 / fl32(s_a)), z = round_half_even(fl32(z_a)); the epilogue uses s_a in float64.
struct ActQuant {
  float inv, z, lo, hi;
  double sa;
  int off;  // codes enter the packed GEMM as u = code - off
};

inline ActQuant act_quant(const at::Tensor& act_scale, const std::optional<at::Tensor>& act_zp,
                   int64_t qmin, int64_t qmax) {
  TORCH_CHECK(act_scale.numel() == 1, "act_scale must hold one value");
  TORCH_CHECK(qmin >= -128 && qmax <= 255 && qmin < qmax && (qmin >= 0 || qmax <= 127),
              "act_quant_min/max must fit uint8 or int8");
  ActQuant q;
  q.sa = as_doubles(act_scale, 1, "act_scale")[0];
  q.inv = 1.0f / static_cast<float>(q.sa);
  q.z = act_zp.has_value()
            ? std::nearbyint(static_cast<float>(as_doubles(*act_zp, 1, "act_zero_point")[0]))
            : 0.0f;
  q.lo = static_cast<float>(qmin);
  q.hi = static_cast<float>(qmax);
  q.off = qmin < 0 ? -128 : 0;
  return q;
}

// Per-channel epilogue terms (s_b in fp32 as the reference's `_step`, the rest float64).
struct Epilogue {
  std::vector<float> sb;
  std::vector<double> cw, bias;
  const int64_t* wsum = nullptr;
  double z = 0.0, sa = 1.0;
  int64_t K = 0;

  // acc: sum_k code * q_b (exact); xsum: sum_k code.
  float operator()(int64_t acc, int64_t xsum, int64_t n) const {
    double total = static_cast<double>(acc);
    total = total - z * static_cast<double>(wsum[n]);  // exact: integers far below 2^53
    total = total + (static_cast<double>(xsum) - static_cast<double>(K) * z) * cw[n];
    double y = total * (sa * static_cast<double>(sb[n]));
    if (!bias.empty()) y = y + bias[n];
    return static_cast<float>(y);
  }
};

inline Epilogue make_epilogue(int64_t N, int64_t K, const at::Tensor& wsum, const at::Tensor& scale,
                       double scale_factor, double c, const std::optional<at::Tensor>& zw,
                       const std::optional<at::Tensor>& bias, const ActQuant& q) {
  TORCH_CHECK(wsum.scalar_type() == at::kLong && wsum.numel() == N && wsum.is_contiguous(),
              "wsum must be a contiguous int64 [N] tensor");
  Epilogue e;
  e.K = K;
  e.z = static_cast<double>(q.z);
  e.sa = q.sa;
  e.wsum = wsum.data_ptr<int64_t>();
  const std::vector<double> s = as_doubles(scale, N, "scale");
  e.sb.resize(N);
  for (int64_t n = 0; n < N; ++n)  // fp32, as _step (scale.to(float32) * 2^k)
    e.sb[n] = static_cast<float>(s[n]) * static_cast<float>(scale_factor);
  e.cw.assign(N, c);
  if (zw.has_value()) {
    const std::vector<double> z = as_doubles(*zw, N, "weight_zero_point");
    for (int64_t n = 0; n < N; ++n) e.cw[n] = c - z[n];
  }
  if (bias.has_value()) e.bias = as_doubles(*bias, N, "bias");
  return e;
}

}  // namespace eqk::fused
