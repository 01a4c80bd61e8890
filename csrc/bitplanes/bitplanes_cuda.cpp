// Host wrappers of the CUDA bit-plane pack/unpack kernels (bitplanes_kernels_cuda.cu): tensors
// -> raw pointers on the current stream. Compiled only (no GPU in this workplace).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common/bitplanes_cuda_launch.h"
#include "common/bitplanes_tensor_args.h"
#include "common/registry.h"

namespace {

// q: int8[N, K] contiguous CUDA -> int32[bits, N, ceil(K/32)], MSB (sign) plane first.
torch::Tensor pack_bitplanes_cuda(const torch::Tensor& q, int64_t bits) {
  eqk::args::check_codes(q, bits, /*cuda=*/true, "pack_bitplanes_cuda");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0);
  const int64_t K = q.size(1);
  auto planes = torch::empty({bits, N, eqk::words_per_row(K)}, q.options().dtype(at::kInt));
  C10_CUDA_CHECK(eqk::cuda::launch_pack_bitplanes(
      q.data_ptr<int8_t>(), N, K, static_cast<int>(bits),
      reinterpret_cast<uint32_t*>(planes.data_ptr<int32_t>()),
      c10::cuda::getCurrentCUDAStream().stream()));
  return planes;
}

// planes: int32[>= bits, N, ceil(K/32)] contiguous CUDA -> int8[N, K] codes of the first `bits`
// planes (= floor(q / 2^(n - bits)) for the n stored planes).
torch::Tensor unpack_bitplanes_cuda(const torch::Tensor& planes, int64_t bits, int64_t K) {
  eqk::args::check_planes(planes, bits, K, /*cuda=*/true, "unpack_bitplanes_cuda");
  const c10::cuda::CUDAGuard guard(planes.device());
  const int64_t N = planes.size(1);
  auto out = torch::empty({N, K}, planes.options().dtype(at::kChar));
  C10_CUDA_CHECK(eqk::cuda::launch_unpack_bitplanes(
      reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), N * planes.size(2), N, K,
      static_cast<int>(bits), out.data_ptr<int8_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

EQK_REGISTER(bitplanes_cuda) {
  m.def("pack_bitplanes_cuda", &pack_bitplanes_cuda, pybind11::arg("q"), pybind11::arg("bits"),
        "CUDA: int8[N,K] codes -> int32[bits,N,ceil(K/32)] planes, MSB first (compiled only)");
  m.def("unpack_bitplanes_cuda", &unpack_bitplanes_cuda, pybind11::arg("planes"),
        pybind11::arg("bits"), pybind11::arg("K"),
        "CUDA: first `bits` planes -> int8[N,K] codes (compiled only)");
}
