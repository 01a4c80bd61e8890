// The step-size gradients of a per-tensor form in one call: what the
// `eqk::fake_quant_form_step_sums` op computes on the CPU (eqkernels/ops/fake_quant_form.py),
// without the Python between the op and the kernel. A compiled supernet calls it once per
// activation quantizer and step, so the dozen small tensor operations of the Python path (the
// fp32 step and its reciprocal, the rounded zero point, the memory-order views, the gradient
// factor) cost more than the kernel on small activations. Every value is the Python path's,
// bit for bit (tested against it).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/registry.h"
#include "fake_quant/fake_quant_cpu.h"

namespace {

// The single element of a one-element tensor, converted like .float() / .tolist() would.
template <typename T>
T only_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "fake_quant_step_sums: ", name, " must have one element, got ",
              t.numel());
  return t.to(c10::CppTypeToScalarType<T>::value).reshape({1}).template data_ptr<T>()[0];
}

// x's dimensions from the largest stride to the smallest (ties: the earlier dimension first):
// the order in which a dense, non-contiguous x (a channels-last activation) lies in memory.
std::vector<int64_t> memory_order(const at::Tensor& x) {
  std::vector<int64_t> perm(x.dim());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(),
                   [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  return perm;
}

// x and dy as [1, 1, numel] in x's memory order (per-tensor sums do not depend on the element
// order except for the fp32 summation order, which this fixes as the Python path does).
std::pair<at::Tensor, at::Tensor> flat_views(const at::Tensor& dy, const at::Tensor& x) {
  if (!x.is_contiguous() && x.dim() >= 2) {
    const auto perm = memory_order(x);
    at::Tensor xp = x.permute(perm);
    if (xp.is_contiguous()) {
      return {dy.permute(perm).contiguous().reshape({1, 1, -1}), xp.reshape({1, 1, -1})};
    }
  }
  return {dy.reshape({1, 1, -1}).contiguous(), x.reshape({1, 1, -1}).contiguous()};
}

// (ds, dz), shaped and typed like `scale`: grad_factor * sum dy * t and grad_factor * sum of
// dy * (in ? 0 : -s) over every element, the sums of the fake-quant backward kernel.
std::tuple<at::Tensor, at::Tensor> fake_quant_step_sums_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, const at::Tensor& form, const at::Tensor& grad_factor,
    int64_t isa) {
  TORCH_CHECK(form.numel() == 5,
              "fake_quant_step_sums: form must be [quant_min, quant_max, inv_step, step, comp]");
  TORCH_CHECK(dy.sizes() == x.sizes(), "fake_quant_step_sums: grad must match x in shape");
  const float s = only_value<float>(scale, "scale");
  const float z = only_value<float>(zero_point, "zero_point");
  const double g = only_value<double>(grad_factor, "grad_factor");
  const at::Tensor f = form.to(at::kDouble).contiguous();
  const double* fp = f.data_ptr<double>();
  // torch.reciprocal and torch.round of the Python path: IEEE fp32 division, half to even;
  // the form's fields as the kernel's tensor entry converts them (int range, float steps).
  const std::vector<eqk::FqParams> params{eqk::make_fq_params(
      s, 1.0f / s, std::nearbyint(z), static_cast<float>(static_cast<int64_t>(fp[0])),
      static_cast<float>(static_cast<int64_t>(fp[1])), static_cast<float>(fp[2]),
      static_cast<float>(fp[3]), static_cast<float>(fp[4]))};
  auto [d3, x3] = flat_views(dy, x);
  auto sums = eqk::fake_quant_bwd_params(d3, x3, params, isa, /*with_dx=*/false);
  // grad_factor * sum in fp32, as a Python float times an fp32 tensor computes it.
  const float gf = static_cast<float>(g);
  at::Tensor ds = (std::get<1>(sums) * gf).reshape(scale.sizes()).to(scale.scalar_type());
  at::Tensor dz = (std::get<2>(sums) * gf).reshape(scale.sizes()).to(scale.scalar_type());
  return {ds, dz};
}

}  // namespace

EQK_REGISTER(fake_quant_step_sums_cpu) {
  m.def("fake_quant_step_sums_cpu", &fake_quant_step_sums_cpu,
        "per-tensor step-size gradients (dy, x, scale, zero_point, form, grad_factor, isa) -> "
        "(ds, dz), shaped like scale");
}
