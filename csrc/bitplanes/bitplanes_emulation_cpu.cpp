// Host emulation of the CUDA bit-plane kernels (bitplanes_kernels_cuda.cu,
// lowbit_gemm_kernels_cuda.cu): runs the very same __host__ __device__ functions of
// csrc/common/lowbit_gemm_tile.h, with the same thread/lane/block decomposition, executing one
// (emulated) thread after another and every barrier phase for all threads of a block before the
// next phase. It exists to test the CUDA
// arithmetic on machines without a GPU (tests/test_cuda_shared_math.py); it is not a fast path.
// Compiled always (CPU tensors in, CPU tensors out).
#include <torch/extension.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/bitplanes_tensor_args.h"
#include "common/lowbit_gemm_tile.h"
#include "common/registry.h"

namespace {

// pack_bitplanes_kernel, warp by warp: lane t holds column 32*word + t and plane p's word is the
// ballot (bit t = lane t's predicate) of code_plane_bit over the 32 lanes.
torch::Tensor pack_bitplanes_emulated_cpu(const torch::Tensor& q, int64_t bits) {
  eqk::args::check_codes(q, bits, /*cuda=*/false, "pack_bitplanes_emulated_cpu");
  const int64_t N = q.size(0);
  const int64_t K = q.size(1);
  const int W = eqk::words_per_row(K);
  auto planes = torch::empty({bits, N, W}, q.options().dtype(at::kInt));
  auto* out = reinterpret_cast<uint32_t*>(planes.data_ptr<int32_t>());
  const int8_t* codes = q.data_ptr<int8_t>();
  for (int64_t item = 0; item < N * W; ++item) {
    const int64_t n = item / W;
    const int64_t word = item % W;
    int lane_code[32];
    for (int lane = 0; lane < 32; ++lane)
      lane_code[lane] = eqk::pack_lane_code(codes + n * K, K, word, lane);
    for (int p = 0; p < bits; ++p) {
      uint32_t ballot = 0;
      for (int lane = 0; lane < 32; ++lane)
        ballot |= (eqk::code_plane_bit(lane_code[lane], static_cast<int>(bits), p) != 0u ? 1u : 0u)
                  << lane;
      out[p * N * W + item] = ballot;  // stored by lane p in the kernel
    }
  }
  return planes;
}

// unpack_bitplanes_kernel: one thread per plane word position.
torch::Tensor unpack_bitplanes_emulated_cpu(const torch::Tensor& planes, int64_t bits, int64_t K) {
  const int W = eqk::args::check_planes(planes, bits, K, /*cuda=*/false,
                                        "unpack_bitplanes_emulated_cpu");
  const int64_t N = planes.size(1);
  auto out = torch::empty({N, K}, planes.options().dtype(at::kChar));
  const auto* p = reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>());
  int8_t* o = out.data_ptr<int8_t>();
  const bool aligned = (K % 4 == 0) && (reinterpret_cast<uintptr_t>(o) % 4 == 0);
  for (int64_t item = 0; item < N * W; ++item) {
    const int64_t n = item / W;
    eqk::unpack_word_thread(p, N * W, W, n, item % W, static_cast<int>(bits), K, aligned,
                            o + n * K);
  }
  return out;
}

// lowbit_gemv_kernel: warp per weight row n; the 32 lane partials are summed (the kernel's
// shuffle tree; integer addition, so the order does not change the result).
template <bool XUnsigned>
void emulate_gemv(const eqk::GemmArgs& a) {
  for (int64_t n = 0; n < a.N; ++n) {
    int64_t total[eqk::kGemvMaxM] = {};
    for (int lane = 0; lane < 32; ++lane) {
      int acc[eqk::kGemvMaxM];
      eqk::gemv_lane_partial<XUnsigned>(a, n, lane, acc);
      for (int m = 0; m < a.M; ++m) total[m] += acc[m];
    }
    // int32 wrap-around as in the kernel (exact while the caller keeps K short enough).
    for (int m = 0; m < a.M; ++m)
      a.out[m * a.N + n] = static_cast<int32_t>(static_cast<uint32_t>(total[m]));
  }
}

