// The emulator's __half (see cuda_runtime.h): IEEE binary16 storage; the host compiler's _Float16 converts it,
// rounding to nearest even like __float2half_rn.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half value) {
  _Float16 half;
  std::memcpy(&half, &value.bits, sizeof half);
  return static_cast<float>(half);
}

inline __half __float2half_rn(float value) {
  const _Float16 half = static_cast<_Float16>(value);
  __half result;
  std::memcpy(&result.bits, &half, sizeof result.bits);
  return result;
}
