// Philox-4x32-10 uniform shared bit for bit by the C++ and CUDA backends (python/fastbon/ops/philox.py is the
// specification): key = (seed lo32, seed hi32), counter = (step lo32, step hi32, 0, 0), u = (c0 >> 8) * 2^-24.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTBON_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTBON_HOST_DEVICE inline
#endif

namespace fastbon {

FASTBON_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t step) {
  uint32_t c0 = static_cast<uint32_t>(step), c1 = static_cast<uint32_t>(step >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t product_a = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t next0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// 24 random bits, exact in float32, in [0, 1).
FASTBON_HOST_DEVICE float philox_uniform(int64_t seed, int64_t step) {
  return static_cast<float>(philox_first_word(static_cast<uint64_t>(seed), static_cast<uint64_t>(step)) >> 8) *
         (1.0f / 16777216.0f);
}

}  // namespace fastbon
