// CPU integer-activation low-bit linear with per-group weight scales: each group of g
// consecutive columns (g a multiple of 32, so a group is whole plane words) has its own scale
// s[n, j] and weight offset cz[n, j] = c - z_w[n, j], so the integer dot product of each group
// is accumulated on its own (int32, exact while g * max|xq| * 2^(bits-1) < 2^31, which the
// caller checks) and the groups are combined in float64:
//   y[m, n] = sum_j s[n, j] * (acc_j - z_a rowsum_j + cz[n, j] (xsum_j - g z_a)),
// s = s_a * s_b in float64, j in a fixed order, one (m, n) per thread, so
// the result does not depend on the thread count.
//
// Rows of the weight are int8 rows decoded once at load (the op caches them per planes
// tensor), or decoded here a block at a time (the ISA decoders of lowbit_cpu_dispatch.h);
// a block is reused for every activation row while it is in cache. On AVX-512 (VNNI) the 8
// rows of a block share each activation load and their float64 epilogue is one vector; the
// AVX2 and portable group dot products are plain loops the compiler vectorizes per target.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/bitplane_math.h"
#include "common/lowbit_cpu_dispatch.h"
#include "common/registry.h"

namespace {

using eqk::lowbit::PlaneRows;

// Weight rows decoded per block: 8 rows of K <= 16384 int8 fit in L2 beside the activations.
constexpr int64_t kRowBlock = 8;

template <typename X>
inline int32_t dot_group(const X* x, const int8_t* w, int64_t g) {
  int32_t acc = 0;
  for (int64_t k = 0; k < g; ++k) acc += int32_t(x[k]) * int32_t(w[k]);
  return acc;
}

template <typename X>
__attribute__((target("avx2"))) int32_t dot_group_avx2(const X* x, const int8_t* w, int64_t g) {
  int32_t acc = 0;
  for (int64_t k = 0; k < g; ++k) acc += int32_t(x[k]) * int32_t(w[k]);
  return acc;
}

// VNNI: vpdpbusd multiplies unsigned by signed bytes, so signed codes are shifted to
// x + 128 (a bit flip) and the caller's group row sum takes the 128 back out:
// sum x*w = sum (x + 128)*w - 128 * sum w. g is a multiple of 32: whole 256-bit loads.
template <typename X>
EQK_TARGET_AVX512 int32_t dot_group_avx512(const X* x, const int8_t* w, int64_t g,
                                           int32_t rowsum) {
  __m256i acc = _mm256_setzero_si256();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < g; k += 32) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
    if constexpr (std::is_signed_v<X>) xv = _mm256_xor_si256(xv, flip);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    acc = _mm256_dpbusd_epi32(acc, xv, wv);
  }
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  const __m128i s2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  const int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
  if constexpr (std::is_signed_v<X>) return total - 128 * rowsum;
  return total;
}

// The 8 rows of a block against one activation chunk: each x load feeds 8 vpdpbusd, and the
// 8 accumulators are reduced together (two hadd levels and one cross-lane add).
template <typename X>
EQK_TARGET_AVX512 void dot_rows8_avx512(const X* x, const int8_t* w, int64_t ldw, int64_t g,
                                        const int32_t* rowsum, int64_t rs_stride, int32_t* out) {
  __m256i acc[kRowBlock];
  for (int r = 0; r < kRowBlock; ++r) acc[r] = _mm256_setzero_si256();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < g; k += 32) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
    if constexpr (std::is_signed_v<X>) xv = _mm256_xor_si256(xv, flip);
    for (int r = 0; r < kRowBlock; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + k));
      acc[r] = _mm256_dpbusd_epi32(acc[r], xv, wv);
    }
  }
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]),
                                       _mm256_hadd_epi32(acc[2], acc[3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[4], acc[5]),
                                       _mm256_hadd_epi32(acc[6], acc[7]));
  __m256i total = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                                   _mm256_permute2x128_si256(u0, u1, 0x31));
  if constexpr (std::is_signed_v<X>) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i rs = _mm256_i32gather_epi32(
        rowsum, _mm256_mullo_epi32(idx, _mm256_set1_epi32(static_cast<int>(rs_stride))), 4);
    total = _mm256_sub_epi32(total, _mm256_slli_epi32(rs, 7));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), total);
}

