// Shared-prefix decode attention on CUDA: split-K over prefix chunks, then suffix + merge.
//
// Pass 1, grid (prefix chunk, KV head, prompt): the block stages one chunk of kAttentionChunk prefix keys and values
// in shared memory once, finds the prompt's samples in sample_to_prompt (no grouping assumed), and every warp takes
// query rows (sample, q head of this KV head) in turn: lane j scores key j, a warp softmax, then lanes own output
// dimensions. It writes each row's normalised partial output and log-sum-exp. The prefix is read from global memory
// once per step, whatever the number of samples.
// Pass 2, one warp per (sample, q head): online softmax over the sample's suffix keys, merged with the prefix
// partials by their log-sum-exp (FlashInfer's merge_state); no keys gives zeros.
#include <cfloat>

#include "device_utils.cuh"
#include "ops.cuh"

namespace fastbon::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = kMaxHeadDim / 32;

// Running softmax state of one query row held by a warp: lane l owns output dims l, l + 32, ...
struct RowState {
  float maximum;
  float sum;
  float acc[kMaxPerLane];
};

__device__ __forceinline__ void rescale(RowState& state, float new_maximum) {
  const float factor = state.maximum == -INFINITY ? 0.0f : __expf(state.maximum - new_maximum);
  state.sum *= factor;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) state.acc[i] *= factor;
  state.maximum = new_maximum;
}

template <typename T>
__global__ void prefix_chunk_kernel(const T* __restrict__ q, const T* __restrict__ prefix_k,
                                    const T* __restrict__ prefix_v, const int32_t* __restrict__ prefix_lens,
                                    const int32_t* __restrict__ sample_to_prompt, float* __restrict__ partial_out,
                                    float* __restrict__ partial_lse, int num_samples, int num_q_heads,
                                    int num_kv_heads, int head_dim, int prefix_max, int slots, float scale) {
  extern __shared__ float shared[];
  const int chunk = blockIdx.x, kv_head = blockIdx.y, prompt = blockIdx.z;
  const int start = chunk * kAttentionChunk;
  const int length = min(static_cast<int>(kAttentionChunk), prefix_lens[prompt] - start);
  if (length <= 0) return;
  const int key_stride = head_dim + 1;  // odd stride: lane j reading row j hits distinct banks
  float* keys = shared;                                   // [chunk, head_dim + 1]
  float* values = keys + kAttentionChunk * key_stride;    // [chunk, head_dim]
  float* queries = values + kAttentionChunk * head_dim;   // [kWarps, head_dim]
  int* members = reinterpret_cast<int*>(queries + kWarps * head_dim);  // this prompt's samples
  __shared__ int member_count;

  const int64_t base = ((static_cast<int64_t>(prompt) * num_kv_heads + kv_head) * prefix_max + start) * head_dim;
  for (int index = threadIdx.x; index < length * head_dim; index += blockDim.x) {
    const int key = index / head_dim, d = index % head_dim;
    keys[key * key_stride + d] = to_float(prefix_k[base + index]);
    values[index] = to_float(prefix_v[base + index]);
  }
  if (threadIdx.x == 0) {
    int count = 0;
    for (int i = 0; i < num_samples; ++i)
      if (sample_to_prompt[i] == prompt) members[count++] = i;
    member_count = count;
  }
  __syncthreads();

  const int group = num_q_heads / num_kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* query = queries + warp * head_dim;
  for (int row = warp; row < member_count * group; row += kWarps) {
    const int sample = members[row / group], head = kv_head * group + row % group;
    const T* source = q + (static_cast<int64_t>(sample) * num_q_heads + head) * head_dim;
    for (int d = lane; d < head_dim; d += 32) query[d] = to_float(source[d]) * scale;
    __syncwarp();
    float score = -INFINITY;
    if (lane < length) {
      score = 0.0f;
      for (int d = 0; d < head_dim; ++d) score += query[d] * keys[lane * key_stride + d];
    }
    const float maximum = warp_max(score);
    const float p = lane < length ? __expf(score - maximum) : 0.0f;
    const float sum = warp_sum(p);
    const int64_t slot = (static_cast<int64_t>(sample) * num_q_heads + head) * slots + chunk;
    // Dims in whole warps: every lane must reach each shuffle, also when head_dim is not a multiple of 32.
    for (int first = 0; first < head_dim; first += 32) {
      const int d = first + lane;
      float acc = 0.0f;
      for (int key = 0; key < length; ++key) {
        const float weight = __shfl_sync(0xFFFFFFFFu, p, key);
        if (d < head_dim) acc += weight * values[key * head_dim + d];
      }
      if (d < head_dim) partial_out[slot * head_dim + d] = acc / sum;
    }
    if (lane == 0) partial_lse[slot] = maximum + __logf(sum);
    __syncwarp();
  }
}

