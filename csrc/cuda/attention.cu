// Shared-prefix decode attention on CUDA: split-K over prefix chunks, then suffix + merge.
//
// Pass 1, grid (prefix chunk, KV head, prompt): the block stages one chunk of prefix keys and values in shared
// memory once, finds the prompt's samples in sample_to_prompt (no grouping assumed), and writes a normalised partial
// output and log-sum-exp for every query row (sample, q head of this KV head) of the prompt. The prefix is read from
// global memory once per step, whatever the number of samples. Two kernels do it:
//  - float16/bfloat16 on sm_80+: prefix_chunk_mma_kernel (attention_tensor_cores.cuh), on tensor cores. At P=4096,
//    n=64, Hq=32, Hkv=8, D=128, pass 1 is 4.3 GFLOP per layer and step, which CUDA cores cannot do in the ~6 us
//    that reading the prefix takes.
//  - otherwise prefix_chunk_kernel below, on CUDA cores: warps take query rows in turn, each an online softmax over
//    the chunk in tiles of 32 keys (lane j scores key j of the tile), the lanes owning output dimensions.
// Chunks are as long as shared memory allows (prefix_plan), because the partials cost 2 x rows x chunks x head_dim
// x 4 bytes of traffic: at the shape above in bf16, 128-key chunks make that 2x the prefix bytes (the first
// version's 32-key chunks made it 8x).
// Pass 2, one warp per (sample, q head): online softmax over the sample's suffix keys, merged with the prefix
// partials by their log-sum-exp (merge_state.cuh); no keys gives zeros.
#include <cfloat>

#include "attention_tensor_cores.cuh"
#include "device_utils.cuh"
#include "merge_state.cuh"
#include "ops.cuh"

