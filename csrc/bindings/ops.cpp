// torch.library registration of fastbon's ops (schemas + CPU kernels) and the Python module fastbon._C.
//
// The ops are out-variants: python/fastbon/_cpp_ops.py allocates the outputs (fastbon.ops._alloc.new_output) and
// registers the fake kernels, so a decode step traces under torch.compile. The CUDA kernels register from
// cuda_ops.cpp when the extension is built with CUDA.
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
      "sample_out(Tensor logits, Tensor row_index, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor seed, Tensor step, Tensor(a!) tokens, Tensor(b!) logprobs) -> ()");
  m.def("select_topk_out(Tensor scores, int k, Tensor(a!) values, Tensor(b!) indices) -> ()");
  m.def("philox_uniform(Tensor seed, Tensor step) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastbon, CPU, m) {
  m.impl("shared_prefix_attention_out", &shared_prefix_attention_cpu);
  m.impl("sample_out", &sample_cpu);
  m.impl("select_topk_out", &select_topk_cpu);
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
