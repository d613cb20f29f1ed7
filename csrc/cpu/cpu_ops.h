// The C++/OpenMP backend of fastbon's three ops: raw pointers and sizes, no torch. Inputs follow the backend
// contract of python/fastbon/ops/reference.py (contiguous, validated); outputs are written in full.
#pragma once

#include <cstdint>

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

// logits [R, V] of `dtype`; per output row i: row_index, temperature, top_k, top_p, min_p, seed, step.
void sample(DType dtype, const void* logits, int64_t vocab, const int64_t* row_index, const float* temperature,
            const int32_t* top_k, const float* top_p, const float* min_p, const int64_t* seed, const int64_t* step,
            int64_t num_rows, int64_t* tokens, float* logprobs, int num_threads);

// scores [B, n] float32/float64 -> values [B, k] (same dtype), indices int64 [B, k].
void select_topk(DType dtype, const void* scores, int64_t num_rows, int64_t n, int64_t k, void* values,
                 int64_t* indices, int num_threads);

}  // namespace fastbon::cpu
