// Float-activation low-bit GEMM on canonical bit planes: argument checks, cache blocking,
// threads and ISA dispatch (kernels: lowbit_float_{portable,avx2,avx512}_cpu.cpp, interface and
// arithmetic: common/lowbit_float_cpu.h).
//
// bf16 activations, up to 4 bits, with AVX512_BF16 + VBMI + GFNI: the weights' integer codes
// decoded to bf16 and multiplied with vdpbf16ps, the (c - z) term added from the activations'
// group sums (run_codes in registers up to kCodesMaxM rows, run_outer_codes on outer panels
// below kCodesOuterEndM). Up to kRegsMaxM rows of fp32 activations and 4 bits (with VBMI +
// GFNI): each weight row is decoded in registers and multiplied at once (gemv_regs_avx512).
// From kOuterMinM rows with AVX-512: outer-product panels (run_outer), the weights decoded once.
// Otherwise dot-product panels, per thread (threads split the output rows): for each block of kKc
// columns, for each block of kMc activation rows (their kKc-column slice stays in L2), for each
// block of kNb weight rows: decode the kNb x kKc panel (L2), then run the register-blocked dot
// products of every activation row of the block against it. The panel is decoded
// ceil(M / kMc) times per call, a few vector ops per 16 weights, and a decoded weight never
// exceeds one panel per thread.
// Every output is summed by one thread in a fixed order: results do not depend on the thread
// count.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <numeric>
#include <vector>

#include "common/bitplane_math.h"
#include "common/cpu_features.h"
#include "common/lowbit_float_cpu.h"
#include "common/registry.h"

namespace {

using eqk::lowbit_float::Weights;
namespace lf = eqk::lowbit_float;

constexpr int64_t kNb = 16;    // weight rows per panel
constexpr int64_t kKc = 2048;  // columns per panel (rounded to whole groups)
constexpr int64_t kMc = 64;    // activation rows sharing one decoded panel
constexpr int64_t kRegsMaxM = 4;  // up to this many rows: decode in registers, no panel
// From this many rows (AVX-512): outer-product panels of kOuterNb rows, decoded once per call;
// below, the transpose costs more than the dot-product form's repeated reductions save.
constexpr int64_t kOuterMinM = 16;
constexpr int64_t kOuterKcF32 = 2048;   // columns per outer panel, fp32 (256 KB panel)
constexpr int64_t kOuterKcBf16 = 4096;  // bf16 (256 KB panel): longer plane streams per row
// bf16 activations, b <= 4, level 4: the integer codes decoded to bf16 (one constant table),
// in registers up to kCodesMaxM rows (run_codes), on outer panels below kCodesOuterEndM
// (run_outer_codes; from there the (c - z) term's per-group FMAs cost more than the cheaper
// decode saves, measured at 256 rows with 32-column groups).
constexpr int64_t kCodesMaxM = 7;
constexpr int64_t kCodesOuterEndM = 64;
constexpr int64_t kCodesNb = 16;  // weight rows per task (their fp32 partials stay in L1)

bool cpu_has_avx512bf16() {
#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// 0 portable, 1 AVX2, 2 AVX-512 (mask decode, fp32 FMA), 3 + VBMI/GFNI decode, 4 + BF16
// (vdpbf16ps for bf16 activations); capped by EQK_CPU_ISA and by `cap`.
int float_kernel_level(int64_t cap) {
  int level = static_cast<int>(eqk::isa_level());
  const auto& f = eqk::cpu_features();
  if (level == 2 && f.avx512vbmi && f.gfni && f.avx512vnni) level = 3;
  if (level == 3 && cpu_has_avx512bf16()) level = 4;
  if (cap >= 0 && cap < level) level = static_cast<int>(cap);
  return level;
}

at::Tensor padded(const at::Tensor& x, int64_t kp) {
  if (x.size(1) == kp) return x.contiguous();
  auto buf = at::zeros({x.size(0), kp}, x.options());
  buf.narrow(1, 0, x.size(1)).copy_(x);
  return buf;
}

Weights check_weights(const at::Tensor& planes, int64_t bits, int64_t K, const at::Tensor& scale,
                      const at::Tensor& cz, int64_t group_size, int level) {
  const char* fn = "lowbit_linear_float_cpu";
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              fn, ": planes must be a contiguous int32 [planes, N, W] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && planes.size(0) >= bits, fn, ": bits must be in 1..",
              std::min<int64_t>(planes.size(0), 8), " (planes held), got ", bits);
  TORCH_CHECK(K >= 1 && planes.size(2) == eqk::words_per_row(K), fn, ": planes hold ",
              planes.size(2), " words per row, K=", K, " needs ", eqk::words_per_row(K));
  const int64_t N = planes.size(1);
  TORCH_CHECK(group_size >= 1 && K % group_size == 0, fn, ": group_size must divide K=", K,
              ", got ", group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(G == 1 || group_size % 32 == 0, fn,
              ": group_size must be a multiple of 32 (or K), got ", group_size);
  for (const auto* t : {&scale, &cz})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == N && t->size(1) == G,
                fn, ": scale and cz must be contiguous float32 [N=", N, ", K/group_size=", G,
                "] tensors");
  const int64_t kp = 32 * planes.size(2);
  return Weights{reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), N,
                 planes.size(2), static_cast<int>(bits), scale.data_ptr<float>(),
                 cz.data_ptr<float>(), G, G == 1 ? kp : group_size, level >= 3};
}

