// CUDA kernels: bit-plane pack and unpack. Compiled only (no GPU in this workplace); the
// per-thread arithmetic is csrc/common/lowbit_gemm_tile.h, which the CPU emulation in
// bitplanes_emulation_cpu.cpp runs and tests/test_cuda_shared_math.py checks.
// Named *_kernels_cuda.cu because torch's ninja build names objects by file stem and the host
// wrapper bitplanes_cuda.cpp already makes bitplanes_cuda.o.
// No torch headers here (compile time): raw pointers, sizes, a stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/bitplanes_cuda_launch.h"
#include "common/lowbit_gemm_tile.h"

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kUnpackThreads = 256;

// One warp per plane word position (n, word): lane t loads column 32*word + t (coalesced), and
// plane p's word is the warp ballot of bit p of the codes. Lane p stores plane p.
__global__ void pack_bitplanes_kernel(const int8_t* __restrict__ q, int64_t N, int64_t K, int W,
                                      int bits, uint32_t* __restrict__ planes) {
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (item >= N * W) return;  // whole warps exit together: item is uniform per warp
  const int64_t n = item / W;
  const int64_t word = item % W;
  const int code = eqk::pack_lane_code(q + n * K, K, word, lane);
  uint32_t mine = 0;
  for (int p = 0; p < bits; ++p) {
    const uint32_t v = __ballot_sync(0xFFFFFFFFu, eqk::code_plane_bit(code, bits, p) != 0u);
    if (lane == p) mine = v;
  }
  if (lane < bits) planes[lane * N * W + item] = mine;
}

// One thread per plane word position: decode 32 codes (eqk::unpack_word_thread).
__global__ void unpack_bitplanes_kernel(const uint32_t* __restrict__ planes, int64_t plane_stride,
                                        int64_t N, int64_t K, int W, int bits, bool aligned,
                                        int8_t* __restrict__ out) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= N * W) return;
  const int64_t n = item / W;
  const int64_t word = item % W;
  eqk::unpack_word_thread(planes, plane_stride, W, n, word, bits, K, aligned, out + n * K);
}

}  // namespace

namespace eqk::cuda {

cudaError_t launch_pack_bitplanes(const int8_t* q, int64_t N, int64_t K, int bits,
                                  uint32_t* planes, cudaStream_t stream) {
  const int W = eqk::words_per_row(K);
  const int64_t items = N * W;
  if (items == 0) return cudaSuccess;
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  pack_bitplanes_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      q, N, K, W, bits, planes);
  return cudaGetLastError();
}

cudaError_t launch_unpack_bitplanes(const uint32_t* planes, int64_t plane_stride, int64_t N,
                                    int64_t K, int bits, int8_t* out, cudaStream_t stream) {
  const int W = eqk::words_per_row(K);
  const int64_t items = N * W;
  if (items == 0) return cudaSuccess;
  const bool aligned = (K % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 4 == 0);
  const int64_t blocks = (items + kUnpackThreads - 1) / kUnpackThreads;
  unpack_bitplanes_kernel<<<static_cast<unsigned>(blocks), kUnpackThreads, 0, stream>>>(
      planes, plane_stride, N, K, W, bits, aligned, out);
  return cudaGetLastError();
}

}  // namespace eqk::cuda
