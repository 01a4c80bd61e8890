// Integer low-bit GEMV / GEMM on tiled bit planes, decoded in registers with AVX-512 VBMI and
// GFNI (two instructions per 64 weights of a row, any width 1-8), multiplied with VNNI.
//
// Tiled planes (the kernel layout, DESIGN.md: "Kernels may repack each plane into a kernel
// layout at load time"): each of the first `bits` planes stays a separate array, MSB plane
// first, with its bits regrouped inside the plane so that one 64-byte load holds 8 rows x 64
// columns:
//   tiles[j][t][kb][r] = 64 bits of plane j, row 8t+r, columns 64kb .. 64kb+63
//                        (bit i = column 64kb+i; zero past K and for rows past N)
// as uint64 [bits][NT][KB][8], NT = ceil(N/8), KB = ceil(K/64). A call reads bits/8 bytes
// per weight, as the canonical planes would.
//
// Decoding row r of a tile for one 64-column block, from the plane registers Z_j:
//   1. vpermt2b gathers, for every group of 8 columns c8, one byte from each plane into the
//      qword c8: byte rr of it = byte (8r + c8) of plane p(rr), p(rr) = max(0, bits - 8 + rr),
//      i.e. bytes 7 .. 8-bits+1 hold planes bits-1 .. 1 and every lower byte the sign plane;
//   2. gf2p8affineqb with the constant operand 0x8040201008040201 per qword transposes that
//      8x8 bit matrix: output byte c = column 8c8 + c, bit jj = byte (7 - jj) bit c. So bit jj
//      is plane bits-1-jj for jj < bits-1 and the sign plane above: the two's complement byte
//      of q_b = floor(q / 2^(n - bits)), sign-extended.
// Widths above 2 combine plane pairs with zero-masked vpermt2b and OR.
//
// Activations enter as unsigned bytes u = code - off (dpbusd multiplies u8 by s8); the caller
// restores sum code * q_b = sum u * q_b + off * sum q_b. Every dpbusd lane adds 4 products of
// at most 255 * 128 per 64 columns, so the int32 lanes are exact for K < 2^20 (the caller
// checks); lanes are summed in int64.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "common/avx512_defined.h"

#define EQK_TARGET_GFNI                                                                     \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,gfni," \
                        "bmi2")))

