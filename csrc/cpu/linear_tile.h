// The register tile of the CPU skinny matrix product (linear.cpp): Rows x rows against Cols weight rows, each output
// one vector of partial sums in registers, summed pairwise across its lanes in a fixed order, per instruction set
// (AVX-512, AVX2, baseline, and AVX512-BF16's VDPBF16PS). linear.cpp splits a product into these tiles over rows,
// weight panels and threads; everything that decides an output's bits is here, the same for every tile position.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernel_utils.h"

#if FASTBON_X86_DISPATCH
#include <immintrin.h>
#endif

// A namespace of its own: linear.cpp's tile sizes (kRowBlock, ...) are other numbers than the attention's.
namespace fastbon::cpu::skinny {

constexpr int kRowBlock = 4;  // x rows per tile
// Weight rows per tile: 4 x 5 accumulators + 5 weight vectors + an x vector in AVX-512's 32 registers, 4 x 3 + 3 + 1
// in AVX2's 16. (4 x 6 left GCC one spare register: with the prefetch pointer added, it spilled and folded weight
// loads into the FMAs in some instantiations; 4 x 5 runs the fp32 products of a 32-row decode step at 183-209
// GFLOP/s on an AVX-512 EPYC whose large fp32 GEMM runs at 190.)
constexpr int tile_columns(int lanes) { return lanes == 16 ? 5 : 3; }
constexpr int kMostTileColumns = 5;
// Weight rows per block, the unit that threads and panels split the weights by: a multiple of every tile width, so
// only the last range of a product ends in a narrower tile.
constexpr int kColBlock = tile_columns(16) * tile_columns(8);
static_assert(kColBlock % tile_columns(4) == 0, "a block holds whole tiles of every instruction set");
// How far ahead of the tile each weight row is prefetched, in tiles, into L2 (locality 1: PREFETCHT1). The hardware
// prefetcher alone left the [4, 512] x [512, 32000] product at 9 GB/s of weights on an AVX2 EPYC; prefetching two
// tiles ahead brought it to 15 GB/s (a plain sum of the same bytes read 18 GB/s). On an AVX-512 EPYC, prefetching
// into L2 instead of L1 (PREFETCHNTA) took it from 21 to 30-37 GB/s, and 16 rows from 12 to 14-15 GB/s: L2 keeps
// more misses in flight. Prefetches never fault, so reading past the last row is harmless.
constexpr int64_t kPrefetchTiles = 2;
constexpr int64_t kLineBytes = 64;  // a cache line; every tile step reads 64 bytes of each weight row


template <int Lanes>
struct LaneVector;  // GCC vector-extension types of Lanes floats and of Lanes lane indices
template <>
struct LaneVector<16> {
  typedef float Vec __attribute__((vector_size(64)));
  typedef float Unaligned __attribute__((vector_size(64), aligned(4), may_alias));
  typedef int32_t Index __attribute__((vector_size(64)));
};
template <>
struct LaneVector<8> {
  typedef float Vec __attribute__((vector_size(32)));
  typedef float Unaligned __attribute__((vector_size(32), aligned(4), may_alias));
  typedef int32_t Index __attribute__((vector_size(32)));
};
template <>
struct LaneVector<4> {
  typedef float Vec __attribute__((vector_size(16)));
  typedef float Unaligned __attribute__((vector_size(16), aligned(4), may_alias));
  typedef int32_t Index __attribute__((vector_size(16)));
};

// Each accumulator's lanes summed pairwise in a fixed order: lanes[l] += lanes[l + half] for half = Lanes/2 .. 1, then
// lanes[0]. Lanes accumulators are summed together, as a transpose: each level folds two vectors into one, every
// accumulator's partial sums halving in count, so a tile's sums cost about 3 instructions per output instead of the 9
// of one accumulator at a time (4 shuffles, 4 adds, an extract). The additions are the same, so are the bits.
//
// One level: a and b hold runs of 2 x Half lanes, one accumulator's partial sums per run; the result holds runs of
// Half lanes, run by run a's folded run then b's (lanes[l] + lanes[l + Half] within each run).
template <int Lanes, int Half, int... Lane>
FASTBON_INLINE typename LaneVector<Lanes>::Vec fold_runs(typename LaneVector<Lanes>::Vec a,
                                                         typename LaneVector<Lanes>::Vec b,
                                                         std::integer_sequence<int, Lane...>) {
  using Index = typename LaneVector<Lanes>::Index;
  // Constant masks (an index past Lanes picks b's lane), so each shuffle is one permute instruction.
  constexpr Index low{((Lane % (2 * Half)) < Half ? Lane : Lanes + Lane - Half)...};
  constexpr Index high{((Lane % (2 * Half)) < Half ? Lane + Half : Lanes + Lane)...};
  return __builtin_shuffle(a, b, low) + __builtin_shuffle(a, b, high);
}

// Lanes accumulators (runs of Lanes lanes) folded level by level into one vector of their sums. Values, not arrays:
// an array of accumulators whose address is taken lives in memory, and the tile's loop then spilled.
template <int L, typename Vec>
FASTBON_INLINE Vec fold_4(Vec a, Vec b, Vec c, Vec d) {
  constexpr auto all = std::make_integer_sequence<int, L>{};
  return fold_runs<L, 1>(fold_runs<L, 2>(a, b, all), fold_runs<L, 2>(c, d, all), all);
}
template <int L, typename Vec>
FASTBON_INLINE Vec fold_8(Vec a, Vec b, Vec c, Vec d, Vec e, Vec f, Vec g, Vec h) {
  constexpr auto all = std::make_integer_sequence<int, L>{};
  return fold_4<L>(fold_runs<L, 4>(a, b, all), fold_runs<L, 4>(c, d, all), fold_runs<L, 4>(e, f, all),
                   fold_runs<L, 4>(g, h, all));
}
template <int L, typename Vec>
FASTBON_INLINE Vec fold_16(Vec a, Vec b, Vec c, Vec d, Vec e, Vec f, Vec g, Vec h, Vec i, Vec j, Vec k, Vec l, Vec m,
                           Vec n, Vec o, Vec p) {
  constexpr auto all = std::make_integer_sequence<int, L>{};
  return fold_8<L>(fold_runs<L, 8>(a, b, all), fold_runs<L, 8>(c, d, all), fold_runs<L, 8>(e, f, all),
                   fold_runs<L, 8>(g, h, all), fold_runs<L, 8>(i, j, all), fold_runs<L, 8>(k, l, all),
                   fold_runs<L, 8>(m, n, all), fold_runs<L, 8>(o, p, all));
}
// The lane that accumulator i's sum ends in: the folds interleave the accumulators by the bits of i, lowest first.
constexpr int sum_lane(int i, int lanes) {
  int lane = 0;
  for (int bit = 1; bit < lanes; bit <<= 1, i >>= 1) lane = (lane << 1) | (i & 1);
  return lane;
}

// sums[First + i] = the pairwise sum of the lanes of accumulator First + i (accumulators numbered row by row; past
// the last one, zeros fill the fold).
template <int I, typename Vec, int Rows, int Cols>
FASTBON_INLINE Vec accumulator(const Vec (&acc)[Rows][Cols]) {
  if constexpr (I < Rows * Cols)
    return acc[I / Cols][I % Cols];
  else
    return Vec{};
}

template <int Lanes, int First, typename Vec, int Rows, int Cols, int... I>
FASTBON_INLINE void fold_group(const Vec (&acc)[Rows][Cols], float* sums, std::integer_sequence<int, I...>) {
  Vec folded;
  if constexpr (Lanes == 16) folded = fold_16<Lanes>(accumulator<First + I>(acc)...);
  if constexpr (Lanes == 8) folded = fold_8<Lanes>(accumulator<First + I>(acc)...);
  if constexpr (Lanes == 4) folded = fold_4<Lanes>(accumulator<First + I>(acc)...);
  ((First + I < Rows * Cols ? void(sums[First + I] = folded[sum_lane(I, Lanes)]) : void()), ...);
}

// sums[i] = the pairwise sum of the lanes of accumulator i (row by row), for all Rows x Cols of them, Lanes at a time.
template <int Lanes, int First = 0, typename Vec, int Rows, int Cols>
FASTBON_INLINE void pairwise_sums(const Vec (&acc)[Rows][Cols], float* sums) {
  fold_group<Lanes, First>(acc, sums, std::make_integer_sequence<int, Lanes>{});
  if constexpr (First + Lanes < Rows * Cols) pairwise_sums<Lanes, First + Lanes>(acc, sums);
}

// y[r, c] for Rows rows of x and Cols rows of w (both `depth` long, rows `depth` apart), y rows `ldy` apart: each
// output one vector of Lanes partial sums (acc += x * w, fused), summed pairwise, then the tail and the bias.
// `ahead`: the first of the lines of later weights this tile prefetches, PerStep at each step.
template <typename Y, int Rows, int Cols, int Lanes, int PerStep>
FASTBON_INLINE void dot_tile(const float* x, const float* w, const Y* bias, int64_t depth, Y* y, int64_t ldy,
                             const char* ahead) {
  using Vec = typename LaneVector<Lanes>::Vec;
  using Unaligned = typename LaneVector<Lanes>::Unaligned;
  Vec acc[Rows][Cols];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) acc[r][c] = Vec{};  // per element: `= {}` on the array became a memset
  int64_t k = 0;
  for (; k + Lanes <= depth; k += Lanes) {
    for (int line = 0; line < PerStep; ++line) __builtin_prefetch(ahead + line * kLineBytes, 0, 1);
    ahead += PerStep * kLineBytes;
    Vec weights[Cols];
    // One unaligned load per vector, loops unrolled: a memcpy per vector in a loop over the columns compiled, for
    // AVX2, to two 16-byte copies through the stack and a 32-byte reload that missed store forwarding (34 GFLOP/s).
#pragma GCC unroll 8
    for (int c = 0; c < Cols; ++c) weights[c] = *reinterpret_cast<const Unaligned*>(w + c * depth + k);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const Vec row = *reinterpret_cast<const Unaligned*>(x + r * depth + k);
#pragma GCC unroll 8
      for (int c = 0; c < Cols; ++c) acc[r][c] += row * weights[c];
    }
  }
  float sums[Rows * Cols];
  pairwise_sums<Lanes>(acc, sums);
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < Cols; ++c) {
      float sum = sums[r * Cols + c];
      for (int64_t tail = k; tail < depth; ++tail) sum += x[r * depth + tail] * w[c * depth + tail];
      if (bias != nullptr) sum += to_float(bias[c]);
      y[r * ldy + c] = narrow<Y>(sum);
    }
  }
}

