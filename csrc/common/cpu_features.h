// Run-time CPU feature detection. Kernels compiled with function target attributes are only
// called when the running CPU has the features (and the OS saves the AVX-512 state).
// EQK_CPU_ISA=portable|avx2|avx512|avx512gfni caps the level, so tests can exercise every path
// here.
#pragma once
#include <cstdlib>
#include <cstring>

namespace eqk {

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false;
  bool avx512vnni = false, avx512vpopcntdq = false, avxvnni = false;
  bool avx512vbmi = false, gfni = false;
};

// The ISA levels of the CPU kernels (their numbers are the `isa` cap argument of every kernel;
// exposed to Python as _C.ISA_LEVELS). avx512gfni (AVX-512 + VBMI + GFNI) is used by the
// bit-plane kernels only (lowbit_cpu_dispatch.h); isa_level() stops at avx512.
enum class IsaLevel { portable = 0, avx2 = 1, avx512 = 2, avx512gfni = 3 };

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512vpopcntdq = __builtin_cpu_supports("avx512vpopcntdq");
  f.avx512vbmi = __builtin_cpu_supports("avx512vbmi");
  f.gfni = __builtin_cpu_supports("gfni");
#if defined(__GNUC__) && __GNUC__ >= 11
  f.avxvnni = __builtin_cpu_supports("avxvnni");
#endif
  const char* cap = std::getenv("EQK_CPU_ISA");
  if (cap && std::strcmp(cap, "portable") == 0) f = CpuFeatures{};
  if (cap && std::strcmp(cap, "avx2") == 0) {
    f.avx512f = f.avx512bw = f.avx512vl = f.avx512vnni = f.avx512vpopcntdq = false;
  }
  if (cap && (std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "avx512") == 0))
    f.avx512vbmi = f.gfni = false;
#endif
  return f;
}

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect_cpu_features();
  return f;
}

// The level the dispatchers use: avx512 needs F+BW+VL (the kernels use byte/word ops on ymm).
inline IsaLevel isa_level() {
  const auto& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl) return IsaLevel::avx512;
  if (f.avx2 && f.fma) return IsaLevel::avx2;
  return IsaLevel::portable;
}

}  // namespace eqk