namespace eqk::lowbit {

constexpr int64_t kTileRows = 8;        // rows per tile
constexpr int64_t kTileCols = 64;       // columns per block
constexpr int64_t kTiledMaxK = 1 << 20;  // int32 lanes exact below this K (see above)

struct TiledPlanes {
  const uint64_t* data;  // [bits][NT][KB][8]
  int64_t N, K, NT, KB;
  int bits;
  const uint64_t* block(int j, int64_t t, int64_t kb) const {
    return data + ((j * NT + t) * KB + kb) * kTileRows;
  }
};

// Index vectors and zero masks of the plane-pair permutes for row r (see step 1 above).
struct DecodeTable {
  __m512i idx[kTileRows][4];
  __mmask64 mask[4];
};

EQK_TARGET_GFNI inline void make_decode_table(int bits, DecodeTable& d) {
  for (int p = 0; p < 4; ++p) d.mask[p] = 0;
  for (int r = 0; r < kTileRows; ++r)
    for (int pair = 0; pair < 4; ++pair) {
      alignas(64) uint8_t id[64];
      for (int c8 = 0; c8 < 8; ++c8)
        for (int rr = 0; rr < 8; ++rr) {
          const int p = bits - 8 + rr < 0 ? 0 : bits - 8 + rr;
          const int pos = 8 * c8 + rr;
          id[pos] = static_cast<uint8_t>((p & 1 ? 64 : 0) + 8 * r + c8);
          if (r == 0 && p / 2 == pair) d.mask[pair] |= uint64_t(1) << pos;
        }
      d.idx[r][pair] = _mm512_load_si512(id);
    }
}

// The 64 signed weights of row r from the plane registers z[0 .. 2*ceil(BITS/2)).
template <int BITS>
EQK_TARGET_GFNI __attribute__((always_inline)) inline __m512i decode_row(const __m512i* z,
                                                                         const DecodeTable& d,
                                                                         int r) {
  constexpr int NP = (BITS + 1) / 2;
  const __m512i transpose = _mm512_set1_epi64(0x8040201008040201LL);
  __m512i a;
  if constexpr (NP == 1) {
    a = _mm512_permutex2var_epi8(z[0], d.idx[r][0], z[1]);
  } else {
    a = _mm512_maskz_permutex2var_epi8(d.mask[0], z[0], d.idx[r][0], z[1]);
#pragma GCC unroll 4
    for (int p = 1; p < NP; ++p)
      a = _mm512_or_si512(
          a, _mm512_maskz_permutex2var_epi8(d.mask[p], z[2 * p], d.idx[r][p], z[2 * p + 1]));
  }
  return _mm512_gf2p8affine_epi64_epi8(transpose, a, 0);
}

template <int BITS>
EQK_TARGET_GFNI __attribute__((always_inline)) inline void load_planes(const TiledPlanes& T,
                                                                       int64_t t, int64_t kb,
                                                                       __m512i* z) {
  constexpr int NP = (BITS + 1) / 2;
#pragma GCC unroll 8
  for (int j = 0; j < BITS; ++j) z[j] = _mm512_loadu_si512(T.block(j, t, kb));
  if constexpr (BITS < 2 * NP) z[BITS] = z[0];  // odd width: the unused table half
}

// acc += dpbusd(u8, s8) in place. GCC copies every accumulator of an array once per iteration
// when the intrinsic's result is assigned back (measured: the M=256 GEMM ran at a third of
// the VNNI rate); the asm pins the accumulator to one register.
EQK_TARGET_GFNI __attribute__((always_inline)) inline void dpbusd_into(__m512i& acc, __m512i u8,
                                                                       __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

// Sum of the 16 int32 lanes in int64.
EQK_TARGET_GFNI inline int64_t lanes_sum64(__m512i v) {
  return avx512::reduce_add_epi64(
      _mm512_add_epi64(avx512::cvtepi32_epi64(avx512::extract_lo256(v)),
                       avx512::cvtepi32_epi64(avx512::extract_hi256(v))));
}

// The kernels' accumulators are named variables, not arrays: GCC kept an array of __m512i on
// the stack here (a load and a store around every dpbusd).
#define EQK_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

// GEMV: out[8(t - t0) + r] = sum_k u[k] * q_b[8t + r, k] for tiles [t0, t1) (rows past N
// included). u: 64 * KB bytes.
template <int BITS>
EQK_TARGET_GFNI void gemv_tiled_t(const TiledPlanes& T, const uint8_t* u, int64_t t0, int64_t t1,
                                  int64_t* out) {
  DecodeTable d;
  make_decode_table(BITS, d);
  constexpr int NZ = 2 * ((BITS + 1) / 2);
  for (int64_t t = t0; t < t1; ++t) {
#define EQK_ZERO(r) __m512i a##r = _mm512_setzero_si512();
    EQK_ROWS(EQK_ZERO)
#undef EQK_ZERO
    for (int64_t kb = 0; kb < T.KB; ++kb) {
      __m512i z[NZ];
      load_planes<BITS>(T, t, kb, z);
      const __m512i xv = _mm512_loadu_si512(u + kTileCols * kb);
#define EQK_ROW(r) dpbusd_into(a##r, xv, decode_row<BITS>(z, d, r));
      EQK_ROWS(EQK_ROW)
#undef EQK_ROW
    }
    int64_t* o = out + kTileRows * (t - t0);
#define EQK_OUT(r) o[r] = lanes_sum64(a##r);
    EQK_ROWS(EQK_OUT)
#undef EQK_OUT
  }
}

// ------------------------------------------------------------------------------------------
// GEMM (M >= 2): per tile, the weights of a chunk of kChunkBlocks blocks are decoded once into
// an L1 buffer of int8 rows, then an inner-product register kernel runs over all M rows: MR
// activation rows x 8 weight rows of int32 lane accumulators, reduced at the chunk's end
// (exact: a chunk's products sum to below 2^31) and added to int64 totals.

constexpr int64_t kChunkBlocks = 32;  // 2048 columns: 16 KiB of decoded weights per tile

// Four accumulators -> their four lane sums (int32; exact within a chunk).
EQK_TARGET_GFNI inline __m128i reduce4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  using namespace avx512;
  const __m512i s01 = _mm512_add_epi32(unpacklo_epi32(a0, a1), unpackhi_epi32(a0, a1));
  const __m512i s23 = _mm512_add_epi32(unpacklo_epi32(a2, a3), unpackhi_epi32(a2, a3));
  const __m512i s = _mm512_add_epi32(unpacklo_epi64(s01, s23), unpackhi_epi64(s01, s23));
  const __m256i h = _mm256_add_epi32(extract_lo256(s), extract_hi256(s));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// acc[m][r] += sum over nblk blocks of u[m] * w[r]; u rows ldu bytes apart, w: 8 decoded rows
// of kLdw bytes. MR = 1 or 2 activation rows (16 accumulators + 2 + 1 operands in registers).
EQK_TARGET_GFNI inline void add_sums(__m512i a0, __m512i a1, __m512i a2, __m512i a3, __m512i a4,
                                     __m512i a5, __m512i a6, __m512i a7, int64_t* acc) {
  alignas(16) int32_t s[kTileRows];
  _mm_store_si128(reinterpret_cast<__m128i*>(s), reduce4(a0, a1, a2, a3));
  _mm_store_si128(reinterpret_cast<__m128i*>(s + 4), reduce4(a4, a5, a6, a7));
  for (int r = 0; r < kTileRows; ++r) acc[r] += s[r];
}

// One 64-column block of the MR = 2 kernel as a single asm statement: GCC, given the same
// work as intrinsics (or as one-instruction asm), shuffled the 16 accumulators between
// registers with a vector move per two dpbusd, which the two VNNI ports then also had to
// execute. Weight rows are kLdw bytes apart.
constexpr int64_t kLdw = kTileCols * 32;  // == kTileCols * kChunkBlocks (checked below)

#define EQK_DP2(r)                                                                \
  "vmovdqu64 " #r "*2048(%[w]), %[tw]\n\t"                                         \
  "vpdpbusd %[tw], %[x0], %[a" #r "]\n\t"                                          \
  "vpdpbusd %[tw], %[x1], %[b" #r "]\n\t"

template <int MR>
EQK_TARGET_GFNI inline void inner_kernel(const uint8_t* u, int64_t ldu, const int8_t* w,
                                         int64_t nblk, int64_t* acc) {
  static_assert(MR == 1 || MR == 2);
#define EQK_ZERO(r) __m512i a##r = _mm512_setzero_si512(), b##r = _mm512_setzero_si512();
  EQK_ROWS(EQK_ZERO)
#undef EQK_ZERO
  for (int64_t kb = 0; kb < nblk; ++kb) {
    const int8_t* wb = w + kTileCols * kb;
    if constexpr (MR == 2) {
      const __m512i x0 = _mm512_loadu_si512(u + kTileCols * kb);
      const __m512i x1 = _mm512_loadu_si512(u + ldu + kTileCols * kb);
      __m512i tw;
      // Two statements of four rows ("+" operands count twice against GCC's limit of 30).
      asm(EQK_DP2(0) EQK_DP2(1) EQK_DP2(2) EQK_DP2(3)
          : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3), [b0] "+v"(b0),
            [b1] "+v"(b1), [b2] "+v"(b2), [b3] "+v"(b3), [tw] "=&v"(tw)
          : [x0] "v"(x0), [x1] "v"(x1), [w] "r"(wb)
          : "memory");
      asm(EQK_DP2(4) EQK_DP2(5) EQK_DP2(6) EQK_DP2(7)
          : [a4] "+v"(a4), [a5] "+v"(a5), [a6] "+v"(a6), [a7] "+v"(a7), [b4] "+v"(b4),
            [b5] "+v"(b5), [b6] "+v"(b6), [b7] "+v"(b7), [tw] "=&v"(tw)
          : [x0] "v"(x0), [x1] "v"(x1), [w] "r"(wb)
          : "memory");
    } else {
      const __m512i x0 = _mm512_loadu_si512(u + kTileCols * kb);
#define EQK_ROW(r) dpbusd_into(a##r, x0, _mm512_loadu_si512(wb + r * kLdw));
      EQK_ROWS(EQK_ROW)
#undef EQK_ROW
    }
  }
  add_sums(a0, a1, a2, a3, a4, a5, a6, a7, acc);
  if constexpr (MR == 2) add_sums(b0, b1, b2, b3, b4, b5, b6, b7, acc + kTileRows);
}
#undef EQK_DP2

// acc[m][r] (int64 [M][8]) += sum_k u[m, k] * q_b[8t + r, k] over the columns of blocks
// [kb0, kb0 + nblk) of tile t (nblk <= kChunkBlocks). buf: 8 * 64 * kChunkBlocks bytes.
template <int BITS>
EQK_TARGET_GFNI void gemm_tile_chunk_t(const TiledPlanes& T, const DecodeTable& d, int64_t t,
                                       int64_t kb0, int64_t nblk, const uint8_t* u, int64_t ldu,
                                       int64_t M, int8_t* buf, int64_t* acc) {
  constexpr int NZ = 2 * ((BITS + 1) / 2);
  constexpr int64_t ldw = kTileCols * kChunkBlocks;
  static_assert(ldw == kLdw, "the asm kernel's row stride");
  for (int64_t i = 0; i < nblk; ++i) {
    __m512i z[NZ];
    load_planes<BITS>(T, t, kb0 + i, z);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r)
      _mm512_storeu_si512(buf + r * ldw + kTileCols * i, decode_row<BITS>(z, d, r));
  }
  const uint8_t* uc = u + kTileCols * kb0;
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) inner_kernel<2>(uc + m * ldu, ldu, buf, nblk, acc + m * kTileRows);
  if (m < M) inner_kernel<1>(uc + m * ldu, ldu, buf, nblk, acc + m * kTileRows);
}

