// Fused sample + score on CUDA: one block per output row, no sort.
//
// p_j = exp(x_j / T - max / T) is recomputed in every pass (the row stays in L2). The top-k threshold (k-th largest
// p) and the top-p threshold (largest v whose kept mass of p >= v reaches top_p of the top-k mass) are found by
// radix selection over the float bits of p, 8 bits per pass (p >= 0, so bits order like values). The draw splits the
// vocabulary into one contiguous segment per thread: a block prefix sum of segment masses finds the segment where
// the cumulative kept mass passes u * total, and that thread walks its segment in vocabulary order.
//
// Radix select rather than the CPU's quickselect or Triton's bisection: a histogram pass is one coalesced read of the
// row with shared-memory atomics, and four passes settle 32 bits. Every sum is order-independent, so one seed gives
// the same token on every run: the histogram's masses (and the top-k mass they are compared with) are 64-bit fixed
// point (p * 2^kMassFractionBits, truncated), whose integer atomics give the same total in any order where float
// atomicAdd would not; the other sums are fixed-order reductions (device_utils.cuh).
#include <cfloat>
#include <climits>

#include "../common/philox.h"
#include "device_utils.cuh"
#include "ops.cuh"

namespace fastbon::cuda {
namespace {

constexpr int kThreads = 512;
// p <= 1, so a row's fixed-point mass stays below vocab * 2^40 < 2^64 for vocab < kMaxVocab; the truncation costs
// under 2^-40 per token, below float32's rounding of masses >= 1 (the largest p is 1).
constexpr int kMassFractionBits = 40;
constexpr int64_t kMaxVocab = int64_t{1} << (64 - kMassFractionBits);
using Mass = unsigned long long;

struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

__device__ __forceinline__ Mass fixed_point_mass(float p) {
  return static_cast<Mass>(p * static_cast<float>(Mass{1} << kMassFractionBits));
}

// Shared memory of one radix selection.
struct RadixScratch {
  unsigned counts[256];
  Mass masses[256];
  Mass remaining;
  unsigned chosen_digit;
};

// The value v among p (with p >= floor) where, walking down from the largest, the running count (by_mass false)
// or fixed-point mass (true) first reaches target: count/mass of p > v < target <= count/mass of p >= v.
template <typename T>
__device__ float radix_select(const T* x, int64_t vocab, float temperature, float scaled_max, float floor,
                              Mass target, bool by_mass, RadixScratch* scratch) {
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) {
      scratch->counts[d] = 0;
      scratch->masses[d] = 0;
    }
    if (threadIdx.x == 0 && shift == 24) scratch->remaining = target;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float p = __expf(to_float(x[j]) / temperature - scaled_max);
      const uint32_t bits = __float_as_uint(p);
      if (p >= floor && (bits & mask) == prefix) {
        const unsigned digit = (bits >> shift) & 255u;
        atomicAdd(&scratch->counts[digit], 1u);
        if (by_mass) atomicAdd(&scratch->masses[digit], fixed_point_mass(p));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      Mass remaining = scratch->remaining;
      int chosen = -1, lowest = 0;
      for (int d = 255; d >= 0; --d) {
        if (scratch->counts[d] == 0) continue;
        lowest = d;
        const Mass amount = by_mass ? scratch->masses[d] : scratch->counts[d];
        if (amount >= remaining) {
          chosen = d;
          break;
        }
        remaining -= amount;
      }
      if (chosen < 0) chosen = lowest;  // the target exceeds everything (truncated masses): take the smallest bucket
      scratch->remaining = remaining;
      scratch->chosen_digit = static_cast<unsigned>(chosen);
    }
    __syncthreads();
    // chosen_digit is next written after two more barriers: no barrier is needed before the next pass or call.
    prefix |= scratch->chosen_digit << shift;
    mask |= 255u << shift;
  }
  return __uint_as_float(prefix);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ row_index,
                  const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                  const float* __restrict__ top_p, const float* __restrict__ min_p, const int64_t* __restrict__ seed,
                  const int64_t* __restrict__ step, int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  __shared__ float float_scratch[32];
  __shared__ long long index_scratch[32];
  __shared__ Mass mass_scratch[32];
  __shared__ RadixScratch radix;
  __shared__ long long chosen;
  const int64_t row = blockIdx.x;
  const T* x = logits + row_index[row] * vocab;

