// ISA choice of the bit-plane CPU kernels: the detected level (cpu_features.h, capped by
// EQK_CPU_ISA at process start), lowered further by a per-call cap (tests exercise every path
// in one process). The AVX-512 kernels also need VNNI (dpbusd) and VPOPCNTDQ; level 3 adds
// VBMI and GFNI (the tiled-plane decode of lowbit_cpu_gfni.h).
#pragma once
#include <cstdint>

#include "common/cpu_features.h"
#include "common/lowbit_cpu_avx2.h"
#include "common/lowbit_cpu_avx512.h"
#include "common/lowbit_cpu_portable.h"

namespace eqk::lowbit {

// An IsaLevel value as int (0 portable, 1 avx2, 2 avx512, 3 avx512gfni). cap < 0: no
// per-call cap.
inline int kernel_level(int64_t cap) {
  constexpr int kAvx2 = static_cast<int>(IsaLevel::avx2);
  constexpr int kAvx512 = static_cast<int>(IsaLevel::avx512);
  int level = static_cast<int>(isa_level());
  const auto& f = cpu_features();
  if (level == kAvx512 && !(f.avx512vnni && f.avx512vpopcntdq)) level = kAvx2;
  if (level == kAvx512 && f.avx512vbmi && f.gfni) level = static_cast<int>(IsaLevel::avx512gfni);
  if (cap >= 0 && cap < level) level = static_cast<int>(cap);
  return level;
}

inline void decode_rows(int level, const PlaneRows& P, int64_t n0, int64_t n1, int64_t ncols,
                        int8_t* out, int64_t ldo) {
  if (level >= 2)
    decode_rows_avx512(P, n0, n1, ncols, out, ldo);
  else if (level == 1)
    decode_rows_avx2(P, n0, n1, ncols, out, ldo);
  else
    decode_rows_portable(P, n0, n1, ncols, out, ldo);
}

inline void rowsums(int level, const PlaneRows& P, int64_t n0, int64_t n1, int64_t* out) {
  if (level >= 2)
    rowsums_avx512(P, n0, n1, out);
  else if (level == 1)
    rowsums_avx2(P, n0, n1, out);
  else
    rowsums_portable(P, n0, n1, out);
}

}  // namespace eqk::lowbit
