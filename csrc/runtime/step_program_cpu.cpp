// A step list over numbered buffers, executed in one C++ call (CPU): the integer low-bit
// conv/linear of the fused kernels (common/lowbit_fused_entry.h) and the float glue between them
// (ReLU, residual adds, pooling, flatten, slicing, padding, float conv/linear through ATen). A
// list of ops is not a model: whoever assembles it (eqnet.deploy) decides what it computes.
//
// Buffer 0 holds the input; every other buffer is written by exactly one step, before any step
// reads it (checked when a step is added, so a program is a DAG in execution order). A buffer is
// released after its last reader; an elementwise step writes into its first input in place when
// that input dies there and its storage is not shared (never the caller's input).
//
// Non-finite values: the integer steps quantize their float input, and the package's NaN rule
// (an output whose receptive field holds a NaN is NaN, +-Inf clamps) lives in the Python ops.
// Every quantized step therefore checks its input first; a non-finite value makes run() return
// nothing, and the caller runs its own per-layer path on that input.
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/lowbit_cpu_dispatch.h"
#include "common/lowbit_fused_entry.h"
#include "common/registry.h"
#include "runtime/step_conv.h"
#include "runtime/step_kinds.h"

namespace {

using eqk::steps::Kind;
using eqk::steps::kArity;
using eqk::steps::kKindNames;
using eqk::steps::kNumKinds;
using eqk::steps::Arity;

struct Step {
  Kind kind;
  std::vector<int64_t> inputs;
  int64_t output;
  std::vector<std::optional<at::Tensor>> tensors;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::shared_ptr<eqk::steps::QConv> qconv;  // k4n16 convs: prepared once (step_conv_cpu.cpp)
};

const at::Tensor& need(const std::optional<at::Tensor>& t) { return *t; }

class StepProgram {
 public:
  explicit StepProgram(int64_t num_buffers) {
    TORCH_CHECK(num_buffers >= 1 && num_buffers <= (int64_t(1) << 20),
                "StepProgram: num_buffers must be in 1..2^20, got ", num_buffers);
    written_.assign(num_buffers, false);
    written_[0] = true;  // the input
    last_use_.assign(num_buffers, -1);
    finite_.assign(num_buffers, false);
    code_target_.assign(num_buffers, nullptr);
  }