// dot_tile as a function of its own per instruction set. Inlined into the loops over tiles, its registers were
// allocated differently in each instantiation, and in some GCC folded a weight's load into every row's FMA (each
// weight vector read from L1 once per row: load-bound, 0.75-0.85x the speed).
template <typename Y, int Rows, int Cols, int PerStep>
FASTBON_TARGET_AVX512 __attribute__((noinline)) void dot_tile_avx512(const float* x, const float* w, const Y* bias,
                                                                      int64_t depth, Y* y, int64_t ldy,
                                                                      const char* ahead) {
  dot_tile<Y, Rows, Cols, 16, PerStep>(x, w, bias, depth, y, ldy, ahead);
}
template <typename Y, int Rows, int Cols, int PerStep>
FASTBON_TARGET_AVX2 __attribute__((noinline)) void dot_tile_avx2(const float* x, const float* w, const Y* bias,
                                                                  int64_t depth, Y* y, int64_t ldy,
                                                                  const char* ahead) {
  dot_tile<Y, Rows, Cols, 8, PerStep>(x, w, bias, depth, y, ldy, ahead);
}
template <typename Y, int Rows, int Cols, int PerStep>
__attribute__((noinline)) void dot_tile_baseline(const float* x, const float* w, const Y* bias, int64_t depth, Y* y,
                                                 int64_t ldy, const char* ahead) {
  dot_tile<Y, Rows, Cols, 4, PerStep>(x, w, bias, depth, y, ldy, ahead);
}

