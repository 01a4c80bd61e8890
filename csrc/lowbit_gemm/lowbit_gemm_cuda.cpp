// Host wrapper of the CUDA low-bit integer GEMM (lowbit_gemm_kernels_cuda.cu): tensors -> raw
// pointers on the current stream. Compiled only (no GPU in this workplace).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common/bitplanes_cuda_launch.h"
#include "common/bitplanes_tensor_args.h"
#include "common/registry.h"

namespace {

// xq: int8 or uint8 [M, K] contiguous; planes: int32[>= bits, N, ceil(K/32)] contiguous.
// Returns int32[M, N] raw accumulators sum_k xq[m,k] * q_b[n,k], accumulated in int32 (exact
// while K * max|xq| * 2^(bits-1) < 2^31; the caller splits longer K).
torch::Tensor lowbit_gemm_int_cuda(const torch::Tensor& xq, const torch::Tensor& planes,
                                   int64_t bits) {
  const char* fn = "lowbit_gemm_int_cuda";
  eqk::args::check_activations(xq, /*cuda=*/true, fn);
  const int64_t K = xq.size(1);
  const int W = eqk::args::check_planes(planes, bits, K, /*cuda=*/true, fn);
  TORCH_CHECK_VALUE(planes.device() == xq.device(), fn, ": xq and planes are on different devices");
  const c10::cuda::CUDAGuard guard(xq.device());
  const int64_t M = xq.size(0);
  const int64_t N = planes.size(1);
  auto out = torch::empty({M, N}, xq.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const auto x_bytes = eqk::args::padded_activation_bytes(xq, W);
  C10_CUDA_CHECK(eqk::cuda::launch_lowbit_gemm_int(
      reinterpret_cast<const uint32_t*>(x_bytes.data_ptr<uint8_t>()),
      xq.scalar_type() == at::kByte, reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()),
      N * W, M, N, W, static_cast<int>(bits), out.data_ptr<int32_t>(),
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

EQK_REGISTER(lowbit_gemm_cuda) {
  m.def("lowbit_gemm_int_cuda", &lowbit_gemm_int_cuda, pybind11::arg("xq"), pybind11::arg("planes"),
        pybind11::arg("bits"),
        "CUDA: int32[M,N] = sum_k xq*q_b from bit planes, dp4a (compiled only)");
}
