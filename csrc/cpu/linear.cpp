// Skinny matrix products on the CPU: y[rows, out] = x[rows, in] · w[out, in]ᵀ (+ bias[out]) for the rows of a
// decode step (fastbon.ops.skinny_linear).
//
// A decode step multiplies a handful of rows (the live samples) by every weight matrix of the model, so each
// weight byte is used `rows` times: at a few rows the product is bound by streaming the weights, at 32 rows by the
// FMA units (the kernel then runs at about the large-GEMM rate). BLAS libraries tune for square shapes; MKL's
// float32 GEMM on a 2-core AVX2 EPYC runs [4, 512] x [512, 32000] at 3.4 GB/s of weights (benchmarks/RESULTS.md).
// Here each thread streams its own contiguous range of weight rows once, in tiles of tile_columns rows, and computes
// every x row against a tile while it is in L1: kRowBlock x tile_columns dot products, each held as one vector of
// partial sums in registers and summed pairwise at the end. Weights are read in their own [out, in] layout: nothing
// is repacked or copied. bfloat16 runs on VDPBF16PS where the CPU has it, else widened to float32 per tile. The tile
// is in linear_tile.h; this file splits a product into tiles over rows, weight panels and threads.
//
// Every output is the same sequence of operations whatever the number of rows, the row's place in the batch or the
// column's place in a tile: the same inputs give the same bits in any batch, which fastbon's decode relies on
// (a sample's tokens do not depend on which samples share its batch).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_ops.h"
#include "linear_tile.h"

