// Shared-prefix decode attention on the CPU, bfloat16 work items on AMX tiles (attention.cpp picks this kernel
// where amx_bf16_active() and head_dim % 32 == 0).
//
// bfloat16 items on AMX tiles (TDPBF16PS: bf16 products, fp32 sums), 64 query rows at a time: S = Q·K^T, the
// softmax in fp32, then O = P·V with P rounded to bf16 (as flash attention does). The tiles multiply the raw bf16
// queries, so the scale goes on the scores. An A operand is 16 rows x 32 bf16 of a row-major matrix; a B operand
// holds 16 depth pairs x 16 columns with each column's two depth elements adjacent, so per item K (transposed) and
// V are packed into that layout once: tiles of 16 x 32 bf16, [column block][depth step], zero past the data.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "attention_item.h"

#if FASTBON_X86_DISPATCH
#include <immintrin.h>

namespace fastbon::cpu {
namespace {

constexpr int64_t kTile = 16;             // rows of every tile; columns of an fp32 result tile
constexpr int64_t kTileDepth = kAmxTileDepth;  // bf16 elements in a tile row (64 bytes)
constexpr int64_t kTileElements = kTile * kTileDepth;
constexpr int64_t kTileGroup = 4 * kTile;  // result columns per pass: four accumulator tiles
constexpr int64_t kTileRows = 4 * kTile;   // query rows per pass: four stripes share each b tile while in L1
// With these sizes the packed operands and the pass's buffers fit in the fp32 path's scratch for any head_dim.
static_assert(kChunk % kTileGroup == 0 && kMaxColumns == kTileGroup && kTileRows <= kRowBlock, "AMX scratch");

struct alignas(64) TileConfig {  // ldtilecfg's palette 1: tmm0-7 all 16 rows x 64 bytes
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// c[stripes * 16, column_blocks * 16] = a[stripes * 16, depth_steps * 32] · b: a row-major (a_stride elements a
// row), b packed, c with c_stride; column_blocks is a multiple of 4. Column groups outermost: the group's b tiles
// stay in L1 while the stripes pass. tmm0-3 accumulate, tmm4 holds a's tile, tmm5-7 b's.
FASTBON_TARGET_AMX void amx_gemm(int64_t stripes, int64_t column_blocks, int64_t depth_steps, const uint16_t* a,
                                 int64_t a_stride, const uint16_t* b, float* c, int64_t c_stride) {
  const int64_t block_stride = depth_steps * kTileElements;
  for (int64_t block = 0; block < column_blocks; block += 4) {
    const uint16_t* tiles = b + block * block_stride;
    for (int64_t stripe = 0; stripe < stripes; ++stripe) {
      const uint16_t* a_stripe = a + stripe * kTile * a_stride;
      float* c_stripe = c + stripe * kTile * c_stride + block * kTile;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t step = 0; step < depth_steps; ++step) {
        const uint16_t* tile = tiles + step * kTileElements;
        _tile_loadd(4, a_stripe + step * kTileDepth, a_stride * 2);
        _tile_loadd(5, tile, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, tile + block_stride, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, tile + 2 * block_stride, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, tile + 3 * block_stride, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, c_stripe, c_stride * 4);
      _tile_stored(1, c_stripe + kTile, c_stride * 4);
      _tile_stored(2, c_stripe + 2 * kTile, c_stride * 4);
      _tile_stored(3, c_stripe + 3 * kTile, c_stride * 4);
    }
  }
}

// GCC 12's shuffle intrinsics start from an "undefined" vector that -Wmaybe-uninitialized flags (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// dst[i * 16 + j] = src[j * stride + i] for a 16 x 16 block of 32-bit elements (four rounds of shuffles).
FASTBON_TARGET_AMX FASTBON_INLINE void transpose_16x16(const uint32_t* src, int64_t stride, uint32_t* dst) {
  __m512i rows[16], mixed[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_si512(src + i * stride);
  for (int i = 0; i < 8; ++i) {
    mixed[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    mixed[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    rows[4 * i] = _mm512_unpacklo_epi64(mixed[4 * i], mixed[4 * i + 2]);
    rows[4 * i + 1] = _mm512_unpackhi_epi64(mixed[4 * i], mixed[4 * i + 2]);
    rows[4 * i + 2] = _mm512_unpacklo_epi64(mixed[4 * i + 1], mixed[4 * i + 3]);
    rows[4 * i + 3] = _mm512_unpackhi_epi64(mixed[4 * i + 1], mixed[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    mixed[i] = _mm512_shuffle_i32x4(rows[i], rows[i + 4], 0x88);
    mixed[i + 4] = _mm512_shuffle_i32x4(rows[i], rows[i + 4], 0xdd);
    mixed[i + 8] = _mm512_shuffle_i32x4(rows[i + 8], rows[i + 12], 0x88);
    mixed[i + 12] = _mm512_shuffle_i32x4(rows[i + 8], rows[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_si512(dst + i * 16, _mm512_shuffle_i32x4(mixed[i], mixed[i + 8], 0x88));
    _mm512_storeu_si512(dst + (i + 8) * 16, _mm512_shuffle_i32x4(mixed[i], mixed[i + 8], 0xdd));
  }
}

}  // namespace

FASTBON_TARGET_AMX void attend_segment_amx(const Segment<BFloat16, float>& segment, int64_t head_dim, float scale,
                                           float* scratch) {
  const int64_t length = segment.length;
  const int64_t key_columns = round_up(length, kTileGroup);  // S's columns
  const int64_t key_depth = round_up(length, kTileDepth);    // P's columns
  const int64_t value_columns = round_up(head_dim, kTileGroup);
  const int64_t pairs = head_dim / 2, head_steps = head_dim / kTileDepth, key_steps = key_depth / kTileDepth;
  uint16_t* keys_packed = reinterpret_cast<uint16_t*>(scratch);   // [key_columns / 16][head_steps] tiles
  uint16_t* values_packed = keys_packed + key_columns * head_dim;  // [value_columns / 16][key_steps] tiles
  uint16_t* queries = values_packed + key_depth * value_columns;   // [kTileRows, head_dim]
  uint16_t* probabilities = queries + kTileRows * head_dim;        // [kTileRows, key_depth]
  float* scores = reinterpret_cast<float*>(probabilities + kTileRows * key_depth);  // [kTileRows, key_columns]
  float* outputs = scores + kTileRows * key_columns;                                // [kTileRows, value_columns]
  float maximum[kTileRows], sum[kTileRows];

  // K^T: tile (key block, depth step) is the transpose of K's 16 keys x 16 bf16 pairs. The last block's keys are
  // first copied, zero-padded, into the query tile's space: rows past `length` may lie past the buffer.
  for (int64_t first_key = 0; first_key < key_columns; first_key += kTile) {
    const int64_t present = std::clamp<int64_t>(length - first_key, 0, kTile);
    const BFloat16* source = segment.keys + first_key * head_dim;
    if (present < kTile) {
      std::memcpy(queries, source, present * head_dim * sizeof(BFloat16));
      std::fill(queries + present * head_dim, queries + kTile * head_dim, uint16_t{0});
      source = reinterpret_cast<const BFloat16*>(queries);
    }
    uint16_t* block = keys_packed + first_key / kTile * head_steps * kTileElements;
    for (int64_t step = 0; step < head_steps; ++step)
      transpose_16x16(reinterpret_cast<const uint32_t*>(source) + step * kTile, pairs,
                      reinterpret_cast<uint32_t*>(block + step * kTileElements));
  }
  // V: tile row `(key % 32) / 2` of tile (column block, key / 32) interleaves keys `key` and `key + 1`.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t key = 0; key < key_depth; key += 2) {
    const BFloat16* first = segment.values + key * head_dim;
    for (int64_t column = 0; column < value_columns; column += kTile) {
      __m512i both = _mm512_setzero_si512();
      if (column < head_dim) {
        const __m256i low = key < length ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + column))
                                         : _mm256_setzero_si256();
        const __m256i high = key + 1 < length
                                 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + head_dim + column))
                                 : _mm256_setzero_si256();
        both = _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_zextsi256_si512(low), high, 1));
      }
      _mm512_storeu_si512(values_packed + (column / kTile * key_steps + key / kTileDepth) * kTileElements +
                              key % kTileDepth / 2 * kTileDepth,
                          both);
    }
  }

