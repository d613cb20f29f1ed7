// The C++/OpenMP backend of fastbon's three ops: raw pointers and sizes, no torch. Inputs follow the backend
// contract of python/fastbon/ops/reference.py (contiguous, validated); outputs are written in full.
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_utils.h"

namespace fastbon::cpu {

// q [N, Hq, D], prefix_k/v [B, Hkv, P_max, D], suffix_k/v [N, Hkv, T_max, D], out [N, Hq, D], all of `dtype`.
// window 0 = none, softcap 0 = none; sinks nullptr or [Hq] of the accumulator type (double for float64, else float).
void shared_prefix_attention(DType dtype, const void* q, const void* prefix_k, const void* prefix_v,
                             const int32_t* prefix_lens, const void* suffix_k, const void* suffix_v,
                             const int32_t* suffix_lens, const int32_t* sample_to_prompt, void* out,
                             int64_t num_samples, int64_t num_prompts, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t prefix_max, int64_t suffix_max, double scale, int64_t window,
                             double softcap, const void* sinks, int num_threads);

// Tree (cascade) attention: each of N rows attends to one segment of every level on its path (L levels, the
// root first), then to its own suffix. Level l stores S_l segments [S_l, Hkv, capacity_l, D]; segments[l, i] is
// row i's segment there and level_lens[l][s] its length; suffix [N, Hkv, suffix_capacity, D] with suffix_lens.
// Keys are placed on row i's path in level order: level l's key t at (lengths of i's earlier levels) + t.
struct TreeShape {
  int64_t num_levels, num_rows, num_q_heads, num_kv_heads, head_dim, suffix_capacity;
  std::vector<int64_t> level_longest;  // [L] the longest segment of each level (sizes its partials)
  int64_t num_threads;                 // the most threads a run uses (sizes the per-thread scratch)
};

// Columns of a planned work item: (level, segment, KV head, first row position in the level's order, rows, chunk).
constexpr int64_t kItemColumns = 6;

// Where the run's buffers lie in the workspace (accumulator elements) and the index workspace (int64).
struct TreeWorkspaceLayout {
  explicit TreeWorkspaceLayout(const TreeShape& shape);
  int64_t queries = 0;                                 // [L + 1, N * Hq, D] the queries in each level's row order
  std::vector<int64_t> chunks, partial_out, partial_lse;  // per level (the suffix last): chunk slots and offsets
  int64_t scratch = 0, scratch_per_thread = 0;
  int64_t elements = 0, index_elements = 0;
};

// The plan of a batch: positions [L, N] (row i's place among its level's rows sorted by segment) and the
// shared-level work items (kItemColumns each). Runs once per batch change, not per layer.
void plan_tree(const TreeShape& shape, const int32_t* const* level_lens, const int64_t* level_segment_counts,
               const int32_t* segments, int64_t* positions, std::vector<int64_t>& items);

// One layer's tree attention on a plan: no allocation (workspace of layout.elements accumulator elements, double
// for float64 else float; index_workspace of layout.index_elements).
void tree_attention(DType dtype, const TreeShape& shape, const void* q, const void* const* level_keys,
                    const void* const* level_values, const int32_t* const* level_lens, const int64_t* level_capacity,
                    const int32_t* segments, const int64_t* positions, const int64_t* items, int64_t num_items,
                    const void* suffix_k, const void* suffix_v, const int32_t* suffix_lens, void* out, double scale,
                    int64_t window, double softcap, const void* sinks, void* workspace, int64_t* index_workspace,
                    int num_threads);

// logits [R, V] of `dtype`; per output row i: row_index, temperature, top_k, top_p, min_p, seed, step.
void sample(DType dtype, const void* logits, int64_t vocab, const int64_t* row_index, const float* temperature,
            const int32_t* top_k, const float* top_p, const float* min_p, const int64_t* seed, const int64_t* step,
            int64_t num_rows, int64_t* tokens, float* logprobs, int num_threads);

// y [rows, out_features] = x [rows, in_features] · weight [out_features, in_features]ᵀ (+ bias [out_features], or
// nullptr), all of `dtype` (float32, bfloat16 or float16), accumulated in float32: the few rows of a decode step.
void skinny_linear(DType dtype, const void* x, const void* weight, const void* bias, void* y, int64_t rows,
                   int64_t out_features, int64_t in_features, int num_threads);

// scores [B, n] float32/float64 -> values [B, k] (same dtype), indices int64 [B, k].
void select_topk(DType dtype, const void* scores, int64_t num_rows, int64_t n, int64_t k, void* values,
                 int64_t* indices, int num_threads);

}  // namespace fastbon::cpu
