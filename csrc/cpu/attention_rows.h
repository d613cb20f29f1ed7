// The CPU attention's scores as lane-folded dot products, and its item for a few query rows (a sample's own keys,
// read by its Hq/Hkv query heads; attention_item.cpp sends rows 1-3 here). Each key and each value is read once for
// all the rows. A row's score for a key is one vector of lane partial sums over head_dim, folded pairwise
// (skinny::pairwise_sums: every accumulator's lanes in the same order, whatever else shares the tile); the matrix
// path scores with the same function and the rest of both paths does the same operations in the same order, so a
// row's bits depend only on the row and its keys: never on the other rows, on where a key falls in a tile, or on
// how many rows read the block.
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
FASTBON_INLINE void score_tile(const float* queries, const float* keys, int64_t head_dim, float* scores,
                               int64_t row_stride, int64_t key_stride) {
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
    for (int c = 0; c < Keys; ++c) scores[r * row_stride + c * key_stride] = sums[r * Keys + c];
}

// scores[r * row_stride + key * key_stride] = queries[r] · keys[key] for `rows` rows and `length` keys, in tiles of
// up to 4 rows x Keys keys: every score the same lane-folded sum whatever the tile. The matrix path (many rows,
// scores transposed) and the few-rows path both score with it, so a row's bits do not depend on its block's path.
template <int Lanes, int Rows>
FASTBON_INLINE void score_row_tile(const float* queries, int64_t length, const float* keys, int64_t head_dim,
                                   float* scores, int64_t row_stride, int64_t key_stride) {
  constexpr int kKeys = Lanes == 16 ? (Rows <= 3 ? 8 : 6) : (Rows <= 3 ? 3 : 2);  // accumulators in registers
  int64_t key = 0;
  for (; key + kKeys <= length; key += kKeys)
    score_tile<Lanes, Rows, kKeys>(queries, keys + key * head_dim, head_dim, scores + key * key_stride, row_stride,
                                   key_stride);
  for (; key < length; ++key)
    score_tile<Lanes, Rows, 1>(queries, keys + key * head_dim, head_dim, scores + key * key_stride, row_stride,
                               key_stride);
}

template <int Lanes>
FASTBON_INLINE void score_rows(const float* queries, int64_t rows, int64_t length, const float* keys,
                               int64_t head_dim, float* scores, int64_t row_stride, int64_t key_stride) {
  int64_t row = 0;
  for (; row + 4 <= rows; row += 4)
    score_row_tile<Lanes, 4>(queries + row * head_dim, length, keys, head_dim, scores + row * row_stride, row_stride,
                             key_stride);
  const float* rest = queries + row * head_dim;
  float* out = scores + row * row_stride;
  if (rows - row == 3) score_row_tile<Lanes, 3>(rest, length, keys, head_dim, out, row_stride, key_stride);
  if (rows - row == 2) score_row_tile<Lanes, 2>(rest, length, keys, head_dim, out, row_stride, key_stride);
  if (rows - row == 1) score_row_tile<Lanes, 1>(rest, length, keys, head_dim, out, row_stride, key_stride);
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

// The few-rows item (1-3 rows) with the matrix path's arithmetic after the scores: soft-cap, the window's hidden
// keys at -inf, the maximum, exp, the sum of the weights in key order, the weighted values in key order, the
// normalisation; so the same row on the same block gives the same bits on either path. `keys` and `values` are
// float (16-bit inputs widened by the caller); scratch holds Rows x (kChunk + head_dim) floats.
template <int Lanes, int Rows, typename In>
FASTBON_INLINE void attend_rows_shared(const Segment<In, float>& segment, const float* keys, const float* values,
                                       int64_t head_dim, float softcap, float* scratch) {
  constexpr int kWidth = Lanes == 16 ? 4 : 2;
  float* scores = scratch;                        // [Rows, kChunk]
  float* accumulator = scores + Rows * kChunk;    // [Rows, head_dim]
  const int64_t length = segment.length;
  score_row_tile<Lanes, Rows>(segment.queries, length, keys, head_dim, scores, kChunk, 1);
  float maximum[Rows], sum[Rows];
  for (int r = 0; r < Rows; ++r) {
    float* row = scores + r * kChunk;
    if (softcap > 0) soft_cap(row, length, softcap);
    const int64_t hidden = first_visible_key(segment, r);
    for (int64_t k = 0; k < hidden; ++k) row[k] = -std::numeric_limits<float>::infinity();
    maximum[r] = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < length; ++k) maximum[r] = std::max(maximum[r], row[k]);
    if (segment.starts != nullptr && std::isinf(maximum[r])) maximum[r] = 0;  // sees no key: every weight 0
#pragma omp simd
    for (int64_t k = 0; k < length; ++k) row[k] = exp_nonpositive(row[k] - maximum[r]);
    float total = 0;
    for (int64_t k = 0; k < length; ++k) total += row[k];  // in key order, as the matrix path's column sums
    sum[r] = total;
  }
  int64_t d = 0;
  for (; d + kWidth * Lanes <= head_dim; d += kWidth * Lanes)
    weighted_values_tile<Lanes, Rows, kWidth>(values, scores, length, head_dim, d, accumulator);
  for (; d < head_dim; d += Lanes)
    weighted_values_tile<Lanes, Rows, 1>(values, scores, length, head_dim, d, accumulator);
  for (int r = 0; r < Rows; ++r) {
    if (sum[r] == 0) {
      write_empty_row(segment, r, head_dim);
      continue;
    }
    float* destination = segment.out + r * segment.out_stride;
    const float inverse = 1.0f / sum[r];
#pragma omp simd
    for (int64_t e = 0; e < head_dim; ++e) destination[e] = accumulator[r * head_dim + e] * inverse;
    segment.lse[r * segment.lse_stride] = maximum[r] + std::log(sum[r]);
  }
}

}  // namespace fastbon::cpu::rows
