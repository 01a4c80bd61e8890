// Arithmetic and per-thread work of the CUDA bit-plane kernels (pack, unpack, dp4a GEMM), as
// __host__ __device__ functions. The CUDA kernels in csrc/bitplanes/ and csrc/lowbit_gemm/ are
// thin loops over these functions; csrc/bitplanes/bitplanes_emulation_cpu.cpp runs the very
// same functions on the host, thread by thread and barrier phase by barrier phase, so the CPU
// tests (tests/test_cuda_shared_math.py) exercise the arithmetic the GPU would run.
//
// Canonical layout (DESIGN.md "Bit planes and the low-bit GEMM"): planes int32[n, N, W],
// W = ceil(K/32), plane 0 = sign plane, bit t of word j = column 32j + t. The first `bits`
// planes decode to q_b = -2^(b-1) P_0 + sum_{j=1}^{b-1} 2^(b-1-j) P_j.
//
// Activations enter the GEMM as "activation words": the codes xq[m, :] zero-padded to W*32
// bytes and read as uint32 words of 4 codes (byte i = column 4w+i, little-endian), so a padded
// row has W*8 words. The zero padding makes the (zero) padding bits of the planes irrelevant.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/bitplane_math.h"

// Full unrolling on the device keeps the per-plane arrays in registers (a runtime-bounded loop
// over a local array would put it in local memory); the host compiler decides for itself.
#if defined(__CUDA_ARCH__)
#define EQK_UNROLL _Pragma("unroll")
#else
#define EQK_UNROLL
#endif

namespace eqk {

constexpr int kMaxPlanes = 8;  // widths 1..8 decode to int8 codes

// ------------------------------------------------------------------------------------------
// Decode: plane words -> packed int8x4 words.

// Bit i (i < 4) of `nibble` moved to bit 0 of byte i. The four shifted copies of the nibble
// (<<0, <<7, <<14, <<21) do not overlap, so the multiply has no carries.
EQK_HD uint32_t spread_nibble(uint32_t nibble) { return (nibble * 0x00204081u) & 0x01010101u; }

// Codes of columns 4g..4g+3 of a 32-column word as an int8x4 word, from the `bits` plane words
// w[0..bits-1] of that word (MSB first). Each byte is built independently: plane j (j >= 1)
// contributes its bit at position bits-1-j (< 8, so no byte overflows), and the sign plane
// contributes -2^(bits-1) as the 8-bit two's-complement pattern 0xFF << (bits-1) (which also
// sign-extends the code to 8 bits). Multiplying the 0/1 bytes by that pattern (<= 0xFF) cannot
// carry between bytes.
EQK_HD uint32_t decode_group4(const uint32_t* w, int bits, int g) {
  const int shift = 4 * g;
  const uint32_t sign_pattern = (0xFFu << (bits - 1)) & 0xFFu;
  uint32_t out = spread_nibble((w[0] >> shift) & 0xFu) * sign_pattern;
  EQK_UNROLL
  for (int j = 1; j < kMaxPlanes; ++j) {
    if (j < bits) out |= spread_nibble((w[j] >> shift) & 0xFu) << (bits - 1 - j);
  }
  return out;
}

// All 32 codes of one plane word position as 8 int8x4 words.
EQK_HD void decode_word32(const uint32_t* w, int bits, uint32_t out[8]) {
  EQK_UNROLL
  for (int g = 0; g < 8; ++g) out[g] = decode_group4(w, bits, g);
}

// The `bits` plane words of word `index` (= n*W + word) of the canonical layout.
EQK_HD void load_plane_words(const uint32_t* planes, int64_t plane_stride, int64_t index,
                             int bits, uint32_t w[kMaxPlanes]) {
  EQK_UNROLL
  for (int j = 0; j < kMaxPlanes; ++j) {
    w[j] = j < bits ? planes[j * plane_stride + index] : 0u;
  }
}

// ------------------------------------------------------------------------------------------
// Pack: codes -> plane words. On the GPU lane t of a warp holds column 32*word + t and plane p's
// word is __ballot_sync of code_plane_bit over the warp; the host emulation ORs the same bits.

// Code of column 32*word + lane of a row of K codes (0 past the end: padding bits are zero).
EQK_HD int pack_lane_code(const int8_t* row, int64_t K, int64_t word, int lane) {
  const int64_t k = word * 32 + lane;
  return k < K ? static_cast<int>(row[k]) : 0;
}

// Bit of plane p (0 = sign) of a b-bit code: bit (bits-1-p) of its two's complement.
EQK_HD uint32_t code_plane_bit(int code, int bits, int p) {
  return (static_cast<uint32_t>(code) >> (bits - 1 - p)) & 1u;
}

// ------------------------------------------------------------------------------------------
// Unpack: one thread decodes one plane word position (32 codes) of row n.

EQK_HD void store_u32(void* p, uint32_t v) {
#if defined(__CUDA_ARCH__)
  *static_cast<uint32_t*>(p) = v;  // callers guarantee 4-byte alignment
#else
  std::memcpy(p, &v, 4);
#endif
}

EQK_HD uint32_t load_u32(const void* p) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}