// The same tile for bfloat16 x and weights with AVX512-BF16's VDPBF16PS: each step adds the products of 16 pairs of
// bf16 elements to the 16 fp32 lanes (exact products, fp32 sums, as torch's bf16 GEMM does on these CPUs: twice
// the products per instruction of widening to fp32), then the lanes pairwise, then the tail in fp32. A function of
// its own, called per tile: an always-inline function compiled for AVX512-BF16 cannot be inlined into the generic
// templates that tile the rows and columns.
template <typename Y, int Rows, int Cols, int PerStep>
FASTBON_TARGET_AVX512_BF16 __attribute__((noinline)) void dot_tile_bf16(const BFloat16* x, const BFloat16* w,
                                                                         const Y* bias, int64_t depth, Y* y,
                                                                         int64_t ldy, const char* ahead) {
#if FASTBON_X86_DISPATCH
  constexpr int64_t kPairs = 32;  // bf16 elements per 512-bit step
  using Vec = LaneVector<16>::Vec;  // the same 16 floats as __m512, for pairwise_sums
  Vec acc[Rows][Cols];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) acc[r][c] = Vec{};
  int64_t k = 0;
  for (; k + kPairs <= depth; k += kPairs) {
    for (int line = 0; line < PerStep; ++line) __builtin_prefetch(ahead + line * kLineBytes, 0, 1);
    ahead += PerStep * kLineBytes;
    __m512bh weights[Cols];
    for (int c = 0; c < Cols; ++c) weights[c] = (__m512bh)_mm512_loadu_si512(w + c * depth + k);
    for (int r = 0; r < Rows; ++r) {
      const __m512bh row = (__m512bh)_mm512_loadu_si512(x + r * depth + k);
      for (int c = 0; c < Cols; ++c) acc[r][c] = (Vec)_mm512_dpbf16_ps((__m512)acc[r][c], row, weights[c]);
    }
  }
  float sums[Rows * Cols];
  pairwise_sums<16>(acc, sums);
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < Cols; ++c) {
      float sum = sums[r * Cols + c];
      for (int64_t tail = k; tail < depth; ++tail) sum += to_float(x[r * depth + tail]) * to_float(w[c * depth + tail]);
      if (bias != nullptr) sum += to_float(bias[c]);
      y[r * ldy + c] = narrow<Y>(sum);
    }
  }
#else
  __builtin_unreachable();  // run_linear picks this path only where avx512_bf16_active()
#endif
}

}  // namespace fastbon::cpu::skinny
