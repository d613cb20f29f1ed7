// Fused sample + score on the CPU, one output row per OpenMP iteration, without sorting the vocabulary.
//
// Per row: max and p_j = exp(x_j / T - max / T) (stored), the raw log-sum-exp for the score, then the thresholds of
// reference.sampling_threshold found by selection instead of a sort: a histogram of p over the top bits of its
// float pattern (p >= 0, so the bit pattern orders like the value) gives, walking down from the largest bucket,
// the bucket holding the k-th largest p (by count) and the bucket where the kept mass reaches top_p of the top-k
// mass; only those buckets' members are collected and ordered. The draw is the first index in vocabulary order
// whose cumulative kept mass exceeds u * total, u the Philox uniform of (seed, step).
//
// Why a histogram here (CUDA radix-selects, Triton bisects, the reference sorts): one CPU thread owns the row, so
// one pass over p stored in L2 builds the whole histogram with no atomics, and only the few members of the bucket
// holding each threshold are then ordered; a full sort of 128k probabilities per row costs ~17 comparisons each,
// and bisection would re-read the row every step.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "../common/philox.h"
#include "cpu_ops.h"

namespace fastbon::cpu {
namespace {

constexpr int kBucketShift = 18;                        // sign, exponent and 5 mantissa bits of a float
constexpr uint32_t kTopBucket = 0x3F800000u >> kBucketShift;  // the bucket of p = 1, the largest p
constexpr int64_t kBlock = 1024;                        // cumulative-mass blocks of the draw

template <typename Work>
struct Scratch {
  std::vector<Work> probs;
  std::vector<uint32_t> counts;
  std::vector<double> mass;
  std::vector<Work> candidates;
  std::vector<double> block_mass;
};

template <typename Work>
FASTBON_INLINE uint32_t bucket_of(Work p) {
  return bit_cast<uint32_t>(static_cast<float>(p)) >> kBucketShift;
}

// sum_j f(j) over [0, count): float partial sums per block (vectorised), added in double.
template <typename Work, typename Term>
FASTBON_INLINE double blocked_sum(int64_t count, Term term) {
  double total = 0;
  for (int64_t start = 0; start < count; start += kBlock) {
    const int64_t end = std::min(count, start + kBlock);
    Work partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t j = start; j < end; ++j) partial += term(j);
    total += partial;
  }
  return total;
}

// The value v in [begin, end) where the mass of larger values is below `remaining` and the mass of values >= v
// reaches it: a quickselect on mass, O(n) expected, instead of sorting the candidate bucket. Reorders the range.
template <typename Work>
Work mass_select(Work* begin, Work* end, double remaining) {
  if (begin == end) return 0;
  Work smallest = *std::min_element(begin, end);  // the answer when rounding leaves `remaining` unreached
  while (begin < end) {
    const Work pivot = begin[(end - begin) / 2];
    Work* greater_end = std::partition(begin, end, [pivot](Work p) { return p > pivot; });
    Work* equal_end = std::partition(greater_end, end, [pivot](Work p) { return p == pivot; });
    double greater_mass = 0;
    for (Work* p = begin; p < greater_end; ++p) greater_mass += *p;
    if (greater_end > begin && greater_mass >= remaining) {
      end = greater_end;
      continue;
    }
    const double through_pivot = greater_mass + static_cast<double>(pivot) * static_cast<double>(equal_end - greater_end);
    if (through_pivot >= remaining) return pivot;
    remaining -= through_pivot;
    begin = equal_end;
  }
  return smallest;
}

template <typename In, typename Work>
FASTBON_INLINE void sample_row(const In* x, int64_t vocab, float temperature, int32_t top_k, float top_p, float min_p,
                               int64_t seed, int64_t step, Scratch<Work>& scratch, int64_t* token, float* logprob) {
  Work maximum = -std::numeric_limits<Work>::infinity();
#pragma omp simd reduction(max : maximum)
  for (int64_t j = 0; j < vocab; ++j) maximum = std::max(maximum, static_cast<Work>(to_float(x[j])));
  auto raw_term = [&](int64_t j) { return exp_nonpositive(static_cast<Work>(to_float(x[j])) - maximum); };

  if (temperature == 0) {  // greedy: the first maximal logit
    int64_t best = 0;
    while (static_cast<Work>(to_float(x[best])) != maximum) ++best;
    *token = best;
    *logprob = static_cast<float>(-std::log(blocked_sum<Work>(vocab, raw_term)));
    return;
  }

  Work* probs = scratch.probs.data();
  const Work work_temperature = temperature;
  const Work scaled_max = maximum / work_temperature;
#pragma omp simd
  for (int64_t j = 0; j < vocab; ++j)
    probs[j] = exp_nonpositive(static_cast<Work>(to_float(x[j])) / work_temperature - scaled_max);
  const double raw_sum = temperature == 1.0f ? blocked_sum<Work>(vocab, [&](int64_t j) { return probs[j]; })
                                             : blocked_sum<Work>(vocab, raw_term);

  const bool use_top_k = top_k > 0 && top_k < vocab;
  const bool use_top_p = top_p < 1.0f;
  Work threshold_k = 0, threshold_p = 0;
  if (use_top_k || use_top_p) {
    uint32_t* counts = scratch.counts.data();
    double* mass = scratch.mass.data();
    std::fill(counts, counts + kTopBucket + 1, 0u);
    std::fill(mass, mass + kTopBucket + 1, 0.0);
    for (int64_t j = 0; j < vocab; ++j) {
      const uint32_t bucket = bucket_of(probs[j]);
      ++counts[bucket];
      mass[bucket] += probs[j];
    }
    std::vector<Work>& candidates = scratch.candidates;
    auto collect = [&](uint32_t bucket) {
      candidates.clear();
      for (int64_t j = 0; j < vocab; ++j)
        if (bucket_of(probs[j]) == bucket) candidates.push_back(probs[j]);
    };

    // top-k: the k-th largest p, ties kept. The mass above it is what top-p takes a fraction of.
    int64_t k_bucket = -1;
    double k_bucket_mass = 0, top_k_mass = 0;
    if (use_top_k) {
      int64_t above = 0;
      for (int64_t bucket = kTopBucket; bucket >= 0; --bucket) {
        if (above + counts[bucket] >= static_cast<uint32_t>(top_k)) {
          k_bucket = bucket;
          break;
        }
        above += counts[bucket];
        top_k_mass += mass[bucket];
      }
      collect(static_cast<uint32_t>(k_bucket));
      const auto nth = candidates.begin() + (top_k - above - 1);
      std::nth_element(candidates.begin(), nth, candidates.end(), std::greater<Work>());
      threshold_k = *nth;
      for (Work p : candidates) k_bucket_mass += p >= threshold_k ? p : 0;
      top_k_mass += k_bucket_mass;
    } else {
      for (uint32_t bucket = 0; bucket <= kTopBucket; ++bucket) top_k_mass += mass[bucket];
    }

    // top-p: the largest v with (kept mass of p >= v) >= top_p * top-k mass.
    if (use_top_p) {
      const double target = static_cast<double>(top_p) * top_k_mass;
      double above = 0;
      for (int64_t bucket = kTopBucket; bucket >= std::max<int64_t>(k_bucket, 0); --bucket) {
        const double bucket_mass = bucket == k_bucket ? k_bucket_mass : mass[bucket];
        if (above + bucket_mass < target) {
          above += bucket_mass;
          continue;
        }
        if (bucket != k_bucket) collect(static_cast<uint32_t>(bucket));
        const auto kept_end = std::partition(candidates.begin(), candidates.end(),
                                             [&](Work p) { return p >= threshold_k; });
        threshold_p = mass_select(candidates.data(), candidates.data() + (kept_end - candidates.begin()),
                                  target - above);
        break;
      }
    }
  }
  const Work threshold = std::max({threshold_k, threshold_p, static_cast<Work>(min_p)});

  // The draw: first j in vocabulary order whose cumulative kept mass exceeds u * total.
  double* block_mass = scratch.block_mass.data();
  const int64_t num_blocks = (vocab + kBlock - 1) / kBlock;
  double total = 0;
  for (int64_t block = 0; block < num_blocks; ++block) {
    const int64_t start = block * kBlock, end = std::min(vocab, start + kBlock);
    Work partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t j = start; j < end; ++j) partial += (probs[j] >= threshold && probs[j] > 0) ? probs[j] : 0;
    block_mass[block] = partial;
    total += partial;
  }
  const double target = static_cast<double>(philox_uniform(seed, step)) * total;
  double cumulative = 0;
  int64_t block = 0;
  while (block + 1 < num_blocks && cumulative + block_mass[block] <= target) cumulative += block_mass[block++];
  int64_t chosen = -1;
  for (int64_t j = block * kBlock, end = std::min(vocab, j + kBlock); j < end; ++j) {
    if (!(probs[j] >= threshold && probs[j] > 0)) continue;
    chosen = j;  // the last kept token so far: the answer when rounding leaves the target unreached
    cumulative += probs[j];
    if (cumulative > target) break;
  }
  *token = chosen;
  *logprob = static_cast<float>(static_cast<Work>(to_float(x[chosen])) - maximum - std::log(raw_sum));
}

