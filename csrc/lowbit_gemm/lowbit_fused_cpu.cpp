// The whole integer low-bit path of lowbit_linear / lowbit_conv2d in one C++ call (CPU):
// quantize the fp32 activation to byte codes (fake_quant's fp32 arithmetic), the integer GEMM,
// the activation code sums and the float64 epilogue
//   y[m, n] = s_a s_b[n] (acc - z_a wsum[n] + (c - z_w[n]) (xsum[m] - K z_a)) + bias[n]
// in the same order as the Python reference (eqkernels/ops/lowbit_gemm.py `_epilogue`), so the
// results equal the reference's up to nothing at all for fp32 inputs.
//
// Weights: `lowbit_pack_weights_cpu` repacks the planes once into a kernel layout and the
// weight code row sums (the Python op caches both per planes tensor):
//   * linear with AVX-512 VBMI + GFNI: tiled planes (lowbit_cpu_gfni.h; still `bits` separate
//     planes, bits/8 bytes per weight), decoded in registers by the GEMV (one row) and GEMM;
//   * linear otherwise: int8 [N, K] (bit-serial GEMV straight from the planes for few rows;
//     the decoded weights feed torch._int_mm for many rows);
//   * conv, cin/groups > 1: k4n16 (lowbit_cpu_packed.h) per group, columns in (kh, kw, cin)
//     order so that im2col on channels-last codes copies whole channel runs;
//   * conv, cin/groups == 1 (depthwise and channel multipliers): int8 [N, kh*kw], direct loop.
// Threads split output rows / positions / channels; every output element is computed by one
// thread in a fixed order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common/bitplane_math.h"
#include "common/lowbit_cpu_dispatch.h"
#include "common/lowbit_cpu_gfni.h"
#include "common/lowbit_cpu_packed.h"
#include "common/registry.h"

namespace {

using eqk::lowbit::PlaneRows;

// Below this many rows the linear op runs the bit-serial GEMV from the planes.
constexpr int64_t kDecodedMinM = 16;
// Integer multiply-adds one parallel task should carry at least (a parallel region costs
// ~10-20 us; ResNet-20 at batch 1 has layers of ~1-5 M MACs).
constexpr int64_t kMinTaskMacs = int64_t(1) << 19;
// Output positions per conv task (the im2col block stays in L1/L2).
constexpr int64_t kConvRows = 64;

PlaneRows plane_rows(const at::Tensor& planes, int64_t bits, int64_t K) {
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              "planes must be a contiguous int32 [planes, N, W] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && planes.size(0) >= bits, "bits must be in 1..",
              planes.size(0), ", got ", bits);
  TORCH_CHECK(planes.size(2) == eqk::words_per_row(K), "planes hold ", planes.size(2),
              " words per row, K=", K, " needs ", eqk::words_per_row(K));
  return PlaneRows{reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), planes.size(1),
                   planes.size(2), static_cast<int>(bits)};
}

// Activation quantization parameters, read from the op's tensors as the reference does:
// inv = fl32(1 / fl32(s_a)), z = round_half_even(fl32(z_a)); the epilogue uses s_a in float64.
struct ActQuant {
  float inv, z, lo, hi;
  double sa;
  int off;  // codes enter the packed GEMM as u = code - off
};

std::vector<double> as_doubles(const at::Tensor& t_in, int64_t N, const char* name);

