// Shared-prefix decode attention on the CPU (Hydragen's batching, FlashInfer's merge_state).
//
// Samples are grouped by prompt (a stable counting sort of sample_to_prompt: no grouping is assumed). For each
// (prompt, KV head, chunk of kChunk prefix keys) one work item multiplies all n·(Hq/Hkv) query rows of that prompt
// with the chunk's keys and values, so every prefix byte is read once per step: two small GEMMs with a softmax
// between them, accumulated in float32 (float64 for float64 inputs). Each sample's suffix is a work item of its
// Hq/Hkv rows. Items write a partial (softmax-weighted values, log-sum-exp) per query row and chunk; a last pass
// merges the partials of each query row by their log-sum-exp. Items run in parallel under OpenMP. On CPUs with AMX,
// bfloat16 items run their two products on AMX tiles instead (attention_amx.cpp), for calls without soft-cap and
// window (those take the vector kernels).
//
// Optional features, each free when absent (a branch per item or row, none per key): a soft-cap rewrites an item's
// scores to c·tanh(s/c) after its first product; a sliding window gives every query row the first key it sees in
// the prefix and in its suffix (per row: samples of one prompt may have different suffix lengths), prefix chunks
// no row of the prompt sees are never built, and rows hide the keys before their start inside a chunk; sinks add
// exp(sink[h]) to query head h's denominator in the final merge.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_item.h"
#include "cpu_ops.h"

namespace fastbon::cpu {
namespace {

constexpr int64_t kGemmRows = 4;  // items with fewer query rows take the matrix-vector path

// c[Rows, Cols] = A[Rows, depth] · b[depth, Cols] with A(r, i) = a[r * a_row + i * a_inner], the accumulators in
// registers (Rows x Cols / vector width of them).
template <typename Acc, int Rows, int Cols>
FASTBON_INLINE void gemm_tile(int64_t depth, const Acc* a, int64_t a_row, int64_t a_inner, const Acc* b, int64_t ldb,
                              Acc* c, int64_t ldc) {
  Acc acc[Rows][Cols] = {};
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
    std::fill(accumulator, accumulator + head_dim, Acc(0));
    for (int64_t key = begin; key < segment.length; ++key) {
      const In* value_row = segment.values + key * head_dim;
      const Acc p = row[key];
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) accumulator[d] += p * to_float(value_row[d]);
    }
    Acc* destination = segment.out + r * segment.out_stride;
    const Acc inverse = Acc(1) / sum;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) destination[d] = accumulator[d] * inverse;
    segment.lse[r * segment.lse_stride] = maximum + std::log(sum);
  }
}

