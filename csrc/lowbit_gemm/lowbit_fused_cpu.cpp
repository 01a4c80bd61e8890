// The whole integer low-bit path of lowbit_linear / lowbit_conv2d in one C++ call (CPU):
// quantize the fp32 activation to byte codes (fake_quant's fp32 arithmetic), the integer GEMM,
// the activation code sums and the float64 epilogue
//   y[m, n] = s_a s_b[n] (acc - z_a wsum[n] + (c - z_w[n]) (xsum[m] - K z_a)) + bias[n]
// in the same order as the Python reference (eqkernels/ops/_lowbit_gemm_paths.py `epilogue`), so
// the results equal the reference's exactly for fp32 inputs. This file: weight packing and the
// linear; lowbit_fused_conv_cpu.cpp: the conv2d; common/lowbit_fused_cpu.h: what they share.
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
// thread in a fixed order, so results do not depend on the thread count.#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common/avx512_defined.h"
#include "common/lowbit_cpu_gfni.h"
#include "common/lowbit_cpu_packed.h"
#include "common/lowbit_fused_cpu.h"
#include "common/lowbit_fused_entry.h"
#include "common/registry.h"

namespace {

using namespace eqk::fused;

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

// (packed, wsum) in the kernel layout `layout` (a PackedLayout value).
std::tuple<at::Tensor, at::Tensor> lowbit_pack_weights_cpu(const at::Tensor& planes, int64_t bits,
                                                           int64_t K, int64_t cin_g, int64_t kh,
                                                           int64_t kw, int64_t groups,
                                                           int64_t layout, int64_t isa) {
  const PlaneRows P = plane_rows(planes, bits, K);
  const int64_t N = P.N;
  TORCH_CHECK(cin_g * kh * kw == K && groups >= 1 && N % groups == 0,
              "lowbit_pack_weights_cpu: inconsistent geometry");
  const int level = eqk::lowbit::kernel_level(isa);
  if (layout == static_cast<int64_t>(PackedLayout::tiled)) return {tile_planes(P, K), plane_rowsums(level, P)};
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
  if (layout == static_cast<int64_t>(PackedLayout::decoded)) return {dec, wsum};
  TORCH_CHECK(layout == static_cast<int64_t>(PackedLayout::k4n16),
              "lowbit_pack_weights_cpu: layout must be one of _C.PACKED_LAYOUTS");
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
  _mm256_storeu_ps(y, eqk::avx512::cvtpd_ps(t));
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
// [N, K] decoded rows (PackedLayout::decoded, for M >= kDecodedMinM) or int64 tiled planes
// (PackedLayout::tiled, any M).
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
                                                        planes, bits, K, K, 1, 1, 1, static_cast<int64_t>(PackedLayout::decoded), isa));
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

}  // namespace

at::Tensor eqk::fused::linear_int_fused(
    const at::Tensor& x, const at::Tensor& planes, int64_t bits,
    const std::optional<at::Tensor>& kernel_weights, const at::Tensor& wsum,
    const at::Tensor& scale, double scale_factor, double c, const std::optional<at::Tensor>& zw,
    const std::optional<at::Tensor>& bias, const at::Tensor& act_scale,
    const std::optional<at::Tensor>& act_zp, int64_t qmin, int64_t qmax, int64_t isa) {
  return lowbit_linear_int_fused_cpu(x, planes, bits, kernel_weights, wsum, scale, scale_factor, c,
                                     zw, bias, act_scale, act_zp, qmin, qmax, isa);
}

EQK_REGISTER(lowbit_fused_cpu) {
  m.def("lowbit_pack_weights_cpu", &lowbit_pack_weights_cpu,
        "(kernel-layout int8 weights, int64 weight code row sums) from canonical planes");
  m.def("lowbit_linear_int_fused_cpu", &lowbit_linear_int_fused_cpu,
        "lowbit_linear integer path in one call: quantize, integer GEMM, epilogue");
  m.attr("LOWBIT_DECODED_MIN_M") = kDecodedMinM;
  m.attr("LOWBIT_TILED_MAX_K") = eqk::lowbit::kTiledMaxK;
  pybind11::dict layouts;
  layouts["decoded"] = static_cast<int64_t>(PackedLayout::decoded);
  layouts["k4n16"] = static_cast<int64_t>(PackedLayout::k4n16);
  layouts["tiled"] = static_cast<int64_t>(PackedLayout::tiled);
  m.attr("PACKED_LAYOUTS") = layouts;
}
