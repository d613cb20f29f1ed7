// CUDA kernels of torch.ops.fastbon (compiled only when the extension builds with CUDA): tensors in, the
// torch-free launchers of csrc/cuda out, on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/ops.cuh"
#include "checks.h"

namespace fastbon {
namespace {

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "fastbon::", op, ": CUDA error ", cudaGetErrorString(status));
}

void shared_prefix_attention_cuda(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                  const at::Tensor& prefix_lens, const at::Tensor& suffix_k,
                                  const at::Tensor& suffix_v, const at::Tensor& suffix_lens,
                                  const at::Tensor& sample_to_prompt, double scale, int64_t window, double softcap,
                                  const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  check_attention_arguments(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            out);
  // The CUDA kernels implement no sliding window, soft-cap or sinks: such calls are refused, never answered
  // without the feature (fastbon.ops.attention sends them to the Triton kernels).
  TORCH_CHECK(window == 0 && softcap == 0 && !sinks.has_value(),
              "fastbon: the CUDA attention kernel implements no sliding window, soft-cap or sinks; use triton");
  const DType dtype = dtype_of(q, "q", {DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  TORCH_CHECK(q.size(2) <= cuda::kMaxHeadDim, "fastbon: the CUDA kernel takes head_dim <= ", cuda::kMaxHeadDim);
  const c10::cuda::CUDAGuard guard(q.device());
  const size_t bytes = cuda::shared_prefix_attention_workspace_bytes(dtype, q.size(0), q.size(1), q.size(2),
                                                                     prefix_k.size(2));
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, q.options().dtype(at::kFloat));
  check_launch(cuda::shared_prefix_attention(
                   dtype, q.data_ptr(), prefix_k.data_ptr(), prefix_v.data_ptr(), prefix_lens.data_ptr<int32_t>(),
                   suffix_k.data_ptr(), suffix_v.data_ptr(), suffix_lens.data_ptr<int32_t>(),
                   sample_to_prompt.data_ptr<int32_t>(), out.data_ptr(), q.size(0), prefix_k.size(0), q.size(1),
                   prefix_k.size(1), q.size(2), prefix_k.size(2), suffix_k.size(2), static_cast<float>(scale),
                   workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "shared_prefix_attention");
}

void sample_cuda(const at::Tensor& logits, const at::Tensor& row_index, const at::Tensor& temperature,
                 const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                 const at::Tensor& step, const at::Tensor& tokens, const at::Tensor& logprobs) {
  check_sample_arguments(logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs);
  const DType dtype = dtype_of(logits, "logits", {DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(cuda::sample(dtype, logits.data_ptr(), logits.size(1), row_index.data_ptr<int64_t>(),
                            temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
                            min_p.data_ptr<float>(), seed.data_ptr<int64_t>(), step.data_ptr<int64_t>(),
                            row_index.size(0), tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                            c10::cuda::getCurrentCUDAStream().stream()),
               "sample");
}

void select_topk_cuda(const at::Tensor& scores, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  check_topk_arguments(scores, k, values, indices);
  const DType dtype = dtype_of(scores, "scores", {DType::kFloat32, DType::kFloat64});
  const c10::cuda::CUDAGuard guard(scores.device());
  check_launch(cuda::select_topk(dtype, scores.data_ptr(), scores.size(0), scores.size(1), k, values.data_ptr(),
                                 indices.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()),
               "select_topk");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbon, CUDA, m) {
  m.impl("shared_prefix_attention_out", &shared_prefix_attention_cuda);
  m.impl("sample_out", &sample_cuda);
  m.impl("select_topk_out", &select_topk_cuda);
}

}  // namespace fastbon