  void add(int64_t kind, const std::vector<int64_t>& inputs, int64_t output,
           const std::vector<std::optional<at::Tensor>>& tensors,
           const std::vector<int64_t>& ints, const std::vector<double>& floats) {
    TORCH_CHECK(output_ < 0, "StepProgram: no step can be added after finish()");
    TORCH_CHECK(kind >= 0 && kind < kNumKinds, "step kind must be one of _C.STEP_KINDS (0..",
                kNumKinds - 1, "), got ", kind);
    const Arity a = kArity[kind];
    const char* name = kKindNames[kind];
    if (a.inputs < 0) {
      TORCH_CHECK(inputs.size() == 1 || inputs.size() == 2, name,
                  ": takes 1 input buffer and optionally a residual, got ", inputs.size());
    } else {
      TORCH_CHECK(static_cast<int>(inputs.size()) == a.inputs, name, ": takes ", a.inputs,
                  " input buffer(s), got ", inputs.size());
    }
    TORCH_CHECK(static_cast<int>(tensors.size()) == a.tensors, name, ": takes ", a.tensors,
                " tensors, got ", tensors.size());
    for (int i = 0; i < a.required_tensors; ++i)
      TORCH_CHECK(tensors[i].has_value(), name, ": tensor ", i, " is required");
    for (const auto& t : tensors)
      TORCH_CHECK(!t.has_value() || (t->device().is_cpu() && t->layout() == at::kStrided),
                  name, ": tensors must be dense CPU tensors");
    TORCH_CHECK(a.ints < 0 || static_cast<int>(ints.size()) == a.ints, name, ": takes ", a.ints,
                " ints, got ", ints.size());
    TORCH_CHECK(static_cast<int>(floats.size()) == a.floats, name, ": takes ", a.floats,
                " floats, got ", floats.size());
    const int64_t nb = static_cast<int64_t>(written_.size());
    for (int64_t b : inputs)
      TORCH_CHECK(b >= 0 && b < nb && written_[b], name, ": input buffer ", b,
                  " is not written by an earlier step (buffers 0..", nb - 1, ", 0 the input)");
    TORCH_CHECK(output >= 1 && output < nb && !written_[output], name, ": output buffer ", output,
                " must be in 1..", nb - 1, " and written by no other step");
    eqk::steps::check_step_params(static_cast<Kind>(kind), name, tensors, ints, floats);
    const Kind k = static_cast<Kind>(kind);
    const bool quantized = k == Kind::qconv || k == Kind::qconv_codes;
    // k4n16 convs, and depthwise convs of one output channel per group (channel multipliers
    // run the per-layer kernel). Prepared before any state changes, so a refused step leaves
    // the program as it was.
    std::shared_ptr<eqk::steps::QConv> qconv;
    if (quantized && (tensors[0]->dim() == 4 || ints[1] == ints[10]))
      qconv = eqk::steps::make_qconv(*tensors[0], *tensors[1], *tensors[2], *tensors[3],
                                     tensors[4], tensors[5], tensors[6], ints, floats[0],
                                     floats[1]);
    if (k == Kind::qconv_codes) {
      // Codes are finite by construction only when the fp32 values they quantize are.
      TORCH_CHECK(qconv && qconv->finite_output, name,
                  ": needs a prepared conv whose fp32 output is finite by construction");
      qconv->out.on = true;
      qconv->out.q = eqk::fused::act_quant(*tensors[7], tensors[8], ints[14], ints[15]);
      qconv->out.ph = ints[16];
      qconv->out.pw = ints[17];
      TORCH_CHECK(qconv->out.q.z >= qconv->out.q.lo && qconv->out.q.z <= qconv->out.q.hi, name,
                  ": the output activation zero point lies outside its range");
    }
    for (size_t j = 0; j < inputs.size(); ++j) {
      const auto& target = code_target_[inputs[j]];
      if (target == nullptr) continue;
      // A code buffer is read only as the input of the conv it was quantized for.
      TORCH_CHECK(j == 0 && qconv && eqk::steps::same_codes(target->out.q, qconv->q) &&
                      target->out.ph == qconv->ph && target->out.pw == qconv->pw,
                  name, ": input buffer ", inputs[j],
                  " holds codes, which only a quantized conv with the same activation "
                  "quantizer and padding reads");
    }
    for (int64_t b : inputs) last_use_[b] = static_cast<int64_t>(steps_.size());
    written_[output] = true;
    Step step{k, inputs, output, tensors, ints, floats, qconv};
    if (k == Kind::qconv_codes) code_target_[output] = qconv;
    // A buffer that is finite whatever the input: a prepared conv without residual whose
    // epilogue is bounded in fp32 (its integer sums are), and ReLU / clamp of one. The next
    // quantized step skips its finiteness pass over such an input.
    const bool from_finite = finite_[inputs[0]];
    if (step.qconv && step.qconv->finite_output && inputs.size() == 1) finite_[output] = true;
    if ((k == Kind::relu || k == Kind::clamp) && from_finite) finite_[output] = true;
    // Steps that mix the samples of a batch, or whose fp32 result may depend on the batch size
    // (ATen's float conv / linear pick algorithms by shape), keep the batch whole.
    if (k == Kind::conv || k == Kind::linear || k == Kind::pad ||
        (k == Kind::flatten && ints[0] < 1) || (k == Kind::slice && ints[0] < 1))
      per_sample_ = false;
    steps_.push_back(std::move(step));
  }

  void finish(int64_t output) {
    TORCH_CHECK(output_ < 0, "StepProgram: finish() was called already");
    TORCH_CHECK(output >= 0 && output < static_cast<int64_t>(written_.size()) && written_[output],
                "StepProgram: the output buffer ", output, " is not written by any step");
    TORCH_CHECK(code_target_[output] == nullptr, "StepProgram: the output buffer ", output,
                " holds activation codes (a qconv_codes step's), not a float result");
    output_ = output;
    last_use_[output] = static_cast<int64_t>(steps_.size());  // kept to the end
  }

  int64_t num_steps() const { return static_cast<int64_t>(steps_.size()); }

  // The output for input x, or nullopt when a quantized step met a non-finite input.
  // A batch whose largest intermediate (measured on an earlier run) exceeds chunk_bytes runs
  // in chunks of samples, so that each step's output stays in cache for the next step; every
  // step computes each sample alone (per_sample_), so the chunks give the same bits.
  std::optional<at::Tensor> run(const at::Tensor& x, int64_t isa) {
    const int64_t B = x.dim() >= 1 ? x.size(0) : 1, per = sample_bytes_.load();
    const int64_t chunk = per > 0 ? std::max<int64_t>(1, chunk_bytes_.load() / per) : B;
    if (!per_sample_ || chunk >= B) return run_impl(x, isa, nullptr);
    std::vector<at::Tensor> parts;
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      auto y = run_impl(x.slice(0, b0, std::min(B, b0 + chunk)), isa, nullptr);
      if (!y.has_value()) return std::nullopt;
      parts.push_back(std::move(*y));
    }
    return at::cat(parts, 0);
  }

