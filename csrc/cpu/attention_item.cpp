// One work item of the CPU shared-prefix attention on the vector units: a chunk of keys against the query rows that
// share it. Two paths by the number of rows: many rows (a prompt's n·(Hq/Hkv) queries against a prefix chunk) score
// into a transposed block and multiply by the values as a register-tiled GEMM, the softmax between them; few rows (a
// sample's own keys) score and sum the values for all their rows in one pass over the keys (attention_rows.h).
// Accumulating in float, both paths do the same operations in the same order per row, so a row's bits do not depend
// on how many rows share its block. attention.cpp builds the items, runs them in parallel and merges their partials.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention_item.h"
#include "attention_rows.h"

namespace fastbon::cpu {
namespace {


constexpr int64_t kGemmRows = 4;  // items with fewer query rows take the matrix-vector path

// c[Rows, Cols] = A[Rows, depth] · b[depth, Cols] with A(r, i) = a[r * a_row + i * a_inner], the accumulators in
// registers (Rows x Cols / vector width of them).
template <typename Acc, int Rows, int Cols>
FASTBON_INLINE void gemm_tile(int64_t depth, const Acc* a, int64_t a_row, int64_t a_inner, const Acc* b, int64_t ldb,
                              Acc* c, int64_t ldc) {
  Acc acc[Rows][Cols];
  for (int r = 0; r < Rows; ++r) {
#pragma omp simd
    for (int col = 0; col < Cols; ++col) acc[r][col] = 0;  // per element: `= {}` on the array became a memset per tile
  }
  for (int64_t inner = 0; inner < depth; ++inner) {
    const Acc* b_row = b + inner * ldb;
    for (int r = 0; r < Rows; ++r) {
      const Acc a_value = a[r * a_row + inner * a_inner];
#pragma omp simd
      for (int col = 0; col < Cols; ++col) acc[r][col] += a_value * b_row[col];
    }
  }
  for (int r = 0; r < Rows; ++r) {
#pragma omp simd
    for (int col = 0; col < Cols; ++col) c[r * ldc + col] = acc[r][col];
  }
}

// The last rows - (rows % Rows) rows with one tile of the exact height.
template <typename Acc, int Rows, int Cols>
FASTBON_INLINE void gemm_rest(int64_t rows, int64_t depth, const Acc* a, int64_t a_row, int64_t a_inner, const Acc* b,
                              int64_t ldb, Acc* c, int64_t ldc) {
  if constexpr (Rows > 0) {
    if (rows == Rows)
      gemm_tile<Acc, Rows, Cols>(depth, a, a_row, a_inner, b, ldb, c, ldc);
    else
      gemm_rest<Acc, Rows - 1, Cols>(rows, depth, a, a_row, a_inner, b, ldb, c, ldc);
  }
}

// c[rows, columns] = A[rows, depth] · b[depth, columns]; columns is a multiple of Cols. Column blocks outermost:
// b's block stays in L1 while A streams.
template <typename Acc, int Rows, int Cols>
FASTBON_INLINE void gemm(int64_t rows, int64_t columns, int64_t depth, const Acc* a, int64_t a_row, int64_t a_inner,
                         const Acc* b, int64_t ldb, Acc* c, int64_t ldc) {
  for (int64_t col = 0; col < columns; col += Cols) {
    int64_t row = 0;
    for (; row + Rows <= rows; row += Rows)
      gemm_tile<Acc, Rows, Cols>(depth, a + row * a_row, a_row, a_inner, b + col, ldb, c + row * ldc + col, ldc);
    gemm_rest<Acc, Rows - 1, Cols>(rows - row, depth, a + row * a_row, a_row, a_inner, b + col, ldb,
                                   c + row * ldc + col, ldc);
  }
}

// out[0, HeadDim) = the sum over keys [begin, end) of p[key] · values[key], in key order per element, the sums held
// in registers (a loop over a runtime head_dim added each key's products to memory: a load and a store per vector
// per key).
template <typename Acc, int HeadDim>
FASTBON_INLINE void weighted_values_fixed(const Acc* values, const Acc* p, int64_t begin, int64_t end, Acc* out) {
  typedef Acc Vec __attribute__((vector_size(64)));
  typedef Acc Unaligned __attribute__((vector_size(64), aligned(sizeof(Acc)), may_alias));
  constexpr int kLanes = 64 / sizeof(Acc), kVectors = HeadDim / kLanes;
  static_assert(HeadDim % kLanes == 0, "whole vectors");
  Vec sums[kVectors];
#pragma GCC unroll 16
  for (int j = 0; j < kVectors; ++j) sums[j] = Vec{};
  for (int64_t key = begin; key < end; ++key) {
    const Acc weight = p[key];
    const Acc* row = values + key * HeadDim;
#pragma GCC unroll 16
    for (int j = 0; j < kVectors; ++j) sums[j] += weight * *reinterpret_cast<const Unaligned*>(row + j * kLanes);
  }
#pragma GCC unroll 16
  for (int j = 0; j < kVectors; ++j) std::memcpy(out + j * kLanes, &sums[j], sizeof(Vec));
}

// out[0, head_dim) = the sum over keys [begin, end) of p[key] · values[key], in key order per element.
template <typename In, typename Acc>
FASTBON_INLINE void weighted_values(const In* values, const Acc* p, int64_t begin, int64_t end, int64_t head_dim,
                                    Acc* out) {
  if constexpr (std::is_same_v<In, Acc>) {
    if (head_dim == 64) return weighted_values_fixed<Acc, 64>(values, p, begin, end, out);
    if (head_dim == 128) return weighted_values_fixed<Acc, 128>(values, p, begin, end, out);
  }
  std::fill(out, out + head_dim, Acc(0));
  for (int64_t key = begin; key < end; ++key) {
    const In* value_row = values + key * head_dim;
    const Acc weight = p[key];
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) out[d] += weight * to_float(value_row[d]);
  }
}

// Few rows (a sample's suffix): per row, dot products with each key, softmax, then a weighted sum of values.
template <typename In, typename Acc>
FASTBON_INLINE void attend_rows(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap, Acc* scratch) {
  Acc* scores = scratch;  // [rows, length]
  Acc* accumulator = scores + kGemmRows * kChunk;  // [head_dim]
  for (int64_t r = 0; r < segment.rows; ++r) {
    const Acc* query = segment.queries + r * head_dim;
    const int64_t begin = first_visible_key(segment, r);
    if (begin == segment.length) {
      write_empty_row(segment, r, head_dim);
      continue;
    }
    Acc* row = scores + r * kChunk;
    for (int64_t key = begin; key < segment.length; ++key) {
      const In* key_row = segment.keys + key * head_dim;
      Acc dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += query[d] * to_float(key_row[d]);
      row[key] = dot;
    }
    if (softcap > 0) soft_cap(row + begin, segment.length - begin, softcap);
    Acc maximum = -std::numeric_limits<Acc>::infinity();
    for (int64_t key = begin; key < segment.length; ++key) maximum = std::max(maximum, row[key]);
    Acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t key = begin; key < segment.length; ++key) {
      const Acc p = exp_nonpositive(row[key] - maximum);
      row[key] = p;
      sum += p;
    }
    weighted_values(segment.values, row, begin, segment.length, head_dim, accumulator);
    Acc* destination = segment.out + r * segment.out_stride;
    const Acc inverse = Acc(1) / sum;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) destination[d] = accumulator[d] * inverse;
    segment.lse[r * segment.lse_stride] = maximum + std::log(sum);
  }
}

