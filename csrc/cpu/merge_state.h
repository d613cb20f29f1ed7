// FlashInfer's merge_state on the CPU: partial softmax states over disjoint key sets merged by their log-sum-exp.
//
// A state is (o, lse): o the softmax-weighted values over its keys (normalised), lse the log-sum-exp of their
// scores; lse = -inf for a state that saw no key. The merge of states s is
//
//     out = sum_s exp(lse_s - m) o_s / sum_s exp(lse_s - m),    m = max_s lse_s,
//
// with a learned sink (gpt-oss) as one more state of zero value. Why all states at once, not two at a time: with
// one common maximum each state's weight is one exp, computed once, and the sums run in the states' order, so the
// result does not depend on how the states were grouped (a pairwise merge rescales the running sum at every new
// maximum, an extra rounding per rescale). Every CPU kernel that merges partial attentions calls this.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernel_utils.h"

namespace fastbon::cpu {

// destination[0, head_dim) = the merge of the states that for_each_state(visit) visits, as visit(lse, o) with o
// [head_dim] (it is called twice: the maximum, then the sums); sink nullptr or the sink's logit. merged is scratch
// of head_dim elements. No state with a key and no sink gives zeros.
template <typename In, typename Acc, typename ForEachState>
FASTBON_INLINE void merge_states(ForEachState&& for_each_state, const Acc* sink, int64_t head_dim, Acc* merged,
                                 In* destination) {
  Acc maximum = sink != nullptr ? *sink : -std::numeric_limits<Acc>::infinity();
  for_each_state([&](Acc lse, const Acc*) { maximum = std::max(maximum, lse); });
  std::fill(merged, merged + head_dim, Acc(0));
  Acc total = sink != nullptr ? std::exp(*sink - maximum) : Acc(0);
  for_each_state([&](Acc lse, const Acc* partial) {
    // A state without keys (lse = -inf) weighs nothing, also when every state is one (exp(-inf + inf) is NaN).
    const Acc weight = std::isinf(lse) ? Acc(0) : std::exp(lse - maximum);
    total += weight;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) merged[d] += weight * partial[d];
  });
  const Acc inverse = total > 0 ? Acc(1) / total : Acc(0);
  for (int64_t d = 0; d < head_dim; ++d) destination[d] = narrow<In>(merged[d] * inverse);
}

}  // namespace fastbon::cpu
