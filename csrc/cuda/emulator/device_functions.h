// The emulator's device intrinsics (see cuda_runtime.h, which includes this file last): barriers and warp
// shuffles as checked collectives on the running block's fibers, atomics, and the math the kernels use.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <type_traits>

// Each collective takes its call site as defaulted arguments, which the caller's line fills in.
#define FASTBON_EMULATOR_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(FASTBON_EMULATOR_SITE) {
  fastbon_emulator::wait_at(fastbon_emulator::state().block.block, {file, line});
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, FASTBON_EMULATOR_SITE) {
  fastbon_emulator::check_full_mask(mask);
  fastbon_emulator::wait_at(fastbon_emulator::warp_barrier(), {file, line});
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32, FASTBON_EMULATOR_SITE) {
  fastbon_emulator::check_full_mask(mask);
  if (width != 32) fastbon_emulator::fail("the emulator supports shuffles of width 32 only");
  return fastbon_emulator::shuffle(value, source_lane, {file, line});
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32, FASTBON_EMULATOR_SITE) {
  const int lane = fastbon_emulator::thread_rank() % 32;
  return __shfl_sync(mask, value, lane ^ lane_mask, width, file, line);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32, FASTBON_EMULATOR_SITE) {
  const int lane = fastbon_emulator::thread_rank() % 32;
  const int source = lane - static_cast<int>(delta) < 0 ? lane : lane - static_cast<int>(delta);
  return __shfl_sync(mask, value, source, width, file, line);
}

// One thread runs at a time, so read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// The fast intrinsics as the GPU computes them: through base 2, so the rounding of x * log2(e) (and of the result's
// scaling) shows here as it does there; the hardware's ex2/lg2 approximations add about 2 ulp more.
inline float __expf(float x) { return std::exp2(x * 1.44269504f); }
inline float __logf(float x) { return std::log2(x) * 0.693147181f; }
inline unsigned __float_as_uint(float x) {
  unsigned bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline float __uint_as_float(unsigned bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
