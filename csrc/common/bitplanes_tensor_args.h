// Argument checks and activation padding shared by the CUDA wrappers (bitplanes_cuda.cpp,
// lowbit_gemm_cuda.cpp) and their CPU emulation (bitplanes_emulation_cpu.cpp), so that the
// emulation accepts exactly what the CUDA functions accept. Host only (uses torch).
#pragma once
#include <torch/extension.h>

#include <cstdint>

#include "common/bitplane_math.h"

namespace eqk::args {

inline void check_bits(int64_t bits, const char* fn) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, fn, ": bits must be in 1..8, got ", bits);
}

inline void check_device(const torch::Tensor& t, bool cuda, const char* fn, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cuda() == cuda, fn, ": ", name, " must be a ",
                    cuda ? "CUDA" : "CPU", " tensor, got ", t.device());
}

// q: int8[N, K] contiguous.
inline void check_codes(const torch::Tensor& q, int64_t bits, bool cuda, const char* fn) {
  check_bits(bits, fn);
  check_device(q, cuda, fn, "q");
  TORCH_CHECK_VALUE(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), fn,
                    ": q must be a contiguous int8 [N, K] tensor, got ", q.scalar_type(), " ",
                    q.sizes());
}

// planes: int32[>= bits, N, ceil(K/32)] contiguous. Returns W.
inline int check_planes(const torch::Tensor& planes, int64_t bits, int64_t K, bool cuda,
                        const char* fn) {
  check_bits(bits, fn);
  check_device(planes, cuda, fn, "planes");
  TORCH_CHECK_VALUE(planes.scalar_type() == at::kInt && planes.dim() == 3 && planes.is_contiguous(),
                    fn, ": planes must be a contiguous int32 [n, N, W] tensor, got ",
                    planes.scalar_type(), " ", planes.sizes());
  TORCH_CHECK_VALUE(planes.size(0) >= bits, fn, ": planes holds ", planes.size(0),
                    " planes, bits=", bits, " needs at least that many");
  TORCH_CHECK_VALUE(K >= 0, fn, ": K must be >= 0, got ", K);
  const int W = eqk::words_per_row(K);
  TORCH_CHECK_VALUE(planes.size(2) == W, fn, ": planes has ", planes.size(2),
                    " words per row, K=", K, " needs ", W);
  return W;
}

// xq: int8 or uint8 [M, K] contiguous.
inline void check_activations(const torch::Tensor& xq, bool cuda, const char* fn) {
  check_device(xq, cuda, fn, "xq");
  TORCH_CHECK_VALUE((xq.scalar_type() == at::kChar || xq.scalar_type() == at::kByte) &&
                        xq.dim() == 2 && xq.is_contiguous(),
                    fn, ": xq must be a contiguous int8 or uint8 [M, K] tensor, got ",
                    xq.scalar_type(), " ", xq.sizes());
}

// The activation codes as bytes zero-padded to [M, W*32] (the GEMM reads them as uint32 words
// of 4 codes). No copy when K is already a multiple of 32 and the data is 4-byte aligned.
inline torch::Tensor padded_activation_bytes(const torch::Tensor& xq, int W) {
  const auto bytes = xq.view(at::kByte);
  const int64_t K = xq.size(1);
  const bool aligned = reinterpret_cast<uintptr_t>(bytes.data_ptr()) % 4 == 0;
  if (K == static_cast<int64_t>(W) * 32 && aligned) return bytes;
  auto padded = torch::zeros({xq.size(0), static_cast<int64_t>(W) * 32}, bytes.options());
  padded.narrow(1, 0, K).copy_(bytes);
  return padded;
}

}  // namespace eqk::args
