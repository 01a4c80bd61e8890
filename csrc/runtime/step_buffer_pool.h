// Storage (float32 activations, uint8 codes) reused across the steps and the runs of one step
// program: a fresh multi-megabyte tensor per step is a fresh mapping whose pages fault in (and
// are zeroed by the kernel) on every run, which cost more than the convolution writing it at
// batch 8 and above. A run takes the program's pool, the executor hands each buffer's storage
// back after its last reader when nothing else holds it, and the pool returns to the program at
// the end (a run that overlaps another one on the same program starts with an empty pool).
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace eqk::steps {

class BufferPool {
 public:
  static constexpr int64_t kMinBytes = int64_t(1) << 20;  // smaller ones come from malloc's heap

  // An uninitialized channels-last float32 [B, C, H, W] tensor, on pooled storage when one is
  // large enough (the smallest such).
  at::Tensor channels_last(int64_t B, int64_t C, int64_t H, int64_t W,
                           const at::TensorOptions& opts) {
    const auto fopts = opts.dtype(at::kFloat);
    at::Tensor t = take(B * C * H * W * 4, fopts);
    if (!t.defined())
      return at::empty({B, C, H, W}, fopts.memory_format(at::MemoryFormat::ChannelsLast));
    return t.view({B, H, W, C}).permute({0, 3, 1, 2});
  }

  // An uninitialized contiguous uint8 [B, H, W, C] tensor (activation codes), pooled alike.
  at::Tensor bytes_nhwc(int64_t B, int64_t H, int64_t W, int64_t C,
                        const at::TensorOptions& opts) {
    const auto bopts = opts.dtype(at::kByte);
    at::Tensor t = take(B * H * W * C, bopts);
    return t.defined() ? t.view({B, H, W, C}) : at::empty({B, H, W, C}, bopts);
  }

  // Keeps t's storage when t is its only holder (no view, no other buffer shares it).
  void give(at::Tensor t) {
    if (!t.defined() || (t.scalar_type() != at::kFloat && t.scalar_type() != at::kByte) ||
        !t.device().is_cpu() || t.use_count() != 1 || t.storage().use_count() != 1 ||
        static_cast<int64_t>(t.storage().nbytes()) < kMinBytes)
      return;
    const int64_t n = static_cast<int64_t>(t.storage().nbytes());
    at::Tensor flat = at::empty({0}, t.options().dtype(at::kByte));
    flat.set_(t.storage(), 0, {n}, {1});
    flats_.push_back(std::move(flat));
  }

  void swap(BufferPool& other) { flats_.swap(other.flats_); }

 private:
  // A flat tensor of `opts`' dtype over the smallest pooled storage of at least nbytes bytes
  // (storage is untyped: float and code buffers share the pool); undefined when none is.
  at::Tensor take(int64_t nbytes, const at::TensorOptions& opts) {
    int64_t best = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(flats_.size()); ++i)
      if (flats_[i].numel() >= nbytes && (best < 0 || flats_[i].numel() < flats_[best].numel()))
        best = i;
    if (best < 0 || nbytes < kMinBytes) return at::Tensor();
    at::Tensor flat = std::move(flats_[best]);
    flats_.erase(flats_.begin() + best);
    at::Tensor t = at::empty({0}, opts);
    t.set_(flat.storage(), 0, {nbytes / static_cast<int64_t>(t.element_size())}, {1});
    return t;
  }

  std::vector<at::Tensor> flats_;  // uint8, one per kept storage
};

}  // namespace eqk::steps