void run_f32(const Weights& w, const float* x, int64_t M, int64_t kp, int64_t kc_step, int level,
             float* out) {
  const int64_t nblocks = (w.N + kNb - 1) / kNb;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> panel(kNb * kc_step);
    for (int64_t k0 = 0; k0 < kp; k0 += kc_step) {
      const int64_t kc = std::min(kc_step, kp - k0);
      for (int64_t m0 = 0; m0 < M; m0 += kMc) {
        const int64_t mb = std::min(kMc, M - m0);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t n0 = b * kNb, nb = std::min(kNb, w.N - n0);
          const float* xs = x + m0 * kp + k0;
          float* o = out + m0 * w.N + n0;
          if (level >= 2) {
            lf::decode_panel_f32_avx512(w, n0, nb, k0, kc, panel.data());
            lf::panel_gemm_f32_avx512(xs, kp, mb, panel.data(), nb, kc, o, w.N);
          } else if (level == 1) {
            lf::decode_panel_f32_avx2(w, n0, nb, k0, kc, panel.data());
            lf::panel_gemm_f32_avx2(xs, kp, mb, panel.data(), nb, kc, o, w.N);
          } else {
            lf::decode_panel_f32_portable(w, n0, nb, k0, kc, panel.data());
            lf::panel_gemm_f32_portable(xs, kp, mb, panel.data(), nb, kc, o, w.N);
          }
        }
      }
    }
  });
}

void run_bf16(const Weights& w, const uint16_t* x, int64_t M, int64_t kp, int64_t kc_step,
              float* out) {
  const int64_t nblocks = (w.N + kNb - 1) / kNb;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint16_t> panel(kNb * kc_step);
    for (int64_t k0 = 0; k0 < kp; k0 += kc_step) {
      const int64_t kc = std::min(kc_step, kp - k0);
      // One group per panel (per-channel scales) or whole groups of gs columns.
      const int64_t gs_kc = w.G == 1 ? kc : w.gs, g0 = w.G == 1 ? 0 : k0 / w.gs;
      for (int64_t m0 = 0; m0 < M; m0 += kMc) {
        const int64_t mb = std::min(kMc, M - m0);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t n0 = b * kNb, nb = std::min(kNb, w.N - n0);
          lf::decode_panel_bf16_avx512bf16(w, n0, nb, k0, kc, panel.data());
          lf::panel_gemm_bf16_avx512bf16(x + m0 * kp + k0, kp, mb, panel.data(), nb, kc, w, n0,
                                         g0, gs_kc, out + m0 * w.N + n0, w.N);
        }
      }
    }
  });
}

