// C++ CPU kernels of the fused fake-quant ops (eqkernels/ops/fake_quant.py holds the schema).
//
// Work layout: x is viewed as [outer, C, inner]; each row (o, c) of `inner` elements is cut into
// blocks of kBlock elements. A block is the unit of parallel work and of reduction: the backward
// accumulates dy*t and o in 16 lanes (element i of the block goes to lane i % 16), sums the lanes
// in a fixed order into one partial per block, and the per-channel totals add the partials in
// (o, block) order. Results therefore do not depend on the thread count, and the AVX-512 (one
// 16-lane register), AVX2 (two 8-lane registers) and portable (16 scalars) paths agree bit for
// bit. Elementwise math is csrc/common/fake_quant_math.h; the vector paths reproduce it exactly
// (same operation order, -ffp-contract=off, max_ps/min_ps operand order, explicit NaN select).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/avx512_defined.h"
#include "common/cpu_features.h"
#include "common/fake_quant_math.h"
#include "common/registry.h"
#include "fake_quant/fake_quant_cpu.h"

namespace {

using eqk::FqParams;

constexpr int64_t kBlock = 8192;
constexpr int kLanes = 16;

// ---------------------------------------------------------------------------------------------
// Portable path (also the tail of the vector paths: the same scalar map, same lane assignment).

void fwd_block_portable(const float* x, float* y, int64_t n, const FqParams& p) {
  for (int64_t i = 0; i < n; ++i) y[i] = eqk::fq_forward(x[i], p);
}

// kDx false: the step-size sums only, dx not written (a compiled graph computes dx itself,
// fused into the batch-norm backward that reads it).
template <bool kDx>
void bwd_tail(const float* dy, const float* x, float* dx, int64_t begin, int64_t n,
              const FqParams& p, float* lt, float* lo) {
  for (int64_t i = begin; i < n; ++i) {
    float d, st, so;
    eqk::fq_backward(dy[i], x[i], p, d, st, so);
    if constexpr (kDx) dx[i] = d;
    lt[i % kLanes] += st;
    lo[i % kLanes] += so;
  }
}

template <bool kDx>
void bwd_block_portable(const float* dy, const float* x, float* dx, int64_t n,
                        const FqParams& p, float* lt, float* lo) {
  bwd_tail<kDx>(dy, x, dx, 0, n, p, lt, lo);
}

// ---------------------------------------------------------------------------------------------
// AVX2 (8 lanes; two registers make the 16 reduction lanes)

#if defined(__x86_64__)
#define EQK_AVX2 __attribute__((target("avx2,fma")))
#define EQK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

struct Avx2Params {
  __m256 s, inv_s, zr, lo, hi, qmin, qmax, inv_step, step, comp;
};

EQK_AVX2 inline Avx2Params avx2_params(const FqParams& p) {
  return {_mm256_set1_ps(p.s),    _mm256_set1_ps(p.inv_s), _mm256_set1_ps(p.zr),
          _mm256_set1_ps(p.lo),   _mm256_set1_ps(p.hi),    _mm256_set1_ps(p.qmin),
          _mm256_set1_ps(p.qmax), _mm256_set1_ps(p.inv_step), _mm256_set1_ps(p.step),
          _mm256_set1_ps(p.comp)};
}

// Returns a; sets v, u and the NaN mask.
EQK_AVX2 inline __m256 avx2_element(__m256 x, const Avx2Params& p, __m256& v, __m256& u,
                                    __m256& nan) {
  v = _mm256_mul_ps(x, p.inv_s);
  nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  __m256 vc = _mm256_min_ps(p.hi, _mm256_max_ps(p.lo, v));
  __m256 r = _mm256_round_ps(vc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  u = _mm256_add_ps(r, p.zr);
  __m256 q = _mm256_min_ps(p.qmax, _mm256_max_ps(p.qmin, u));
  __m256 f = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(q, p.zr), p.inv_step),
                             _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm256_mul_ps(_mm256_add_ps(f, p.comp), p.step);
}

EQK_AVX2 void fwd_block_avx2(const float* x, float* y, int64_t n, const FqParams& sp) {
  const Avx2Params p = avx2_params(sp);
  const __m256 nanv = _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v, u, nan;
    __m256 a = avx2_element(_mm256_loadu_ps(x + i), p, v, u, nan);
    _mm256_storeu_ps(y + i, _mm256_blendv_ps(_mm256_mul_ps(a, p.s), nanv, nan));
  }
  for (; i < n; ++i) y[i] = eqk::fq_forward(x[i], sp);
}