// The lane-dimension loop of pass 2 needs every lane in the shuffles, so dims are visited in whole warps.
template <typename T>
__global__ void suffix_merge_kernel(const T* __restrict__ q, const T* __restrict__ suffix_k,
                                    const T* __restrict__ suffix_v, const int32_t* __restrict__ prefix_lens,
                                    const int32_t* __restrict__ suffix_lens,
                                    const int32_t* __restrict__ sample_to_prompt,
                                    const float* __restrict__ partial_out, const float* __restrict__ partial_lse,
                                    T* __restrict__ out, int num_samples, int num_q_heads, int num_kv_heads,
                                    int head_dim, int suffix_max, int slots, float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= static_cast<int64_t>(num_samples) * num_q_heads) return;
  const int sample = static_cast<int>(row / num_q_heads), head = static_cast<int>(row % num_q_heads);
  const int kv_head = head / (num_q_heads / num_kv_heads);
  float query[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    query[i] = d < head_dim ? to_float(q[row * head_dim + d]) * scale : 0.0f;
  }
  RowState state;
  state.maximum = -INFINITY;
  state.sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) state.acc[i] = 0.0f;

  const int length = suffix_lens[sample];
  const int64_t base = (static_cast<int64_t>(sample) * num_kv_heads + kv_head) * suffix_max * head_dim;
  for (int key = 0; key < length; ++key) {  // one key at a time: lanes split the dot product
    const T* key_row = suffix_k + base + static_cast<int64_t>(key) * head_dim;
    float partial = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) partial += query[i] * to_float(key_row[d]);
    }
    const float score = warp_sum(partial);
    if (score > state.maximum) rescale(state, score);
    const float p = __expf(score - state.maximum);
    state.sum += p;
    const T* value_row = suffix_v + base + static_cast<int64_t>(key) * head_dim;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) state.acc[i] += p * to_float(value_row[d]);
    }
  }
  // Each prefix chunk's partial acts as one "key" with score lse and value its normalised output.
  const int used_chunks = static_cast<int>((prefix_lens[sample_to_prompt[sample]] + kAttentionChunk - 1) /
                                           kAttentionChunk);
  for (int chunk = 0; chunk < used_chunks; ++chunk) {
    const int64_t slot = row * slots + chunk;
    const float lse = partial_lse[slot];
    if (lse > state.maximum) rescale(state, lse);
    const float weight = __expf(lse - state.maximum);
    state.sum += weight;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) state.acc[i] += weight * partial_out[slot * head_dim + d];
    }
  }
  const float inverse = state.sum > 0.0f ? 1.0f / state.sum : 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) out[row * head_dim + d] = from_float<T>(state.acc[i] * inverse);
  }
}

}  // namespace

size_t shared_prefix_attention_workspace_bytes(int64_t num_samples, int64_t num_q_heads, int64_t head_dim,
                                               int64_t prefix_max) {
  const int64_t slots = (prefix_max + kAttentionChunk - 1) / kAttentionChunk;
  return static_cast<size_t>(num_samples * num_q_heads * slots * (head_dim + 1)) * sizeof(float);
}

cudaError_t shared_prefix_attention(DType dtype, const void* q, const void* prefix_k, const void* prefix_v,
                                    const int32_t* prefix_lens, const void* suffix_k, const void* suffix_v,
                                    const int32_t* suffix_lens, const int32_t* sample_to_prompt, void* out,
                                    int64_t num_samples, int64_t num_prompts, int64_t num_q_heads,
                                    int64_t num_kv_heads, int64_t head_dim, int64_t prefix_max, int64_t suffix_max,
                                    float scale, void* workspace, cudaStream_t stream) {
  if (head_dim > kMaxHeadDim || head_dim <= 0) return cudaErrorInvalidValue;
  const int64_t slots = (prefix_max + kAttentionChunk - 1) / kAttentionChunk;
  float* partial_out = static_cast<float*>(workspace);
  float* partial_lse = partial_out + num_samples * num_q_heads * slots * head_dim;
  const int64_t rows = num_samples * num_q_heads;
  return dispatch_half_types(dtype, [&](auto element) {
    using T = decltype(element);
    if (slots > 0 && num_samples > 0) {
      const size_t shared_bytes = (kAttentionChunk * (2 * head_dim + 1) + kWarps * head_dim) * sizeof(float) +
                                  num_samples * sizeof(int);
      cudaError_t status = cudaFuncSetAttribute(prefix_chunk_kernel<T>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(shared_bytes));
      if (status != cudaSuccess) return status;
      const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(num_kv_heads),
                      static_cast<unsigned>(num_prompts));
      prefix_chunk_kernel<T><<<grid, kWarps * 32, shared_bytes, stream>>>(
          static_cast<const T*>(q), static_cast<const T*>(prefix_k), static_cast<const T*>(prefix_v), prefix_lens,
          sample_to_prompt, partial_out, partial_lse, static_cast<int>(num_samples), static_cast<int>(num_q_heads),
          static_cast<int>(num_kv_heads), static_cast<int>(head_dim), static_cast<int>(prefix_max),
          static_cast<int>(slots), scale);
    }
    if (rows > 0) {
      const unsigned blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
      suffix_merge_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(
          static_cast<const T*>(q), static_cast<const T*>(suffix_k), static_cast<const T*>(suffix_v), prefix_lens,
          suffix_lens, sample_to_prompt, partial_out, partial_lse, static_cast<T*>(out),
          static_cast<int>(num_samples), static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads),
          static_cast<int>(head_dim), static_cast<int>(suffix_max), static_cast<int>(slots), scale);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastbon::cuda