template <typename In, typename Work>
FASTBON_TARGET_AVX512 void sample_row_avx512(const In* x, int64_t vocab, float temperature, int32_t top_k, float top_p,
                                             float min_p, int64_t seed, int64_t step, Scratch<Work>& scratch,
                                             int64_t* token, float* logprob) {
  sample_row<In, Work>(x, vocab, temperature, top_k, top_p, min_p, seed, step, scratch, token, logprob);
}
template <typename In, typename Work>
FASTBON_TARGET_AVX2 void sample_row_avx2(const In* x, int64_t vocab, float temperature, int32_t top_k, float top_p,
                                         float min_p, int64_t seed, int64_t step, Scratch<Work>& scratch,
                                         int64_t* token, float* logprob) {
  sample_row<In, Work>(x, vocab, temperature, top_k, top_p, min_p, seed, step, scratch, token, logprob);
}
template <typename In, typename Work>
void sample_row_baseline(const In* x, int64_t vocab, float temperature, int32_t top_k, float top_p, float min_p,
                         int64_t seed, int64_t step, Scratch<Work>& scratch, int64_t* token, float* logprob) {
  sample_row<In, Work>(x, vocab, temperature, top_k, top_p, min_p, seed, step, scratch, token, logprob);
}

template <typename In, typename Work>
void run_sample(const In* logits, int64_t vocab, const int64_t* row_index, const float* temperature,
                const int32_t* top_k, const float* top_p, const float* min_p, const int64_t* seed, const int64_t* step,
                int64_t num_rows, int64_t* tokens, float* logprobs, int num_threads) {
  const Isa isa = active_isa();
  const int threads = team_size(static_cast<int>(std::min<int64_t>(num_threads, num_rows)), num_rows * vocab,
                                int64_t{1} << 17);
#pragma omp parallel num_threads(threads)
  {
    Scratch<Work> scratch;
    scratch.probs.resize(vocab);
    scratch.counts.resize(kTopBucket + 1);
    scratch.mass.resize(kTopBucket + 1);
    scratch.block_mass.resize((vocab + kBlock - 1) / kBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_rows; ++i) {
      const In* x = logits + row_index[i] * vocab;
      auto* row = isa == Isa::kAvx512 ? &sample_row_avx512<In, Work>
                  : isa == Isa::kAvx2 ? &sample_row_avx2<In, Work>
                                      : &sample_row_baseline<In, Work>;
      row(x, vocab, temperature[i], top_k[i], top_p[i], min_p[i], seed[i], step[i], scratch, tokens + i,
          logprobs + i);
    }
  }
}

}  // namespace

void sample(DType dtype, const void* logits, int64_t vocab, const int64_t* row_index, const float* temperature,
            const int32_t* top_k, const float* top_p, const float* min_p, const int64_t* seed, const int64_t* step,
            int64_t num_rows, int64_t* tokens, float* logprobs, int num_threads) {
  auto run = [&](auto element, auto work) {
    using In = decltype(element);
    run_sample<In, decltype(work)>(static_cast<const In*>(logits), vocab, row_index, temperature, top_k, top_p,
                                   min_p, seed, step, num_rows, tokens, logprobs, num_threads);
  };
  visit_dtype(dtype, run);
}

}  // namespace fastbon::cpu