  const __m512i top_halves = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const TileConfig config;
  _tile_loadconfig(&config);
  for (int64_t first_row = 0; first_row < segment.rows; first_row += kTileRows) {
    const int64_t rows = std::min(kTileRows, segment.rows - first_row);
    const int64_t stripes = (rows + kTile - 1) / kTile;
    // The query values are bf16 held as float: their top halves are exact.
#pragma omp simd
    for (int64_t index = 0; index < rows * head_dim; ++index)
      queries[index] = bit_cast<uint32_t>(segment.queries[first_row * head_dim + index]) >> 16;
    std::fill(queries + rows * head_dim, queries + stripes * kTile * head_dim, uint16_t{0});
    amx_gemm(stripes, key_columns / kTile, head_steps, queries, head_dim, keys_packed, scores, key_columns);
    std::fill(probabilities + rows * key_depth, probabilities + stripes * kTile * key_depth, uint16_t{0});
    for (int64_t r = 0; r < rows; ++r) {
      float* score_row = scores + r * key_columns;
      uint16_t* row = probabilities + r * key_depth;
      float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
      for (int64_t key = 0; key < length; ++key) row_max = std::max(row_max, score_row[key] * scale);
#pragma omp simd
      for (int64_t key = 0; key < length; ++key) score_row[key] = exp_nonpositive(score_row[key] * scale - row_max);
      std::fill(score_row + length, score_row + key_depth, 0.0f);
      // 32 weights at a time to bf16 (nearest even), summed as rounded: the weights that multiply V. A 32-bit lane
      // holds two of them, the top half and the bottom half moved up.
      __m512 row_sum = _mm512_setzero_ps();
      for (int64_t key = 0; key < key_depth; key += kTileDepth) {
        const __m512i weights = reinterpret_cast<__m512i>(
            _mm512_cvtne2ps_pbh(_mm512_loadu_ps(score_row + key + kTile), _mm512_loadu_ps(score_row + key)));
        _mm512_storeu_si512(row + key, weights);
        row_sum = _mm512_add_ps(row_sum, _mm512_castsi512_ps(_mm512_slli_epi32(weights, 16)));
        row_sum = _mm512_add_ps(row_sum, _mm512_castsi512_ps(_mm512_and_si512(weights, top_halves)));
      }
      maximum[r] = row_max;
      sum[r] = _mm512_reduce_add_ps(row_sum);
    }
    amx_gemm(stripes, value_columns / kTile, key_steps, probabilities, key_depth, values_packed, outputs,
             value_columns);
    for (int64_t r = 0; r < rows; ++r) {
      const float inverse = 1.0f / sum[r];
      float* destination = segment.out + (first_row + r) * segment.out_stride;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) destination[d] = outputs[r * value_columns + d] * inverse;
      segment.lse[(first_row + r) * segment.lse_stride] = maximum[r] + std::log(sum[r]);
    }
  }
  _tile_release();
}
#pragma GCC diagnostic pop

}  // namespace fastbon::cpu
#endif