ActQuant act_quant(const at::Tensor& act_scale, const std::optional<at::Tensor>& act_zp,
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

// The values of a small CPU tensor as double, read in place for the common dtypes (a dtype
// conversion op per argument and call cost as much as a small layer's GEMM).
std::vector<double> as_doubles(const at::Tensor& t_in, int64_t N, const char* name) {
  TORCH_CHECK(t_in.numel() == 1 || t_in.numel() == N, name, " must hold 1 or N=", N, " values");
  const at::Tensor t = t_in.contiguous();
  const int64_t cnt = t.numel();
  std::vector<double> vals(cnt);
  switch (t.scalar_type()) {
    case at::kFloat: { const float* p = t.data_ptr<float>(); for (int64_t i = 0; i < cnt; ++i) vals[i] = p[i]; break; }
    case at::kDouble: { const double* p = t.data_ptr<double>(); for (int64_t i = 0; i < cnt; ++i) vals[i] = p[i]; break; }
    case at::kInt: { const int32_t* p = t.data_ptr<int32_t>(); for (int64_t i = 0; i < cnt; ++i) vals[i] = p[i]; break; }
    case at::kLong: { const int64_t* p = t.data_ptr<int64_t>(); for (int64_t i = 0; i < cnt; ++i) vals[i] = static_cast<double>(p[i]); break; }
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

Epilogue make_epilogue(int64_t N, int64_t K, const at::Tensor& wsum, const at::Tensor& scale,
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

// ------------------------------------------------------------------------------------------
// Weight packing (once per planes tensor; the Python op caches the result).

// Tiled planes of the first P.bits planes (layout of lowbit_cpu_gfni.h): word pairs of each
// plane row regrouped 8 rows per 64-byte block; zero past K (the canonical padding bits are
// zero) and for the rows past N.
at::Tensor tile_planes(const PlaneRows& P, int64_t K) {
  using eqk::lowbit::kTileRows;
  const int64_t NT = (P.N + kTileRows - 1) / kTileRows, KB = (K + 63) / 64;
  auto out = at::zeros({P.bits, NT, KB, kTileRows}, at::TensorOptions().dtype(at::kLong));
  uint64_t* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, P.bits * NT, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int j = static_cast<int>(i / NT);
      const int64_t t = i % NT;
      for (int64_t r = 0; r < kTileRows && t * kTileRows + r < P.N; ++r) {
        const uint32_t* row = P.row(j, t * kTileRows + r);
        for (int64_t kb = 0; kb < KB; ++kb) {
          const uint64_t lo = row[2 * kb];
          const uint64_t hi = 2 * kb + 1 < P.W ? row[2 * kb + 1] : 0;
          o[(i * KB + kb) * kTileRows + r] = lo | (hi << 32);
        }
      }
    }
  });
  return out;
}

at::Tensor plane_rowsums(int level, const PlaneRows& P) {
  auto wsum = at::empty({P.N}, at::TensorOptions().dtype(at::kLong));
  int64_t* ws = wsum.data_ptr<int64_t>();
  at::parallel_for(0, P.N, 256, [&](int64_t n0, int64_t n1) {
    eqk::lowbit::rowsums(level, P, n0, n1, ws);  // writes ws[n] for n in [n0, n1)
  });
  return wsum;
}

// (packed, wsum). layout: 0 = int8 [N, K] (linear, or conv with cin_g == 1), 1 = k4n16 per
// group with columns in (kh, kw, cin_g) order: int8 [groups, K4, Npad_g, 4], 2 = tiled planes
// (linear; lowbit_cpu_gfni.h): int64 [bits, ceil(N/8), ceil(K/64), 8].
std::tuple<at::Tensor, at::Tensor> lowbit_pack_weights_cpu(const at::Tensor& planes, int64_t bits,
                                                           int64_t K, int64_t cin_g, int64_t kh,
                                                           int64_t kw, int64_t groups,
                                                           int64_t layout, int64_t isa) {
  const PlaneRows P = plane_rows(planes, bits, K);
  const int64_t N = P.N;
  TORCH_CHECK(cin_g * kh * kw == K && groups >= 1 && N % groups == 0,
              "lowbit_pack_weights_cpu: inconsistent geometry");
  const int level = eqk::lowbit::kernel_level(isa);
  if (layout == 2) return {tile_planes(P, K), plane_rowsums(level, P)};
  auto dec = at::empty({N, K}, planes.options().dtype(at::kChar));
  int8_t* d = dec.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    eqk::lowbit::decode_rows(level, P, n0, n1, K, d + n0 * K, K);
  });
  auto wsum = at::empty({N}, planes.options().dtype(at::kLong));
  int64_t* ws = wsum.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    int64_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += d[n * K + k];
    ws[n] = s;
  }
  if (layout == 0) return {dec, wsum};
  TORCH_CHECK(layout == 1, "lowbit_pack_weights_cpu: layout must be 0, 1 or 2");
  const int64_t n_g = N / groups, K4 = (K + 3) / 4, Npad = 16 * ((n_g + 15) / 16);
  auto packed = at::zeros({groups, K4, Npad, 4}, dec.options());
  int8_t* p = packed.data_ptr<int8_t>();
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t nl = 0; nl < n_g; ++nl)
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t src = (ci * kh + i) * kw + j;  // PyTorch's [cin_g, kh, kw] order
            const int64_t dst = (i * kw + j) * cin_g + ci;
            p[((g * K4 + dst / 4) * Npad + nl) * 4 + dst % 4] = d[(g * n_g + nl) * K + src];
          }
  return {packed, wsum};
}

