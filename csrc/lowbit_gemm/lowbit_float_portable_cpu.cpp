// Portable (any CPU) kernels of the float-activation low-bit GEMM (interface:
// common/lowbit_float_cpu.h): scalar decode of the plane bits and a sequential dot product.
#include <cstdint>

#include "common/lowbit_float_cpu.h"

namespace eqk::lowbit_float {

void decode_panel_f32_portable(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                               float* panel) {
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t n = n0 + r;
    for (int64_t i = 0; i < kc; ++i) {
      const int64_t k = k0 + i;
      int idx = 0;
      for (int j = 0; j < w.bits; ++j) idx = (idx << 1) | ((w.row(j, n)[k >> 5] >> (k & 31)) & 1);
      const int64_t g = w.group(k);
      const float t = static_cast<float>(code_of_pattern(idx, w.bits)) + w.cz[n * w.G + g];
      panel[r * kc + i] = t * w.scale[n * w.G + g];
    }
  }
}

void panel_gemm_f32_portable(const float* x, int64_t ldx, int64_t mb, const float* panel,
                             int64_t nb, int64_t kc, float* out, int64_t ldo) {
  for (int64_t m = 0; m < mb; ++m)
    for (int64_t n = 0; n < nb; ++n) {
      float acc = 0.0f;
      for (int64_t i = 0; i < kc; ++i) acc += x[m * ldx + i] * panel[n * kc + i];
      out[m * ldo + n] += acc;
    }
}

}  // namespace eqk::lowbit_float
