// The fake-quant backward pass of fake_quant_cpu.cpp, for the other entries of this directory.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common/fake_quant_math.h"

namespace eqk {

// (dx3, sum_t[C], sum_z[C]) over x3 / dy3 viewed [outer, C, inner] (contiguous); with_dx=false
// leaves dx3 undefined and reads only. See fake_quant_cpu.cpp for the summation order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cpu(
    const at::Tensor& dy3, const at::Tensor& x3, const at::Tensor& s, const at::Tensor& inv_s,
    const at::Tensor& zr, int64_t qmin, int64_t qmax, double inv_step, double step, double comp,
    int64_t isa, bool with_dx);

// The same pass with the per-channel parameters given directly (eqk::make_fq_params).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_params(
    const at::Tensor& dy3, const at::Tensor& x3, const std::vector<FqParams>& params, int64_t isa,
    bool with_dx);

}  // namespace eqk
