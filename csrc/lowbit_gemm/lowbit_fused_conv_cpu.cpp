// The fused C++ integer conv2d (CPU) of lowbit_conv2d: quantize the fp32 activation to
// channels-last byte codes padded with the code of real zero, im2col in blocks of positions,
// the packed int8 GEMM per group (k4n16 weights, lowbit_cpu_packed.h) or a direct loop for
// cin/groups == 1, and the float64 epilogue of common/lowbit_fused_cpu.h. Every output element
// is computed by one thread in a fixed order: results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common/lowbit_cpu_packed.h"
#include "common/lowbit_fused_entry.h"
#include "common/lowbit_fused_cpu.h"
#include "common/registry.h"

namespace {

using namespace eqk::fused;

// Output positions per conv task (the im2col block stays in L1/L2).
constexpr int64_t kConvRows = 64;

// memcpy of a short run with inlined fixed-size copies (a library call per run cost more than
// the GEMM for ResNet-sized layers).
inline void copy_run(uint8_t* dst, const uint8_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) std::memcpy(dst + i, src + i, 16);
  for (; i + 4 <= n; i += 4) std::memcpy(dst + i, src + i, 4);
  for (; i < n; ++i) dst[i] = src[i];
}

// Conv epilogue of one block, row by row over contiguous channels (vectorizes; the output
// is transposed into [N, L] afterwards). The same operations in the same order as
// Epilogue::operator(): double(acc + corr) == double(acc) + corr exactly (integers < 2^53).
__attribute__((always_inline)) inline void epilogue_rows_body(
    const int32_t* C, int64_t ldc, int64_t rows, int64_t cnt, const double* corr,
    const double* zw, const double* cw, const double* sc, const double* bias, const double* xz,
    float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* c = C + r * ldc;
    float* o = out + r * ldc;
    const double x = xz[r];
    if (bias == nullptr) {
      for (int64_t n = 0; n < cnt; ++n)
        o[n] = static_cast<float>(((static_cast<double>(c[n]) + corr[n] - zw[n]) + x * cw[n]) *
                                  sc[n]);
    } else {
      for (int64_t n = 0; n < cnt; ++n)
        o[n] = static_cast<float>(
            ((static_cast<double>(c[n]) + corr[n] - zw[n]) + x * cw[n]) * sc[n] + bias[n]);
    }
  }
}

EQK_TARGET_AVX2 void epilogue_rows_avx2(const int32_t* C, int64_t ldc, int64_t rows, int64_t cnt,
                                        const double* corr, const double* zw, const double* cw,
                                        const double* sc, const double* bias, const double* xz,
                                        float* out) {
  epilogue_rows_body(C, ldc, rows, cnt, corr, zw, cw, sc, bias, xz, out);
}

void epilogue_rows_portable(const int32_t* C, int64_t ldc, int64_t rows, int64_t cnt,
                            const double* corr, const double* zw, const double* cw,
                            const double* sc, const double* bias, const double* xz, float* out) {
  epilogue_rows_body(C, ldc, rows, cnt, corr, zw, cw, sc, bias, xz, out);
}

struct ConvGeom {
  int64_t B, C, H, W, N, kh, kw, sh, sw, ph, pw, dh, dw, groups, OH, OW, Hp, Wp;
};

// Codes of x [B, C, H, W] as channels-last padded bytes [B, Hp, Wp, C], the border holding the
// code of real zero (z - sub). One channel row at a time is quantized, then scattered.
std::vector<uint8_t> codes_nhwc(int level, const float* x, const ConvGeom& g, const ActQuant& q,
                                int sub) {
  const uint8_t pad = static_cast<uint8_t>(static_cast<int>(q.z) - sub);  // z in range
  std::vector<uint8_t> u(g.B * g.Hp * g.Wp * g.C, pad);
  const int64_t grain = std::max<int64_t>(1, 16384 / (g.H * g.W));
  at::parallel_for(0, g.B * g.C, grain, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> row(g.W);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / g.C, ch = i % g.C;
      for (int64_t h = 0; h < g.H; ++h) {
        eqk::lowbit::quantize_codes(level, x + (i * g.H + h) * g.W, g.W, q.inv, q.z, q.lo, q.hi,
                                    sub, row.data());
        uint8_t* dst = u.data() + ((b * g.Hp + h + g.ph) * g.Wp + g.pw) * g.C + ch;
        for (int64_t w = 0; w < g.W; ++w) dst[w * g.C] = row[w];
      }
    }
  });
  return u;
}

