// Float-activation low-bit GEMM on canonical bit planes: the interface between the driver
// (csrc/lowbit_gemm/lowbit_float_cpu.cpp: checks, blocking, threads) and the per-ISA kernels
// (lowbit_float_{portable,avx2,avx512}_cpu.cpp, each compiled with its own target attributes).
//
// y[m, n] = sum_k x[m, k] * w[n, k] with w[n, k] = (q_b[n, k] + cz[n, g]) * s[n, g], g = k / gs:
// cz = c - z_w (compensation minus weight zero point) and s the step of width b, per output row
// and group of gs consecutive columns (G = 1 group spanning the row for per-channel scales).
// (q + cz) is exact in fp32, so w is the reference's fl32((q + c - z) * s) bit for bit.
//
// Work is done on panels: `nb` plane rows x `kc` columns decoded into a cache-resident buffer
// and reused by every activation row of the block; a whole decoded weight never exists.
#pragma once
#include <cstdint>

namespace eqk::lowbit_float {

struct Weights {
  const uint32_t* planes;  // int32 [>= bits, N, W] canonical planes, plane j row n at (j N + n) W
  int64_t N, W;
  int bits;
  const float* scale;  // [N, G]
  const float* cz;     // [N, G]
  int64_t G, gs;       // groups per row and columns per group (gs a multiple of 32)
  bool gfni_decode;    // AVX-512 decode with VBMI + GFNI (the driver checks the CPU)
  const uint32_t* row(int j, int64_t n) const { return planes + ((int64_t)j * N + n) * W; }
  // The group of column k; the zero padding columns past K belong to the last group.
  int64_t group(int64_t k) const {
    const int64_t g = k / gs;
    return g < G ? g : G - 1;
  }
  // End (panel-relative, exclusive) of group g's columns inside the panel [k0, k0 + kc).
  int64_t group_end(int64_t g, int64_t k0, int64_t kc) const {
    const int64_t e = g == G - 1 ? k0 + kc : (g + 1) * gs;
    return (e < k0 + kc ? e : k0 + kc) - k0;
  }
};

// Signed code of the raw plane pattern `idx` (plane 0 at bit bits-1): two's complement.
inline int code_of_pattern(int idx, int bits) { return idx - ((idx >> (bits - 1)) << bits); }

// panel[r * kc + i] = w[n0 + r, k0 + i] (fp32, scaled) for r < nb, i < kc; k0, kc multiples of 32.
void decode_panel_f32_portable(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                               float* panel);
void decode_panel_f32_avx2(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                           float* panel);
void decode_panel_f32_avx512(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                             float* panel);

// out[m * ldo + n] += sum_{i < kc} x[m * ldx + i] * panel[n * kc + i], m < mb, n < nb.
void panel_gemm_f32_portable(const float* x, int64_t ldx, int64_t mb, const float* panel,
                             int64_t nb, int64_t kc, float* out, int64_t ldo);
void panel_gemm_f32_avx2(const float* x, int64_t ldx, int64_t mb, const float* panel, int64_t nb,
                         int64_t kc, float* out, int64_t ldo);
void panel_gemm_f32_avx512(const float* x, int64_t ldx, int64_t mb, const float* panel,
                           int64_t nb, int64_t kc, float* out, int64_t ldo);

// Up to 4 activation rows, b <= 4, GFNI decode: weights decoded in registers and multiplied
// at once, out[m * ldo + n] = sum over the whole row for n in [n0, n1). False when not
// applicable (the caller then uses panels).
bool gemv_regs_avx512(const Weights& w, const float* x, int64_t ldx, int64_t M, int64_t n0,
                      int64_t n1, float* out, int64_t ldo);

// bf16 activations (AVX512_BF16): the panel holds the unscaled (q + cz) as bf16 (exact when
// |q + cz| needs at most 8 significant bits, which holds for every nested width and for
// integer zero points), products accumulate per group in fp32 with vdpbf16ps and each group's
// sum is scaled by s[n, g] in an fp32 FMA. panel[r * kc + i] as for fp32, in bf16 bits.
void decode_panel_bf16_avx512bf16(const Weights& w, int64_t n0, int64_t nb, int64_t k0,
                                  int64_t kc, uint16_t* panel);
// out[m * ldo + n] += sum_g s[n0 + n, g] sum_{i in g} x[m, i] panel[n, i]; groups of gs_kc
// columns (kc a multiple of gs_kc) starting at group g0 of `w`.
void panel_gemm_bf16_avx512bf16(const uint16_t* x, int64_t ldx, int64_t mb, const uint16_t* panel,
                                int64_t nb, int64_t kc, const Weights& w, int64_t n0, int64_t g0,
                                int64_t gs_kc, float* out, int64_t ldo);

// Outer-product panels (AVX-512, lowbit_float_outer_avx512_cpu.cpp): kOuterNb output rows with
// the output index fastest. pack: panel[c * kOuterNb + r] = rows[r * cols + c] for r < 16 and
// 32-bit elements (an fp32 weight, or the bf16 pair of columns 2c, 2c + 1), cols a multiple
// of 16.
constexpr int64_t kOuterNb = 32;
void pack_outer_avx512(const uint32_t* rows, int64_t cols, uint32_t* panel);
// out[m * ldo + r] += sum_{k < kc} x[m * ldx + k] * panel[k * kOuterNb + r], m < mb, r < nb.
void panel_outer_f32_avx512(const float* x, int64_t ldx, int64_t mb, const float* panel,
                            int64_t kc, int64_t nb, float* out, int64_t ldo);
// out[m * ldo + r] += sum_g sT[g * kOuterNb + r] sum_{k in g} x[m, k] w[r, k], groups of gs_kc
// columns (kc a multiple of gs_kc), w the bf16 pairs panel[(k / 2) * kOuterNb + r].
void panel_outer_bf16_avx512bf16(const uint16_t* x, int64_t ldx, int64_t mb,
                                 const uint32_t* panel, int64_t kc, const float* sT,
                                 int64_t gs_kc, int64_t nb, float* out, int64_t ldo);

// bf16 activations, b <= 4, AVX512_BF16 + VBMI + GFNI (common/lowbit_float_codes.h): the
// integer codes decoded to bf16 with one constant table and multiplied with vdpbf16ps,
//   y[m, n] = sum_g s[n, g] sum_{k in g} q x[m, k] + sum_g s[n, g] cz[n, g] xsum[m, g].
// An infinite activation meets code 0 as inf * 0 = NaN where the weight (0 + cz) s is nonzero
// (lowbit_linear sends non-finite inputs to the dequantized torch path, docs/numerics.md).
// permute_x_codes: xp [M, kpad] the activations x [M, K] in the decoder's column order (inner:
// the register kernel's, outer: the outer panels' pair order), zero past K (kpad a multiple of
// kCodesBlock), and xsum [M, G] their fp32 per-group sums.
constexpr int64_t kCodesBlock = 128;
void permute_x_codes(const uint16_t* x, int64_t M, int64_t K, const Weights& w, int64_t kpad,
                     bool outer, uint16_t* xp, float* xsum);
// Register kernel (lowbit_float_codes_bf16_avx512_cpu.cpp), inner order: out[m * ldo + n] =
// y[m, n] for n in [n0, n1), all M rows.
void rows_codes_bf16(const Weights& w, const uint16_t* xp, const float* xsum, int64_t M,
                     int64_t kpad, int64_t n0, int64_t n1, float* out, int64_t ldo);
// Outer panels of codes (lowbit_float_codes_outer_avx512_cpu.cpp): panel[(i / 2) * kOuterNb
// + r] = the bf16 code pair of row n0 + r at outer-order columns k0 + i, i + 1 (zero for r >=
// nb), for the panel_outer_bf16_avx512bf16 microkernel; k0, kc multiples of kCodesBlock.
void decode_outer_codes(const Weights& w, int64_t n0, int64_t nb, int64_t k0, int64_t kc,
                        uint32_t* panel);
// sT[g * kOuterNb + r] = s[n0 + r, g0 + g] and sczT = s cz there for g < ng (zero for r >= nb
// or g >= ng_real), the scales of an outer panel's rows and groups.
void outer_code_scales(const Weights& w, int64_t n0, int64_t nb, int64_t g0, int64_t ng,
                       int64_t ng_real, float* sT, float* sczT);
// The (c - z) term of an outer panel: out[m * ldo + r] += sum_{g < ngroups} xsum[m * ldxs + g]
// * sczT[g * kOuterNb + r] for r < nb, m < M (sczT = s cz of the panel's rows and groups).
void add_outer_correction(const float* xsum, int64_t ldxs, int64_t M, const float* sczT,
                          int64_t ngroups, int64_t nb, float* out, int64_t ldo);

}  // namespace eqk::lowbit_float