// The float64 epilogue of 8 rows at once (one row per lane), with the scalar path's operation
// order: y += s * ((acc - z_a rowsum) + cz * xs) per group, j ascending, no fused multiply-add.
// Per-group terms are stored [j][row]. Bit-identical to the scalar loop. (The masked
// conversion with a zero merge source: GCC 12's unmasked form warns -Wmaybe-uninitialized.)
EQK_TARGET_AVX512 void epilogue8_avx512(const int32_t* accs, const double* sv, const double* czv,
                                        const double* rsv, const int32_t* xsum, int64_t G,
                                        int64_t g, double z_a, double* out) {
  __m512d y = _mm512_setzero_pd();
  const __m512d za = _mm512_set1_pd(z_a);
  for (int64_t j = 0; j < G; ++j) {
    const __m512d acc = _mm512_mask_cvtepi32_pd(_mm512_setzero_pd(), 0xFF,
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(accs + j * kRowBlock)));
    const __m512d xs = _mm512_set1_pd(double(xsum[j]) - double(g) * z_a);
    const __m512d part = _mm512_sub_pd(acc, _mm512_mul_pd(za, _mm512_loadu_pd(rsv + j * kRowBlock)));
    const __m512d total =
        _mm512_add_pd(part, _mm512_mul_pd(_mm512_loadu_pd(czv + j * kRowBlock), xs));
    y = _mm512_add_pd(y, _mm512_mul_pd(_mm512_loadu_pd(sv + j * kRowBlock), total));
  }
  _mm512_storeu_pd(out, y);
}

template <typename X>
inline int32_t dot_at(int level, const X* x, const int8_t* w, int64_t g, int32_t rowsum) {
  if (level >= 2) return dot_group_avx512(x, w, g, rowsum);
  if (level == 1) return dot_group_avx2(x, w, g);
  return dot_group(x, w, g);
}

// Weight rows: decoded from the planes a block at a time, or (`dec`, `dec_rows`) int8 [N, K]
// rows and their int32 [N, G] group sums decoded once at load (the op's cache).
struct GroupWeights {
  const PlaneRows& P;
  const int8_t* dec;
  const int32_t* dec_rows;
};

// The epilogue's per-group terms: s = s_a * fl32(scale * 2^(top_bits - bits)) (the power of
// two is exact in fp32, as in the torch reference's step) and cz = c - z_w, z_w per channel
// (zw_groups == 1), per group, or absent.
struct GroupEpilogue {
  const float* scale;
  float step_factor;
  double s_a, c;
  const float* zw;
  int64_t zw_groups;
  double z_a;
  double s(int64_t n, int64_t G, int64_t j) const {
    return s_a * double(scale[n * G + j] * step_factor);
  }
  double cz(int64_t n, int64_t G, int64_t j) const {
    if (zw == nullptr) return c;
    return c - double(zw[zw_groups == 1 ? n : n * G + j]);
  }
};

template <typename X>
void group_gemm(const X* x, int64_t M, int64_t K, int64_t g, const GroupWeights& gw, int level,
                const GroupEpilogue& e, double* out) {
  const double z_a = e.z_a;
  const PlaneRows& P = gw.P;
  const int64_t G = K / g, N = P.N;
  std::vector<int32_t> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < G; ++j) {
      int32_t s = 0;
      for (int64_t k = 0; k < g; ++k) s += int32_t(x[m * K + j * g + k]);
      xsum[m * G + j] = s;
    }
  const int64_t kp = 32 * P.W;
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int8_t> w(kRowBlock * kp);
    std::vector<int32_t> rows(kRowBlock * G), accs(kRowBlock * G);
    std::vector<double> sv(kRowBlock * G), czv(kRowBlock * G), rsv(kRowBlock * G);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowBlock, n1 = std::min(N, n0 + kRowBlock);
      const int8_t* wb = gw.dec ? gw.dec + n0 * K : w.data();
      const int64_t ldw = gw.dec ? K : kp;
      const int32_t* rb = gw.dec ? gw.dec_rows + n0 * G : rows.data();
      if (!gw.dec) {
        eqk::lowbit::decode_rows(level, P, n0, n1, K, w.data(), kp);
        for (int64_t r = 0; r < n1 - n0; ++r)
          for (int64_t j = 0; j < G; ++j) {
            int32_t s = 0;
            for (int64_t k = 0; k < g; ++k) s += w[r * kp + j * g + k];
            rows[r * G + j] = s;
          }
      }
      const int64_t rcount = n1 - n0;
      for (int64_t r = 0; r < rcount; ++r)
        for (int64_t j = 0; j < G; ++j) {
          sv[j * kRowBlock + r] = e.s(n0 + r, G, j);
          czv[j * kRowBlock + r] = e.cz(n0 + r, G, j);
          rsv[j * kRowBlock + r] = double(rb[r * G + j]);
        }
      for (int64_t m = 0; m < M; ++m) {
        const X* xr = x + m * K;
        for (int64_t j = 0; j < G; ++j) {
          if (level >= 2 && rcount == kRowBlock) {
            dot_rows8_avx512(xr + j * g, wb + j * g, ldw, g, rb + j, G, accs.data() + j * kRowBlock);
            continue;
          }
          for (int64_t r = 0; r < rcount; ++r)
            accs[j * kRowBlock + r] =
                dot_at(level, xr + j * g, wb + r * ldw + j * g, g, rb[r * G + j]);
        }
        if (level >= 2 && rcount == kRowBlock) {
          epilogue8_avx512(accs.data(), sv.data(), czv.data(), rsv.data(), xsum.data() + m * G,
                           G, g, z_a, out + m * N + n0);
          continue;
        }
        for (int64_t r = 0; r < rcount; ++r) {
          double y = 0.0;
          for (int64_t j = 0; j < G; ++j) {
            const double xs = double(xsum[m * G + j]) - double(g) * z_a;
            const double acc = double(accs[j * kRowBlock + r]);
            const int64_t t = j * kRowBlock + r;
            const double total = (acc - z_a * rsv[t]) + czv[t] * xs;
            y += sv[t] * total;
          }
          out[m * N + n0 + r] = y;
        }
      }
    }
  });
}

