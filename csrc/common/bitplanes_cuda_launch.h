// Host-side launchers of the CUDA bit-plane kernels (defined in
// csrc/bitplanes/bitplanes_kernels_cuda.cu and csrc/lowbit_gemm/lowbit_gemm_kernels_cuda.cu).
// Raw pointers, sizes and a stream only: the .cu files never include torch/extension.h
// (compile time); the *_cuda.cpp wrappers turn tensors into these arguments. Each launcher
// returns the launch status (cudaGetLastError) for the caller to check.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace eqk::cuda {

// q: int8[N, K] contiguous codes; planes: int32[bits, N, ceil(K/32)] (written entirely).
// Each code is packed from its low `bits` bits (range checks are the caller's job).
cudaError_t launch_pack_bitplanes(const int8_t* q, int64_t N, int64_t K, int bits,
                                  uint32_t* planes, cudaStream_t stream);

// planes: canonical, first `bits` planes used, plane_stride = N * ceil(K/32) words;
// out: int8[N, K] contiguous.
cudaError_t launch_unpack_bitplanes(const uint32_t* planes, int64_t plane_stride, int64_t N,
                                    int64_t K, int bits, int8_t* out, cudaStream_t stream);

// x_words: activation codes zero-padded to [M, W*32] bytes (read as uint32 words); planes as
// above; out: int32[M, N] = sum_k xq[m,k] * q_b[n,k] (int32, wrapping: callers keep K short
// enough for exactness). x_unsigned: codes are uint8 (else int8).
cudaError_t launch_lowbit_gemm_int(const uint32_t* x_words, bool x_unsigned,
                                   const uint32_t* planes, int64_t plane_stride, int64_t M,
                                   int64_t N, int W, int bits, int32_t* out, cudaStream_t stream);

}  // namespace eqk::cuda
