// CPU low-bit GEMM on canonical bit planes: raw integer accumulators sum_k xq*q_b (the Python
// op does the quantization and the epilogue) and the float GEMV sum_k x*q_b.
//
// Strategy (measured in bench/bench_lowbit_gemm.py):
//   * few activation rows: bit-serial GEMV straight from the planes (reads bits/8 of an int8
//     weight's bytes; AVX-512 VNNI masked dpbusd, AVX2 maddubs, portable dp4a);
//   * many rows (M >= kDecodeMinM): decode the planes once to int8 and run an int8 GEMM
//     (torch._int_mm, oneDNN VNNI), uint8 activations shifted to int8 and corrected with the
//     weight row sums.
// Threads split the output rows; integer results do not depend on the thread count and every
// float sum runs in a fixed order inside one thread.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>

#include "common/bitplane_math.h"
#include "common/lowbit_cpu_dispatch.h"
#include "common/registry.h"

namespace {

using eqk::lowbit::PlaneRows;

constexpr int64_t kDecodeMinM = 16;

PlaneRows gemm_planes(const at::Tensor& planes, int64_t bits, int64_t K, const char* fn) {
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              fn, ": planes must be a contiguous int32 [planes, N, W] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && planes.size(0) >= bits, fn, ": bits must be in 1..",
              planes.size(0), " (planes held), got ", bits);
  TORCH_CHECK(planes.size(2) == eqk::words_per_row(K), fn, ": planes hold ", planes.size(2),
              " words per row, K=", K, " needs ", eqk::words_per_row(K));
  return PlaneRows{reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), planes.size(1),
                   planes.size(2), static_cast<int>(bits)};
}

// Activation rows copied into zero-padded rows of `stride` elements (the kernels read whole
// 64-column blocks; the padding meets zero plane bits).
template <typename T>
at::Tensor padded_rows(const at::Tensor& x, int64_t stride) {
  const int64_t M = x.size(0), K = x.size(1);
  auto buf = at::zeros({M, stride}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = buf.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) std::memcpy(dst + m * stride, src + m * K, K * sizeof(T));
  return buf;
}

at::Tensor gemm_int_decoded(const at::Tensor& xq, const PlaneRows& P, int64_t K, int level) {
  auto w = at::empty({P.N, K}, xq.options().dtype(at::kChar));
  int8_t* wp = w.data_ptr<int8_t>();
  at::parallel_for(0, P.N, 16, [&](int64_t n0, int64_t n1) {
    eqk::lowbit::decode_rows(level, P, n0, n1, K, wp + n0 * K, K);
  });
  if (xq.scalar_type() == at::kChar) return at::_int_mm(xq, w.t());
  // uint8 codes u = s + 128 with s int8: sum u*q = sum s*q + 128 * sum q.
  auto xs = at::bitwise_xor(xq, 128).view(at::kChar);
  auto rows = at::empty({P.N}, xq.options().dtype(at::kLong));
  at::parallel_for(0, P.N, 64, [&](int64_t n0, int64_t n1) {
    eqk::lowbit::rowsums(level, P, n0, n1, rows.data_ptr<int64_t>());
  });
  return at::_int_mm(xs, w.t()).add_(rows.mul(128).to(at::kInt).unsqueeze(0));
}

// int32 [M, N] = sum_k xq[m, k] * q_b[n, k]; xq int8 or uint8 [M, K]. Exact while
// K * max|xq| * 2^(bits-1) < 2^31 (the caller splits longer K).
at::Tensor lowbit_gemm_int_cpu(const at::Tensor& xq_in, const at::Tensor& planes, int64_t bits,
                               int64_t isa) {
  TORCH_CHECK(xq_in.dim() == 2 && (xq_in.scalar_type() == at::kChar || xq_in.scalar_type() == at::kByte),
              "lowbit_gemm_int_cpu: xq must be an int8 or uint8 [M, K] tensor");
  const at::Tensor xq = xq_in.contiguous();
  const int64_t M = xq.size(0), K = xq.size(1);
  const PlaneRows P = gemm_planes(planes, bits, K, "lowbit_gemm_int_cpu");
  const bool x_signed = xq.scalar_type() == at::kChar;
  const int level = eqk::lowbit::kernel_level(isa);
  if (level >= 1 && M >= kDecodeMinM) return gemm_int_decoded(xq, P, K, level);
  auto out = at::empty({M, P.N}, xq.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  if (level == 0) {
    const at::Tensor xp = padded_rows<uint8_t>(xq.view(at::kByte), 32 * P.W);
    const uint8_t* x = xp.data_ptr<uint8_t>();
    at::parallel_for(0, P.N, 16, [&](int64_t n0, int64_t n1) {
      eqk::lowbit::gemm_int_portable(P, x, x_signed, M, n0, n1, o, P.N);
    });
    return out;
  }
  const int64_t stride = 64 * ((P.W + 1) / 2);
  const at::Tensor xp = padded_rows<uint8_t>(xq.view(at::kByte), stride);
  const uint8_t* x = xp.data_ptr<uint8_t>();
  at::parallel_for(0, P.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      if (level >= 2)
        eqk::lowbit::gemv_int_avx512(P, x + m * stride, x_signed, n0, n1, o + m * P.N);
      else
        eqk::lowbit::gemv_int_avx2(P, x + m * stride, x_signed, n0, n1, o + m * P.N);
    }
  });
  return out;
}

// float32 [M, N] = sum_k x[m, k] * q_b[n, k] (bit-serial; for small M).
at::Tensor lowbit_gemm_float_cpu(const at::Tensor& x_in, const at::Tensor& planes, int64_t bits,
                                 int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat,
              "lowbit_gemm_float_cpu: x must be a float32 [M, K] tensor");
  const at::Tensor xc = x_in.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const PlaneRows P = gemm_planes(planes, bits, K, "lowbit_gemm_float_cpu");
  const int level = eqk::lowbit::kernel_level(isa);
  const int64_t stride = 32 * P.W;
  const at::Tensor xp = padded_rows<float>(xc, stride);
  const float* x = xp.data_ptr<float>();
  auto out = at::empty({M, P.N}, xc.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, P.N, 16, [&](int64_t n0, int64_t n1) {
    if (level == 0) {
      eqk::lowbit::gemv_float_portable(P, x, M, n0, n1, o, P.N);
      return;
    }
    for (int64_t m = 0; m < M; ++m) {
      if (level >= 2)
        eqk::lowbit::gemv_float_avx512(P, x + m * stride, n0, n1, o + m * P.N);
      else
        eqk::lowbit::gemv_float_avx2(P, x + m * stride, n0, n1, o + m * P.N);
    }
  });
  return out;
}

}  // namespace

EQK_REGISTER(lowbit_gemm_cpu) {
  m.def("lowbit_gemm_int_cpu", &lowbit_gemm_int_cpu,
        "int32 sum_k xq*q_b from canonical planes (xq int8/uint8 [M, K])");
  m.def("lowbit_gemm_float_cpu", &lowbit_gemm_float_cpu,
        "float32 sum_k x*q_b from canonical planes (bit-serial, small M)");
}
