// Entry points of the fused C++ integer low-bit kernels (csrc/lowbit_gemm/lowbit_fused_cpu.cpp,
// lowbit_fused_conv_cpu.cpp) for other translation units of eqkernels._C (the step-list
// executor of csrc/runtime/): the same functions the Python ops call through pybind11.
#pragma once
#include <torch/extension.h>

#include <optional>

namespace eqk::fused {

// lowbit_conv2d_int_fused_cpu: y fp32 [B, N, OH, OW], or nullopt when the rounded activation
// zero point lies outside [qmin, qmax].
std::optional<at::Tensor> conv2d_int_fused(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wsum, int64_t bits, int64_t N,
    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
    int64_t dw, int64_t groups, const at::Tensor& scale, double scale_factor, double c,
    const std::optional<at::Tensor>& zw, const std::optional<at::Tensor>& bias,
    const at::Tensor& act_scale, const std::optional<at::Tensor>& act_zp, int64_t qmin,
    int64_t qmax, int64_t isa);

// lowbit_linear_int_fused_cpu: y fp32 [M, N] of x fp32 [M, K].
at::Tensor linear_int_fused(const at::Tensor& x, const at::Tensor& planes, int64_t bits,
                            const std::optional<at::Tensor>& kernel_weights,
                            const at::Tensor& wsum, const at::Tensor& scale, double scale_factor,
                            double c, const std::optional<at::Tensor>& zw,
                            const std::optional<at::Tensor>& bias, const at::Tensor& act_scale,
                            const std::optional<at::Tensor>& act_zp, int64_t qmin, int64_t qmax,
                            int64_t isa);

}  // namespace eqk::fused
