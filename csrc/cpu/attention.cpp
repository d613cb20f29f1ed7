// Shared-prefix decode attention on the CPU (Hydragen's batching, FlashInfer's merge_state).
//
// Samples are grouped by prompt (a stable counting sort of sample_to_prompt: no grouping is assumed). For each
// (prompt, KV head, chunk of kChunk prefix keys) one work item multiplies all n·(Hq/Hkv) query rows of that prompt
// with the chunk's keys and values, so every prefix byte is read once per step: two small GEMMs with a softmax
// between them, accumulated in float32 (float64 for float64 inputs). Each sample's suffix is a work item of its
// Hq/Hkv rows. Items write a partial (softmax-weighted values, log-sum-exp) per query row and chunk; a last pass
// merges the partials of each query row by their log-sum-exp (merge_state.h). Items run in parallel under OpenMP. This
// file plans and runs the items and merges; the items' kernels are in attention_item.cpp (vector units) and, on CPUs
// with AMX, attention_amx.cpp: bfloat16 items run their two products on AMX tiles, for calls without soft-cap and
// window (those take the vector kernels).
//
// Optional features, each free when absent (a branch per item or row, none per key): a soft-cap rewrites an item's
// scores to c·tanh(s/c) after its first product; a sliding window gives every query row the first key it sees in
// the prefix and in its suffix (per row: samples of one prompt may have different suffix lengths), prefix chunks
// no row of the prompt sees are never built, and rows hide the keys before their start inside a chunk; sinks add
// exp(sink[h]) to query head h's denominator in the final merge.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention_item.h"
#include "cpu_ops.h"
#include "merge_state.h"

namespace fastbon::cpu {
namespace {

// The call of one layer: the plan's level structure, this layer's tensors, and the workspace the plan sized.
template <typename In, typename Acc>
struct TreeRun {
  const TreeShape& shape;
  const In* q;
  const In* const* level_keys;    // [L] each [S_l, Hkv, capacity_l, D]
  const In* const* level_values;  // [L]
  const int32_t* const* level_lens;  // [L] each [S_l]
  const int64_t* level_capacity;     // [L] keys per segment in level_keys[l]'s storage
  const int32_t* segments;           // [L, N]
  const int64_t* positions;          // [L, N]
  const int64_t* items;              // [num_items, kItemColumns]
  int64_t num_items;
  const In* suffix_k;  // [N, Hkv, suffix_capacity, D]
  const In* suffix_v;
  const int32_t* suffix_lens;  // [N]
  In* out;                     // [N, Hq, D]
  double scale;
  int64_t window;
  double softcap;
  const Acc* sinks;
  Acc* workspace;
  int64_t* index_workspace;
  int num_threads;
};

// The first key index whose chunk any of the rows sees (0 without a window).
FASTBON_INLINE int64_t first_chunk(int64_t start) { return start > 0 ? start / kChunk : 0; }

template <typename In, typename Acc>
void run_tree(const TreeRun<In, Acc>& call) {
  const TreeShape& shape = call.shape;
  const int64_t num_levels = shape.num_levels, num_rows = shape.num_rows, num_q_heads = shape.num_q_heads;
  const int64_t num_kv_heads = shape.num_kv_heads, head_dim = shape.head_dim, group = num_q_heads / num_kv_heads;
  const int64_t query_rows = num_rows * num_q_heads;
  const bool windowed = call.window > 0;
  // bfloat16 on AMX where the CPU has it: the tiles multiply bf16 several times faster than fp32 FMAs can, after
  // the inputs were widened. head_dim must fill whole tile rows. The AMX kernel knows neither soft-cap nor window.
  const bool amx = std::is_same_v<In, BFloat16> && head_dim % kAmxTileDepth == 0 && call.softcap == 0 && !windowed &&
                   amx_bf16_active();
  const TreeWorkspaceLayout layout(shape);
  // Level L is the suffix: every row its own segment, in row order.
  auto level_chunks = [&](int64_t level) { return layout.chunks[level]; };
  auto position = [&](int64_t level, int64_t i) { return level < num_levels ? call.positions[level * num_rows + i] : i; };
  // Query row (sample i, head) in level l's layout: a segment's rows for one KV head are contiguous there.
  auto level_row = [&](int64_t level, int64_t i, int64_t head) {
    return (head / group * num_rows + position(level, i)) * group + head % group;
  };
  auto queries = [&](int64_t level) { return call.workspace + layout.queries + level * query_rows * head_dim; };
  auto partial_out = [&](int64_t level) { return call.workspace + layout.partial_out[level]; };
  auto partial_lse = [&](int64_t level) { return call.workspace + layout.partial_lse[level]; };
  // Per row: where each level starts on its path (for the window), then the keys before the suffix.
  int64_t* offsets = call.index_workspace;                // [L, N]
  int64_t* path_lens = offsets + num_levels * num_rows;   // [N]
  int64_t* starts = path_lens + num_rows;                 // [L + 1, N * Hq] with a window, in each level's layout
  for (int64_t i = 0; i < num_rows; ++i) {
    int64_t path = 0;
    for (int64_t level = 0; level < num_levels; ++level) {
      offsets[level * num_rows + i] = path;
      path += call.level_lens[level][call.segments[level * num_rows + i]];
    }
    path_lens[i] = path;
  }
  const Acc query_scale = static_cast<Acc>(amx ? 1.0 : call.scale);
  for (int64_t level = 0; level <= num_levels; ++level) {
    Acc* level_queries = queries(level);
    for (int64_t i = 0; i < num_rows; ++i) {
      // The row's first visible key as an index into this level's segment (negative: every key).
      const int64_t start = call.suffix_lens[i] - call.window +
                            (level < num_levels ? path_lens[i] - offsets[level * num_rows + i] : 0);
      for (int64_t head = 0; head < num_q_heads; ++head) {
        const int64_t row = level_row(level, i, head);
        const In* source = call.q + (i * num_q_heads + head) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) level_queries[row * head_dim + d] = to_float(source[d]) * query_scale;
        if (windowed) starts[level * query_rows + row] = start;
      }
    }
  }

