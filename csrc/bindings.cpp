// The private kernel module eqkernels._C. Op schemas live in Python (torch.library); this
// module only exposes kernels, collected from every op directory through csrc/common/registry.h.
#include <torch/extension.h>

#include "common/cpu_features.h"
#include "common/registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "eqkernels private kernels (C++ CPU, and CUDA when built with it)";
#ifdef EQK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_features", [] {
    const auto& f = eqk::cpu_features();
    pybind11::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512vnni"] = f.avx512vnni;
    d["avx512vpopcntdq"] = f.avx512vpopcntdq;
    d["avxvnni"] = f.avxvnni;
    return d;
  }, "CPU features detected at run time (and honoured: EQK_CPU_ISA=portable|avx2|avx512 caps them)");
  pybind11::dict levels;  // the `isa` cap argument of the CPU kernels
  levels["portable"] = static_cast<int>(eqk::IsaLevel::portable);
  levels["avx2"] = static_cast<int>(eqk::IsaLevel::avx2);
  levels["avx512"] = static_cast<int>(eqk::IsaLevel::avx512);
  levels["avx512gfni"] = static_cast<int>(eqk::IsaLevel::avx512gfni);
  m.attr("ISA_LEVELS") = levels;
  for (auto& reg : eqk::registrars()) reg(m);
}