// out_row: int8[K] of row n. `aligned` = every row start is 4-byte aligned (K % 4 == 0 and the
// buffer is aligned), which allows whole-word stores.
EQK_HD void unpack_word_thread(const uint32_t* planes, int64_t plane_stride, int W, int64_t n,
                               int64_t word, int bits, int64_t K, bool aligned, int8_t* out_row) {
  uint32_t w[kMaxPlanes];
  uint32_t codes[8];
  load_plane_words(planes, plane_stride, n * W + word, bits, w);
  decode_word32(w, bits, codes);
  const int64_t k0 = word * 32;
  if (aligned && k0 + 32 <= K) {
    for (int g = 0; g < 8; ++g) store_u32(out_row + k0 + 4 * g, codes[g]);
    return;
  }
  EQK_UNROLL
  for (int g = 0; g < 8; ++g) {
    for (int i = 0; i < 4; ++i) {
      const int64_t k = k0 + 4 * g + i;
      if (k < K) out_row[k] = static_cast<int8_t>((codes[g] >> (8 * i)) & 0xFFu);
    }
  }
}

// ------------------------------------------------------------------------------------------
// dp4a dot products of activation words with decoded weight words.

template <bool XUnsigned>
EQK_HD int dp4a_x(uint32_t x, uint32_t w, int acc) {
  if constexpr (XUnsigned) {
    return dp4a_us(x, w, acc);
  } else {
    return dp4a_ss(x, w, acc);
  }
}

struct GemmArgs {
  const uint32_t* x_words;  // [M, x_row_words] padded activation words
  int64_t x_row_words;      // W * 8
  const uint32_t* planes;   // canonical planes, first `bits` used
  int64_t plane_stride;     // N * W
  int32_t* out;             // [M, N] raw accumulators sum_k xq * q_b
  int64_t M;
  int64_t N;
  int W;
  int bits;
};

// ---- GEMV path (small M): one warp per weight row n; lane l takes words l, l+32, ...; the
// lane partials are summed (a shuffle tree on the GPU; integer sums, so any order is exact).
constexpr int kGemvMaxM = 8;
constexpr int kGemvWarpsPerBlock = 8;

EQK_HD bool use_gemv_path(int64_t M) { return M <= kGemvMaxM; }

template <bool XUnsigned>
EQK_HD void gemv_lane_partial(const GemmArgs& a, int64_t n, int lane, int acc[kGemvMaxM]) {
  EQK_UNROLL
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0;
  uint32_t w[kMaxPlanes];
  uint32_t codes[8];
  for (int64_t word = lane; word < a.W; word += 32) {
    load_plane_words(a.planes, a.plane_stride, n * a.W + word, a.bits, w);
    decode_word32(w, a.bits, codes);
    EQK_UNROLL
    for (int m = 0; m < kGemvMaxM; ++m) {
      if (m >= a.M) break;
      const uint32_t* xw = a.x_words + m * a.x_row_words + word * 8;
      int s = acc[m];
      for (int g = 0; g < 8; ++g) s = dp4a_x<XUnsigned>(xw[g], codes[g], s);
      acc[m] = s;
    }
  }
}

