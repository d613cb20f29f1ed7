// C entry points to the emulated CUDA launchers of csrc/cuda/ops.cuh, for ctypes (tests/cuda_emulator.py). Pointers
// are host memory: under the emulator, "device" memory is the CPU tensors' storage. Each call returns 0 on success,
// else a CUDA error code whose message fastbon_emulated_take_error() (take_error.cpp) returns once.
#include <cuda_runtime.h>

#include <string>

#include "ops.cuh"

namespace {

int finish(cudaError_t status) {
  if (status != cudaSuccess && fastbon_emulator::state().error.empty())
    fastbon_emulator::fail("the launcher returned CUDA error " + std::to_string(static_cast<int>(status)));
  return static_cast<int>(status != cudaSuccess ? status : cudaGetLastError());
}

}  // namespace

extern "C" {

// The emulated device's opt-in shared memory per block (227 KiB, an H100's, unless a test lowers it).
void fastbon_emulated_set_shared_memory_limit(size_t bytes) { fastbon_emulator::state().device_shared_limit = bytes; }

size_t fastbon_emulated_attention_workspace_bytes(int32_t dtype, int64_t num_samples, int64_t num_q_heads,
                                                  int64_t head_dim, int64_t prefix_max) {
  return fastbon::cuda::shared_prefix_attention_workspace_bytes(static_cast<fastbon::DType>(dtype), num_samples,
                                                                num_q_heads, head_dim, prefix_max);
}

int fastbon_emulated_shared_prefix_attention(int32_t dtype, const void* q, const void* prefix_k,
                                             const void* prefix_v, const int32_t* prefix_lens, const void* suffix_k,
                                             const void* suffix_v, const int32_t* suffix_lens,
                                             const int32_t* sample_to_prompt, void* out, int64_t num_samples,
                                             int64_t num_prompts, int64_t num_q_heads, int64_t num_kv_heads,
                                             int64_t head_dim, int64_t prefix_max, int64_t suffix_max, float scale,
                                             void* workspace) {
  return finish(fastbon::cuda::shared_prefix_attention(
      static_cast<fastbon::DType>(dtype), q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
      sample_to_prompt, out, num_samples, num_prompts, num_q_heads, num_kv_heads, head_dim, prefix_max, suffix_max,
      scale, workspace, nullptr));
}

int fastbon_emulated_sample(int32_t dtype, const void* logits, int64_t vocab, const int64_t* row_index,
                            const float* temperature, const int32_t* top_k, const float* top_p, const float* min_p,
                            const int64_t* seed, const int64_t* step, int64_t num_rows, int64_t* tokens,
                            float* logprobs) {
  return finish(fastbon::cuda::sample(static_cast<fastbon::DType>(dtype), logits, vocab, row_index, temperature,
                                      top_k, top_p, min_p, seed, step, num_rows, tokens, logprobs, nullptr));
}

int fastbon_emulated_select_topk(int32_t dtype, const void* scores, int64_t num_rows, int64_t n, int64_t k,
                                 void* values, int64_t* indices) {
  return finish(
      fastbon::cuda::select_topk(static_cast<fastbon::DType>(dtype), scores, num_rows, n, k, values, indices, nullptr));
}

}  // extern "C"