// The few-rows path: rows accumulating in float share each key's read and score with the matrix path's arithmetic
// (attention_rows.h); float64 goes row by row.
template <typename In, typename Acc, int Lanes>
FASTBON_INLINE void attend_few_rows(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap, Acc* scratch) {
  if constexpr (std::is_same_v<Acc, float>) {
    if (head_dim % Lanes == 0 && segment.length > 0) {
      const float* keys = reinterpret_cast<const float*>(segment.keys);
      const float* values = reinterpret_cast<const float*>(segment.values);
      float* rest = scratch;
      if constexpr (!std::is_same_v<In, float>) {  // 16-bit inputs widened once, as the matrix path does
        float* wide_keys = scratch;
        float* wide_values = wide_keys + kChunk * head_dim;
#pragma omp simd
        for (int64_t index = 0; index < segment.length * head_dim; ++index) {
          wide_keys[index] = to_float(segment.keys[index]);
          wide_values[index] = to_float(segment.values[index]);
        }
        keys = wide_keys, values = wide_values;
        rest = wide_values + kChunk * round_up(head_dim, kMaxColumns);
      }
      static_assert(kGemmRows == 4, "rows 1-3 take rows::attend_rows_shared");
      if (segment.rows == 1) return rows::attend_rows_shared<Lanes, 1>(segment, keys, values, head_dim, softcap, rest);
      if (segment.rows == 2) return rows::attend_rows_shared<Lanes, 2>(segment, keys, values, head_dim, softcap, rest);
      if (segment.rows == 3) return rows::attend_rows_shared<Lanes, 3>(segment, keys, values, head_dim, softcap, rest);
    }
  }
  attend_rows(segment, head_dim, softcap, scratch);
}