// ---- Tiled path: a block of kTileThreads threads computes out[m0:m0+kTileM, n0:n0+kTileN]. Per
// K step of kChunkWords plane words (128 columns) it stages activation words and decoded weight
// words in shared memory (phase 1, then a barrier), and every thread accumulates a
// kMicro x kMicro micro-tile with dp4a (phase 2, then a barrier).
constexpr int kTileM = 32;
constexpr int kTileN = 64;
constexpr int kChunkWords = 4;
constexpr int kTileThreads = 128;
constexpr int kMicro = 4;                       // kTileM * kTileN = kTileThreads * kMicro^2
constexpr int kStageWords = kChunkWords * 8;    // int8x4 words per tile row per K step
constexpr int kStagePitch = kStageWords + 1;    // +1: rows land in different shared banks
constexpr int kThreadsAlongN = kTileN / kMicro;  // 16

static_assert(kTileM * kTileN == kTileThreads * kMicro * kMicro, "tile/thread mismatch");
static_assert(kTileThreads / kThreadsAlongN * kMicro == kTileM, "micro-tile layout");

struct TileStage {
  uint32_t x[kTileM][kStagePitch];
  uint32_t w[kTileN][kStagePitch];
};

// Phase 1 (thread tid of kTileThreads): stage the activation words and the decoded weights of
// K step `word0` (plane word index of the step's first word). Out-of-range rows/words are 0.
EQK_HD void tile_stage_thread(const GemmArgs& a, int64_t m0, int64_t n0, int64_t word0, int tid,
                              TileStage& s) {
  for (int i = tid; i < kTileM * kStageWords; i += kTileThreads) {
    const int r = i / kStageWords;
    const int c = i % kStageWords;
    const int64_t m = m0 + r;
    const int64_t xw = word0 * 8 + c;
    s.x[r][c] = (m < a.M && xw < a.x_row_words) ? a.x_words[m * a.x_row_words + xw] : 0u;
  }
  uint32_t w[kMaxPlanes];
  uint32_t codes[8];
  for (int i = tid; i < kTileN * kChunkWords; i += kTileThreads) {
    const int r = i / kChunkWords;
    const int cw = i % kChunkWords;
    const int64_t n = n0 + r;
    const int64_t word = word0 + cw;
    if (n < a.N && word < a.W) {
      load_plane_words(a.planes, a.plane_stride, n * a.W + word, a.bits, w);
      decode_word32(w, a.bits, codes);
    } else {
      for (int g = 0; g < 8; ++g) codes[g] = 0u;
    }
    for (int g = 0; g < 8; ++g) s.w[r][cw * 8 + g] = codes[g];
  }
}

// Rows of the micro-tile of thread tid: m = tm + i*(kTileM/kMicro), n = tn + j*kThreadsAlongN,
// interleaved so that a warp reads 16 distinct weight rows (different banks) and 2 activation
// rows (broadcast) per step.
EQK_HD int tile_tm(int tid) { return tid / kThreadsAlongN; }
EQK_HD int tile_tn(int tid) { return tid % kThreadsAlongN; }
constexpr int kTileRowStrideM = kTileM / kMicro;

// Phase 2: accumulate this thread's micro-tile over the staged K step.
template <bool XUnsigned>
EQK_HD void tile_accumulate_thread(const TileStage& s, int tid, int acc[kMicro][kMicro]) {
  const int tm = tile_tm(tid);
  const int tn = tile_tn(tid);
  for (int c = 0; c < kStageWords; ++c) {
    uint32_t xv[kMicro];
    uint32_t wv[kMicro];
    for (int i = 0; i < kMicro; ++i) xv[i] = s.x[tm + i * kTileRowStrideM][c];
    for (int j = 0; j < kMicro; ++j) wv[j] = s.w[tn + j * kThreadsAlongN][c];
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) acc[i][j] = dp4a_x<XUnsigned>(xv[i], wv[j], acc[i][j]);
  }
}

// Final phase: write the micro-tile (bounds-checked).
EQK_HD void tile_store_thread(const GemmArgs& a, int64_t m0, int64_t n0, int tid,
                              const int acc[kMicro][kMicro]) {
  const int tm = tile_tm(tid);
  const int tn = tile_tn(tid);
  for (int i = 0; i < kMicro; ++i) {
    const int64_t m = m0 + tm + i * kTileRowStrideM;
    if (m >= a.M) continue;
    for (int j = 0; j < kMicro; ++j) {
      const int64_t n = n0 + tn + j * kThreadsAlongN;
      if (n < a.N) a.out[m * a.N + n] = acc[i][j];
    }
  }
}

}  // namespace eqk