// AVX-512 outer-product panels: per block of kOuterNb weight rows and kc columns, decode 16
// rows at a time (row-major: scaled fp32, or unscaled q + cz in bf16) and transpose them into
// the panel, then run every activation row against it, so each weight is decoded once per call.
// Threads split the row blocks; each output is summed by one thread in a fixed order.
template <bool BF16>
void run_outer(const Weights& w, const void* x, int64_t M, int64_t kp, int64_t kc_step,
               float* out) {
  constexpr int64_t nr = lf::kOuterNb;
  constexpr int64_t per32 = BF16 ? 2 : 1;  // weights per 32-bit panel element
  const int64_t nblocks = (w.N + nr - 1) / nr;
  const int64_t groups_max = w.G == 1 ? 1 : kc_step / w.gs;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> rows(16 * kc_step / per32), panel(nr * kc_step / per32);
    std::vector<float> sT(nr * groups_max);
    for (int64_t k0 = 0; k0 < kp; k0 += kc_step) {
      const int64_t kc = std::min(kc_step, kp - k0), cols = kc / per32;
      const int64_t gs_kc = w.G == 1 ? kc : w.gs, g0 = w.G == 1 ? 0 : k0 / w.gs;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * nr, nb = std::min(nr, w.N - n0);
        for (int64_t r0 = 0; r0 < nr; r0 += 16) {
          const int64_t rn = std::max<int64_t>(0, std::min<int64_t>(16, nb - r0));
          // rows past N are zero (their outputs are masked off)
          std::fill(rows.begin() + rn * cols, rows.begin() + 16 * cols, 0u);
          if (rn > 0 && BF16)
            lf::decode_panel_bf16_avx512bf16(w, n0 + r0, rn, k0, kc,
                                             reinterpret_cast<uint16_t*>(rows.data()));
          if (rn > 0 && !BF16)
            lf::decode_panel_f32_avx512(w, n0 + r0, rn, k0, kc,
                                        reinterpret_cast<float*>(rows.data()));
          lf::pack_outer_avx512(rows.data(), cols, panel.data() + r0);
        }
        if constexpr (BF16) {
          for (int64_t gi = 0; gi < kc / gs_kc; ++gi)
            for (int64_t r = 0; r < nr; ++r)
              sT[gi * nr + r] = r < nb ? w.scale[(n0 + r) * w.G + g0 + gi] : 0.0f;
          lf::panel_outer_bf16_avx512bf16(static_cast<const uint16_t*>(x) + k0, kp, M,
                                          panel.data(), kc, sT.data(), gs_kc, nb, out + n0, w.N);
        } else {
          lf::panel_outer_f32_avx512(static_cast<const float*>(x) + k0, kp, M,
                                     reinterpret_cast<const float*>(panel.data()), kc, nb,
                                     out + n0, w.N);
        }
      }
    }
  });
}

// The bf16 activations [M, K] in the code kernels' column order, zero-padded to kpad columns
// (`outer`: the outer-panel order), and their per-group sums for the (c - z) term.
struct CodesInput {
  at::Tensor xp, xsum;
  const uint16_t* codes() const {
    return reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
  }
  const float* sums() const { return xsum.data_ptr<float>(); }
};

CodesInput permute_codes_input(const Weights& w, const at::Tensor& x, int64_t kpad, bool outer) {
  const int64_t M = x.size(0);
  CodesInput in{at::empty({M, kpad}, x.options()),
                at::empty({M, w.G}, x.options().dtype(at::kFloat))};
  lf::permute_x_codes(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M,
                      x.size(1), w, kpad, outer,
                      reinterpret_cast<uint16_t*>(in.xp.data_ptr<at::BFloat16>()),
                      in.xsum.data_ptr<float>());
  return in;
}

// bf16 codes in registers (lowbit_float_codes_bf16_avx512_cpu.cpp): the activations permuted
// to the decoder's column order once per call, then threads split the weight rows.
void run_codes(const Weights& w, const at::Tensor& x, int64_t kp, float* out) {  // x: [M, K]
  const int64_t M = x.size(0);
  const int64_t kpad = (kp + lf::kCodesBlock - 1) / lf::kCodesBlock * lf::kCodesBlock;
  const CodesInput in = permute_codes_input(w, x, kpad, false);
  const uint16_t* xpp = in.codes();
  const float* xs = in.sums();
  const int64_t nblocks = (w.N + kCodesNb - 1) / kCodesNb;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      lf::rows_codes_bf16(w, xpp, xs, M, kpad, b * kCodesNb,
                          std::min(w.N, (b + 1) * kCodesNb), out, w.N);
  });
}

// bf16 codes on outer panels (lowbit_float_codes_outer_avx512_cpu.cpp): as run_outer, with the
// panels decoded from the codes (the transpose on nibbles) and the (c - z) term added per panel
// from the activations' group sums. Columns padded to whole groups and 128-column blocks.
void run_outer_codes(const Weights& w, const at::Tensor& x, int64_t kp, float* out) {
  const int64_t M = x.size(0);
  const int64_t unit = w.G == 1 ? lf::kCodesBlock : std::lcm(w.gs, lf::kCodesBlock);
  const int64_t kpad = (kp + unit - 1) / unit * unit;
  const CodesInput in = permute_codes_input(w, x, kpad, true);
  const uint16_t* xpp = in.codes();
  const float* xs = in.sums();
  constexpr int64_t nr = lf::kOuterNb;
  const int64_t kc_step = std::max(unit, kOuterKcBf16 / unit * unit);
  const int64_t nblocks = (w.N + nr - 1) / nr;
  const int64_t groups_max = w.G == 1 ? 1 : kc_step / w.gs;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> panel(nr * kc_step / 2);
    std::vector<float> sT(nr * groups_max), sczT(nr * groups_max);
    for (int64_t k0 = 0; k0 < kpad; k0 += kc_step) {
      const int64_t kc = std::min(kc_step, kpad - k0);
      const int64_t gs_kc = w.G == 1 ? kc : w.gs, g0 = w.G == 1 ? 0 : k0 / w.gs;
      const int64_t ng = kc / gs_kc, ng_real = std::max<int64_t>(0, std::min(ng, w.G - g0));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * nr, nb = std::min(nr, w.N - n0);
        lf::decode_outer_codes(w, n0, nb, k0, kc, panel.data());
        lf::outer_code_scales(w, n0, nb, g0, ng, ng_real, sT.data(), sczT.data());
        lf::panel_outer_bf16_avx512bf16(xpp + k0, kpad, M, panel.data(), kc, sT.data(), gs_kc,
                                        nb, out + n0, w.N);
        if (w.G > 1 || k0 == 0)  // per channel: one group over every chunk, added once
          lf::add_outer_correction(xs + g0, w.G, M, sczT.data(), ng_real, nb, out + n0, w.N);
      }
    }
  });
}