// lowbit_gemm_tile_kernel: every block, every K step: phase 1 (stage) for all threads, barrier,
// phase 2 (accumulate) for all threads, barrier; then the store phase.
template <bool XUnsigned>
void emulate_tiles(const eqk::GemmArgs& a) {
  auto stage = std::make_unique<eqk::TileStage>();
  std::vector<int> acc(static_cast<size_t>(eqk::kTileThreads) * eqk::kMicro * eqk::kMicro);
  auto thread_acc = [&](int tid) {
    const size_t offset = static_cast<size_t>(tid) * eqk::kMicro * eqk::kMicro;
    return reinterpret_cast<int(*)[eqk::kMicro]>(&acc[offset]);
  };
  for (int64_t m0 = 0; m0 < a.M; m0 += eqk::kTileM) {
    for (int64_t n0 = 0; n0 < a.N; n0 += eqk::kTileN) {
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t word0 = 0; word0 < a.W; word0 += eqk::kChunkWords) {
        for (int tid = 0; tid < eqk::kTileThreads; ++tid)
          eqk::tile_stage_thread(a, m0, n0, word0, tid, *stage);
        for (int tid = 0; tid < eqk::kTileThreads; ++tid)
          eqk::tile_accumulate_thread<XUnsigned>(*stage, tid, thread_acc(tid));
      }
      for (int tid = 0; tid < eqk::kTileThreads; ++tid)
        eqk::tile_store_thread(a, m0, n0, tid, thread_acc(tid));
    }
  }
}

// lowbit_gemm_int_cuda, emulated. path: "auto" (the CUDA wrapper's choice by M), "gemv" or
// "tile" (to test both kernels on the same inputs).
torch::Tensor lowbit_gemm_int_emulated_cpu(const torch::Tensor& xq, const torch::Tensor& planes,
                                           int64_t bits, const std::string& path) {
  const char* fn = "lowbit_gemm_int_emulated_cpu";
  eqk::args::check_activations(xq, /*cuda=*/false, fn);
  const int64_t K = xq.size(1);
  const int W = eqk::args::check_planes(planes, bits, K, /*cuda=*/false, fn);
  TORCH_CHECK_VALUE(path == "auto" || path == "gemv" || path == "tile", fn,
                    ": path must be 'auto', 'gemv' or 'tile', got '", path, "'");
  const int64_t M = xq.size(0);
  const int64_t N = planes.size(1);
  const bool gemv = path == "gemv" || (path == "auto" && eqk::use_gemv_path(M));
  TORCH_CHECK_VALUE(!gemv || M <= eqk::kGemvMaxM, fn, ": path='gemv' handles M <= ",
                    eqk::kGemvMaxM, ", got M=", M);
  auto out = torch::empty({M, N}, xq.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const auto x_bytes = eqk::args::padded_activation_bytes(xq, W);
  const eqk::GemmArgs a{reinterpret_cast<const uint32_t*>(x_bytes.data_ptr<uint8_t>()),
                        static_cast<int64_t>(W) * 8,
                        reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()),
                        N * W,
                        out.data_ptr<int32_t>(),
                        M,
                        N,
                        W,
                        static_cast<int>(bits)};
  const bool x_unsigned = xq.scalar_type() == at::kByte;
  if (gemv) {
    x_unsigned ? emulate_gemv<true>(a) : emulate_gemv<false>(a);
  } else {
    x_unsigned ? emulate_tiles<true>(a) : emulate_tiles<false>(a);
  }
  return out;
}

}  // namespace

EQK_REGISTER(bitplanes_emulation_cpu) {
  m.def("pack_bitplanes_emulated_cpu", &pack_bitplanes_emulated_cpu, pybind11::arg("q"),
        pybind11::arg("bits"), "Host emulation of pack_bitplanes_cuda (for tests)");
  m.def("unpack_bitplanes_emulated_cpu", &unpack_bitplanes_emulated_cpu, pybind11::arg("planes"),
        pybind11::arg("bits"), pybind11::arg("K"),
        "Host emulation of unpack_bitplanes_cuda (for tests)");
  m.def("lowbit_gemm_int_emulated_cpu", &lowbit_gemm_int_emulated_cpu, pybind11::arg("xq"),
        pybind11::arg("planes"), pybind11::arg("bits"), pybind11::arg("path") = "auto",
        "Host emulation of lowbit_gemm_int_cuda (for tests); path: auto | gemv | tile");
}