// The matrix path's scores when they accumulate in float: attention_rows.h's lane-folded dot products (the few-rows
// path's), written transposed into scores_t [length, padded_rows], the padding columns zero.
template <typename Acc, int Lanes>
FASTBON_INLINE bool folded_scores(const Acc* queries, int64_t rows, int64_t padded_rows, int64_t length,
                                  const Acc* keys, int64_t head_dim, Acc* scores_t) {
  if constexpr (std::is_same_v<Acc, float>) {
    if (head_dim % Lanes != 0) return false;
    rows::score_rows<Lanes>(queries, rows, length, keys, head_dim, scores_t, 1, padded_rows);
    for (int64_t key = 0; key < length; ++key)
      for (int64_t r = rows; r < padded_rows; ++r) scores_t[key * padded_rows + r] = 0;
    return true;
  }
  return false;
}

// The score product's tile width for `rows` query rows: one or two vectors when they hold the rows, else Cols (a
// prompt's 16 query rows padded to AVX-512's 64 columns did 4x the multiplications).
template <typename Acc, int Cols, int Lanes>
FASTBON_INLINE int64_t score_columns(int64_t rows) {
  constexpr int64_t kVector = Lanes * 4 / sizeof(Acc);  // Lanes counts floats
  if (kVector < Cols && rows <= kVector) return kVector;
  if (2 * kVector < Cols && rows <= 2 * kVector) return 2 * kVector;
  return Cols;
}

// S^T = K · Q^T (Q^T [head_dim, padded_rows]) in tiles of score_columns' width. Every score is the same sum in the
// same order whatever the tile: the width changes the speed, never the bits.
template <typename Acc, int Rows, int Cols, int Lanes>
FASTBON_INLINE void scores_product(int64_t length, int64_t padded_rows, int64_t head_dim, const Acc* keys,
                                   const Acc* queries_t, Acc* scores_t) {
  constexpr int kVector = Lanes * 4 / sizeof(Acc);
  const int64_t width = score_columns<Acc, Cols, Lanes>(padded_rows);
  if constexpr (kVector < Cols) {
    if (width == kVector)  // 12 rows x one vector of accumulators
      return gemm<Acc, 12, kVector>(length, padded_rows, head_dim, keys, head_dim, 1, queries_t, padded_rows,
                                    scores_t, padded_rows);
  }
  if constexpr (2 * kVector < Cols) {
    if (width == 2 * kVector)
      return gemm<Acc, 8, 2 * kVector>(length, padded_rows, head_dim, keys, head_dim, 1, queries_t, padded_rows,
                                       scores_t, padded_rows);
  }
  gemm<Acc, Rows, Cols>(length, padded_rows, head_dim, keys, head_dim, 1, queries_t, padded_rows, scores_t,
                        padded_rows);
}

