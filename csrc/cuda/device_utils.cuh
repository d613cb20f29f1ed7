// Element conversions and warp/block reductions shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/dtype.h"

namespace fastbon::cuda {

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ double to_float(double value) { return value; }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xFFFFFFFFu, value, offset));
  return value;
}

// Calls body(element_type_tag) with the CUDA type of a float dtype (float32/float16/bfloat16).
template <typename Body>
cudaError_t dispatch_half_types(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32: return body(float{});
    case DType::kFloat16: return body(__half{});
    case DType::kBFloat16: return body(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastbon::cuda

namespace fastbon::cuda {

// Block-wide reduction with op (every thread gets the result); scratch holds one value per warp.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, Op op, T* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xFFFFFFFFu, value, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  T result = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) result = op(result, scratch[w]);
  __syncthreads();
  return result;
}

// Block-wide reductions in a fixed order (a fixed shuffle tree, then the warps in order): the same inputs give the
// same result bit for bit on every run, unlike float atomics.

// Block-wide exclusive prefix sum in thread order; *total gets the sum of all values and *inclusive (when given)
// this thread's inclusive prefix, which is bit for bit the next thread's exclusive one (and the last thread's equals
// *total), so the intervals [exclusive, inclusive) tile [0, total) without overlap or gap.
__device__ __forceinline__ float block_exclusive_sum(float value, float* scratch, float* total,
                                                     float* inclusive_out = nullptr) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float inclusive = value;
  for (int offset = 1; offset < 32; offset *= 2) {
    const float neighbour = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += neighbour;
  }
  float exclusive = __shfl_up_sync(0xFFFFFFFFu, inclusive, 1);
  if (lane == 0) exclusive = 0.0f;
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  float before = 0.0f, sum = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  __syncthreads();
  *total = sum;
  if (inclusive_out != nullptr) *inclusive_out = before + inclusive;
  return before + exclusive;
}

}  // namespace fastbon::cuda
