// The CPU attention's item for a few float query rows without a window (a sample's own keys, read by its Hq/Hkv
// query heads; attention_item.cpp sends rows 1-3 here): each key and each value is read once for all the rows,
// where attend_rows reads them once per row. A row's score for a key is one vector of lane partial sums over
// head_dim, folded pairwise (skinny::pairwise_sums: every accumulator's lanes in the same order, whatever else shares
// the tile), and its weighted values are summed in key order per element: a row's bits depend only on the row and
// its keys, never on the other rows or on where a key falls in a tile.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention_item.h"
#include "linear_tile.h"

namespace fastbon::cpu::rows {

template <int Lanes, int Rows, int Keys>
FASTBON_INLINE void score_tile(const float* queries, const float* keys, int64_t head_dim, float* scores) {
  using Vec = typename skinny::LaneVector<Lanes>::Vec;
  using Unaligned = typename skinny::LaneVector<Lanes>::Unaligned;
  Vec acc[Rows][Keys];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Keys; ++c) acc[r][c] = Vec{};
  for (int64_t d = 0; d < head_dim; d += Lanes) {
    Vec query[Rows];
#pragma GCC unroll 4
    for (int r = 0; r < Rows; ++r) query[r] = *reinterpret_cast<const Unaligned*>(queries + r * head_dim + d);
#pragma GCC unroll 8
    for (int c = 0; c < Keys; ++c) {
      const Vec key = *reinterpret_cast<const Unaligned*>(keys + c * head_dim + d);
#pragma GCC unroll 4
      for (int r = 0; r < Rows; ++r) acc[r][c] += query[r] * key;
    }
  }
  float sums[Rows * Keys];
  skinny::pairwise_sums<Lanes>(acc, sums);
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Keys; ++c) scores[r * kChunk + c] = sums[r * Keys + c];
}

// out[r][d] = the sum over keys of p[r][key] · values[key][d], in key order per element (as weighted_values), the
// rows' sums for Width vectors of d in registers while each value vector is read once.
template <int Lanes, int Rows, int Width>
FASTBON_INLINE void weighted_values_tile(const float* values, const float* p, int64_t length, int64_t head_dim,
                                         int64_t d, float* out) {
  using Vec = typename skinny::LaneVector<Lanes>::Vec;
  using Unaligned = typename skinny::LaneVector<Lanes>::Unaligned;
  Vec sums[Rows][Width];
  for (int r = 0; r < Rows; ++r)
    for (int w = 0; w < Width; ++w) sums[r][w] = Vec{};
  for (int64_t key = 0; key < length; ++key) {
    Vec value[Width];
#pragma GCC unroll 8
    for (int w = 0; w < Width; ++w)
      value[w] = *reinterpret_cast<const Unaligned*>(values + key * head_dim + d + w * Lanes);
#pragma GCC unroll 4
    for (int r = 0; r < Rows; ++r) {
      const float weight = p[r * kChunk + key];
#pragma GCC unroll 8
      for (int w = 0; w < Width; ++w) sums[r][w] += weight * value[w];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int w = 0; w < Width; ++w) std::memcpy(out + r * head_dim + d + w * Lanes, &sums[r][w], sizeof(Vec));
}

template <int Lanes, int Rows>
FASTBON_INLINE void attend_rows_shared(const Segment<float, float>& segment, int64_t head_dim, float softcap,
                                       float* scratch) {
  constexpr int kKeys = Lanes == 16 ? 8 : 4;  // Rows x kKeys accumulators + Rows query vectors in the registers
  constexpr int kWidth = Lanes == 16 ? 4 : 2;
  float* scores = scratch;                        // [Rows, kChunk]
  float* accumulator = scores + Rows * kChunk;    // [Rows, head_dim]
  const int64_t length = segment.length;
  int64_t key = 0;
  for (; key + kKeys <= length; key += kKeys)
    score_tile<Lanes, Rows, kKeys>(segment.queries, segment.keys + key * head_dim, head_dim, scores + key);
  for (; key < length; ++key) score_tile<Lanes, Rows, 1>(segment.queries, segment.keys + key * head_dim, head_dim,
                                                         scores + key);
  float maximum[Rows], sum[Rows];
  for (int r = 0; r < Rows; ++r) {
    float* row = scores + r * kChunk;
    if (softcap > 0) soft_cap(row, length, softcap);
    maximum[r] = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < length; ++k) maximum[r] = std::max(maximum[r], row[k]);
    float total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < length; ++k) {
      const float p = exp_nonpositive(row[k] - maximum[r]);
      row[k] = p;
      total += p;
    }
    sum[r] = total;
  }
  int64_t d = 0;
  for (; d + kWidth * Lanes <= head_dim; d += kWidth * Lanes)
    weighted_values_tile<Lanes, Rows, kWidth>(segment.values, scores, length, head_dim, d, accumulator);
  for (; d < head_dim; d += Lanes)
    weighted_values_tile<Lanes, Rows, 1>(segment.values, scores, length, head_dim, d, accumulator);
  for (int r = 0; r < Rows; ++r) {
    float* destination = segment.out + r * segment.out_stride;
    const float inverse = 1.0f / sum[r];
#pragma omp simd
    for (int64_t e = 0; e < head_dim; ++e) destination[e] = accumulator[r * head_dim + e] * inverse;
    segment.lse[r * segment.lse_stride] = maximum[r] + std::log(sum[r]);
  }
}

}  // namespace fastbon::cpu::rows
