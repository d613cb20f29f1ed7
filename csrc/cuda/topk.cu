// Segmented top-k on CUDA: one block per row; element i's rank is the number of elements that beat it (greater,
// or equal with a lower index), so the k best land in place without a sort. O(n^2 / threads) per row, meant for
// best-of-n rows (n up to a few thousand).
#include "ops.cuh"

namespace fastbon::cuda {
namespace {

template <typename T>
__global__ void select_topk_kernel(const T* __restrict__ scores, int64_t n, int64_t k, T* __restrict__ values,
                                   int64_t* __restrict__ indices) {
  const T* row = scores + static_cast<int64_t>(blockIdx.x) * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T value = row[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < n && rank < k; ++j) {
      const T other = row[j];
      rank += (other > value || (other == value && j < i)) ? 1 : 0;
    }
    if (rank < k) {
      values[static_cast<int64_t>(blockIdx.x) * k + rank] = value;
      indices[static_cast<int64_t>(blockIdx.x) * k + rank] = i;
    }
  }
}

}  // namespace

cudaError_t select_topk(DType dtype, const void* scores, int64_t num_rows, int64_t n, int64_t k, void* values,
                        int64_t* indices, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_rows);
  if (dtype == DType::kFloat32)
    select_topk_kernel<float><<<blocks, 256, 0, stream>>>(static_cast<const float*>(scores), n, k,
                                                           static_cast<float*>(values), indices);
  else if (dtype == DType::kFloat64)
    select_topk_kernel<double><<<blocks, 256, 0, stream>>>(static_cast<const double*>(scores), n, k,
                                                            static_cast<double*>(values), indices);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace fastbon::cuda
