// Each op family registers its pybind11 functions from its own translation unit, so that
// csrc/bindings.cpp never changes when an op is added and EQK_OPS can build a subset.
#pragma once
#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace eqk {

using Registrar = std::function<void(pybind11::module_&)>;

inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> list;  // function-local static: safe static-init order
  return list;
}

struct RegisterOps {
  explicit RegisterOps(Registrar fn) { registrars().push_back(std::move(fn)); }
};

}  // namespace eqk

// Usage, at namespace scope in a .cpp file:
//   EQK_REGISTER(fake_quant_cpu) { m.def("fake_quant_fwd_cpu", &fake_quant_fwd_cpu); }
#define EQK_REGISTER(tag)                                                   \
  static void eqk_register_##tag(pybind11::module_& m);                     \
  static ::eqk::RegisterOps eqk_register_obj_##tag(&eqk_register_##tag);    \
  static void eqk_register_##tag(pybind11::module_& m)