// y fp32 [B, N, OH, OW], or None when the rounded activation zero point lies outside
// [qmin, qmax] (its padding code is not a byte then; the caller runs the reference path).
std::optional<at::Tensor> lowbit_conv2d_int_fused_cpu(
    const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& wsum, int64_t bits,
    int64_t N,
    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
    int64_t dw, int64_t groups, const at::Tensor& scale, double scale_factor, double c,
    const std::optional<at::Tensor>& zw, const std::optional<at::Tensor>& bias,
    const at::Tensor& act_scale, const std::optional<at::Tensor>& act_zp, int64_t qmin,
    int64_t qmax, int64_t isa) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat,
              "lowbit_conv2d_int_fused_cpu: x must be a float32 [B, C, H, W] tensor");
  const at::Tensor x = x_in.contiguous();
  ConvGeom g{x.size(0), x.size(1), x.size(2), x.size(3), N, kh, kw, sh, sw, ph, pw, dh, dw,
             groups, 0, 0, 0, 0};
  TORCH_CHECK(groups >= 1 && g.C % groups == 0 && N % groups == 0, "bad groups");
  g.Hp = g.H + 2 * ph;
  g.Wp = g.W + 2 * pw;
  g.OH = (g.Hp - dh * (kh - 1) - 1) / sh + 1;
  g.OW = (g.Wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.OH >= 1 && g.OW >= 1, "input smaller than the dilated kernel");
  const int64_t cin_g = g.C / groups, n_g = N / groups, K = cin_g * kh * kw, L = g.OH * g.OW;
  const int level = eqk::lowbit::kernel_level(isa);
  const ActQuant q = act_quant(act_scale, act_zp, qmin, qmax);
  if (!(q.z >= q.lo && q.z <= q.hi)) return std::nullopt;
  const Epilogue e = make_epilogue(N, K, wsum, scale, scale_factor, c, zw, bias, q);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed must be contiguous int8");
  const int8_t* wp = packed.data_ptr<int8_t>();
  auto y = at::empty({g.B, N, g.OH, g.OW}, x.options());
  float* yp = y.data_ptr<float>();

  if (cin_g == 1) {
    // Depthwise / channel multiplier: direct loop over the kh*kw taps of one input channel.
    TORCH_CHECK(packed.numel() == N * K, "packed must be int8 [N, kh*kw] when cin/groups == 1");
    const std::vector<uint8_t> u = codes_nhwc(level, x.data_ptr<float>(), g, q, 0);
    const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, L * K));
    at::parallel_for(0, g.B * N, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / N, n = i % N, ch = n / n_g;
        const int8_t* w = wp + n * K;
        const uint8_t* base = u.data() + b * g.Hp * g.Wp * g.C + ch;
        const bool sgn = qmin < 0;
        for (int64_t oy = 0; oy < g.OH; ++oy)
          for (int64_t ox = 0; ox < g.OW; ++ox) {
            int64_t acc = 0, xs = 0;
            for (int64_t a = 0; a < kh; ++a)
              for (int64_t bb = 0; bb < kw; ++bb) {
                const uint8_t byte =
                    base[((oy * sh + a * dh) * g.Wp + ox * sw + bb * dw) * g.C];
                const int v = sgn ? static_cast<int8_t>(byte) : static_cast<int>(byte);
                acc += v * w[a * kw + bb];
                xs += v;
              }
            yp[(b * N + n) * L + oy * g.OW + ox] = e(acc, xs, n);
          }
      }
    });
    return y;
  }

  // im2col on channels-last codes (columns in (kh, kw, cin_g) order, matching the k4n16
  // weights) in blocks of kConvRows positions, then the packed int8 GEMM and the epilogue.
  const int64_t K4 = (K + 3) / 4, Kp = 4 * K4, Npad = 16 * ((n_g + 15) / 16);
  TORCH_CHECK(packed.numel() == groups * K4 * Npad * 4, "packed: k4n16 size mismatch");
  const int sub = q.off;
  const std::vector<uint8_t> u = codes_nhwc(level, x.data_ptr<float>(), g, q, sub);
  std::vector<double> corr_d(N), zw_d(N), sc_d(N);  // per-channel epilogue terms
  for (int64_t n = 0; n < N; ++n) {
    corr_d[n] = static_cast<double>(static_cast<int64_t>(sub) * e.wsum[n]);
    zw_d[n] = e.z * static_cast<double>(e.wsum[n]);
    sc_d[n] = e.sa * static_cast<double>(e.sb[n]);
  }
  const int64_t blocks = (L + kConvRows - 1) / kConvRows;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (kConvRows * N * K));
  at::parallel_for(0, g.B * blocks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> A(kConvRows * Kp, 0);
    std::vector<int32_t> Cbuf(kConvRows * Npad);
    std::vector<int64_t> xs(kConvRows);
    std::vector<double> xz(kConvRows);
    std::vector<float> T(kConvRows * Npad);
    std::vector<int64_t> taps(kh * kw);  // byte offsets of the kernel taps in the codes
    for (int64_t a = 0; a < kh; ++a)
      for (int64_t bb = 0; bb < kw; ++bb) taps[a * kw + bb] = (a * dh * g.Wp + bb * dw) * g.C;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, l0 = (t % blocks) * kConvRows;
      const int64_t rows = std::min(kConvRows, L - l0);
      const uint8_t* ub = u.data() + b * g.Hp * g.Wp * g.C;
      for (int64_t gi = 0; gi < groups; ++gi) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t l = l0 + r, oy = l / g.OW, ox = l % g.OW;
          uint8_t* dst = A.data() + r * Kp;
          const uint8_t* src = ub + (oy * sh * g.Wp + ox * sw) * g.C + gi * cin_g;
          const int64_t ntaps = kh * kw;
          if (cin_g == 16) {
            for (int64_t t = 0; t < ntaps; ++t) std::memcpy(dst + 16 * t, src + taps[t], 16);
          } else {
            for (int64_t t = 0; t < ntaps; ++t) copy_run(dst + t * cin_g, src + taps[t], cin_g);
          }
          int32_t s = 0;  // K * 255 < 2^31 (the caller's exactness rule)
          for (int64_t k = 0; k < K; ++k) s += dst[k];
          xs[r] = s + K * sub;  // sum of the codes
          xz[r] = static_cast<double>(xs[r]) - static_cast<double>(K) * e.z;
        }
        eqk::lowbit::packed_gemm(level, static_cast<int>(bits), A.data(), Kp, rows, wp + gi * K4 * Npad * 4, K4, Npad,
                                 Cbuf.data(), Npad);
        const int64_t n0 = gi * n_g;
        const double* bias_g = e.bias.empty() ? nullptr : e.bias.data() + n0;
        (level >= 1 ? epilogue_rows_avx2 : epilogue_rows_portable)(
            Cbuf.data(), Npad, rows, n_g, corr_d.data() + n0, zw_d.data() + n0,
            e.cw.data() + n0, sc_d.data() + n0, bias_g, xz.data(), T.data());
        for (int64_t nl = 0; nl < n_g; ++nl) {
          float* yo = yp + (b * N + n0 + nl) * L + l0;
          for (int64_t r = 0; r < rows; ++r) yo[r] = T[r * Npad + nl];
        }
      }
    }
  });
  return y;
}

}  // namespace

std::optional<at::Tensor> eqk::fused::conv2d_int_fused(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wsum, int64_t bits, int64_t N,
    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
    int64_t dw, int64_t groups, const at::Tensor& scale, double scale_factor, double c,
    const std::optional<at::Tensor>& zw, const std::optional<at::Tensor>& bias,
    const at::Tensor& act_scale, const std::optional<at::Tensor>& act_zp, int64_t qmin,
    int64_t qmax, int64_t isa) {
  return lowbit_conv2d_int_fused_cpu(x, packed, wsum, bits, N, kh, kw, sh, sw, ph, pw, dh, dw,
                                     groups, scale, scale_factor, c, zw, bias, act_scale, act_zp,
                                     qmin, qmax, isa);
}

EQK_REGISTER(lowbit_fused_conv_cpu) {
  m.def("lowbit_conv2d_int_fused_cpu", &lowbit_conv2d_int_fused_cpu,
        "lowbit_conv2d integer path in one call: quantize, im2col, integer GEMM, epilogue");
}