// float64 [M, N]: the per-group epilogue above on codes xq (int8 or uint8 [M, K]).
at::Tensor lowbit_linear_group_int_cpu(const at::Tensor& xq_in, const at::Tensor& planes,
                                       int64_t bits, int64_t group_size, const at::Tensor& scale,
                                       double step_factor, double s_a, double c,
                                       const std::optional<at::Tensor>& weight_zero_point,
                                       double z_a,
                                       const std::optional<at::Tensor>& decoded,
                                       const std::optional<at::Tensor>& group_rowsums,
                                       int64_t isa) {
  const char* fn = "lowbit_linear_group_int_cpu";
  TORCH_CHECK(xq_in.dim() == 2 &&
                  (xq_in.scalar_type() == at::kChar || xq_in.scalar_type() == at::kByte),
              fn, ": xq must be an int8 or uint8 [M, K] tensor");
  const at::Tensor xq = xq_in.contiguous();
  const int64_t M = xq.size(0), K = xq.size(1);
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              fn, ": planes must be a contiguous int32 [planes, N, W] tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && planes.size(0) >= bits, fn, ": bits must be in 1..",
              planes.size(0), ", got ", bits);
  TORCH_CHECK(planes.size(2) == eqk::words_per_row(K), fn, ": planes hold ", planes.size(2),
              " words per row, K=", K, " needs ", eqk::words_per_row(K));
  TORCH_CHECK(group_size >= 32 && group_size % 32 == 0 && K % group_size == 0, fn,
              ": group_size must be a multiple of 32 dividing K=", K, ", got ", group_size);
  const int64_t N = planes.size(1), G = K / group_size;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == N && scale.size(1) == G,
              fn, ": scale must be contiguous float32 [N=", N, ", G=", G, "]");
  GroupEpilogue e{scale.data_ptr<float>(), static_cast<float>(step_factor), s_a, c, nullptr, 1,
                  z_a};
  if (weight_zero_point.has_value()) {
    const at::Tensor& z = *weight_zero_point;
    TORCH_CHECK(z.scalar_type() == at::kFloat && z.is_contiguous() && z.size(0) == N &&
                    (z.dim() == 1 || (z.dim() == 2 && z.size(1) == G)),
                fn, ": weight_zero_point must be contiguous float32 [N] or [N, G]");
    e.zw = z.data_ptr<float>();
    e.zw_groups = z.dim() == 1 ? 1 : G;
  }
  const PlaneRows P{reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), N,
                    planes.size(2), static_cast<int>(bits)};
  TORCH_CHECK(decoded.has_value() == group_rowsums.has_value(), fn,
              ": decoded and group_rowsums go together");
  const int8_t* dec = nullptr;
  const int32_t* dec_rows = nullptr;
  if (decoded.has_value()) {
    TORCH_CHECK(decoded->scalar_type() == at::kChar && decoded->is_contiguous() &&
                    decoded->dim() == 2 && decoded->size(0) == N && decoded->size(1) == K,
                fn, ": decoded must be contiguous int8 [N, K]");
    TORCH_CHECK(group_rowsums->scalar_type() == at::kInt && group_rowsums->is_contiguous() &&
                    group_rowsums->dim() == 2 && group_rowsums->size(0) == N &&
                    group_rowsums->size(1) == G,
                fn, ": group_rowsums must be contiguous int32 [N, G]");
    dec = decoded->data_ptr<int8_t>();
    dec_rows = group_rowsums->data_ptr<int32_t>();
  }
  const GroupWeights gw{P, dec, dec_rows};
  const int level = eqk::lowbit::kernel_level(isa);
  auto out = at::empty({M, N}, xq.options().dtype(at::kDouble));
  if (xq.scalar_type() == at::kChar)
    group_gemm(xq.data_ptr<int8_t>(), M, K, group_size, gw, level, e, out.data_ptr<double>());
  else
    group_gemm(xq.data_ptr<uint8_t>(), M, K, group_size, gw, level, e, out.data_ptr<double>());
  return out;
}

}  // namespace

EQK_REGISTER(lowbit_group_int_cpu) {
  m.def("lowbit_linear_group_int_cpu", &lowbit_linear_group_int_cpu,
        "float64 per-group integer-activation linear from canonical planes (no bias)");
}
