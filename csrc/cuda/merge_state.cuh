// FlashInfer's merge_state on CUDA: a running softmax state of one query row, held by a warp, and the merge of a
// partial state over other keys into it by log-sum-exp.
//
// The running state is (m, l, acc): the largest score so far, sum exp(s - m) and the unnormalised sum
// exp(s - m) v, lane l owning output dims l, l + 32, ... A partial (o, lse) over a disjoint key set (a prefix
// chunk's normalised output and log-sum-exp) joins it as one key of score lse and value o:
//
//     m' = max(m, lse),  l' = l e^(m - m') + e^(lse - m'),  acc' = acc e^(m - m') + e^(lse - m') o.
//
// Why a running state rather than FlashInfer's pairwise merge of two normalised states: pass 2 already holds the
// suffix's online softmax in this form, so each chunk costs one exp and no division; it divides once at the end.
// Every CUDA kernel that merges partial attentions uses this.
#pragma once

#include <cfloat>

#include "ops.cuh"

namespace fastbon::cuda {

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

// The partial (partial_out[0, head_dim), lse) merged into state by this lane's dims.
__device__ __forceinline__ void merge_state(RowState& state, float lse, const float* __restrict__ partial_out, int lane,
                                            int head_dim) {
  if (lse > state.maximum) rescale(state, lse);
  const float weight = __expf(lse - state.maximum);
  state.sum += weight;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) state.acc[i] += weight * partial_out[d];
  }
}

}  // namespace fastbon::cuda
