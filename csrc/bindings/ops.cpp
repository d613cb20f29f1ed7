// torch.library registration of fastbon's ops (schemas + CPU kernels) and the Python module fastbon._C.
//
// The ops are out-variants: python/fastbon/_cpp_ops.py allocates the outputs (fastbon.ops._alloc.new_output) and
// registers the fake kernels, so a decode step traces under torch.compile. The CUDA kernels register from
// cuda_ops.cpp when the extension is built with CUDA.
#include <algorithm>

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/philox.h"
#include "../cpu/cpu_ops.h"
#include "checks.h"

namespace fastbon {
namespace {

// The kernels' OpenMP teams take torch's thread count (torch.set_num_threads), passed explicitly.
int op_threads() { return at::get_num_threads(); }

int openmp_team_size() {
  int size = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(op_threads())
  {
#pragma omp master
    size = omp_get_num_threads();
  }
#endif
  return size;
}

void shared_prefix_attention_cpu(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                 const at::Tensor& prefix_lens, const at::Tensor& suffix_k,
                                 const at::Tensor& suffix_v, const at::Tensor& suffix_lens,
                                 const at::Tensor& sample_to_prompt, double scale, int64_t window, double softcap,
                                 const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  check_attention_arguments(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            out);
  check_attention_features(q, window, softcap, sinks);
  cpu::shared_prefix_attention(dtype_of(q, "q", {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64}),
                               q.data_ptr(), prefix_k.data_ptr(), prefix_v.data_ptr(),
                               prefix_lens.data_ptr<int32_t>(), suffix_k.data_ptr(), suffix_v.data_ptr(),
                               suffix_lens.data_ptr<int32_t>(), sample_to_prompt.data_ptr<int32_t>(),
                               out.data_ptr(), q.size(0), prefix_k.size(0), q.size(1), prefix_k.size(1), q.size(2),
                               prefix_k.size(2), suffix_k.size(2), scale, window, softcap,
                               sinks.has_value() ? sinks->data_ptr() : nullptr, op_threads());
}

// The level structure of a tree-attention call as the kernels take it: each level's lengths, the row -> segment map.
cpu::TreeShape tree_shape(const std::vector<at::Tensor>& level_lens, const at::Tensor& level_segments,
                          int64_t suffix_capacity, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim) {
  const int64_t num_levels = static_cast<int64_t>(level_lens.size());
  TORCH_CHECK(level_segments.dim() == 2 && level_segments.size(0) == num_levels &&
                  level_segments.scalar_type() == at::kInt && level_segments.is_contiguous(),
              "fastbon: level_segments must be a contiguous int32 [levels, rows] tensor");
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "fastbon: q heads must be a multiple of KV heads");
  std::vector<int64_t> longest;
  for (const at::Tensor& lens : level_lens) {
    TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == at::kInt && lens.is_contiguous() && lens.is_cpu(),
                "fastbon: level_lens must be contiguous int32 CPU vectors");
    const int32_t* data = lens.data_ptr<int32_t>();  // a plain loop: the per-layer run allocates nothing
    longest.push_back(lens.numel() ? *std::max_element(data, data + lens.numel()) : 0);
  }
  return {num_levels, level_segments.size(1), num_q_heads, num_kv_heads, head_dim, suffix_capacity, longest,
          op_threads()};
}

std::vector<const int32_t*> lens_pointers(const std::vector<at::Tensor>& level_lens) {
  std::vector<const int32_t*> pointers;
  for (const at::Tensor& lens : level_lens) pointers.push_back(lens.data_ptr<int32_t>());
  return pointers;
}

// Once per batch change: positions, work items and the workspaces one layer's run needs (reused by every layer).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_attention_plan_cpu(
    const std::vector<at::Tensor>& level_lens, const at::Tensor& level_segments, int64_t suffix_capacity,
    int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, bool float64) {
  const cpu::TreeShape shape = tree_shape(level_lens, level_segments, suffix_capacity, num_q_heads, num_kv_heads,
                                          head_dim);
  std::vector<int64_t> counts;
  for (const at::Tensor& lens : level_lens) counts.push_back(lens.numel());
  const auto index_options = level_segments.options().dtype(at::kLong);
  at::Tensor positions = at::empty({shape.num_levels, shape.num_rows}, index_options);
  std::vector<int64_t> items;
  const auto pointers = lens_pointers(level_lens);
  cpu::plan_tree(shape, pointers.data(), counts.data(), level_segments.data_ptr<int32_t>(),
                 positions.data_ptr<int64_t>(), items);
  at::Tensor item_tensor = at::empty({static_cast<int64_t>(items.size()) / cpu::kItemColumns, cpu::kItemColumns},
                                     index_options);
  std::copy(items.begin(), items.end(), item_tensor.data_ptr<int64_t>());
  const cpu::TreeWorkspaceLayout layout(shape);
  at::Tensor workspace = at::empty({layout.elements}, level_segments.options().dtype(float64 ? at::kDouble : at::kFloat));
  at::Tensor index_workspace = at::empty({layout.index_elements}, index_options);
  return {positions, item_tensor, workspace, index_workspace};
}