// ------------------------------------------------------------------------------------------
// Linear

// Epilogue of one 8-channel tile of one row, 8 doubles per vector: the operations of
// Epilogue::operator() in the same order with the same roundings (no FMA: -ffp-contract=off
// and separate mul/add intrinsics; int64 -> double exact below 2^53), per-channel terms
// precomputed exactly as the scalar code computes them.
struct TileEpilogue {
  std::vector<int64_t> offw;        // off * wsum[n] (code sum correction, exact)
  std::vector<double> zw, cw, sc, bias;  // z * wsum[n], cw[n], sa * sb[n], bias[n]
};

TileEpilogue make_tile_epilogue(const Epilogue& e, int64_t N, int64_t off) {
  TileEpilogue t;
  t.offw.resize(N);
  t.zw.resize(N);
  t.sc.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    t.offw[n] = off * e.wsum[n];
    t.zw[n] = e.z * static_cast<double>(e.wsum[n]);
    t.sc[n] = e.sa * static_cast<double>(e.sb[n]);
  }
  t.cw = e.cw;
  t.bias = e.bias;
  return t;
}

// y[n0 .. n0+8) of one row; xz = double(xsum) - double(K) * z.
EQK_TARGET_AVX512 void tile_epilogue_avx512(const TileEpilogue& te, const int64_t* acc,
                                            int64_t n0, double xz, float* y) {
  const __m512i a = _mm512_add_epi64(_mm512_loadu_si512(acc), _mm512_loadu_si512(&te.offw[n0]));
  __m512d t = _mm512_sub_pd(_mm512_cvtepi64_pd(a), _mm512_loadu_pd(&te.zw[n0]));
  t = _mm512_add_pd(t, _mm512_mul_pd(_mm512_set1_pd(xz), _mm512_loadu_pd(&te.cw[n0])));
  t = _mm512_mul_pd(t, _mm512_loadu_pd(&te.sc[n0]));
  if (!te.bias.empty()) t = _mm512_add_pd(t, _mm512_loadu_pd(&te.bias[n0]));
  _mm256_storeu_ps(y, _mm512_cvtpd_ps(t));
}