// Many rows (a prompt's queries against a prefix chunk): S^T = K · Q^T and O = P · V as two register-tiled GEMMs,
// the softmax running down S^T's columns. K is read in its own layout; only the small Q block is transposed.
template <typename In, typename Acc, int Rows, int Cols>
FASTBON_INLINE void attend_segment(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap, Acc* scratch) {
  if (segment.rows < kGemmRows) return attend_rows(segment, head_dim, softcap, scratch);
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
    const int64_t padded_rows = round_up(rows, Cols);
    for (int64_t d = 0; d < head_dim; ++d) {
      for (int64_t r = 0; r < rows; ++r) queries_t[d * padded_rows + r] = segment.queries[(first_row + r) * head_dim + d];
      for (int64_t r = rows; r < padded_rows; ++r) queries_t[d * padded_rows + r] = 0;
    }
    gemm<Acc, Rows, Cols>(length, padded_rows, head_dim, key_rows, head_dim, 1, queries_t, padded_rows, scores_t,
                          padded_rows);
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

// The same body compiled for three instruction sets; register tiles of 6 rows x four (AVX-512) or two vectors.
template <typename In, typename Acc>
FASTBON_TARGET_AVX512 void attend_segment_avx512(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap,
                                                 Acc* scratch) {
  attend_segment<In, Acc, 6, 256 / sizeof(Acc)>(segment, head_dim, softcap, scratch);
}
template <typename In, typename Acc>
FASTBON_TARGET_AVX2 void attend_segment_avx2(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap,
                                             Acc* scratch) {
  attend_segment<In, Acc, 6, 64 / sizeof(Acc)>(segment, head_dim, softcap, scratch);
}
template <typename In, typename Acc>
void attend_segment_baseline(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap, Acc* scratch) {
  attend_segment<In, Acc, 6, 32 / sizeof(Acc)>(segment, head_dim, softcap, scratch);
}

template <typename In, typename Acc>
void run_attention(const In* q, const In* prefix_k, const In* prefix_v, const int32_t* prefix_lens, const In* suffix_k,
                   const In* suffix_v, const int32_t* suffix_lens, const int32_t* sample_to_prompt, In* out,
                   int64_t num_samples, int64_t num_prompts, int64_t num_q_heads, int64_t num_kv_heads,
                   int64_t head_dim, int64_t prefix_max, int64_t suffix_max, double scale, int64_t window,
                   double softcap, const Acc* sinks, int num_threads) {
  const int64_t group = num_q_heads / num_kv_heads;
  // bfloat16 on AMX where the CPU has it: the tiles multiply bf16 several times faster than fp32 FMAs can, after
  // the inputs were widened. head_dim must fill whole tile rows. The AMX kernel knows neither soft-cap nor window.
  const bool amx = std::is_same_v<In, BFloat16> && head_dim % kAmxTileDepth == 0 && softcap == 0 && window == 0 &&
                   amx_bf16_active();
  // Stable counting sort: order[first[b] .. first[b + 1]) are prompt b's samples.
  std::vector<int64_t> first(num_prompts + 1, 0), order(num_samples), position(num_samples);
  for (int64_t i = 0; i < num_samples; ++i) ++first[sample_to_prompt[i] + 1];
  for (int64_t b = 0; b < num_prompts; ++b) first[b + 1] += first[b];
  std::vector<int64_t> cursor(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < num_samples; ++i) {
    position[i] = cursor[sample_to_prompt[i]]++;
    order[position[i]] = i;
  }
  // Query rows are renumbered so that prompt b's rows for KV head h are contiguous: one GEMM operand per item.
  auto row_id = [&](int64_t prompt, int64_t kv_head, int64_t local_sample) {
    const int64_t count = first[prompt + 1] - first[prompt];
    return first[prompt] * num_q_heads + kv_head * count * group + local_sample * group;
  };
  const int64_t prefix_slots = (prefix_max + kChunk - 1) / kChunk;
  const int64_t slots = prefix_slots + (suffix_max + kChunk - 1) / kChunk;
  const int64_t num_rows = num_samples * num_q_heads;
  std::unique_ptr<Acc[]> queries(new Acc[num_rows * head_dim]);
  std::unique_ptr<Acc[]> partial_out(new Acc[num_rows * slots * head_dim]);
  std::unique_ptr<Acc[]> partial_lse(new Acc[num_rows * slots]);
  // With a window, each row's first visible prefix and suffix key (query position - window + 1, in the index of
  // each sequence; negative: every key), and each prompt's earliest one over its samples.
  std::vector<int64_t> prefix_starts(window > 0 ? num_rows : 0), suffix_starts(window > 0 ? num_rows : 0);
  std::vector<int64_t> prompt_starts(num_prompts, std::numeric_limits<int64_t>::max());
  for (int64_t i = 0; i < num_samples; ++i) {
    const int64_t prompt = sample_to_prompt[i];
    const int64_t prefix_start = prefix_lens[prompt] + suffix_lens[i] - window;
    prompt_starts[prompt] = window > 0 ? std::min(prompt_starts[prompt], prefix_start) : 0;
    for (int64_t head = 0; head < num_q_heads; ++head) {
      const int64_t row = row_id(prompt, head / group, position[i] - first[prompt]) + head % group;
      const In* source = q + (i * num_q_heads + head) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d)
        queries[row * head_dim + d] = to_float(source[d]) * static_cast<Acc>(amx ? 1.0 : scale);
      if (window > 0) {
        prefix_starts[row] = prefix_start;
        suffix_starts[row] = suffix_lens[i] - window;
      }
    }
  }
  // The first key index whose chunk any of the rows sees (0 without a window).
  auto first_chunk = [](int64_t start) { return start > 0 ? start / kChunk : 0; };

  std::vector<Segment<In, Acc>> segments;
  auto add_segments = [&](const In* keys, const In* values, int64_t length, int64_t row, int64_t rows,
                          int64_t first_slot, const int64_t* starts, int64_t earliest_start) {
    for (int64_t chunk = first_chunk(earliest_start); chunk * kChunk < length; ++chunk) {
      const int64_t offset = chunk * kChunk * head_dim;
      segments.push_back({keys + offset, values + offset, std::min(kChunk, length - chunk * kChunk),
                          queries.get() + row * head_dim, rows,
                          partial_out.get() + (row * slots + first_slot + chunk) * head_dim, slots * head_dim,
                          partial_lse.get() + row * slots + first_slot + chunk, slots, chunk * kChunk,
                          starts == nullptr ? nullptr : starts + row});
    }
  };
  for (int64_t prompt = 0; prompt < num_prompts; ++prompt) {
    const int64_t count = first[prompt + 1] - first[prompt];
    if (count == 0) continue;
    for (int64_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
      const int64_t offset = (prompt * num_kv_heads + kv_head) * prefix_max * head_dim;
      add_segments(prefix_k + offset, prefix_v + offset, prefix_lens[prompt], row_id(prompt, kv_head, 0),
                   count * group, 0, window > 0 ? prefix_starts.data() : nullptr, prompt_starts[prompt]);
    }
  }
  for (int64_t i = 0; i < num_samples; ++i) {
    const int64_t prompt = sample_to_prompt[i];
    for (int64_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
      const int64_t offset = (i * num_kv_heads + kv_head) * suffix_max * head_dim;
      add_segments(suffix_k + offset, suffix_v + offset, suffix_lens[i],
                   row_id(prompt, kv_head, position[i] - first[prompt]), group, prefix_slots,
                   window > 0 ? suffix_starts.data() : nullptr, window > 0 ? suffix_lens[i] - window : 0);
    }
  }
  const Acc cap = static_cast<Acc>(softcap);

  const Isa isa = active_isa();
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  int64_t multiply_adds = 0;
  for (const auto& segment : segments) multiply_adds += segment.rows * segment.length * head_dim;
  const int threads = team_size(std::min<int64_t>(num_threads, num_segments), multiply_adds, int64_t{1} << 20);
#pragma omp parallel num_threads(threads)
  {
    std::unique_ptr<Acc[]> scratch(new Acc[scratch_elements<Acc>(head_dim)]);
    std::unique_ptr<Acc[]> merged(new Acc[head_dim]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < num_segments; ++index) {
#if FASTBON_X86_DISPATCH
      if constexpr (std::is_same_v<In, BFloat16>) {
        if (amx) {
          attend_segment_amx(segments[index], head_dim, static_cast<float>(scale), scratch.get());
          continue;
        }
      }
#endif
      if (isa == Isa::kAvx512)
        attend_segment_avx512<In, Acc>(segments[index], head_dim, cap, scratch.get());
      else if (isa == Isa::kAvx2)
        attend_segment_avx2<In, Acc>(segments[index], head_dim, cap, scratch.get());
      else
        attend_segment_baseline<In, Acc>(segments[index], head_dim, cap, scratch.get());
    }

    // Merge each query row's partials (the chunks from its window's first one on) by log-sum-exp, with the sink as
    // one more term of zero value; no keys and no sink gives zeros.
#pragma omp for schedule(static)
    for (int64_t index = 0; index < num_rows; ++index) {
      const int64_t i = index / num_q_heads, head = index % num_q_heads, prompt = sample_to_prompt[i];
      const int64_t row = row_id(prompt, head / group, position[i] - first[prompt]) + head % group;
      const int64_t used_prefix = (prefix_lens[prompt] + kChunk - 1) / kChunk;
      const int64_t used_suffix = (suffix_lens[i] + kChunk - 1) / kChunk;
      const int64_t first_prefix = window > 0 ? first_chunk(prefix_starts[row]) : 0;
      const int64_t first_suffix = window > 0 ? first_chunk(suffix_starts[row]) : 0;
      Acc maximum = sinks != nullptr ? sinks[head] : -std::numeric_limits<Acc>::infinity();
      auto for_each_slot = [&](auto&& visit) {
        for (int64_t slot = first_prefix; slot < used_prefix; ++slot) visit(slot);
        for (int64_t slot = prefix_slots + first_suffix; slot < prefix_slots + used_suffix; ++slot) visit(slot);
      };
      for_each_slot([&](int64_t slot) { maximum = std::max(maximum, partial_lse[row * slots + slot]); });
      std::fill(merged.get(), merged.get() + head_dim, Acc(0));
      Acc total = sinks != nullptr ? std::exp(sinks[head] - maximum) : Acc(0);
      for_each_slot([&](int64_t slot) {
        // A chunk its window starts after the end of (lse = -inf, at most one per row) weighs nothing.
        const Acc lse = partial_lse[row * slots + slot];
        const Acc weight = std::isinf(lse) ? Acc(0) : std::exp(lse - maximum);
        const Acc* partial = partial_out.get() + (row * slots + slot) * head_dim;
        total += weight;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) merged[d] += weight * partial[d];
      });
      const Acc inverse = total > 0 ? Acc(1) / total : Acc(0);
      In* destination = out + index * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) destination[d] = narrow<In>(merged[d] * inverse);
    }
  }
}

}  // namespace

void shared_prefix_attention(DType dtype, const void* q, const void* prefix_k, const void* prefix_v,
                             const int32_t* prefix_lens, const void* suffix_k, const void* suffix_v,
                             const int32_t* suffix_lens, const int32_t* sample_to_prompt, void* out,
                             int64_t num_samples, int64_t num_prompts, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t prefix_max, int64_t suffix_max, double scale,
                             int64_t window, double softcap, const void* sinks, int num_threads) {
  auto run = [&](auto element, auto accumulator) {
    using In = decltype(element);
    using Acc = decltype(accumulator);
    run_attention<In, Acc>(static_cast<const In*>(q), static_cast<const In*>(prefix_k),
                           static_cast<const In*>(prefix_v), prefix_lens, static_cast<const In*>(suffix_k),
                           static_cast<const In*>(suffix_v), suffix_lens, sample_to_prompt, static_cast<In*>(out),
                           num_samples, num_prompts, num_q_heads, num_kv_heads, head_dim, prefix_max, suffix_max,
                           scale, window, softcap, static_cast<const Acc*>(sinks), num_threads);
  };
  visit_dtype(dtype, run);
}

}  // namespace fastbon::cpu