  void set_chunk_bytes(int64_t bytes) {
    TORCH_CHECK(bytes >= 1, "StepProgram: chunk_bytes must be >= 1, got ", bytes);
    chunk_bytes_ = bytes;
  }

  // Seconds spent in each step for input x (empty when a quantized step met a non-finite
  // input); a separate entry point so that run() carries no timing.
  std::vector<double> profile(const at::Tensor& x, int64_t isa) {
    std::vector<double> seconds;
    if (!run_impl(x, isa, &seconds).has_value()) seconds.clear();
    return seconds;
  }

  std::vector<std::string> step_kinds() const {
    std::vector<std::string> names;
    for (const Step& s : steps_) names.emplace_back(kKindNames[static_cast<int64_t>(s.kind)]);
    return names;
  }

 private:
  std::optional<at::Tensor> run_impl(const at::Tensor& x, int64_t isa,
                                     std::vector<double>* seconds) {
    TORCH_CHECK(output_ >= 0, "StepProgram: call finish(output) before run()");
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
                "StepProgram: x must be a float32 CPU tensor");
    std::vector<at::Tensor> buf(written_.size());
    buf[0] = x;
    int64_t sample_max = 0;
    eqk::steps::BufferPool pool;
    {
      std::lock_guard<std::mutex> lock(pool_mutex_);
      pool.swap(pool_);
    }
    for (size_t i = 0; i < steps_.size(); ++i) {
      const Step& s = steps_[i];
      const auto t0 = seconds != nullptr ? std::chrono::steady_clock::now()
                                         : std::chrono::steady_clock::time_point{};
      std::optional<at::Tensor> y = execute(s, buf, static_cast<int64_t>(i), isa, pool);
      if (!y.has_value()) return std::nullopt;
      if (x.dim() >= 1 && x.size(0) >= 1 && y->dim() >= 1 && y->size(0) == x.size(0))
        sample_max = std::max<int64_t>(sample_max, y->nbytes() / x.size(0));
      if (seconds != nullptr)
        seconds->push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      buf[s.output] = std::move(*y);
      for (int64_t b : s.inputs)
        if (last_use_[b] == static_cast<int64_t>(i) && b != 0) pool.give(std::move(buf[b]));
    }
    // Channels-last intermediates are the executor's business: the caller gets the
    // contiguous layout the per-layer path returns.
    at::Tensor out = buf[output_].contiguous();
    buf.clear();
    sample_bytes_ = std::max(sample_bytes_.load(), sample_max);
    std::lock_guard<std::mutex> lock(pool_mutex_);
    pool_.swap(pool);
    return out;
  }

  std::vector<Step> steps_;
  eqk::steps::BufferPool pool_;  // storage kept between runs (step_buffer_pool.h)
  std::mutex pool_mutex_;
  std::vector<bool> written_;
  std::vector<int64_t> last_use_;
  int64_t output_ = -1;
  std::vector<bool> finite_;  // buffers finite by construction (see add())
  // Code buffers: the qconv_codes step that writes each (null: a float buffer).
  std::vector<std::shared_ptr<const eqk::steps::QConv>> code_target_;
  bool per_sample_ = true;
  std::atomic<int64_t> sample_bytes_{0};               // largest intermediate per sample
  std::atomic<int64_t> chunk_bytes_{int64_t(4) << 20};  // about an L2 + L3 share per core

  bool in_place_ok(const Step& s, const std::vector<at::Tensor>& buf, int64_t i) const {
    const int64_t b = s.inputs[0];
    const at::Tensor& t = buf[b];
    return b != 0 && last_use_[b] == i && t.is_contiguous() && t.storage().use_count() == 1 &&
           (s.inputs.size() < 2 || s.inputs[1] != b);
  }

  std::optional<at::Tensor> execute(const Step& s, std::vector<at::Tensor>& buf, int64_t i,
                                    int64_t isa, eqk::steps::BufferPool& pool) const {
    const at::Tensor& x = buf[s.inputs[0]];
    const auto& t = s.tensors;
    const auto& n = s.ints;
    switch (s.kind) {
      case Kind::qconv:
      case Kind::qconv_codes: {
        if (!finite_[s.inputs[0]] && !eqk::steps::all_finite(x, isa)) return std::nullopt;
        const at::Tensor* res = s.inputs.size() > 1 ? &buf[s.inputs[1]] : nullptr;
        const eqk::steps::Activation act{static_cast<int>(n[13]), static_cast<float>(s.floats[2]),
                                         static_cast<float>(s.floats[3])};
        if (s.qconv) return eqk::steps::run_qconv(*s.qconv, x, res, act, isa, &pool);
        auto y = eqk::fused::conv2d_int_fused(
            x, need(t[0]), need(t[1]), n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], n[8],
            n[9], n[10], need(t[2]), s.floats[0], s.floats[1], t[4], t[5], need(t[3]), t[6],
            n[11], n[12], isa);
        TORCH_CHECK(y.has_value(), "qconv: the activation zero point lies outside its range");
        if (res != nullptr) y->add_(*res);
        if (act.kind == 1) y->relu_();
        if (act.kind == 2) y->clamp_(s.floats[2], s.floats[3]);
        return y;
      }
      case Kind::qlinear: {
        if (!eqk::steps::all_finite(x, isa)) return std::nullopt;
        TORCH_CHECK(x.dim() >= 1, "qlinear: input must have at least one dimension");
        const at::Tensor x2 = x.reshape({-1, x.size(-1)});
        at::Tensor y = eqk::fused::linear_int_fused(
            x2, need(t[0]).slice(0, 0, n[0]), n[0], t[4], need(t[1]), need(t[2]), s.floats[0],
            s.floats[1], t[5], t[6], need(t[3]), t[7], n[1], n[2], isa);
        std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
        shape.back() = y.size(1);
        return y.reshape(shape);
      }
      case Kind::conv:
        return at::conv2d(x, need(t[0]), t[1], {n[0], n[1]}, {n[2], n[3]}, {n[4], n[5]}, n[6]);
      case Kind::linear:
        return at::linear(x, need(t[0]), t[1]);
      case Kind::affine: {
        TORCH_CHECK(x.dim() >= 2 && x.size(1) == t[0]->numel(),
                    "affine: input dim 1 must match the channel count");
        std::vector<int64_t> shape(x.dim(), 1);
        shape[1] = -1;
        return at::add(at::mul(x, t[0]->view(shape)), t[1]->view(shape));
      }
      case Kind::relu:
        return in_place_ok(s, buf, i) ? at::relu_(buf[s.inputs[0]]) : at::relu(x);
      case Kind::clamp:
        return in_place_ok(s, buf, i) ? at::clamp_(buf[s.inputs[0]], s.floats[0], s.floats[1])
                                      : at::clamp(x, s.floats[0], s.floats[1]);
      case Kind::add:
      case Kind::add_relu: {
        const at::Tensor& b = buf[s.inputs[1]];
        at::Tensor y = in_place_ok(s, buf, i) && b.sizes() == x.sizes()
                           ? buf[s.inputs[0]].add_(b)
                           : at::add(x, b);
        return s.kind == Kind::add_relu ? at::relu_(y) : y;
      }
      case Kind::max_pool2d:
        return at::max_pool2d(x, {n[0], n[1]}, {n[2], n[3]}, {n[4], n[5]}, {n[6], n[7]},
                              n[8] != 0);
      case Kind::avg_pool2d:
        return at::avg_pool2d(x, {n[0], n[1]}, {n[2], n[3]}, {n[4], n[5]}, n[6] != 0,
                              n[7] != 0);
      case Kind::adaptive_avg_pool2d:
        return at::adaptive_avg_pool2d(x, {n[0], n[1]});
      case Kind::flatten:
        return at::flatten(x, n[0], n[1]);
      case Kind::slice:
        return x.slice(n[0], n[1], n[2], n[3]);
      case Kind::pad:
        return at::constant_pad_nd(x, n, s.floats[0]);
    }
    TORCH_CHECK(false, "unknown step kind");
  }
};

}  // namespace

EQK_REGISTER(step_program_cpu) {
  pybind11::class_<StepProgram>(m, "StepProgramCpu")
      .def(pybind11::init<int64_t>(), pybind11::arg("num_buffers"))
      .def("add", &StepProgram::add, "append a step (kind, inputs, output, tensors, ints, floats)")
      .def("finish", &StepProgram::finish, "mark the output buffer; no step can be added after")
      .def("num_steps", &StepProgram::num_steps)
      .def("set_chunk_bytes", &StepProgram::set_chunk_bytes,
           "largest intermediate (bytes) from which a batch runs in chunks of samples")
      .def("step_kinds", &StepProgram::step_kinds, "the kind name of each step, in order")
      .def("profile", &StepProgram::profile, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "seconds per step for x (empty when a quantized step met a non-finite input)")
      .def("run", &StepProgram::run, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "the output for x, or None when a quantized step met a non-finite input");
  pybind11::dict kinds;
  for (int64_t k = 0; k < kNumKinds; ++k) kinds[kKindNames[k]] = k;
  m.attr("STEP_KINDS") = kinds;
}