// Tiles [t0, t1) in groups of `group` tiles; within a group the column chunks are the outer
// loop, so the activations' chunk (M x 2048 bytes) stays in L2 while every tile of the group
// uses it (tile-outer order streamed all M x K activation bytes from L3 once per tile and ran
// at half the VNNI rate for M = 256). acc: group * M * 8 int64 of scratch; after a group,
// sink(t, int64 [M][8]) receives each tile's sums.
template <int BITS, class Sink>
EQK_TARGET_GFNI void gemm_tiled_t(const TiledPlanes& T, const uint8_t* u, int64_t ldu, int64_t M,
                                  int64_t t0, int64_t t1, int64_t group, int8_t* buf,
                                  int64_t* acc, Sink& sink) {
  DecodeTable d;
  make_decode_table(BITS, d);
  const int64_t per_tile = M * kTileRows;
  for (int64_t g0 = t0; g0 < t1; g0 += group) {
    const int64_t g1 = g0 + group < t1 ? g0 + group : t1;
    std::memset(acc, 0, sizeof(int64_t) * per_tile * (g1 - g0));
    for (int64_t kb0 = 0; kb0 < T.KB; kb0 += kChunkBlocks) {
      const int64_t nblk = T.KB - kb0 < kChunkBlocks ? T.KB - kb0 : kChunkBlocks;
      for (int64_t t = g0; t < g1; ++t)
        gemm_tile_chunk_t<BITS>(T, d, t, kb0, nblk, u, ldu, M, buf, acc + (t - g0) * per_tile);
    }
    for (int64_t t = g0; t < g1; ++t) sink(t, static_cast<const int64_t*>(acc + (t - g0) * per_tile));
  }
}