  float local_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) local_max = fmaxf(local_max, to_float(x[j]));
  const float maximum = block_reduce(local_max, Max{}, float_scratch);
  float local_sum = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) local_sum += __expf(to_float(x[j]) - maximum);
  const float log_normaliser = maximum + __logf(block_reduce(local_sum, Sum{}, float_scratch));

  const float row_temperature = temperature[row];
  if (row_temperature == 0.0f) {  // greedy: the first maximal logit
    long long first = LLONG_MAX;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
      if (to_float(x[j]) == maximum) first = min(first, static_cast<long long>(j));
    first = block_reduce(first, Min{}, index_scratch);
    if (threadIdx.x == 0) {
      tokens[row] = first;
      logprobs[row] = maximum - log_normaliser;
    }
    return;
  }

  const float scaled_max = maximum / row_temperature;
  auto prob = [&](int64_t j) { return __expf(to_float(x[j]) / row_temperature - scaled_max); };
  float threshold_k = 0.0f;
  const int32_t k = top_k[row];
  if (k > 0 && k < vocab)
    threshold_k = radix_select(x, vocab, row_temperature, scaled_max, 0.0f, static_cast<Mass>(k), false, &radix);
  float threshold_p = 0.0f;
  if (top_p[row] < 1.0f) {
    Mass local_mass = 0;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float p = prob(j);
      if (p >= threshold_k) local_mass += fixed_point_mass(p);
    }
    const Mass top_k_mass = block_reduce(local_mass, Sum{}, mass_scratch);
    // The kept mass must reach top_p * top_k_mass: an integer mass does exactly when it reaches the ceiling.
    const Mass target = static_cast<Mass>(ceil(static_cast<double>(top_p[row]) * static_cast<double>(top_k_mass)));
    threshold_p = radix_select(x, vocab, row_temperature, scaled_max, threshold_k, target, true, &radix);
  }
  const float threshold = fmaxf(fmaxf(threshold_k, threshold_p), min_p[row]);

  // The draw: thread t owns the contiguous segment [t * span, (t + 1) * span).
  const int64_t span = (vocab + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(vocab, threadIdx.x * span), end = min(vocab, begin + span);
  float segment_mass = 0.0f;
  long long last_kept = -1;
  for (int64_t j = begin; j < end; ++j) {
    const float p = prob(j);
    if (p >= threshold && p > 0.0f) {
      segment_mass += p;
      last_kept = j;
    }
  }
  float total, through;
  const float before = block_exclusive_sum(segment_mass, float_scratch, &total, &through);
  last_kept = block_reduce(last_kept, Max{}, index_scratch);
  if (threadIdx.x == 0) chosen = last_kept;  // the answer when rounding leaves u * total unreached
  __syncthreads();
  const float target = philox_uniform(seed[row], step[row]) * total;
  // [before, through) are the scan's own prefixes, so the segments tile [0, total): at most one thread owns target.
  if (before <= target && target < through) {
    float running = before;
    long long choice = -1;  // the segment's last kept token unless the target is passed before it
    for (int64_t j = begin; j < end; ++j) {
      const float p = prob(j);
      if (!(p >= threshold && p > 0.0f)) continue;
      choice = j;
      running += p;
      if (running > target) break;
    }
    chosen = choice;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tokens[row] = chosen;
    logprobs[row] = to_float(x[chosen]) - log_normaliser;
  }
}

}  // namespace

cudaError_t sample(DType dtype, const void* logits, int64_t vocab, const int64_t* row_index, const float* temperature,
                   const int32_t* top_k, const float* top_p, const float* min_p, const int64_t* seed,
                   const int64_t* step, int64_t num_rows, int64_t* tokens, float* logprobs, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  if (vocab >= kMaxVocab) return cudaErrorInvalidValue;  // the fixed-point masses would overflow
  return dispatch_half_types(dtype, [&](auto element) {
    using T = decltype(element);
    sample_kernel<T><<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(
        static_cast<const T*>(logits), vocab, row_index, temperature, top_k, top_p, min_p, seed, step, tokens,
        logprobs);
    return cudaGetLastError();
  });
}

}  // namespace fastbon::cuda