// The tiled-plane path (level 3): codes as unsigned bytes u = code - off in rows padded to whole
// 64-column blocks, the one-row GEMV or the M-row GEMM of lowbit_cpu_gfni.h, and the epilogue
// with sum code * q_b = sum u * q_b + off * wsum[n], per tile inside the parallel task.
void linear_tiled(const float* xp, int64_t M, int64_t K, const at::Tensor& tiles, int bits,
                  int64_t N, const ActQuant& q, const Epilogue& e, int level, float* yp) {
  using namespace eqk::lowbit;
  TORCH_CHECK(tiles.scalar_type() == at::kLong && tiles.is_contiguous() && tiles.dim() == 4 &&
                  tiles.size(0) == bits && tiles.size(1) == (N + kTileRows - 1) / kTileRows &&
                  tiles.size(2) == (K + kTileCols - 1) / kTileCols && tiles.size(3) == kTileRows,
              "kernel weights: tiled planes must be int64 [bits, ceil(N/8), ceil(K/64), 8]");
  TORCH_CHECK(level >= 3 && K < kTiledMaxK,
              "tiled planes need AVX-512 VBMI + GFNI and K < 2^20 (use layout 0)");
  const TiledPlanes T{reinterpret_cast<const uint64_t*>(tiles.data_ptr<int64_t>()), N, K,
                      tiles.size(1), tiles.size(2), bits};
  const int64_t ldu = kTileCols * T.KB;
  // 64-byte aligned (ATen's CPU allocator): a 64-byte load that crosses two cache lines costs
  // two load uops, and the GEMM kernel is load-port bound when its rows are misaligned.
  const at::Tensor u_buf = at::empty({M * ldu}, at::TensorOptions().dtype(at::kByte));
  uint8_t* u = u_buf.data_ptr<uint8_t>();
  std::vector<int64_t> xsum(M);
  at::parallel_for(0, M, std::max<int64_t>(1, kMinTaskMacs / (64 * K)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      xsum[m] = quantize_codes(level, xp + m * K, K, q.inv, q.z, q.lo, q.hi, q.off, u + m * ldu);
      std::memset(u + m * ldu + K, 0, ldu - K);  // columns past K meet zero weights: finite
    }
  });
  const int64_t off = q.off;
  const TileEpilogue te = make_tile_epilogue(e, N, off);
  auto finish = [&](int64_t m, int64_t t, const int64_t* acc) {
    const int64_t n0 = t * kTileRows;
    if (n0 + kTileRows <= N) {  // the scalar code's xz, then 8 channels at once
      const double xz = static_cast<double>(xsum[m]) - static_cast<double>(K) * e.z;
      tile_epilogue_avx512(te, acc, n0, xz, yp + m * N + n0);
      return;
    }
    for (int64_t n = n0; n < N; ++n) yp[m * N + n] = e(acc[n - n0] + off * e.wsum[n], xsum[m], n);
  };
  const int64_t tile_macs = kTileRows * K * M;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / tile_macs);
  if (M == 1) {
    at::parallel_for(0, T.NT, grain, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> acc(kTileRows * (t1 - t0));
      gemv_tiled(T, u, t0, t1, acc.data());
      for (int64_t t = t0; t < t1; ++t) finish(0, t, acc.data() + kTileRows * (t - t0));
    });
    return;
  }
  at::parallel_for(0, T.NT, grain, [&](int64_t t0, int64_t t1) {
    // Tiles per group: int64 sums of at most 256 KiB, which share L2 (1.25 MiB here) with the
    // activation chunk (M x 2048 bytes; 1 MiB of sums thrashed it at M = 256).
    const int64_t group = std::clamp<int64_t>((int64_t(1) << 18) / (64 * M), 1, t1 - t0);
    const at::Tensor buf = at::empty({kTileRows * kTileCols * kChunkBlocks},
                                     at::TensorOptions().dtype(at::kChar));  // 64-byte aligned
    std::vector<int64_t> acc(group * kTileRows * M);
    auto sink = [&](int64_t t, const int64_t* a) {
      for (int64_t m = 0; m < M; ++m) finish(m, t, a + m * kTileRows);
    };
    gemm_tiled(T, u, ldu, M, t0, t1, group, buf.data_ptr<int8_t>(), acc.data(), sink);
  });
}