#define EQK_TILED_SWITCH(bits, CALL) \
  switch (bits) {                    \
    case 1: CALL(1); break;          \
    case 2: CALL(2); break;          \
    case 3: CALL(3); break;          \
    case 4: CALL(4); break;          \
    case 5: CALL(5); break;          \
    case 6: CALL(6); break;          \
    case 7: CALL(7); break;          \
    default: CALL(8); break;         \
  }

// out[8(t - t0) + r] for tiles [t0, t1); see gemv_tiled_t.
inline void gemv_tiled(const TiledPlanes& T, const uint8_t* u, int64_t t0, int64_t t1,
                       int64_t* out) {
#define EQK_CALL(B) gemv_tiled_t<B>(T, u, t0, t1, out)
  EQK_TILED_SWITCH(T.bits, EQK_CALL)
#undef EQK_CALL
}

// All M rows of tiles [t0, t1), handed to sink(t, int64 [M][8]) tile by tile (see
// gemm_tiled_t); buf: 8 * 64 * kChunkBlocks bytes, acc: group * 8 * M int64 of scratch.
template <class Sink>
void gemm_tiled(const TiledPlanes& T, const uint8_t* u, int64_t ldu, int64_t M, int64_t t0,
                int64_t t1, int64_t group, int8_t* buf, int64_t* acc, Sink& sink) {
#define EQK_CALL(B) gemm_tiled_t<B>(T, u, ldu, M, t0, t1, group, buf, acc, sink)
  EQK_TILED_SWITCH(T.bits, EQK_CALL)
#undef EQK_CALL
}

#undef EQK_TILED_SWITCH
#undef EQK_ROWS

}  // namespace eqk::lowbit