  // Work items: the plan's shared-level items, then one per (sample, KV head, suffix chunk).
  const int64_t suffix_chunks = level_chunks(num_levels);
  const int64_t num_work = call.num_items + num_rows * num_kv_heads * suffix_chunks;
  auto make_segment = [&](int64_t index, Segment<In, Acc>& segment) {
    int64_t level, kv_head, first, count, chunk;
    const In *keys, *values;
    int64_t length;
    if (index < call.num_items) {
      const int64_t* item = call.items + index * kItemColumns;
      level = item[0];
      const int64_t segment_index = item[1];
      kv_head = item[2], first = item[3], count = item[4], chunk = item[5];
      const int64_t offset = ((segment_index * num_kv_heads + kv_head) * call.level_capacity[level] + chunk * kChunk) *
                             head_dim;
      keys = call.level_keys[level] + offset, values = call.level_values[level] + offset;
      length = call.level_lens[level][segment_index];
    } else {
      const int64_t local = index - call.num_items;
      const int64_t i = local / (num_kv_heads * suffix_chunks);
      level = num_levels, kv_head = local / suffix_chunks % num_kv_heads, chunk = local % suffix_chunks;
      first = i, count = 1;
      const int64_t offset = ((i * num_kv_heads + kv_head) * shape.suffix_capacity + chunk * kChunk) * head_dim;
      keys = call.suffix_k + offset, values = call.suffix_v + offset;
      length = call.suffix_lens[i];
    }
    if (chunk * kChunk >= length) return false;
    const int64_t row = (kv_head * num_rows + first) * group;
    const int64_t chunks = level_chunks(level);
    const int64_t* row_starts = windowed ? starts + level * query_rows + row : nullptr;
    const int64_t chunk_end = std::min(length, (chunk + 1) * kChunk);
    if (windowed) {  // a chunk before every row's first visible chunk is never built: the merge starts after it
      int64_t earliest = std::numeric_limits<int64_t>::max();
      for (int64_t r = 0; r < count * group; ++r) earliest = std::min(earliest, row_starts[r]);
      if (first_chunk(earliest) > chunk) return false;
    }
    segment = {keys, values, chunk_end - chunk * kChunk, queries(level) + row * head_dim, count * group,
               partial_out(level) + (row * chunks + chunk) * head_dim, chunks * head_dim,
               partial_lse(level) + row * chunks + chunk, chunks, chunk * kChunk, row_starts};
    return true;
  };
  const Acc cap = static_cast<Acc>(call.softcap);
  const Isa isa = active_isa();
  int64_t multiply_adds = num_work * kChunk * group * head_dim;  // an upper bound: picks the team size only
  const int threads = team_size(std::min<int64_t>({call.num_threads, shape.num_threads, std::max<int64_t>(num_work, 1)}),
                                multiply_adds, int64_t{1} << 20);
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int thread = omp_get_thread_num();
#else
    const int thread = 0;
#endif
    Acc* scratch = call.workspace + layout.scratch + thread * layout.scratch_per_thread;
    Acc* merged = scratch + scratch_elements<Acc>(head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < num_work; ++index) {
      Segment<In, Acc> segment;
      if (!make_segment(index, segment)) continue;
#if FASTBON_X86_DISPATCH
      if constexpr (std::is_same_v<In, BFloat16>) {
        if (amx) {
          attend_segment_amx(segment, head_dim, static_cast<float>(call.scale), scratch);
          continue;
        }
      }
#endif
      if (isa == Isa::kAvx512)
        attend_segment_avx512<In, Acc>(segment, head_dim, cap, scratch);
      else if (isa == Isa::kAvx2)
        attend_segment_avx2<In, Acc>(segment, head_dim, cap, scratch);
      else
        attend_segment_baseline<In, Acc>(segment, head_dim, cap, scratch);
    }

