// The step kinds of the step executor (step_program_cpu.cpp), what each one takes, and the
// checks of a step's parameters when it is added (step_checks_cpu.cpp).
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace eqk::steps {

// Step kinds (exposed to Python as _C.STEP_KINDS, name -> value).
enum class Kind : int64_t {
  qconv = 0,
  qlinear = 1,
  conv = 2,
  linear = 3,
  affine = 4,
  relu = 5,
  clamp = 6,
  add = 7,
  add_relu = 8,
  max_pool2d = 9,
  avg_pool2d = 10,
  adaptive_avg_pool2d = 11,
  flatten = 12,
  slice = 13,
  pad = 14,
  qconv_codes = 15,
};
constexpr int64_t kNumKinds = 16;

inline const char* const kKindNames[kNumKinds] = {
    "qconv",      "qlinear",    "conv",       "linear",   "affine",
    "relu",       "clamp",      "add",        "add_relu", "max_pool2d",
    "avg_pool2d", "adaptive_avg_pool2d", "flatten", "slice", "pad", "qconv_codes"};

// What each kind takes: inputs, tensors (required ones first; the rest may be None), ints,
// floats. -1: any count (checked by the kind itself). qconv reads its input and optionally a
// residual added before its optional activation (ints: the conv's 13, then the activation:
// 0 none, 1 ReLU, 2 clamp to [lo, hi]; floats: scale factor, compensation, lo, hi).
// qconv_codes is a qconv without residual whose output is the next conv's activation codes
// (step_codes_cpu.cpp): tensors 7 and 8 the consumer's act scale (required) and zero point,
// ints 14..17 its act_quant_min/max and padding (h, w).
struct Arity {
  int inputs, tensors, required_tensors, ints, floats;
};
inline constexpr Arity kArity[kNumKinds] = {
    {-1, 7, 4, 14, 4},  // qconv: packed, wsum, scale, act_scale | zw, bias, act_zp; + act
    {1, 8, 4, 3, 2},    // qlinear: planes, wsum, scale, act_scale | kernel weights, zw, bias, act_zp
    {1, 2, 1, 7, 0},    // conv: weight | bias; stride, padding, dilation pairs, groups
    {1, 2, 1, 0, 0},    // linear: weight | bias
    {1, 2, 2, 0, 0},    // affine: mul, add (per channel of dim 1)
    {1, 0, 0, 0, 0},    // relu
    {1, 0, 0, 0, 2},    // clamp: lo, hi
    {2, 0, 0, 0, 0},    // add
    {2, 0, 0, 0, 0},    // add_relu
    {1, 0, 0, 9, 0},    // max_pool2d: kernel, stride, padding, dilation pairs, ceil_mode
    {1, 0, 0, 8, 0},    // avg_pool2d: kernel, stride, padding pairs, ceil_mode, count_include_pad
    {1, 0, 0, 2, 0},    // adaptive_avg_pool2d: output size pair
    {1, 0, 0, 2, 0},    // flatten: start_dim, end_dim
    {1, 0, 0, 4, 0},    // slice: dim, start, end, step
    {1, 0, 0, -1, 1},   // pad: pairs of (before, after) from the last dim; value
    {1, 9, 4, 18, 4},   // qconv_codes: qconv's | out act_scale (required), out act_zp; + 4 ints
};

// Checks a step's tensors, ints and floats (counts already checked); one-line errors.
void check_step_params(Kind k, const char* name, const std::vector<std::optional<at::Tensor>>& t,
                       const std::vector<int64_t>& ints, const std::vector<double>& f);

// Whether every value of t is finite (a vectorized pass per ISA level for dense float32).
bool all_finite(const at::Tensor& t, int64_t isa);

}  // namespace eqk::steps
