// CUDA kernels of the low-bit integer GEMM: raw int32 accumulators sum_k xq[m,k] * q_b[n,k] from
// bit planes decoded to int8 and multiplied with dp4a (compiled only: no GPU in this workplace).
// Both kernels are loops over the __host__ __device__ functions of csrc/common/lowbit_gemm_tile.h
// with __syncthreads() between phases; bitplanes_emulation_cpu.cpp runs the same functions on the
// host, phase by phase, and tests/test_cuda_shared_math.py checks them against an int64 oracle.
// Named *_kernels_cuda.cu because torch's ninja build names objects by file stem and the host
// wrapper lowbit_gemm_cuda.cpp already makes lowbit_gemm_cuda.o.
// No torch headers here (compile time): raw pointers, sizes, a stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/bitplanes_cuda_launch.h"
#include "common/lowbit_gemm_tile.h"

namespace {

using eqk::GemmArgs;

// Small M: one warp per weight row; lane partials reduced with a shuffle tree.
template <bool XUnsigned>
__global__ void __launch_bounds__(eqk::kGemvWarpsPerBlock * 32)
    lowbit_gemv_kernel(GemmArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * eqk::kGemvWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= a.N) return;  // uniform per warp
  int acc[eqk::kGemvMaxM];
  eqk::gemv_lane_partial<XUnsigned>(a, n, lane, acc);
#pragma unroll
  for (int m = 0; m < eqk::kGemvMaxM; ++m) {
    if (m >= a.M) break;
    int v = acc[m];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    if (lane == 0) a.out[m * a.N + n] = v;
  }
}

// Larger M: a kTileM x kTileN output tile per block, staged through shared memory.
template <bool XUnsigned>
__global__ void __launch_bounds__(eqk::kTileThreads) lowbit_gemm_tile_kernel(GemmArgs a) {
  __shared__ eqk::TileStage stage;
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * eqk::kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * eqk::kTileN;
  int acc[eqk::kMicro][eqk::kMicro] = {};
  for (int64_t word0 = 0; word0 < a.W; word0 += eqk::kChunkWords) {
    eqk::tile_stage_thread(a, m0, n0, word0, tid, stage);
    __syncthreads();
    eqk::tile_accumulate_thread<XUnsigned>(stage, tid, acc);
    __syncthreads();
  }
  eqk::tile_store_thread(a, m0, n0, tid, acc);
}

template <bool XUnsigned>
void launch(const GemmArgs& a, cudaStream_t stream) {
  if (eqk::use_gemv_path(a.M)) {
    const int64_t blocks = (a.N + eqk::kGemvWarpsPerBlock - 1) / eqk::kGemvWarpsPerBlock;
    lowbit_gemv_kernel<XUnsigned>
        <<<static_cast<unsigned>(blocks), eqk::kGemvWarpsPerBlock * 32, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>((a.M + eqk::kTileM - 1) / eqk::kTileM),
                    static_cast<unsigned>((a.N + eqk::kTileN - 1) / eqk::kTileN));
    lowbit_gemm_tile_kernel<XUnsigned><<<grid, eqk::kTileThreads, 0, stream>>>(a);
  }
}

}  // namespace

namespace eqk::cuda {

cudaError_t launch_lowbit_gemm_int(const uint32_t* x_words, bool x_unsigned,
                                   const uint32_t* planes, int64_t plane_stride, int64_t M,
                                   int64_t N, int W, int bits, int32_t* out, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if ((N + eqk::kTileN - 1) / eqk::kTileN > 65535) return cudaErrorInvalidConfiguration;
  const GemmArgs a{x_words, static_cast<int64_t>(W) * 8, planes, plane_stride, out, M, N, W, bits};
  if (x_unsigned) {
    launch<true>(a, stream);
  } else {
    launch<false>(a, stream);
  }
  return cudaGetLastError();
}

}  // namespace eqk::cuda