namespace fastbon::cuda {
namespace {

constexpr int kWarps = 4;
static_assert(kMmaWarps == kWarps, "both pass-1 kernels launch kWarps warps");
constexpr size_t kStagingBudget = 80 * 1024;  // CUDA-core kernel: bytes of keys + values per block

// Keys are staged with a row stride of head_dim plus 4 bytes: an odd number of 4-byte words whenever head_dim is
// even, so lane j reading key row j hits a distinct bank.
template <typename T>
constexpr int kKeyPadding = static_cast<int>(4 / sizeof(T));

template <typename T>
size_t staging_bytes(int64_t chunk_keys, int64_t head_dim) {
  return static_cast<size_t>(chunk_keys * (2 * head_dim + kKeyPadding<T>)) * sizeof(T);
}

// Dynamic shared memory of prefix_chunk_kernel.
template <typename T>
size_t cuda_core_shared_bytes(int64_t chunk_keys, int64_t head_dim, int64_t num_samples) {
  return kWarps * head_dim * sizeof(float) + (num_samples + 1) * sizeof(int) + staging_bytes<T>(chunk_keys, head_dim);
}

template <typename T>
__global__ void prefix_chunk_kernel(const T* __restrict__ q, const T* __restrict__ prefix_k,
                                    const T* __restrict__ prefix_v, const int32_t* __restrict__ prefix_lens,
                                    const int32_t* __restrict__ sample_to_prompt, float* __restrict__ partial_out,
                                    float* __restrict__ partial_lse, int num_samples, int num_q_heads,
                                    int num_kv_heads, int head_dim, int prefix_max, int chunk_keys, int slots,
                                    float scale) {
  extern __shared__ float shared[];
  const int chunk = blockIdx.x, kv_head = blockIdx.y, prompt = blockIdx.z;
  const int start = chunk * chunk_keys;
  const int length = min(chunk_keys, prefix_lens[prompt] - start);
  if (length <= 0) return;
  const int key_stride = head_dim + kKeyPadding<T>;
  float* queries = shared;                                                   // [kWarps, head_dim]
  int* members = reinterpret_cast<int*>(queries + kWarps * head_dim);        // this prompt's samples
  T* keys = reinterpret_cast<T*>(members + num_samples + (num_samples & 1));  // [chunk, key_stride], 8-byte aligned
  T* values = keys + chunk_keys * key_stride;                                // [chunk, head_dim]
  __shared__ int member_count;

  const int64_t base = ((static_cast<int64_t>(prompt) * num_kv_heads + kv_head) * prefix_max + start) * head_dim;
  for (int index = threadIdx.x; index < length * head_dim; index += blockDim.x) {
    keys[index / head_dim * key_stride + index % head_dim] = prefix_k[base + index];
    values[index] = prefix_v[base + index];
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
    RowState state;
    state.maximum = -INFINITY;
    state.sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) state.acc[i] = 0.0f;
    for (int tile = 0; tile < length; tile += 32) {  // uniform over the warp: every lane reaches each shuffle
      const int key = tile + lane, tile_keys = min(32, length - tile);
      float score = -INFINITY;
      if (key < length) {
        score = 0.0f;
        for (int d = 0; d < head_dim; ++d) score += query[d] * to_float(keys[key * key_stride + d]);
      }
      const float tile_max = warp_max(score);  // finite: the tile holds at least one key
      if (tile_max > state.maximum) rescale(state, tile_max);
      const float p = key < length ? __expf(score - state.maximum) : 0.0f;
      state.sum += warp_sum(p);
      for (int j = 0; j < tile_keys; ++j) {
        const float weight = __shfl_sync(0xFFFFFFFFu, p, j);
        const T* value_row = values + (tile + j) * head_dim;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < head_dim) state.acc[i] += weight * to_float(value_row[d]);
        }
      }
    }
    const int64_t slot = (static_cast<int64_t>(sample) * num_q_heads + head) * slots + chunk;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) partial_out[slot * head_dim + d] = state.acc[i] / state.sum;
    }
    if (lane == 0) partial_lse[slot] = state.maximum + __logf(state.sum);
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
                                    int head_dim, int suffix_max, int chunk_keys, int slots, float scale) {
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
  const int used_chunks = (prefix_lens[sample_to_prompt[sample]] + chunk_keys - 1) / chunk_keys;
  for (int chunk = 0; chunk < used_chunks; ++chunk) {
    const int64_t slot = row * slots + chunk;
    merge_state(state, partial_lse[slot], partial_out + slot * head_dim, lane, head_dim);
  }
  const float inverse = state.sum > 0.0f ? 1.0f / state.sum : 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) out[row * head_dim + d] = from_float<T>(state.acc[i] * inverse);
  }
}

// How pass 1 runs: which kernel, how many prefix keys per chunk, and its dynamic shared memory.
struct PrefixPlan {
  bool tensor_cores;
  int64_t chunk_keys;
  size_t shared_bytes;
};

// An attribute of the current device, or fallback when it cannot be read.
int device_attribute(cudaDeviceAttr attribute, int fallback) {
  int device = 0, value = fallback;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attribute, device) != cudaSuccess)
    return fallback;
  return value;
}

// Tensor cores for 16-bit inputs on sm_80+ with the longest chunk that fits the device's shared memory, else CUDA
// cores with the longest chunk within the staging budget that fits.
template <typename T>
PrefixPlan prefix_plan(int64_t head_dim, int64_t num_samples) {
  const size_t limit = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024));
  if (sizeof(T) == 2 && device_attribute(cudaDevAttrComputeCapabilityMajor, 0) >= 8) {
    for (int64_t keys : {128, 64, 32, 16}) {
      const size_t bytes = mma_layout(static_cast<int>(keys), static_cast<int>(head_dim),
                                      static_cast<int>(num_samples), static_cast<int>(sizeof(T))).total;
      if (bytes <= limit) return {true, keys, bytes};
    }
  }
  int64_t keys = 128;  // whole 32-key tiles
  while (keys > 32 && (staging_bytes<T>(keys, head_dim) > kStagingBudget ||
                       cuda_core_shared_bytes<T>(keys, head_dim, num_samples) > limit))
    keys /= 2;
  return {false, keys, cuda_core_shared_bytes<T>(keys, head_dim, num_samples)};  // too big at 32: the launch fails
}