// Many rows (a prompt's queries against a prefix chunk): S^T = K · Q^T (in float: the few-rows path's lane-folded
// dot products, so both paths give a row the same bits; in float64 a register-tiled GEMM over the transposed Q
// block) and O = P · V as a register-tiled GEMM, the softmax running down S^T's columns in key order.
template <typename In, typename Acc, int Rows, int Cols, int Lanes>
FASTBON_INLINE void attend_segment(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap, Acc* scratch) {
  if (segment.rows < kGemmRows) return attend_few_rows<In, Acc, Lanes>(segment, head_dim, softcap, scratch);
  const int64_t padded_dim = round_up(head_dim, Cols);
  const int64_t length = segment.length;
  Acc* keys = scratch;                                                  // [length, head_dim]
  Acc* values = keys + kChunk * head_dim;                               // [length, padded_dim]
  Acc* queries_t = values + kChunk * round_up(head_dim, kMaxColumns);   // [head_dim, padded_rows]
  Acc* scores_t = queries_t + head_dim * kRowBlock;                     // [length, padded_rows]
  Acc* outputs = scores_t + kChunk * kRowBlock;                         // [rows, padded_dim]
  Acc* column_max = outputs + kRowBlock * round_up(head_dim, kMaxColumns);
  Acc* column_sum = column_max + kRowBlock;

  const Acc* key_rows = keys;
  const Acc* value_rows = values;
  int64_t value_stride = padded_dim;
  if constexpr (std::is_same_v<In, Acc>) {  // float inputs are read in place
    key_rows = segment.keys;
    if (padded_dim == head_dim) {
      value_rows = segment.values;
      value_stride = head_dim;
    }
  } else {
#pragma omp simd
    for (int64_t index = 0; index < length * head_dim; ++index) keys[index] = to_float(segment.keys[index]);
  }
  if (value_rows == values) {
    for (int64_t key = 0; key < length; ++key) {
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) values[key * padded_dim + d] = to_float(segment.values[key * head_dim + d]);
      for (int64_t d = head_dim; d < padded_dim; ++d) values[key * padded_dim + d] = 0;
    }
  }

  for (int64_t first_row = 0; first_row < segment.rows; first_row += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, segment.rows - first_row);
    const int64_t padded_rows = round_up(rows, score_columns<Acc, Cols, Lanes>(rows));
    if (!folded_scores<Acc, Lanes>(segment.queries + first_row * head_dim, rows, padded_rows, length, key_rows,
                                   head_dim, scores_t)) {
      for (int64_t d = 0; d < head_dim; ++d) {
        for (int64_t r = 0; r < rows; ++r) queries_t[d * padded_rows + r] = segment.queries[(first_row + r) * head_dim + d];
        for (int64_t r = rows; r < padded_rows; ++r) queries_t[d * padded_rows + r] = 0;
      }
      scores_product<Acc, Rows, Cols, Lanes>(length, padded_rows, head_dim, key_rows, queries_t, scores_t);
    }
    if (softcap > 0) soft_cap(scores_t, length * padded_rows, softcap);
    if (segment.starts != nullptr) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t hidden = first_visible_key(segment, first_row + r);
        for (int64_t key = 0; key < hidden; ++key) scores_t[key * padded_rows + r] = -std::numeric_limits<Acc>::infinity();
      }
    }
    std::fill(column_max, column_max + padded_rows, -std::numeric_limits<Acc>::infinity());
    std::fill(column_sum, column_sum + padded_rows, Acc(0));
    for (int64_t key = 0; key < length; ++key) {
      const Acc* score_row = scores_t + key * padded_rows;
#pragma omp simd
      for (int64_t r = 0; r < padded_rows; ++r) column_max[r] = std::max(column_max[r], score_row[r]);
    }
    if (segment.starts != nullptr) {  // a row that sees no key: exp(-inf - 0) = 0 below, not exp(-inf + inf)
      for (int64_t r = 0; r < rows; ++r) column_max[r] = std::isinf(column_max[r]) ? Acc(0) : column_max[r];
    }
    for (int64_t key = 0; key < length; ++key) {
      Acc* score_row = scores_t + key * padded_rows;
#pragma omp simd
      for (int64_t r = 0; r < padded_rows; ++r) {
        const Acc p = exp_nonpositive(score_row[r] - column_max[r]);
        score_row[r] = p;
        column_sum[r] += p;
      }
    }
    gemm<Acc, Rows, Cols>(rows, padded_dim, length, scores_t, 1, padded_rows, value_rows, value_stride, outputs,
                          padded_dim);
    for (int64_t r = 0; r < rows; ++r) {
      if (column_sum[r] == 0) {
        write_empty_row(segment, first_row + r, head_dim);
        continue;
      }
      const Acc inverse = Acc(1) / column_sum[r];
      Acc* destination = segment.out + (first_row + r) * segment.out_stride;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) destination[d] = outputs[r * padded_dim + d] * inverse;
      segment.lse[(first_row + r) * segment.lse_stride] = column_max[r] + std::log(column_sum[r]);
    }
  }
}

}  // namespace

// The same body compiled for three instruction sets; register tiles of 6 rows x four (AVX-512) or two vectors.
template <typename In, typename Acc>
FASTBON_TARGET_AVX512 void attend_segment_avx512(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap,
                                                 Acc* scratch) {
  attend_segment<In, Acc, 6, 256 / sizeof(Acc), 16>(segment, head_dim, softcap, scratch);
}
template <typename In, typename Acc>
FASTBON_TARGET_AVX2 void attend_segment_avx2(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap,
                                             Acc* scratch) {
  attend_segment<In, Acc, 6, 64 / sizeof(Acc), 8>(segment, head_dim, softcap, scratch);
}
template <typename In, typename Acc>
void attend_segment_baseline(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap, Acc* scratch) {
  attend_segment<In, Acc, 6, 32 / sizeof(Acc), 4>(segment, head_dim, softcap, scratch);
}

// attention.cpp's dtypes (visit_dtype): float, bfloat16 and float16 accumulate in float, float64 in double.
#define FASTBON_ATTEND_SEGMENT(In, Acc)                                                                    \
  template void attend_segment_avx512<In, Acc>(const Segment<In, Acc>&, int64_t, Acc, Acc*);               \
  template void attend_segment_avx2<In, Acc>(const Segment<In, Acc>&, int64_t, Acc, Acc*);                 \
  template void attend_segment_baseline<In, Acc>(const Segment<In, Acc>&, int64_t, Acc, Acc*);
FASTBON_ATTEND_SEGMENT(float, float)
FASTBON_ATTEND_SEGMENT(BFloat16, float)
FASTBON_ATTEND_SEGMENT(Half, float)
FASTBON_ATTEND_SEGMENT(double, double)
#undef FASTBON_ATTEND_SEGMENT

}  // namespace fastbon::cpu