template <bool kDx>
EQK_AVX2 void bwd_block_avx2(const float* dy, const float* x, float* dx, int64_t n,
                             const FqParams& sp, float* lt, float* lo) {
  const Avx2Params p = avx2_params(sp);
  const __m256 nanv = _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const __m256 zero = _mm256_setzero_ps();
  __m256 at[2] = {_mm256_loadu_ps(lt), _mm256_loadu_ps(lt + 8)};
  __m256 ao[2] = {_mm256_loadu_ps(lo), _mm256_loadu_ps(lo + 8)};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + 8 * h;
      __m256 v, u, nan;
      __m256 a = avx2_element(_mm256_loadu_ps(x + j), p, v, u, nan);
      __m256 g = _mm256_loadu_ps(dy + j);
      __m256 in = _mm256_and_ps(_mm256_cmp_ps(u, p.qmin, _CMP_GE_OQ),
                                _mm256_cmp_ps(u, p.qmax, _CMP_LE_OQ));
      if constexpr (kDx)
        _mm256_storeu_ps(dx + j, _mm256_blendv_ps(_mm256_blendv_ps(zero, g, in), nanv, nan));
      __m256 t = _mm256_blendv_ps(a, _mm256_sub_ps(a, v), in);
      __m256 st = _mm256_blendv_ps(_mm256_mul_ps(g, t), nanv, nan);
      __m256 so = _mm256_blendv_ps(_mm256_blendv_ps(g, zero, in), nanv, nan);
      at[h] = _mm256_add_ps(at[h], st);
      ao[h] = _mm256_add_ps(ao[h], so);
    }
  }
  _mm256_storeu_ps(lt, at[0]);
  _mm256_storeu_ps(lt + 8, at[1]);
  _mm256_storeu_ps(lo, ao[0]);
  _mm256_storeu_ps(lo + 8, ao[1]);
  bwd_tail<kDx>(dy, x, dx, i, n, sp, lt, lo);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (16 lanes, one register)

struct Avx512Params {
  __m512 s, inv_s, zr, lo, hi, qmin, qmax, inv_step, step, comp;
};

EQK_AVX512 inline Avx512Params avx512_params(const FqParams& p) {
  return {_mm512_set1_ps(p.s),    _mm512_set1_ps(p.inv_s), _mm512_set1_ps(p.zr),
          _mm512_set1_ps(p.lo),   _mm512_set1_ps(p.hi),    _mm512_set1_ps(p.qmin),
          _mm512_set1_ps(p.qmax), _mm512_set1_ps(p.inv_step), _mm512_set1_ps(p.step),
          _mm512_set1_ps(p.comp)};
}

EQK_AVX512 inline __m512 avx512_element(__m512 x, const Avx512Params& p, __m512& v, __m512& u,
                                        __mmask16& nan) {
  v = _mm512_mul_ps(x, p.inv_s);
  nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  using namespace eqk::avx512;
  __m512 vc = min_ps(p.hi, max_ps(p.lo, v));
  __m512 r = roundscale_ps<_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC>(vc);
  u = _mm512_add_ps(r, p.zr);
  __m512 q = min_ps(p.qmax, max_ps(p.qmin, u));
  __m512 f = roundscale_ps<_MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC>(
      _mm512_mul_ps(_mm512_sub_ps(q, p.zr), p.inv_step));
  return _mm512_mul_ps(_mm512_add_ps(f, p.comp), p.step);
}

EQK_AVX512 void fwd_block_avx512(const float* x, float* y, int64_t n, const FqParams& sp) {
  const Avx512Params p = avx512_params(sp);
  const __m512 nanv = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v, u;
    __mmask16 nan;
    __m512 a = avx512_element(_mm512_loadu_ps(x + i), p, v, u, nan);
    _mm512_storeu_ps(y + i, _mm512_mask_blend_ps(nan, _mm512_mul_ps(a, p.s), nanv));
  }
  for (; i < n; ++i) y[i] = eqk::fq_forward(x[i], sp);
}

