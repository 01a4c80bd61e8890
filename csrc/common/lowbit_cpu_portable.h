// Portable (any CPU) bit-plane kernels: decode, integer GEMM, float GEMV, row sums. They run
// the shared __host__ __device__ arithmetic of bitplane_math.h (decode_code, dp4a_ss/dp4a_us),
// so the CPU tests exercise exactly what the CUDA kernels compute. Raw pointers only (no torch
// headers): the dispatchers in csrc/bitplanes/ and csrc/lowbit_gemm/ own threading.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/bitplane_math.h"

namespace eqk::lowbit {

// A canonical plane tensor int32[n, N, W] seen as words; only the first `bits` planes are read.
struct PlaneRows {
  const uint32_t* data;
  int64_t N, W;
  int bits;
  const uint32_t* row(int j, int64_t n) const { return data + (int64_t)j * N * W + n * W; }
};

// Signed weight of plane j in a `bits`-bit code: -2^(b-1) for the sign plane, else 2^(b-1-j).
inline int plane_weight(int bits, int j) { return j == 0 ? -(1 << (bits - 1)) : 1 << (bits - 1 - j); }

// Rows [n0, n1) decoded to int8, out[(n - n0) * ldo + k] for k < ncols (ncols <= 32 W; the
// padding columns decode to 0 because padding bits are zero).
inline void decode_rows_portable(const PlaneRows& P, int64_t n0, int64_t n1, int64_t ncols,
                                 int8_t* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* r = P.row(0, n);
    for (int64_t k = 0; k < ncols; ++k)
      out[(n - n0) * ldo + k] = static_cast<int8_t>(decode_code(r, P.N * P.W, P.bits, k));
  }
}

// out[m * ldo + n] = sum_k x[m, k] * q_b[n, k] for rows n in [n0, n1); x rows are zero-padded
// to 32 W bytes (row stride 32 W), int8 when x_signed else uint8. dp4a over 4-byte words,
// the CUDA kernel's arithmetic. int32 is exact under the op's chunking rule.
inline void gemm_int_portable(const PlaneRows& P, const uint8_t* x, bool x_signed, int64_t M,
                              int64_t n0, int64_t n1, int32_t* out, int64_t ldo) {
  const int64_t kp = 32 * P.W;
  std::vector<int8_t> w(kp);
  for (int64_t n = n0; n < n1; ++n) {
    decode_rows_portable(P, n, n + 1, kp, w.data(), kp);
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* xr = x + m * kp;
      int acc = 0;
      for (int64_t k = 0; k < kp; k += 4) {
        uint32_t a, b;
        std::memcpy(&a, xr + k, 4);
        std::memcpy(&b, w.data() + k, 4);
        acc = x_signed ? dp4a_ss(a, b, acc) : dp4a_us(a, b, acc);
      }
      out[m * ldo + n] = acc;
    }
  }
}

// out[m * ldo + n] = sum_k x[m, k] * q_b[n, k] in fp32, sequential in k (fixed order).
// x rows are zero-padded to 32 W floats.
inline void gemv_float_portable(const PlaneRows& P, const float* x, int64_t M, int64_t n0,
                                int64_t n1, float* out, int64_t ldo) {
  const int64_t kp = 32 * P.W;
  std::vector<int8_t> w(kp);
  for (int64_t n = n0; n < n1; ++n) {
    decode_rows_portable(P, n, n + 1, kp, w.data(), kp);
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t k = 0; k < kp; ++k) acc += float(w[k]) * x[m * kp + k];
      out[m * ldo + n] = acc;
    }
  }
}

inline int popcount32(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  return static_cast<int>((((v + (v >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
}

// sum_k q_b[n, k] = sum_j plane_weight(j) * popcount(P_j[n]) for rows [n0, n1).
inline void rowsums_portable(const PlaneRows& P, int64_t n0, int64_t n1, int64_t* out) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t s = 0;
    for (int j = 0; j < P.bits; ++j) {
      int64_t c = 0;
      const uint32_t* r = P.row(j, n);
      for (int64_t w = 0; w < P.W; ++w) c += popcount32(r[w]);
      s += plane_weight(P.bits, j) * c;
    }
    out[n] = s;
  }
}

}  // namespace eqk::lowbit
