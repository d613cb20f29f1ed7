// Argument checks shared by the CPU and CUDA bindings. The public Python functions validate values (ranges,
// NaN); these guard memory safety when torch.ops.fastbon.* is called directly: dtypes, shapes, contiguity.
#pragma once

#include <cmath>
#include <initializer_list>
#include <optional>

#include <torch/library.h>

#include "../common/dtype.h"

namespace fastbon {

// The kernel element type of `tensor` (argument `name`), one of `allowed`; a TypeError naming the argument else.
inline DType dtype_of(const at::Tensor& tensor, const char* name, std::initializer_list<DType> allowed) {
  DType dtype = DType::kFloat32;
  bool known = true;
  switch (tensor.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kHalf: dtype = DType::kFloat16; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    case at::kDouble: dtype = DType::kFloat64; break;
    default: known = false;
  }
  bool listed = false;
  for (DType candidate : allowed) listed = listed || (known && candidate == dtype);
  TORCH_CHECK_TYPE(listed, "fastbon: ", name, " has dtype ", tensor.scalar_type(), ", which the ",
                   tensor.device().type(), " kernels do not take");
  return dtype;
}

inline void check_tensor(const at::Tensor& tensor, const char* name, const at::Tensor& like, int64_t ndim,
                         at::ScalarType dtype) {
  TORCH_CHECK(tensor.dim() == ndim, "fastbon: ", name, " must have ", ndim, " dimensions");
  TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, "fastbon: ", name, " must be ", dtype);
  TORCH_CHECK(tensor.device() == like.device(), "fastbon: ", name, " must be on ", like.device());
  TORCH_CHECK(tensor.is_contiguous(), "fastbon: ", name, " must be contiguous");
}

inline void check_attention_arguments(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                      const at::Tensor& prefix_lens, const at::Tensor& suffix_k,
                                      const at::Tensor& suffix_v, const at::Tensor& suffix_lens,
                                      const at::Tensor& sample_to_prompt, const at::Tensor& out) {
  const auto dtype = q.scalar_type();
  check_tensor(q, "q", q, 3, dtype);
  check_tensor(prefix_k, "prefix_k", q, 4, dtype);
  check_tensor(prefix_v, "prefix_v", q, 4, dtype);
  check_tensor(suffix_k, "suffix_k", q, 4, dtype);
  check_tensor(suffix_v, "suffix_v", q, 4, dtype);
  check_tensor(out, "out", q, 3, dtype);
  check_tensor(prefix_lens, "prefix_lens", q, 1, at::kInt);
  check_tensor(suffix_lens, "suffix_lens", q, 1, at::kInt);
  check_tensor(sample_to_prompt, "sample_to_prompt", q, 1, at::kInt);
  const int64_t samples = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t prompts = prefix_k.size(0), kv_heads = prefix_k.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "fastbon: q heads must be a multiple of KV heads");
  TORCH_CHECK(prefix_k.size(3) == dim && prefix_v.sizes() == prefix_k.sizes(), "fastbon: prefix_k/v shape");
  TORCH_CHECK(suffix_k.size(0) == samples && suffix_k.size(1) == kv_heads && suffix_k.size(3) == dim &&
                  suffix_v.sizes() == suffix_k.sizes(),
              "fastbon: suffix_k/v shape");
  TORCH_CHECK(out.sizes() == q.sizes(), "fastbon: out must have q's shape");
  TORCH_CHECK(prefix_lens.size(0) == prompts && suffix_lens.size(0) == samples &&
                  sample_to_prompt.size(0) == samples,
              "fastbon: prefix_lens, suffix_lens, sample_to_prompt sizes");
}

// window 0 = none, softcap 0 = none, sinks absent or [Hq] in the accumulator dtype (float64 for float64 q, else
// float32).
inline void check_attention_features(const at::Tensor& q, int64_t window, double softcap,
                                     const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(window >= 0, "fastbon: window must be >= 0 (0 = none)");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "fastbon: softcap must be finite and >= 0 (0 = none)");
  if (sinks.has_value()) {
    check_tensor(*sinks, "sinks", q, 1, q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    TORCH_CHECK(sinks->size(0) == q.size(1), "fastbon: sinks must have one entry per query head");
  }
}

inline void check_sample_arguments(const at::Tensor& logits, const at::Tensor& row_index,
                                   const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                                   const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& step,
                                   const at::Tensor& tokens, const at::Tensor& logprobs) {
  check_tensor(logits, "logits", logits, 2, logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, "fastbon: logits must have a vocabulary");
  check_tensor(row_index, "row_index", logits, 1, at::kLong);
  const int64_t rows = row_index.size(0);
  for (auto [tensor, name, dtype] : {std::tuple{&temperature, "temperature", at::kFloat},
                                     std::tuple{&top_k, "top_k", at::kInt}, std::tuple{&top_p, "top_p", at::kFloat},
                                     std::tuple{&min_p, "min_p", at::kFloat}, std::tuple{&seed, "seed", at::kLong},
                                     std::tuple{&step, "step", at::kLong}, std::tuple{&tokens, "tokens", at::kLong},
                                     std::tuple{&logprobs, "logprobs", at::kFloat}}) {
    check_tensor(*tensor, name, logits, 1, dtype);
    TORCH_CHECK(tensor->size(0) == rows, "fastbon: ", name, " must have one entry per output row");
  }
}

inline void check_topk_arguments(const at::Tensor& scores, int64_t k, const at::Tensor& values,
                                 const at::Tensor& indices) {
  check_tensor(scores, "scores", scores, 2, scores.scalar_type());
  TORCH_CHECK(1 <= k && k <= scores.size(1), "fastbon: k must lie in [1, n]");
  check_tensor(values, "values", scores, 2, scores.scalar_type());
  check_tensor(indices, "indices", scores, 2, at::kLong);
  TORCH_CHECK(values.size(0) == scores.size(0) && values.size(1) == k && indices.sizes() == values.sizes(),
              "fastbon: values/indices must have shape [B, k]");
}

}  // namespace fastbon
