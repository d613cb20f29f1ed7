// Segmented top-k on the CPU: per row, a partial selection of k of n (best first, ties to the lower index).
#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu_ops.h"

namespace fastbon::cpu {
namespace {

template <typename T>
void run_select_topk(const T* scores, int64_t num_rows, int64_t n, int64_t k, T* values, int64_t* indices,
                     int num_threads) {
#pragma omp parallel num_threads(team_size(num_threads, num_rows * n, int64_t{1} << 16))
  {
    std::vector<int64_t> order(n);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < num_rows; ++row) {
      const T* x = scores + row * n;
      std::iota(order.begin(), order.end(), int64_t{0});
      // -inf compares below every finite score, so it ranks last without a special case (NaN is rejected).
      auto better = [x](int64_t a, int64_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), better);
      std::sort(order.begin(), order.begin() + k, better);
      for (int64_t i = 0; i < k; ++i) {
        values[row * k + i] = x[order[i]];
        indices[row * k + i] = order[i];
      }
    }
  }
}

}  // namespace

void select_topk(DType dtype, const void* scores, int64_t num_rows, int64_t n, int64_t k, void* values,
                 int64_t* indices, int num_threads) {
  if (dtype == DType::kFloat64)
    run_select_topk(static_cast<const double*>(scores), num_rows, n, k, static_cast<double*>(values), indices,
                    num_threads);
  else
    run_select_topk(static_cast<const float*>(scores), num_rows, n, k, static_cast<float*>(values), indices,
                    num_threads);
}

}  // namespace fastbon::cpu
