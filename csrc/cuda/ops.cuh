// fastbon's CUDA kernels: launchers over raw device pointers, sizes and a stream. No torch header: this compiles
// with nvcc alone (compile_check.sh); csrc/bindings/cuda_ops.cpp binds them to torch.ops.fastbon.
// Inputs follow the backend contract of python/fastbon/ops/reference.py (contiguous, validated).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../common/dtype.h"

namespace fastbon::cuda {

constexpr int64_t kMaxHeadDim = 256;

// Float32 workspace the attention launcher needs: a partial output and log-sum-exp per (query row, prefix chunk);
// the chunk length depends on the element type and head_dim.
size_t shared_prefix_attention_workspace_bytes(DType dtype, int64_t num_samples, int64_t num_q_heads,
                                               int64_t head_dim, int64_t prefix_max);

// dtype: float32, float16 or bfloat16. head_dim <= kMaxHeadDim.
cudaError_t shared_prefix_attention(DType dtype, const void* q, const void* prefix_k, const void* prefix_v,
                                    const int32_t* prefix_lens, const void* suffix_k, const void* suffix_v,
                                    const int32_t* suffix_lens, const int32_t* sample_to_prompt, void* out,
                                    int64_t num_samples, int64_t num_prompts, int64_t num_q_heads,
                                    int64_t num_kv_heads, int64_t head_dim, int64_t prefix_max, int64_t suffix_max,
                                    float scale, void* workspace, cudaStream_t stream);

cudaError_t sample(DType dtype, const void* logits, int64_t vocab, const int64_t* row_index, const float* temperature,
                   const int32_t* top_k, const float* top_p, const float* min_p, const int64_t* seed,
                   const int64_t* step, int64_t num_rows, int64_t* tokens, float* logprobs, cudaStream_t stream);

// dtype: float32 or float64.
cudaError_t select_topk(DType dtype, const void* scores, int64_t num_rows, int64_t n, int64_t k, void* values,
                        int64_t* indices, cudaStream_t stream);

}  // namespace fastbon::cuda
