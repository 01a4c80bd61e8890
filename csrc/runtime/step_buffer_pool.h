// Float32 storage reused across the steps and the runs of one step program: a fresh
// multi-megabyte tensor per step is a fresh mapping whose pages fault in (and are zeroed by the
// kernel) on every run, which cost more than the convolution writing it at batch 8 and above.
// A run takes the program's pool, the executor hands each buffer's storage back after its last
// reader when nothing else holds it, and the pool returns to the program at the end (a run
// that overlaps another one on the same program starts with an empty pool).
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
    const int64_t n = B * C * H * W;
    int64_t best = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(flats_.size()); ++i)
      if (flats_[i].numel() >= n && (best < 0 || flats_[i].numel() < flats_[best].numel()))
        best = i;
    if (best < 0 || n * 4 < kMinBytes)
      return at::empty({B, C, H, W}, opts.memory_format(at::MemoryFormat::ChannelsLast));
    at::Tensor flat = std::move(flats_[best]);
    flats_.erase(flats_.begin() + best);
    return flat.slice(0, 0, n).view({B, H, W, C}).permute({0, 3, 1, 2});
  }

  // Keeps t's storage when t is its only holder (no view, no other buffer shares it).
  void give(at::Tensor t) {
    if (!t.defined() || t.scalar_type() != at::kFloat || !t.device().is_cpu() ||
        t.use_count() != 1 || t.storage().use_count() != 1 ||
        static_cast<int64_t>(t.storage().nbytes()) < kMinBytes)
      return;
    const int64_t n = static_cast<int64_t>(t.storage().nbytes()) / 4;
    at::Tensor flat = at::empty({0}, t.options());
    flat.set_(t.storage(), 0, {n}, {1});
    flats_.push_back(std::move(flat));
  }

  void swap(BufferPool& other) { flats_.swap(other.flats_); }

 private:
  std::vector<at::Tensor> flats_;
};

}  // namespace eqk::steps