// The number of prefix chunks of pass 1 (and so of partials per query row).
int64_t prefix_slots(DType dtype, int64_t head_dim, int64_t num_samples, int64_t prefix_max) {
  int64_t chunk_keys = 32;
  dispatch_half_types(dtype, [&](auto element) {
    chunk_keys = prefix_plan<decltype(element)>(head_dim, num_samples).chunk_keys;
    return cudaSuccess;
  });
  return (prefix_max + chunk_keys - 1) / chunk_keys;
}

}  // namespace

size_t shared_prefix_attention_workspace_bytes(DType dtype, int64_t num_samples, int64_t num_q_heads,
                                               int64_t head_dim, int64_t prefix_max) {
  const int64_t slots = prefix_slots(dtype, head_dim, num_samples, prefix_max);
  return static_cast<size_t>(num_samples * num_q_heads * slots * (head_dim + 1)) * sizeof(float);
}

cudaError_t shared_prefix_attention(DType dtype, const void* q, const void* prefix_k, const void* prefix_v,
                                    const int32_t* prefix_lens, const void* suffix_k, const void* suffix_v,
                                    const int32_t* suffix_lens, const int32_t* sample_to_prompt, void* out,
                                    int64_t num_samples, int64_t num_prompts, int64_t num_q_heads,
                                    int64_t num_kv_heads, int64_t head_dim, int64_t prefix_max, int64_t suffix_max,
                                    float scale, void* workspace, cudaStream_t stream) {
  if (head_dim > kMaxHeadDim || head_dim <= 0) return cudaErrorInvalidValue;
  const int64_t rows = num_samples * num_q_heads;
  return dispatch_half_types(dtype, [&](auto element) {
    using T = decltype(element);
    const PrefixPlan plan = prefix_plan<T>(head_dim, num_samples);
    const int64_t slots = (prefix_max + plan.chunk_keys - 1) / plan.chunk_keys;
    float* partial_out = static_cast<float*>(workspace);
    float* partial_lse = partial_out + rows * slots * head_dim;
    if (slots > 0 && num_samples > 0) {
      auto pass_one = prefix_chunk_kernel<T>;
      if constexpr (sizeof(T) == 2) {
        if (plan.tensor_cores) pass_one = prefix_chunk_mma_kernel<T>;
      }
      cudaError_t status = cudaFuncSetAttribute(pass_one, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(plan.shared_bytes));
      if (status != cudaSuccess) return status;
      const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(num_kv_heads),
                      static_cast<unsigned>(num_prompts));
      pass_one<<<grid, kWarps * 32, plan.shared_bytes, stream>>>(
          static_cast<const T*>(q), static_cast<const T*>(prefix_k), static_cast<const T*>(prefix_v), prefix_lens,
          sample_to_prompt, partial_out, partial_lse, static_cast<int>(num_samples), static_cast<int>(num_q_heads),
          static_cast<int>(num_kv_heads), static_cast<int>(head_dim), static_cast<int>(prefix_max),
          static_cast<int>(plan.chunk_keys), static_cast<int>(slots), scale);
    }
    if (rows > 0) {
      const unsigned blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
      suffix_merge_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(
          static_cast<const T*>(q), static_cast<const T*>(suffix_k), static_cast<const T*>(suffix_v), prefix_lens,
          suffix_lens, sample_to_prompt, partial_out, partial_lse, static_cast<T*>(out),
          static_cast<int>(num_samples), static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads),
          static_cast<int>(head_dim), static_cast<int>(suffix_max), static_cast<int>(plan.chunk_keys),
          static_cast<int>(slots), scale);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastbon::cuda