    // Merge each query row's partials (every level, from its window's first chunk on) by log-sum-exp, with the
    // sink as one more term of zero value; no keys and no sink gives zeros. A chunk its window starts after the end
    // of has lse = -inf (at most one per level) and weighs nothing.
#pragma omp for schedule(static)
    for (int64_t index = 0; index < query_rows; ++index) {
      const int64_t i = index / num_q_heads, head = index % num_q_heads;
      auto for_each_slot = [&](auto&& visit) {
        for (int64_t level = 0; level <= num_levels; ++level) {
          const int64_t row = level_row(level, i, head);
          const int64_t length = level < num_levels
                                     ? call.level_lens[level][call.segments[level * num_rows + i]]
                                     : call.suffix_lens[i];
          const int64_t first = windowed ? first_chunk(starts[level * query_rows + row]) : 0;
          const int64_t chunks = level_chunks(level);
          for (int64_t chunk = first; chunk * kChunk < length; ++chunk)
            visit(partial_lse(level)[row * chunks + chunk], partial_out(level) + (row * chunks + chunk) * head_dim);
        }
      };
      merge_states(for_each_slot, call.sinks != nullptr ? call.sinks + head : nullptr, head_dim, merged,
                   call.out + index * head_dim);
    }
  }
}

}  // namespace

TreeWorkspaceLayout::TreeWorkspaceLayout(const TreeShape& shape) {
  const int64_t query_rows = shape.num_rows * shape.num_q_heads;
  int64_t size = 0;
  queries = size;
  size += (shape.num_levels + 1) * query_rows * shape.head_dim;
  for (int64_t level = 0; level <= shape.num_levels; ++level) {
    const int64_t longest = level < shape.num_levels ? shape.level_longest[level] : shape.suffix_capacity;
    chunks.push_back((longest + kChunk - 1) / kChunk);
    partial_out.push_back(size);
    size += query_rows * chunks.back() * shape.head_dim;
    partial_lse.push_back(size);
    size += query_rows * chunks.back();
  }
  scratch = size;
  // Both accumulator types size the same way in elements (scratch_elements does not depend on the type).
  scratch_per_thread = scratch_elements<float>(shape.head_dim) + shape.head_dim;
  elements = size + shape.num_threads * scratch_per_thread;
  index_elements = shape.num_levels * shape.num_rows + shape.num_rows + (shape.num_levels + 1) * query_rows;
}

