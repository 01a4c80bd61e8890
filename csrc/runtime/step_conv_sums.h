// The integer sums of the step executor's k4n16 conv (step_conv_cpu.cpp): im2col of
// channels-last codes with each row's code sum, the implicit GEMM that reads the codes in place
// (AVX-512 VNNI), and the per-pixel code sums that the implicit path's compensation term needs.
#pragma once
#include <cstdint>

namespace eqk::steps {

// im2col of `rows` output positions from channels-last codes (columns in (kh, kw, cin_g) order,
// the k4n16 weights' order) and each row's code sum term xz = (sum u + K sub) - K z, as the
// per-layer kernel computes it.
struct Im2col {
  const uint8_t* ub;  // codes of this image, [Hp, Wp, C]
  int64_t C, Wp, OW, cin_g, K, Kp, sub, sh, sw;
  const int64_t* taps;
  int64_t ntaps;
  double z;
};
void im2col(const Im2col& g, int64_t l0, int64_t rows, int64_t gi, uint8_t* A, double* xz);

// Implicit GEMM (AVX-512 VNNI, cin_g % 4 == 0) of output channel tiles [tile0, tile1) of 16:
// row r, tap t reads the 4 * K4t code bytes at P[r] + taps[t]; C[r][n] int32 sums.
void implicit_gemm(const uint8_t* const* P, int64_t rows, const int64_t* taps, int64_t ntaps,
                   int64_t K4t, const int8_t* Wp, int64_t Npad, int64_t tile0, int64_t tile1,
                   int32_t* C, int64_t ldc);

// Per padded pixel and group, the sum of the group's C / groups code bytes.
void group_sums(const uint8_t* u, int64_t pixels, int64_t C, int64_t groups, int32_t* S);

}  // namespace eqk::steps
