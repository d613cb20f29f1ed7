// Pass 1 of the shared-prefix decode attention on tensor cores (wmma) for float16/bfloat16 inputs on sm_80+;
// attention.cu has the design and launches it. Each block stages one prefix chunk of one (prompt, KV head); each
// warp takes 16-row tiles of the prompt's query rows (the rows that share the KV head) and computes S = Q K^T and
// O = P V as 16x16x16 matrix products. The chunk's scores sit in shared memory whole, so its softmax needs no
// rescaling. P enters the product as a high and a low 16-bit part (two products), keeping about 16 bits of each
// weight.
#pragma once

#include <mma.h>

#include <cfloat>

#include "device_utils.cuh"

namespace fastbon::cuda {
namespace {

constexpr int kMmaWarps = 4;

__host__ __device__ inline size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared memory of prefix_chunk_mma_kernel, in bytes from the (128-byte aligned) start, every part 128-byte
// aligned: wmma wants 256-bit aligned tiles and leading dimensions that are multiples of 16 bytes, which the row
// strides below (padded by 8 elements or 4 floats, which also spreads rows over the banks) give.
struct MmaLayout {
  int padded_dim;    // head_dim rounded up to the 16-wide tile
  int kv_stride;     // elements per staged key, value and query row
  int score_stride;  // floats per row of S, and later of O
  int prob_stride;   // elements per row of P
  size_t keys, values, members, warp_areas, warp_bytes, total;
  size_t query, scores, probs_high, probs_low, row_stats;  // offsets inside one warp's area
};

__host__ __device__ inline MmaLayout mma_layout(int chunk_keys, int head_dim, int num_samples, int element_bytes) {
  MmaLayout layout;
  layout.padded_dim = (head_dim + 15) / 16 * 16;
  layout.kv_stride = layout.padded_dim + 8;
  layout.score_stride = (chunk_keys > layout.padded_dim ? chunk_keys : layout.padded_dim) + 4;
  layout.prob_stride = chunk_keys + 8;
  const size_t staged = align128(static_cast<size_t>(chunk_keys) * layout.kv_stride * element_bytes);
  layout.keys = 0;
  layout.values = staged;
  layout.members = 2 * staged;  // the prompt's samples, then their count
  layout.warp_areas = layout.members + align128((static_cast<size_t>(num_samples) + 1) * sizeof(int));
  layout.query = 0;
  layout.scores = align128(16 * static_cast<size_t>(layout.kv_stride) * element_bytes);
  layout.probs_high = layout.scores + align128(16 * static_cast<size_t>(layout.score_stride) * sizeof(float));
  layout.probs_low = layout.probs_high + align128(16 * static_cast<size_t>(layout.prob_stride) * element_bytes);
  layout.row_stats = layout.probs_low + align128(16 * static_cast<size_t>(layout.prob_stride) * element_bytes);
  layout.warp_bytes = layout.row_stats + align128(2 * 16 * sizeof(float));
  layout.total = layout.warp_areas + kMmaWarps * layout.warp_bytes;
  return layout;
}

// Pass 1 on tensor cores (T = __half or __nv_bfloat16): grid (prefix chunk, KV head, prompt); each warp takes
// 16-row tiles of the prompt's query rows in turn.
template <typename T>
__global__ void __launch_bounds__(kMmaWarps * 32)
    prefix_chunk_mma_kernel(const T* __restrict__ q, const T* __restrict__ prefix_k, const T* __restrict__ prefix_v,
                            const int32_t* __restrict__ prefix_lens, const int32_t* __restrict__ sample_to_prompt,
                            float* __restrict__ partial_out, float* __restrict__ partial_lse, int num_samples,
                            int num_q_heads, int num_kv_heads, int head_dim, int prefix_max, int chunk_keys,
                            int slots, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 wmma needs sm_80; the launcher takes the CUDA-core kernel below compute capability 8.0
#else
  namespace wmma = nvcuda::wmma;
  using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  extern __shared__ __align__(128) unsigned char block_memory[];  // a name of its own: one type per name
  const int chunk = blockIdx.x, kv_head = blockIdx.y, prompt = blockIdx.z;
  const int start = chunk * chunk_keys;
  const int length = min(chunk_keys, prefix_lens[prompt] - start);
  if (length <= 0) return;
  const MmaLayout layout = mma_layout(chunk_keys, head_dim, num_samples, sizeof(T));
  T* keys = reinterpret_cast<T*>(block_memory + layout.keys);      // [staged keys, kv_stride]
  T* values = reinterpret_cast<T*>(block_memory + layout.values);  // [staged keys, kv_stride]
  int* members = reinterpret_cast<int*>(block_memory + layout.members);

  // Stage whole 16-key tiles; keys and dims past the data are zeros, so that a zero weight never meets a NaN.
  const int key_tiles = (length + 15) / 16;
  const T zero = from_float<T>(0.0f);
  const int64_t base = ((static_cast<int64_t>(prompt) * num_kv_heads + kv_head) * prefix_max + start) * head_dim;
  for (int index = threadIdx.x; index < key_tiles * 16 * layout.padded_dim; index += blockDim.x) {
    const int key = index / layout.padded_dim, d = index % layout.padded_dim;
    const bool inside = key < length && d < head_dim;
    keys[key * layout.kv_stride + d] = inside ? prefix_k[base + key * head_dim + d] : zero;
    values[key * layout.kv_stride + d] = inside ? prefix_v[base + key * head_dim + d] : zero;
  }
  if (threadIdx.x == 0) {
    int count = 0;
    for (int i = 0; i < num_samples; ++i)
      if (sample_to_prompt[i] == prompt) members[count++] = i;
    members[num_samples] = count;
  }
  __syncthreads();

  const int group = num_q_heads / num_kv_heads, rows = members[num_samples] * group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* area = block_memory + layout.warp_areas + warp * layout.warp_bytes;
  T* query = reinterpret_cast<T*>(area + layout.query);        // [16, kv_stride]
  float* scores = reinterpret_cast<float*>(area + layout.scores);  // [16, score_stride]: S, then O
  T* probs_high = reinterpret_cast<T*>(area + layout.probs_high);  // [16, prob_stride]
  T* probs_low = reinterpret_cast<T*>(area + layout.probs_low);
  float* row_max = reinterpret_cast<float*>(area + layout.row_stats);
  float* row_sum = row_max + 16;
  auto slot_of = [&](int row) {
    const int sample = members[row / group], head = kv_head * group + row % group;
    return (static_cast<int64_t>(sample) * num_q_heads + head) * slots + chunk;
  };

  for (int first = warp * 16; first < rows; first += kMmaWarps * 16) {  // uniform over the warp
    for (int index = lane; index < 16 * layout.padded_dim; index += 32) {  // rows past the last are zeros
      const int r = index / layout.padded_dim, d = index % layout.padded_dim, row = first + r;
      T value = zero;
      if (row < rows && d < head_dim) {
        const int sample = members[row / group], head = kv_head * group + row % group;
        value = q[(static_cast<int64_t>(sample) * num_q_heads + head) * head_dim + d];
      }
      query[r * layout.kv_stride + d] = value;
    }
    __syncwarp();

    for (int key_tile = 0; key_tile < key_tiles; ++key_tile) {  // S = Q K^T
      Accumulator tile;
      wmma::fill_fragment(tile, 0.0f);
      for (int d = 0; d < layout.padded_dim; d += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T: keys are its columns
        wmma::load_matrix_sync(a, query + d, layout.kv_stride);
        wmma::load_matrix_sync(b, keys + key_tile * 16 * layout.kv_stride + d, layout.kv_stride);
        wmma::mma_sync(tile, a, b, tile);
      }
      wmma::store_matrix_sync(scores + key_tile * 16, tile, layout.score_stride, wmma::mem_row_major);
    }
    __syncwarp();

    for (int r = 0; r < 16; ++r) {  // each row's softmax over the chunk, lanes across keys
      const float* row_scores = scores + r * layout.score_stride;
      float maximum = -INFINITY;
      for (int key = lane; key < length; key += 32) maximum = fmaxf(maximum, row_scores[key] * scale);
      maximum = warp_max(maximum);
      float sum = 0.0f;
      for (int key = lane; key < key_tiles * 16; key += 32) {
        const float p = key < length ? __expf(row_scores[key] * scale - maximum) : 0.0f;
        const T high = from_float<T>(p);
        probs_high[r * layout.prob_stride + key] = high;
        probs_low[r * layout.prob_stride + key] = from_float<T>(p - to_float(high));
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        row_max[r] = maximum;
        row_sum[r] = sum;
      }
    }
    __syncwarp();

    for (int d = 0; d < layout.padded_dim; d += 16) {  // O = (P_high + P_low) V, over S, which is spent
      Accumulator tile;
      wmma::fill_fragment(tile, 0.0f);
      for (int key_tile = 0; key_tile < key_tiles; ++key_tile) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v;
        wmma::load_matrix_sync(v, values + key_tile * 16 * layout.kv_stride + d, layout.kv_stride);
        wmma::load_matrix_sync(p, probs_high + key_tile * 16, layout.prob_stride);
        wmma::mma_sync(tile, p, v, tile);
        wmma::load_matrix_sync(p, probs_low + key_tile * 16, layout.prob_stride);
        wmma::mma_sync(tile, p, v, tile);
      }
      wmma::store_matrix_sync(scores + d, tile, layout.score_stride, wmma::mem_row_major);
    }
    __syncwarp();

    for (int index = lane; index < 16 * head_dim; index += 32) {
      const int r = index / head_dim, d = index % head_dim;
      if (first + r < rows)
        partial_out[slot_of(first + r) * head_dim + d] = scores[r * layout.score_stride + d] / row_sum[r];
    }
    if (lane < 16 && first + lane < rows) partial_lse[slot_of(first + lane)] = row_max[lane] + __logf(row_sum[lane]);
    __syncwarp();  // the next tile overwrites this warp's area
  }
#endif
}

}  // namespace
}  // namespace fastbon::cuda