void plan_tree(const TreeShape& shape, const int32_t* const* level_lens, const int64_t* level_segment_counts,
               const int32_t* segments, int64_t* positions, std::vector<int64_t>& items) {
  std::vector<int64_t> first, cursor;
  const int64_t num_rows = shape.num_rows;
  items.clear();
  for (int64_t level = 0; level < shape.num_levels; ++level) {
    // Stable counting sort of the rows by segment: positions[level, i] is row i's place in that order.
    const int32_t* segment_of = segments + level * num_rows;
    const int64_t num_segments = level_segment_counts[level];
    first.assign(num_segments + 1, 0);
    for (int64_t i = 0; i < num_rows; ++i) ++first[segment_of[i] + 1];
    for (int64_t s = 0; s < num_segments; ++s) first[s + 1] += first[s];
    cursor.assign(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < num_rows; ++i) positions[level * num_rows + i] = cursor[segment_of[i]]++;
    for (int64_t s = 0; s < num_segments; ++s) {
      const int64_t count = first[s + 1] - first[s];
      if (count == 0) continue;
      for (int64_t kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head)
        for (int64_t chunk = 0; chunk * kChunk < level_lens[level][s]; ++chunk)
          items.insert(items.end(), {level, s, kv_head, first[s], count, chunk});
    }
  }
}

void tree_attention(DType dtype, const TreeShape& shape, const void* q, const void* const* level_keys,
                    const void* const* level_values, const int32_t* const* level_lens, const int64_t* level_capacity,
                    const int32_t* segments, const int64_t* positions, const int64_t* items, int64_t num_items,
                    const void* suffix_k, const void* suffix_v, const int32_t* suffix_lens, void* out, double scale,
                    int64_t window, double softcap, const void* sinks, void* workspace, int64_t* index_workspace,
                    int num_threads) {
  auto run = [&](auto element, auto accumulator) {
    using In = decltype(element);
    using Acc = decltype(accumulator);
    run_tree<In, Acc>({shape, static_cast<const In*>(q), reinterpret_cast<const In* const*>(level_keys),
                       reinterpret_cast<const In* const*>(level_values), level_lens, level_capacity, segments,
                       positions, items, num_items, static_cast<const In*>(suffix_k), static_cast<const In*>(suffix_v),
                       suffix_lens, static_cast<In*>(out), scale, window, softcap, static_cast<const Acc*>(sinks),
                       static_cast<Acc*>(workspace), index_workspace, num_threads});
  };
  visit_dtype(dtype, run);
}

void shared_prefix_attention(DType dtype, const void* q, const void* prefix_k, const void* prefix_v,
                             const int32_t* prefix_lens, const void* suffix_k, const void* suffix_v,
                             const int32_t* suffix_lens, const int32_t* sample_to_prompt, void* out,
                             int64_t num_samples, int64_t num_prompts, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t prefix_max, int64_t suffix_max, double scale,
                             int64_t window, double softcap, const void* sinks, int num_threads) {
  // One level (the prompts), planned for this call alone: the decode loop plans once per batch change instead.
  const int64_t longest = num_prompts ? *std::max_element(prefix_lens, prefix_lens + num_prompts) : 0;
  const TreeShape shape{1, num_samples, num_q_heads, num_kv_heads, head_dim, suffix_max, {longest}, num_threads};
  std::vector<int64_t> positions(num_samples), items;
  plan_tree(shape, &prefix_lens, &num_prompts, sample_to_prompt, positions.data(), items);
  const TreeWorkspaceLayout layout(shape);
  const bool wide = dtype == DType::kFloat64;
  std::vector<double> workspace_double(wide ? layout.elements : 0);
  std::vector<float> workspace_float(wide ? 0 : layout.elements);
  std::vector<int64_t> index_workspace(layout.index_elements);
  const int64_t capacity = prefix_max;
  tree_attention(dtype, shape, q, &prefix_k, &prefix_v, &prefix_lens, &capacity, sample_to_prompt, positions.data(),
                 items.data(), static_cast<int64_t>(items.size() / kItemColumns), suffix_k, suffix_v, suffix_lens, out,
                 scale, window, softcap, sinks,
                 wide ? static_cast<void*>(workspace_double.data()) : static_cast<void*>(workspace_float.data()),
                 index_workspace.data(), num_threads);
}

}  // namespace fastbon::cpu