namespace fastbon::cpu {
namespace {

using namespace skinny;  // the tile (linear_tile.h)

// The tiles of x rows that pass over one tile of weights share out the prefetch of the weights kPrefetchTiles tiles
// ahead, PerStep cache lines at each step of their loops, each tile its own run of lines (dot_rows): 32 rows issue
// one prefetch per step instead of a burst of one per weight row within the first tile. The [32, 512] x [512, 32000]
// product went from 138 to 182 GFLOP/s in fp32 and from 242 to 281-294 in bf16 with the changes of the same commit
// (the burst overran the misses L2 keeps in flight; a prefetch per weight row in every tile cost bf16's
// compute-bound products 5 %). PerStep is a template argument: a loop over a runtime count took a register the fp32
// tile needs.
constexpr int64_t kRowChunk = 32;            // rows that share one pass over the weights from memory
constexpr int64_t kPanelBytes = int64_t{1} << 17;  // weight rows kept in L2 while the row chunks pass over them


// One tile of x rows (float, or bfloat16 for VDPBF16PS) against Cols weight rows of the same type.
template <typename X, typename Y, int Rows, int Cols, int Lanes, int PerStep>
FASTBON_INLINE void any_tile(const X* x, const X* w, const Y* bias, int64_t depth, Y* y, int64_t ldy,
                             const char* ahead) {
  if constexpr (std::is_same_v<X, BFloat16>)
    dot_tile_bf16<Y, Rows, Cols, PerStep>(x, w, bias, depth, y, ldy, ahead);
  else if constexpr (Lanes == 16)
    dot_tile_avx512<Y, Rows, Cols, PerStep>(x, w, bias, depth, y, ldy, ahead);
  else if constexpr (Lanes == 8)
    dot_tile_avx2<Y, Rows, Cols, PerStep>(x, w, bias, depth, y, ldy, ahead);
  else
    dot_tile_baseline<Y, Rows, Cols, PerStep>(x, w, bias, depth, y, ldy, ahead);
}

// Every row of x against Cols weight rows: tiles of kRowBlock rows, then one tile of the remaining height, each
// prefetching its own `run` bytes of the lines at `ahead`, PerStep lines per step (see kPrefetchTiles).
template <typename X, typename Y, int Cols, int Lanes, int PerStep>
FASTBON_INLINE void dot_row_tiles(const X* x, int64_t rows, const X* w, const Y* bias, int64_t depth, Y* y,
                                  int64_t ldy, const char* ahead, int64_t run) {
  int64_t row = 0;
  for (; row + kRowBlock <= rows; row += kRowBlock, ahead += run)
    any_tile<X, Y, kRowBlock, Cols, Lanes, PerStep>(x + row * depth, w, bias, depth, y + row * ldy, ldy, ahead);
  const int64_t rest = rows - row;
  const X* x_rest = x + row * depth;
  Y* y_rest = y + row * ldy;
  static_assert(kRowBlock == 4, "the remainder below covers heights 1 to 3");
  if (rest == 3) any_tile<X, Y, 3, Cols, Lanes, PerStep>(x_rest, w, bias, depth, y_rest, ldy, ahead);
  if (rest == 2) any_tile<X, Y, 2, Cols, Lanes, PerStep>(x_rest, w, bias, depth, y_rest, ldy, ahead);
  if (rest == 1) any_tile<X, Y, 1, Cols, Lanes, PerStep>(x_rest, w, bias, depth, y_rest, ldy, ahead);
}

// Every row of x against Cols weight rows. Prefetch: the tiles prefetch the Cols weight rows kPrefetchTiles tiles
// ahead, as few lines per step of their loops as cover them (full tiles only: a narrower tile is the last of its
// range).
template <typename X, typename Y, int Cols, int Lanes, bool Prefetch>
FASTBON_INLINE void dot_rows(const X* x, int64_t rows, const X* w, const Y* bias, int64_t depth, Y* y, int64_t ldy) {
  const char* ahead = reinterpret_cast<const char*>(w + kPrefetchTiles * Cols * depth);
  constexpr int64_t kStep = std::is_same_v<X, BFloat16> ? 32 : Lanes;  // elements per step of a tile's loop
  const int64_t steps = depth / kStep;
  if constexpr (Prefetch && Cols == tile_columns(Lanes)) {
    if (steps > 0) {
      const int64_t lines = (Cols * depth * int64_t{sizeof(X)} + kLineBytes - 1) / kLineBytes;
      const int64_t tiles = (rows + kRowBlock - 1) / kRowBlock;
      const int64_t per_step = (lines + tiles * steps - 1) / (tiles * steps);  // at most Cols: a step reads <= a line
      static_assert(Cols <= 6, "the lines per step below cover tiles of up to 6 weight rows");
      const int64_t line_run = steps * kLineBytes;  // a tile's run of lines, per line per step
      if (per_step >= Cols)
        return dot_row_tiles<X, Y, Cols, Lanes, Cols>(x, rows, w, bias, depth, y, ldy, ahead, Cols * line_run);
      if (per_step == 3)
        return dot_row_tiles<X, Y, Cols, Lanes, 3>(x, rows, w, bias, depth, y, ldy, ahead, 3 * line_run);
      if (per_step == 2)
        return dot_row_tiles<X, Y, Cols, Lanes, 2>(x, rows, w, bias, depth, y, ldy, ahead, 2 * line_run);
      return dot_row_tiles<X, Y, Cols, Lanes, 1>(x, rows, w, bias, depth, y, ldy, ahead, line_run);
    }
  }
  dot_row_tiles<X, Y, Cols, Lanes, 0>(x, rows, w, bias, depth, y, ldy, ahead, 0);
}

// Every row of x against the Cols weight rows at w. 16-bit weights are first widened into `scratch` (Cols x
// depth floats, in L1): a contiguous conversion loop vectorises, the same conversion inside the tile did not
// (float16 ran at 1 GFLOP/s).
template <typename T, typename X, int Cols, int Lanes>
FASTBON_INLINE void dot_columns(const X* x, int64_t rows, const T* w, const T* bias, int64_t depth, T* y,
                                int64_t ldy, float* scratch) {
  if constexpr (std::is_same_v<T, X>) {  // float, or bfloat16 on VDPBF16PS: the weights are read in place
    dot_rows<X, T, Cols, Lanes, true>(x, rows, w, bias, depth, y, ldy);
  } else {
    for (int c = 0; c < Cols; ++c)
      __builtin_prefetch(w + c * depth + kPrefetchTiles * Cols * depth, 0, 1);
#pragma omp simd
    for (int64_t i = 0; i < Cols * depth; ++i) scratch[i] = to_float(w[i]);
    dot_rows<float, T, Cols, Lanes, false>(x, rows, scratch, bias, depth, y, ldy);
  }
}

// The last, narrower tile of a range: `width` (1 .. Width) weight rows. A recursive always-inline template, not a
// lambda: a lambda is a function of its own, compiled for the baseline instruction set whatever its caller's
// target, and there the tile ran without FMA (other bits than the full tiles).
template <typename T, typename X, int Lanes, int Width>
FASTBON_INLINE void last_tile(int64_t width, const X* x, int64_t rows, const T* w, const T* bias, int64_t depth,
                              T* y, int64_t ldy, float* scratch) {
  if constexpr (Width >= 1) {
    if (width == Width)
      dot_columns<T, X, Width, Lanes>(x, rows, w, bias, depth, y, ldy, scratch);
    else
      last_tile<T, X, Lanes, Width - 1>(width, x, rows, w, bias, depth, y, ldy, scratch);
  }
}

// Output columns [first, last) of y for the rows of x: weight rows in tiles of tile_columns(Lanes), the last one
// narrower.
template <typename T, typename X, int Lanes>
FASTBON_INLINE void panel_columns(const X* x, const T* w, const T* bias, T* y, int64_t rows, int64_t out,
                                  int64_t depth, int64_t first, int64_t last, float* scratch) {
  constexpr int kTile = tile_columns(Lanes);
  auto at = [&](int64_t col) { return bias ? bias + col : nullptr; };
  int64_t col = first;
  for (; col + kTile <= last; col += kTile)
    dot_columns<T, X, kTile, Lanes>(x, rows, w + col * depth, at(col), depth, y + col, out, scratch);
  last_tile<T, X, Lanes, kTile - 1>(last - col, x, rows, w + col * depth, at(col), depth, y + col, out, scratch);
}

// Output columns [first, last) of y. Up to kRowChunk rows, each weight row is streamed once for all of them. Wider
// batches go in chunks of kRowChunk rows over panels of weight rows that stay in L2 (about kPanelBytes), so the
// weights still come from memory once and each chunk's rows from L2. Every output is the same dot product, summed in
// the same order, whatever the number of rows or the row's place in the batch: a sample's result does not depend on
// which other samples share its batch (a call split into waves gives the bits of one wave).
template <typename T, typename X, int Lanes>
FASTBON_INLINE void linear_columns(const X* x, const T* w, const T* bias, T* y, int64_t rows, int64_t out,
                                   int64_t depth, int64_t first, int64_t last, float* scratch) {
  if (rows <= kRowChunk) {
    panel_columns<T, X, Lanes>(x, w, bias, y, rows, out, depth, first, last, scratch);
    return;
  }
  const int64_t panel_blocks = std::max<int64_t>(1, kPanelBytes / (depth * int64_t{sizeof(T)}) / kColBlock);
  const int64_t panel = panel_blocks * kColBlock;
  for (int64_t start = first; start < last; start += panel) {
    const int64_t stop = std::min(last, start + panel);
    for (int64_t row = 0; row < rows; row += kRowChunk)
      panel_columns<T, X, Lanes>(x + row * depth, w, bias, y + row * out, std::min(kRowChunk, rows - row), out, depth,
                                 start, stop, scratch);
  }
}

// One instantiation per instruction set; each is called from inside the OpenMP team (an OpenMP region outlined
// from an always-inline template would not inherit the target attribute, and would run baseline code).
template <typename T>
FASTBON_TARGET_AVX512 void linear_columns_avx512(const float* x, const T* w, const T* bias, T* y, int64_t rows,
                                                 int64_t out, int64_t depth, int64_t first, int64_t last,
                                                 float* scratch) {
  linear_columns<T, float, 16>(x, w, bias, y, rows, out, depth, first, last, scratch);
}
template <typename T>
FASTBON_TARGET_AVX2 void linear_columns_avx2(const float* x, const T* w, const T* bias, T* y, int64_t rows, int64_t out,
                                             int64_t depth, int64_t first, int64_t last, float* scratch) {
  linear_columns<T, float, 8>(x, w, bias, y, rows, out, depth, first, last, scratch);
}
template <typename T>
void linear_columns_baseline(const float* x, const T* w, const T* bias, T* y, int64_t rows, int64_t out, int64_t depth,
                             int64_t first, int64_t last, float* scratch) {
  linear_columns<T, float, 4>(x, w, bias, y, rows, out, depth, first, last, scratch);
}

// bfloat16 x and weights on VDPBF16PS (the tiles are compiled for AVX512-BF16 themselves).
FASTBON_TARGET_AVX512 void linear_columns_avx512_bf16(const BFloat16* x, const BFloat16* w, const BFloat16* bias,
                                                      BFloat16* y, int64_t rows, int64_t out, int64_t depth,
                                                      int64_t first, int64_t last) {
  linear_columns<BFloat16, BFloat16, 16>(x, w, bias, y, rows, out, depth, first, last, nullptr);
}

// Output columns split over the team: each thread streams one contiguous range of whole blocks of weight rows.
template <typename Columns>
void over_threads(int64_t out, int64_t depth, int num_threads, Columns columns) {
  const int64_t blocks = (out + kColBlock - 1) / kColBlock;
  const int threads = team_size(static_cast<int>(std::min<int64_t>(num_threads, blocks)), out * depth,
                                int64_t{1} << 16);
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t id = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int64_t id = 0, team = 1;
#endif
    const int64_t first = std::min(out, blocks * id / team * kColBlock);
    const int64_t last = std::min(out, blocks * (id + 1) / team * kColBlock);
    if (first < last) columns(first, last);
  }
}

template <typename T>
void run_linear(const T* x, const T* w, const T* bias, T* y, int64_t rows, int64_t out, int64_t depth,
                int num_threads) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (avx512_bf16_active()) {
      over_threads(out, depth, num_threads, [&](int64_t first, int64_t last) {
        linear_columns_avx512_bf16(x, w, bias, y, rows, out, depth, first, last);
      });
      return;
    }
  }
  const Isa isa = active_isa();
  auto* columns = isa == Isa::kAvx512 ? &linear_columns_avx512<T>
                  : isa == Isa::kAvx2 ? &linear_columns_avx2<T>
                                      : &linear_columns_baseline<T>;
  // 16-bit rows are widened once here, not in every tile that reads them (rows x in_features floats: small).
  std::vector<float> widened;
  const float* x_float;
  if constexpr (std::is_same_v<T, float>) {
    x_float = x;
  } else {
    widened.resize(rows * depth);
    for (int64_t i = 0; i < rows * depth; ++i) widened[i] = to_float(x[i]);
    x_float = widened.data();
  }
  over_threads(out, depth, num_threads, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : kMostTileColumns * depth);
    columns(x_float, w, bias, y, rows, out, depth, first, last, scratch.data());
  });
}

}  // namespace

void skinny_linear(DType dtype, const void* x, const void* weight, const void* bias, void* y, int64_t rows,
                   int64_t out_features, int64_t in_features, int num_threads) {
  auto run = [&](auto element, auto) {
    using T = decltype(element);
    if constexpr (std::is_same_v<T, double>) {
      return;  // float64 is declined by the binding (dtype_of): the oracle's precision is torch's job
    } else {
      run_linear<T>(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                    static_cast<T*>(y), rows, out_features, in_features, num_threads);
    }
  };
  visit_dtype(dtype, run);
}

}  // namespace fastbon::cpu