// y fp32 [M, N]. x fp32 [M, K]. kernel_weights: optional, from lowbit_pack_weights_cpu: int8
// [N, K] decoded rows (layout 0, used for M >= 16) or int64 tiled planes (layout 2, any M).
at::Tensor lowbit_linear_int_fused_cpu(const at::Tensor& x_in, const at::Tensor& planes,
                                       int64_t bits, const std::optional<at::Tensor>& decoded,
                                       const at::Tensor& wsum, const at::Tensor& scale,
                                       double scale_factor, double c,
                                       const std::optional<at::Tensor>& zw,
                                       const std::optional<at::Tensor>& bias,
                                       const at::Tensor& act_scale,
                                       const std::optional<at::Tensor>& act_zp, int64_t qmin,
                                       int64_t qmax, int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat,
              "lowbit_linear_int_fused_cpu: x must be a float32 [M, K] tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const PlaneRows P = plane_rows(planes, bits, K);
  const int64_t N = P.N;
  const int level = eqk::lowbit::kernel_level(isa);
  const ActQuant q = act_quant(act_scale, act_zp, qmin, qmax);
  const Epilogue e = make_epilogue(N, K, wsum, scale, scale_factor, c, zw, bias, q);
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  if (decoded.has_value() && decoded->scalar_type() == at::kLong) {
    linear_tiled(xp, M, K, *decoded, static_cast<int>(bits), N, q, e, level, yp);
    return y;
  }
  std::vector<int64_t> xsum(M);

  if (M >= kDecodedMinM && level >= 1) {
    // Signed int8 codes (s = u - 128 for an unsigned range) into torch._int_mm (oneDNN).
    at::Tensor w = decoded.has_value() ? *decoded : std::get<0>(lowbit_pack_weights_cpu(
                                                        planes, bits, K, K, 1, 1, 1, 0, isa));
    TORCH_CHECK(w.scalar_type() == at::kChar && w.size(0) == N && w.size(1) == K,
                "decoded must be int8 [N, K]");
    const int shift = q.off == 0 ? 128 : 0;  // s = code - shift
    auto xs = at::empty({M, K}, x.options().dtype(at::kChar));
    uint8_t* xb = reinterpret_cast<uint8_t*>(xs.data_ptr<int8_t>());
    at::parallel_for(0, M, std::max<int64_t>(1, kMinTaskMacs / (64 * K)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        xsum[m] = eqk::lowbit::quantize_codes(level, xp + m * K, K, q.inv, q.z, q.lo, q.hi,
                                              shift, xb + m * K);
    });
    const at::Tensor acc = at::_int_mm(xs, w.t());
    const int32_t* a = acc.data_ptr<int32_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / N), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n)
          yp[m * N + n] = e(static_cast<int64_t>(a[m * N + n]) + shift * e.wsum[n], xsum[m], n);
    });
    return y;
  }

  // Few rows: codes in their own signedness (int8 bytes or uint8), bit-serial GEMV from the
  // planes. Rows zero-padded to the kernels' block length.
  const bool x_signed = qmin < 0;
  const int64_t stride = level == 0 ? 32 * P.W : 64 * ((P.W + 1) / 2);
  std::vector<uint8_t> xb(M * stride, 0);
  for (int64_t m = 0; m < M; ++m)
    xsum[m] = eqk::lowbit::quantize_codes(level, xp + m * K, K, q.inv, q.z, q.lo, q.hi, 0,
                                          xb.data() + m * stride);
  std::vector<int32_t> acc(M * N);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (level == 0) {
      eqk::lowbit::gemm_int_portable(P, xb.data(), x_signed, M, n0, n1, acc.data(), N);
    } else {
      for (int64_t m = 0; m < M; ++m) {
        if (level >= 2)
          eqk::lowbit::gemv_int_avx512(P, xb.data() + m * stride, x_signed, n0, n1,
                                       acc.data() + m * N);
        else
          eqk::lowbit::gemv_int_avx2(P, xb.data() + m * stride, x_signed, n0, n1,
                                     acc.data() + m * N);
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) yp[m * N + n] = e(acc[m * N + n], xsum[m], n);
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// Conv2d

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

EQK_REGISTER(lowbit_fused_cpu) {
  m.def("lowbit_pack_weights_cpu", &lowbit_pack_weights_cpu,
        "(kernel-layout int8 weights, int64 weight code row sums) from canonical planes");
  m.def("lowbit_linear_int_fused_cpu", &lowbit_linear_int_fused_cpu,
        "lowbit_linear integer path in one call: quantize, integer GEMM, epilogue");
  m.def("lowbit_conv2d_int_fused_cpu", &lowbit_conv2d_int_fused_cpu,
        "lowbit_conv2d integer path in one call: quantize, im2col, integer GEMM, epilogue");
}