// Columns per panel near `target`, whole groups (a group's scale covers whole 32-column blocks).
int64_t panel_cols(const Weights& w, int64_t kp, int64_t target) {
  return w.G == 1 ? std::min(kp, target) : w.gs * std::max<int64_t>(1, target / w.gs);
}

// float32 [M, N] = x @ ((q_b + cz) * s)^T with scale s and cz = c - z_w per output row and
// group of `group_size` columns ([N, K / group_size]; group_size = K for per-channel).
at::Tensor lowbit_linear_float_cpu(const at::Tensor& x_in, const at::Tensor& planes, int64_t bits,
                                   int64_t K, const at::Tensor& scale, const at::Tensor& cz,
                                   int64_t group_size, int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K &&
                  (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "lowbit_linear_float_cpu: x must be a float32 or bfloat16 [M, K=", K, "] tensor");
  const int level = float_kernel_level(isa);
  const Weights w = check_weights(planes, bits, K, scale, cz, group_size, level);
  const int64_t M = x_in.size(0), kp = 32 * w.W;
  const int64_t kc_step = panel_cols(w, kp, kKc);
  auto out = at::zeros({M, w.N}, x_in.options().dtype(at::kFloat));
  if (M == 0) return out;
  if (x_in.scalar_type() == at::kBFloat16 && level >= 4 && w.bits <= 4 && M <= kCodesMaxM) {
    run_codes(w, x_in.contiguous(), kp, out.data_ptr<float>());
    return out;
  }
  if (x_in.scalar_type() == at::kBFloat16 && level >= 4 && w.bits <= 4 && M < kCodesOuterEndM) {
    run_outer_codes(w, x_in.contiguous(), kp, out.data_ptr<float>());
    return out;
  }
  if (x_in.scalar_type() == at::kBFloat16 && level >= 4 && !(M <= kRegsMaxM && w.bits <= 4)) {
    const at::Tensor xp = padded(x_in, kp);
    if (M >= kOuterMinM) {
      run_outer<true>(w, xp.data_ptr<at::BFloat16>(), M, kp, panel_cols(w, kp, kOuterKcBf16),
                      out.data_ptr<float>());
      return out;
    }
    run_bf16(w, reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>()), M, kp, kc_step,
             out.data_ptr<float>());
    return out;
  }
  const at::Tensor xp = padded(x_in.to(at::kFloat), kp);
  if (level >= 3 && M <= kRegsMaxM && w.bits <= 4) {
    const float* xf = xp.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
      lf::gemv_regs_avx512(w, xf, kp, M, n0, n1, o, w.N);
    });
    return out;
  }
  if (level >= 2 && M >= kOuterMinM) {
    run_outer<false>(w, xp.data_ptr<float>(), M, kp, panel_cols(w, kp, kOuterKcF32),
                     out.data_ptr<float>());
    return out;
  }
  run_f32(w, xp.data_ptr<float>(), M, kp, kc_step, level, out.data_ptr<float>());
  return out;
}

int64_t lowbit_float_cpu_level(int64_t cap) { return float_kernel_level(cap); }

}  // namespace

EQK_REGISTER(lowbit_float_cpu) {
  m.def("lowbit_linear_float_cpu", &lowbit_linear_float_cpu,
        "float32 x @ ((q_b + cz) * s)^T from canonical planes, per-channel or per-group s, cz; "
        "x float32 or bfloat16 (vdpbf16ps)");
  m.def("lowbit_float_cpu_level", &lowbit_float_cpu_level,
        "kernel level of lowbit_linear_float_cpu: 0 portable, 1 avx2, 2 avx512, 3 +gfni, 4 +bf16");
}