void tree_attention_cpu(const at::Tensor& q, const std::vector<at::Tensor>& level_keys,
                        const std::vector<at::Tensor>& level_values, const std::vector<at::Tensor>& level_lens,
                        const at::Tensor& level_segments, const at::Tensor& positions, const at::Tensor& items,
                        const at::Tensor& suffix_k, const at::Tensor& suffix_v, const at::Tensor& suffix_lens,
                        double scale, int64_t window, double softcap, const std::optional<at::Tensor>& sinks,
                        const at::Tensor& workspace, const at::Tensor& index_workspace, const at::Tensor& out) {
  const auto dtype = q.scalar_type();
  check_tensor(q, "q", q, 3, dtype);
  check_tensor(out, "out", q, 3, dtype);
  check_tensor(suffix_k, "suffix_k", q, 4, dtype);
  check_tensor(suffix_v, "suffix_v", q, 4, dtype);
  check_tensor(suffix_lens, "suffix_lens", q, 1, at::kInt);
  check_attention_features(q, window, softcap, sinks);
  const int64_t rows = q.size(0), kv_heads = suffix_k.size(1);
  TORCH_CHECK(out.sizes() == q.sizes() && suffix_k.size(0) == rows && suffix_k.size(3) == q.size(2) &&
                  suffix_v.sizes() == suffix_k.sizes() && suffix_lens.size(0) == rows,
              "fastbon: q, suffix_k/v, suffix_lens, out shapes");
  TORCH_CHECK(level_keys.size() == level_lens.size() && level_values.size() == level_lens.size(),
              "fastbon: one keys, values and lens tensor per level");
  const cpu::TreeShape shape = tree_shape(level_lens, level_segments, suffix_k.size(2), q.size(1), kv_heads, q.size(2));
  TORCH_CHECK(shape.num_rows == rows, "fastbon: level_segments must have one column per row of q");
  std::vector<const void*> keys, values;
  std::vector<int64_t> capacity;
  for (size_t level = 0; level < level_keys.size(); ++level) {
    check_tensor(level_keys[level], "level_keys", q, 4, dtype);
    check_tensor(level_values[level], "level_values", q, 4, dtype);
    TORCH_CHECK(level_keys[level].size(0) == level_lens[level].numel() && level_keys[level].size(1) == kv_heads &&
                    level_keys[level].size(3) == q.size(2) && level_values[level].sizes() == level_keys[level].sizes(),
                "fastbon: level ", level, " keys/values shape");
    keys.push_back(level_keys[level].data_ptr());
    values.push_back(level_values[level].data_ptr());
    capacity.push_back(level_keys[level].size(2));
  }
  const cpu::TreeWorkspaceLayout layout(shape);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == shape.num_levels * rows &&
                  items.scalar_type() == at::kLong && items.dim() == 2 && items.size(1) == cpu::kItemColumns,
              "fastbon: positions/items are not a plan of this batch (tree_attention_plan)");
  TORCH_CHECK(workspace.numel() >= layout.elements && index_workspace.numel() >= layout.index_elements &&
                  workspace.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat) &&
                  index_workspace.scalar_type() == at::kLong,
              "fastbon: the workspace does not fit this call: plan again (tree_attention_plan)");
  const auto pointers = lens_pointers(level_lens);
  cpu::tree_attention(dtype_of(q, "q", {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64}), shape,
                      q.data_ptr(), keys.data(), values.data(), pointers.data(), capacity.data(),
                      level_segments.data_ptr<int32_t>(), positions.data_ptr<int64_t>(), items.data_ptr<int64_t>(),
                      items.size(0), suffix_k.data_ptr(), suffix_v.data_ptr(), suffix_lens.data_ptr<int32_t>(),
                      out.data_ptr(), scale, window, softcap, sinks.has_value() ? sinks->data_ptr() : nullptr,
                      workspace.data_ptr(), index_workspace.data_ptr<int64_t>(), op_threads());
}

void sample_cpu(const at::Tensor& logits, const at::Tensor& row_index, const at::Tensor& temperature,
                const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                const at::Tensor& step, const at::Tensor& tokens, const at::Tensor& logprobs) {
  check_sample_arguments(logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs);
  cpu::sample(dtype_of(logits, "logits", {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64}),
              logits.data_ptr(), logits.size(1), row_index.data_ptr<int64_t>(), temperature.data_ptr<float>(),
              top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(), seed.data_ptr<int64_t>(),
              step.data_ptr<int64_t>(), row_index.size(0), tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
              op_threads());
}

void skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& out) {
  const auto dtype = x.scalar_type();
  check_tensor(x, "x", x, 2, dtype);
  check_tensor(weight, "weight", x, 2, dtype);
  check_tensor(out, "out", x, 2, dtype);
  TORCH_CHECK(weight.size(1) == x.size(1) && out.size(0) == x.size(0) && out.size(1) == weight.size(0),
              "fastbon: x [rows, in], weight [out, in], out [rows, out] shapes");
  if (bias.has_value()) {
    check_tensor(*bias, "bias", x, 1, dtype);
    TORCH_CHECK(bias->size(0) == weight.size(0), "fastbon: bias must have one element per row of weight");
  }
  cpu::skinny_linear(dtype_of(x, "x", {DType::kFloat32, DType::kBFloat16, DType::kFloat16}), x.data_ptr(),
                     weight.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(), x.size(0),
                     weight.size(0), x.size(1), op_threads());
}

void select_topk_cpu(const at::Tensor& scores, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  check_topk_arguments(scores, k, values, indices);
  cpu::select_topk(dtype_of(scores, "scores", {DType::kFloat32, DType::kFloat64}), scores.data_ptr(), scores.size(0),
                   scores.size(1), k, values.data_ptr(), indices.data_ptr<int64_t>(), op_threads());
}

at::Tensor philox_uniform_cpu(const at::Tensor& seed, const at::Tensor& step) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && step.scalar_type() == at::kLong, "seed and step must be int64");
  TORCH_CHECK(seed.sizes() == step.sizes(), "seed and step must have the same shape");
  const at::Tensor seeds = seed.contiguous(), steps = step.contiguous();
  at::Tensor uniforms = at::empty(seed.sizes(), seed.options().dtype(at::kFloat));
  const int64_t* seed_data = seeds.data_ptr<int64_t>();
  const int64_t* step_data = steps.data_ptr<int64_t>();
  float* out = uniforms.data_ptr<float>();
  for (int64_t i = 0; i < seeds.numel(); ++i) out[i] = philox_uniform(seed_data[i], step_data[i]);
  return uniforms;
}

}  // namespace

TORCH_LIBRARY(fastbon, m) {
  m.def(
      "shared_prefix_attention_out(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor prefix_lens, Tensor suffix_k, "
      "Tensor suffix_v, Tensor suffix_lens, Tensor sample_to_prompt, float scale, int window, float softcap, "
      "Tensor? sinks, Tensor(a!) out) -> ()");
  m.def(
      "tree_attention_plan(Tensor[] level_lens, Tensor level_segments, int suffix_capacity, int num_q_heads, "
      "int num_kv_heads, int head_dim, bool float64) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "tree_attention_out(Tensor q, Tensor[] level_keys, Tensor[] level_values, Tensor[] level_lens, "
      "Tensor level_segments, Tensor positions, Tensor items, Tensor suffix_k, Tensor suffix_v, Tensor suffix_lens, "
      "float scale, int window, float softcap, Tensor? sinks, Tensor(a!) workspace, Tensor(b!) index_workspace, "
      "Tensor(c!) out) -> ()");
  m.def(
      "sample_out(Tensor logits, Tensor row_index, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor seed, Tensor step, Tensor(a!) tokens, Tensor(b!) logprobs) -> ()");
  m.def("select_topk_out(Tensor scores, int k, Tensor(a!) values, Tensor(b!) indices) -> ()");
  m.def("skinny_linear_out(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("philox_uniform(Tensor seed, Tensor step) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastbon, CPU, m) {
  m.impl("shared_prefix_attention_out", &shared_prefix_attention_cpu);
  m.impl("tree_attention_plan", &tree_attention_plan_cpu);
  m.impl("tree_attention_out", &tree_attention_cpu);
  m.impl("sample_out", &sample_cpu);
  m.impl("select_topk_out", &select_topk_cpu);
  m.impl("skinny_linear_out", &skinny_linear_cpu);
  m.impl("philox_uniform", &philox_uniform_cpu);
}

}  // namespace fastbon

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastbon's C++ (and, when built with it, CUDA) kernels; the ops live in torch.ops.fastbon";
#ifdef FASTBON_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
  module.def("openmp_team_size", &fastbon::openmp_team_size,
             "Threads an OpenMP region of the CPU kernels runs with (follows torch.set_num_threads).");
  module.def("cpu_isa", [] {
    static const char* names[] = {"baseline", "avx2", "avx512"};
    return std::string(names[static_cast<int>(fastbon::cpu::active_isa())]);
  }, "The instruction set the CPU kernels run with (FASTBON_CPU_ISA=baseline|avx2 lowers it).");
}
