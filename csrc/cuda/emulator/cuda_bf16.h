// The emulator's __nv_bfloat16 (see cuda_runtime.h): the top 16 bits of a float32, rounded to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.bits) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  __nv_bfloat16 result;
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x7FFFFFu)) {
    result.bits = static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays a (quiet) NaN
  } else {
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    result.bits = static_cast<uint16_t>(bits >> 16);
  }
  return result;
}
