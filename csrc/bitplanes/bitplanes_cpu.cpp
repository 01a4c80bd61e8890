// CPU pack / unpack / row sums of canonical bit planes (DESIGN.md "Bit planes and the low-bit
// GEMM"). Packing is a load-time operation (scalar, parallel over rows); decoding uses the
// ISA-dispatched kernels of csrc/common/lowbit_cpu_*.h.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>

#include "common/bitplane_math.h"
#include "common/lowbit_cpu_dispatch.h"
#include "common/registry.h"

namespace {

using eqk::lowbit::PlaneRows;

PlaneRows plane_rows(const at::Tensor& planes, int64_t bits, int64_t K, const char* fn) {
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              fn, ": planes must be a contiguous int32 [planes, N, W] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && planes.size(0) >= bits, fn, ": bits must be in 1..",
              planes.size(0), " (planes held), got ", bits);
  TORCH_CHECK(K >= 1 && planes.size(2) == eqk::words_per_row(K), fn, ": planes hold ",
              planes.size(2), " words per row, K=", K, " needs ", eqk::words_per_row(K));
  return PlaneRows{reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), planes.size(1),
                   planes.size(2), static_cast<int>(bits)};
}

// q int8 [N, K] (values in the signed `bits` range, checked by the Python op) -> int32
// [bits, N, W]: bit t of word w of plane j = bit (bits-1-j) of the two's-complement code of
// column 32 w + t.
at::Tensor pack_bitplanes_cpu(const at::Tensor& q, int64_t bits) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "pack_bitplanes_cpu: q must be a contiguous int8 [N, K] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8, "pack_bitplanes_cpu: bits must be in 1..8");
  const int64_t N = q.size(0), K = q.size(1), W = eqk::words_per_row(K);
  auto out = at::empty({bits, N, W}, q.options().dtype(at::kInt));
  const int8_t* src = q.data_ptr<int8_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t w = 0; w < W; ++w) {
        uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int64_t kend = std::min<int64_t>(32, K - 32 * w);
        for (int64_t t = 0; t < kend; ++t) {
          const uint32_t code = eqk::byte_of(src[n * K + 32 * w + t]);
          for (int j = 0; j < bits; ++j) words[j] |= ((code >> (bits - 1 - j)) & 1u) << t;
        }
        for (int j = 0; j < bits; ++j) dst[(j * N + n) * W + w] = words[j];
      }
    }
  });
  return out;
}

at::Tensor unpack_bitplanes_cpu(const at::Tensor& planes, int64_t bits, int64_t K, int64_t isa) {
  const PlaneRows P = plane_rows(planes, bits, K, "unpack_bitplanes_cpu");
  auto out = at::empty({P.N, K}, planes.options().dtype(at::kChar));
  int8_t* dst = out.data_ptr<int8_t>();
  const int level = eqk::lowbit::kernel_level(isa);
  at::parallel_for(0, P.N, 16, [&](int64_t n0, int64_t n1) {
    eqk::lowbit::decode_rows(level, P, n0, n1, K, dst + n0 * K, K);
  });
  return out;
}

// sum_k q_b[n, k] as int64 [N] (for the activation zero-point term of the integer GEMM).
at::Tensor bitplane_rowsums_cpu(const at::Tensor& planes, int64_t bits, int64_t K) {
  const PlaneRows P = plane_rows(planes, bits, K, "bitplane_rowsums_cpu");
  auto out = at::empty({P.N}, planes.options().dtype(at::kLong));
  int64_t* dst = out.data_ptr<int64_t>();
  const int level = eqk::lowbit::kernel_level(-1);
  at::parallel_for(0, P.N, 64, [&](int64_t n0, int64_t n1) {
    eqk::lowbit::rowsums(level, P, n0, n1, dst);
  });
  return out;
}

}  // namespace

EQK_REGISTER(bitplanes_cpu) {
  m.def("pack_bitplanes_cpu", &pack_bitplanes_cpu, "canonical bit planes of int8 codes");
  m.def("unpack_bitplanes_cpu", &unpack_bitplanes_cpu, "decode the first `bits` planes to int8");
  m.def("bitplane_rowsums_cpu", &bitplane_rowsums_cpu, "row sums of the b-bit codes");
  m.def("bitplanes_cpu_isa", [](int64_t cap) { return eqk::lowbit::kernel_level(cap); },
        "ISA level the bit-plane CPU kernels use (0 portable, 1 avx2, 2 avx512, 3 avx512 + VBMI + GFNI)");
}