template <bool kDx>
EQK_AVX512 void bwd_block_avx512(const float* dy, const float* x, float* dx, int64_t n,
                                 const FqParams& sp, float* lt, float* lo) {
  const Avx512Params p = avx512_params(sp);
  const __m512 nanv = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  __m512 at = _mm512_loadu_ps(lt);
  __m512 ao = _mm512_loadu_ps(lo);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __m512 v, u;
    __mmask16 nan;
    __m512 a = avx512_element(_mm512_loadu_ps(x + i), p, v, u, nan);
    __m512 g = _mm512_loadu_ps(dy + i);
    __mmask16 in = _mm512_cmp_ps_mask(u, p.qmin, _CMP_GE_OQ) &
                   _mm512_cmp_ps_mask(u, p.qmax, _CMP_LE_OQ);
    if constexpr (kDx)
      _mm512_storeu_ps(dx + i, _mm512_mask_blend_ps(nan, _mm512_maskz_mov_ps(in, g), nanv));
    __m512 t = _mm512_mask_sub_ps(a, in, a, v);
    at = _mm512_add_ps(at, _mm512_mask_blend_ps(nan, _mm512_mul_ps(g, t), nanv));
    ao = _mm512_add_ps(ao, _mm512_mask_blend_ps(nan, _mm512_maskz_mov_ps(~in, g), nanv));
  }
  _mm512_storeu_ps(lt, at);
  _mm512_storeu_ps(lo, ao);
  bwd_tail<kDx>(dy, x, dx, i, n, sp, lt, lo);
}
#endif  // __x86_64__

// ---------------------------------------------------------------------------------------------
// Dispatch

using FwdBlock = void (*)(const float*, float*, int64_t, const FqParams&);
using BwdBlock = void (*)(const float*, const float*, float*, int64_t, const FqParams&, float*,
                          float*);

int resolve_isa(int64_t requested) {
  const int best = static_cast<int>(eqk::isa_level());
  if (requested < 0) return best;
  TORCH_CHECK(requested <= 2, "fake_quant: isa=", requested,
              " accepted values are -1 (auto), 0 (portable), 1 (avx2), 2 (avx512)");
  TORCH_CHECK(requested <= best, "fake_quant: isa=", requested,
              " is not supported by this CPU (or capped by EQK_CPU_ISA); best is ", best);
  return static_cast<int>(requested);
}

FwdBlock fwd_block_for(int isa) {
#if defined(__x86_64__)
  if (isa == 2) return fwd_block_avx512;
  if (isa == 1) return fwd_block_avx2;
#endif
  return fwd_block_portable;
}

template <bool kDx>
BwdBlock bwd_block_for(int isa) {
#if defined(__x86_64__)
  if (isa == 2) return bwd_block_avx512<kDx>;
  if (isa == 1) return bwd_block_avx2<kDx>;
#endif
  return bwd_block_portable<kDx>;
}

struct Layout {
  int64_t outer, channels, inner, blocks_per_row, items;
};

Layout layout_of(const at::Tensor& x3) {
  Layout l;
  l.outer = x3.size(0);
  l.channels = x3.size(1);
  l.inner = x3.size(2);
  l.blocks_per_row = (l.inner + kBlock - 1) / kBlock;
  l.items = l.outer * l.channels * l.blocks_per_row;
  return l;
}

std::vector<FqParams> channel_params(const at::Tensor& s, const at::Tensor& inv_s,
                                     const at::Tensor& zr, int64_t channels, int64_t qmin,
                                     int64_t qmax, double inv_step, double step, double comp) {
  for (const auto* t : {&s, &inv_s, &zr}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == channels,
                "fake_quant: scale/inv_scale/zero_point must be contiguous float32 [C]");
  }
  std::vector<FqParams> params(channels);
  const float* ps = s.data_ptr<float>();
  const float* pi = inv_s.data_ptr<float>();
  const float* pz = zr.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    params[c] = eqk::make_fq_params(ps[c], pi[c], pz[c], static_cast<float>(qmin),
                                    static_cast<float>(qmax), static_cast<float>(inv_step),
                                    static_cast<float>(step), static_cast<float>(comp));
  }
  return params;
}

// Items per parallel task: at least ~32K elements, so short rows are batched.
int64_t grain_items(const Layout& l) {
  const int64_t per_item = std::max<int64_t>(std::min(l.inner, kBlock), 1);
  return std::max<int64_t>(1, 32768 / per_item);
}

// fp16/bf16 blocks are converted to fp32 (c10's round-to-nearest-even casts, the same as
// torch's .to()) in a per-task buffer; fp32 is used in place.
template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

void check_x3(const at::Tensor& x3, const char* name) {
  TORCH_CHECK(x3.dim() == 3 && x3.is_contiguous() && x3.device().is_cpu(), "fake_quant: ", name,
              " must be a contiguous CPU tensor viewed as [outer, C, inner]");
  TORCH_CHECK(x3.scalar_type() == at::kFloat || x3.scalar_type() == at::kHalf ||
                  x3.scalar_type() == at::kBFloat16,
              "fake_quant: ", name, " must be float32, float16 or bfloat16");
}

template <typename T>
void forward_impl(const at::Tensor& x3, at::Tensor& y3, const Layout& l,
                  const std::vector<FqParams>& params, FwdBlock block) {
  const T* x = x3.data_ptr<T>();
  T* y = y3.data_ptr<T>();
  at::parallel_for(0, l.items, grain_items(l), [&](int64_t begin, int64_t end) {
    std::vector<float> xb, yb;
    if constexpr (!std::is_same_v<T, float>) {
      xb.resize(kBlock);
      yb.resize(kBlock);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / l.blocks_per_row;
      const int64_t start = (item % l.blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, l.inner - start);
      const int64_t off = row * l.inner + start;
      const FqParams& p = params[row % l.channels];
      if constexpr (std::is_same_v<T, float>) {
        block(x + off, y + off, n, p);
      } else {
        to_float(x + off, xb.data(), n);
        block(xb.data(), yb.data(), n, p);
        from_float(yb.data(), y + off, n);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& dy3, const at::Tensor& x3, at::Tensor& dx3, const Layout& l,
                   const std::vector<FqParams>& params, BwdBlock block, float* part_t,
                   float* part_o) {
  const T* x = x3.data_ptr<T>();
  const T* dy = dy3.data_ptr<T>();
  T* dx = dx3.defined() ? dx3.data_ptr<T>() : nullptr;
  at::parallel_for(0, l.items, grain_items(l), [&](int64_t begin, int64_t end) {
    std::vector<float> xb, gb, db;
    if constexpr (!std::is_same_v<T, float>) {
      xb.resize(kBlock);
      gb.resize(kBlock);
      db.resize(kBlock);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / l.blocks_per_row;
      const int64_t start = (item % l.blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, l.inner - start);
      const int64_t off = row * l.inner + start;
      const FqParams& p = params[row % l.channels];
      float lt[kLanes] = {0}, lo[kLanes] = {0};
      if constexpr (std::is_same_v<T, float>) {
        block(dy + off, x + off, dx ? dx + off : nullptr, n, p, lt, lo);
      } else {
        to_float(x + off, xb.data(), n);
        to_float(dy + off, gb.data(), n);
        block(gb.data(), xb.data(), db.data(), n, p, lt, lo);
        if (dx) from_float(db.data(), dx + off, n);
      }
      float st = 0.0f, so = 0.0f;
      for (int j = 0; j < kLanes; ++j) {
        st += lt[j];
        so += lo[j];
      }
      part_t[item] = st;
      part_o[item] = so;
    }
  });
}

// y = fake-quant(x) through the unified element map; x3 contiguous [outer, C, inner].
at::Tensor fake_quant_fwd_cpu(const at::Tensor& x3, const at::Tensor& s, const at::Tensor& inv_s,
                              const at::Tensor& zr, int64_t qmin, int64_t qmax, double inv_step,
                              double step, double comp, int64_t isa) {
  check_x3(x3, "x");
  const Layout l = layout_of(x3);
  const auto params = channel_params(s, inv_s, zr, l.channels, qmin, qmax, inv_step, step, comp);
  const FwdBlock block = fwd_block_for(resolve_isa(isa));
  at::Tensor y3 = at::empty_like(x3);
  switch (x3.scalar_type()) {
    case at::kFloat: forward_impl<float>(x3, y3, l, params, block); break;
    case at::kHalf: forward_impl<at::Half>(x3, y3, l, params, block); break;
    default: forward_impl<at::BFloat16>(x3, y3, l, params, block); break;
  }
  return y3;
}

}  // namespace

namespace eqk {

// (dx, sum_t[C], sum_z[C]): dx = dy * in; sum_t = sum dy * t; sum_z = sum dy * (in ? 0 : -s),
// the sums fp32 in the fixed block/lane order described at the top of the file.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cpu(
    const at::Tensor& dy3, const at::Tensor& x3, const at::Tensor& s, const at::Tensor& inv_s,
    const at::Tensor& zr, int64_t qmin, int64_t qmax, double inv_step, double step, double comp,
    int64_t isa, bool with_dx) {
  check_x3(x3, "x");
  const int64_t channels = x3.size(1);
  const auto params = channel_params(s, inv_s, zr, channels, qmin, qmax, inv_step, step, comp);
  return fake_quant_bwd_params(dy3, x3, params, isa, with_dx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_params(
    const at::Tensor& dy3, const at::Tensor& x3, const std::vector<FqParams>& params, int64_t isa,
    bool with_dx) {
  check_x3(x3, "x");
  check_x3(dy3, "grad");
  TORCH_CHECK(dy3.sizes() == x3.sizes() && dy3.scalar_type() == x3.scalar_type(),
              "fake_quant: grad must match x in shape and dtype");
  const Layout l = layout_of(x3);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == l.channels,
              "fake_quant: one parameter set per channel of x3 expected");
  const int level = resolve_isa(isa);
  const BwdBlock block = with_dx ? bwd_block_for<true>(level) : bwd_block_for<false>(level);
  at::Tensor dx3 = with_dx ? at::empty_like(x3) : at::Tensor();
  std::vector<float> part_t(l.items), part_o(l.items);
  switch (x3.scalar_type()) {
    case at::kFloat:
      backward_impl<float>(dy3, x3, dx3, l, params, block, part_t.data(), part_o.data());
      break;
    case at::kHalf:
      backward_impl<at::Half>(dy3, x3, dx3, l, params, block, part_t.data(), part_o.data());
      break;
    default:
      backward_impl<at::BFloat16>(dy3, x3, dx3, l, params, block, part_t.data(), part_o.data());
      break;
  }
  at::Tensor sum_t = at::zeros({l.channels}, x3.options().dtype(at::kFloat));
  at::Tensor sum_z = at::zeros({l.channels}, x3.options().dtype(at::kFloat));
  float* pt = sum_t.data_ptr<float>();
  float* pz = sum_z.data_ptr<float>();
  // Serial on purpose: it is O(items) additions, and a second parallel region costs more than
  // that (on a busy machine, a whole scheduler time slice waiting for the other thread).
  for (int64_t c = 0; c < l.channels; ++c) {
    float acc_t = 0.0f, acc_o = 0.0f;
    for (int64_t o = 0; o < l.outer; ++o) {
      const int64_t base = (o * l.channels + c) * l.blocks_per_row;
      for (int64_t b = 0; b < l.blocks_per_row; ++b) {
        acc_t += part_t[base + b];
        acc_o += part_o[base + b];
      }
    }
    pt[c] = acc_t;
    pz[c] = -params[c].s * acc_o;
  }
  return {dx3, sum_t, sum_z};
}

}  // namespace eqk

EQK_REGISTER(fake_quant_cpu) {
  m.def("fake_quant_fwd_cpu", &fake_quant_fwd_cpu,
        "fake-quant forward (x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp, isa)");
  m.def("fake_quant_bwd_cpu", &eqk::fake_quant_bwd_cpu,
        "fake-quant backward (dy3, x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp, isa, "
        "with_dx) -> (dx3, sum_t, sum_z); with_dx=False leaves dx3 None (the sums only)");
  m.def("fake_quant_cpu_isa", [] { return static_cast<int>(eqk::isa_level()); },
        "ISA level the fake-quant kernels use by default: 0 portable, 1 avx2, 2 avx512");
}
