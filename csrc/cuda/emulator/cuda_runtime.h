// A CUDA emulator for testing fastbon's CUDA kernels on a machine without a GPU (tests/cuda_emulator.py builds it).
//
// It stands in for <cuda_runtime.h> when csrc/cuda/*.cu is compiled by the host C++ compiler, after two textual
// rewrites (`kernel<<<grid, block, shared, stream>>>(args)` -> `fastbon_emulator::launch(kernel, grid, block, shared,
// stream)(args)`, and `extern __shared__ T name[];` -> a pointer to the block's dynamic shared memory).
//
// Execution model: the blocks of a grid run one after another; the threads of a block are fibers (fiber_switch.S)
// on one OS thread that switch only at a barrier (__syncthreads, __syncwarp, a warp shuffle, a wmma operation:
// mma.h). Between barriers the threads of a block run in a shuffled order that changes at every barrier, so code
// that relies on an order the hardware does not promise tends to give wrong answers here too. Device intrinsics:
// device_functions.h. What the emulator checks, and reports as a launch error:
//   - every lane of a warp reaches the same warp collective (a full-mask shuffle or __syncwarp, told apart by the
//     source line that calls it): lanes that diverged onto different collectives, or a collective after some lanes
//     exited, is an error (undefined on the GPU);
//   - a barrier that can never complete (deadlock);
//   - block size, grid size and dynamic shared memory against the hardware limits, the 48 KiB default for dynamic
//     shared memory included unless cudaFuncSetAttribute raised it;
//   - dynamic shared memory starts as NaN bytes, so a read before a write shows; a write past its end (into a guard
//     zone) is an error;
//   - wmma operands are 256-bit aligned with leading dimensions of whole 16 bytes.
// What it does not model: timing, memory coalescing, bank conflicts, the weak memory model, and warp-synchronous
// code that relies on lanes running in lockstep without a collective.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one copy, shared by every thread of the block running now
#define __align__(bytes) __attribute__((aligned(bytes)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
using cudaStream_t = struct CUstream_st*;

// The running thread's coordinates: the scheduler sets them before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fastbon_emulator {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // sm_90 opt-in limit
constexpr size_t kFiberStack = 256 * 1024;
constexpr size_t kSharedGuard = 4096;  // bytes after the dynamic shared memory that must stay untouched
constexpr unsigned char kGuardByte = 0xA5;

// Where a thread waits: the source line of the collective (the intrinsic's call site).
struct Site {
  const char* file = "";
  int line = 0;
  bool operator!=(const Site& other) const { return line != other.line || std::strcmp(file, other.file) != 0; }
  std::string text() const { return std::string(file) + ":" + std::to_string(line); }
};

struct Barrier {
  int arrived = 0;
  int expected = 0;
  unsigned generation = 0;
  Site site;  // where the first thread to arrive in this generation waits
};

// The start of a block's shared memory is 128-byte aligned on the GPU; so is the emulator's.
template <typename T>
struct SharedAllocator {
  using value_type = T;
  SharedAllocator() = default;
  template <typename U>
  SharedAllocator(const SharedAllocator<U>&) {}
  T* allocate(size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t{128})); }
  void deallocate(T* pointer, size_t) { ::operator delete(pointer, std::align_val_t{128}); }
  bool operator==(const SharedAllocator&) const { return true; }
  bool operator!=(const SharedAllocator&) const { return false; }
};

struct Fiber {
  void* stack_pointer = nullptr;  // where fastbon_emulator_switch resumes it
  std::unique_ptr<char[]> stack;
  bool done = false;
  const Barrier* waiting_on = nullptr;  // the scheduler resumes it only once this barrier's generation moves on
  unsigned waiting_generation = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Barrier> warps;
  std::vector<bool> warp_lost_lane;
  std::vector<std::array<uint64_t, 32>> exchange;  // one shuffle slot per lane
  Barrier block;
  std::vector<unsigned char, SharedAllocator<unsigned char>> dynamic_shared;
  std::function<void()> body;
  void* scheduler_stack_pointer = nullptr;
  int current = 0;
  long long progress = 0;  // bumps whenever some thread gets past a barrier
};

struct State {
  Block block;
  std::string error;  // the first error since the last cudaGetLastError
  std::map<const void*, size_t> shared_limit;
  size_t device_shared_limit = kMaxDynamicShared;  // the opt-in limit of the emulated device (tests lower it)
  std::mt19937 order_rng{12345};
};

inline State& state() {
  static State instance;
  return instance;
}

inline void fail(const std::string& message) {
  if (state().error.empty()) state().error = message;
}

}  // namespace fastbon_emulator

extern "C" void fastbon_emulator_switch(void** save_stack_pointer, void* load_stack_pointer);

namespace fastbon_emulator {

inline void yield_to_scheduler() {
  Block& block = state().block;
  fastbon_emulator_switch(&block.fibers[block.current].stack_pointer, block.scheduler_stack_pointer);
}

// Arrive at a barrier and wait (switching to other threads) until every live participant has arrived.
inline void wait_at(Barrier& barrier, Site site) {
  Block& block = state().block;
  if (barrier.arrived == 0) barrier.site = site;
  else if (barrier.site != site)
    fail("lanes of a warp diverged onto different warp collectives: " + barrier.site.text() + " and " + site.text());
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    ++block.progress;
    return;
  }
  Fiber& self = block.fibers[block.current];
  self.waiting_on = &barrier;
  self.waiting_generation = generation;
  yield_to_scheduler();
  self.waiting_on = nullptr;
  ++block.progress;
}

inline int thread_rank() { return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

inline Barrier& warp_barrier() {
  Block& block = state().block;
  const int warp = thread_rank() / 32;
  if (block.warp_lost_lane[warp]) fail("a full-mask warp collective after some lanes of the warp exited");
  return block.warps[warp];
}

// Every lane of the calling warp meets here (a warp-synchronous operation such as a wmma load).
inline void warp_sync(Site site) { wait_at(warp_barrier(), site); }

inline void check_full_mask(unsigned mask) {
  if (mask != 0xFFFFFFFFu) fail("the emulator supports full-mask warp collectives only");
}

template <typename T>
T shuffle(T value, int source_lane, Site site) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a wide type");
  Block& block = state().block;
  const int rank = thread_rank(), warp = rank / 32, lane = rank % 32;
  Barrier& barrier = warp_barrier();
  std::memcpy(&block.exchange[warp][lane], &value, sizeof(T));
  wait_at(barrier, site);  // every lane has published its value
  T result;
  std::memcpy(&result, &block.exchange[warp][source_lane & 31], sizeof(T));
  wait_at(barrier, site);  // every lane has read before the slots are reused
  return result;
}

inline void fiber_main(int index) {
  Block& block = state().block;
  block.body();
  block.fibers[index].done = true;
  // An exited thread no longer counts at the block barrier; its warp can no longer take a full-mask collective.
  const int warp = index / 32;
  block.warp_lost_lane[warp] = true;
  if (--block.block.expected > 0 && block.block.arrived == block.block.expected) {
    block.block.arrived = 0;
    ++block.block.generation;
  }
  Barrier& lanes = block.warps[warp];
  if (--lanes.expected > 0 && lanes.arrived == lanes.expected) {
    lanes.arrived = 0;
    ++lanes.generation;
    fail("a lane exited while other lanes of its warp waited at a warp collective");
  }
  ++block.progress;
  fastbon_emulator_switch(&block.fibers[index].stack_pointer, block.scheduler_stack_pointer);  // never resumed
}

// A new fiber's first switch "returns" here, on its own stack.
[[noreturn]] inline void fiber_entry() {
  fiber_main(state().block.current);
  __builtin_unreachable();
}

// A stack that fastbon_emulator_switch resumes at fiber_entry: six zero callee-saved registers, then the return
// address, placed so that fiber_entry starts with the stack alignment of a called function.
inline void* fresh_stack(char* stack, size_t size) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~static_cast<uintptr_t>(15);
  auto* slots = reinterpret_cast<void**>(top);
  slots[-1] = nullptr;  // padding: after `ret`, rsp = top - 8, as after a call
  slots[-2] = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 3; i <= 8; ++i) slots[-i] = nullptr;
  return slots - 8;
}

// Runs one block to completion: every thread is a fiber; the scheduler resumes them round-robin in a fresh random
// order each round until all have exited.
inline bool run_block(const dim3& block_dim, size_t dynamic_shared) {
  Block& block = state().block;
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  const int warps = (threads + 31) / 32;
  if (static_cast<int>(block.fibers.size()) < threads) {
    block.fibers.resize(threads);
    for (Fiber& fiber : block.fibers)
      if (!fiber.stack) fiber.stack.reset(new char[kFiberStack]);
  }
  block.warps.assign(warps, Barrier{});
  for (int w = 0; w < warps; ++w) block.warps[w].expected = std::min(32, threads - 32 * w);
  block.warp_lost_lane.assign(warps, false);
  block.exchange.assign(warps, {});
  block.block = Barrier{};
  block.block.expected = threads;
  block.dynamic_shared.assign(dynamic_shared, 0xFF);  // NaN as float, -1 as int: reads before writes show
  block.dynamic_shared.resize(dynamic_shared + kSharedGuard, kGuardByte);
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    fiber.done = false;
    fiber.waiting_on = nullptr;
    fiber.stack_pointer = fresh_stack(fiber.stack.get(), kFiberStack);
  }
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  int live = threads;
  while (live > 0) {
    std::shuffle(order.begin(), order.end(), state().order_rng);
    const long long progress_before = block.progress;
    for (int t : order) {
      Fiber& fiber = block.fibers[t];
      if (fiber.done || (fiber.waiting_on && fiber.waiting_on->generation == fiber.waiting_generation)) continue;
      block.current = t;
      threadIdx = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
      fastbon_emulator_switch(&block.scheduler_stack_pointer, fiber.stack_pointer);
      if (fiber.done) --live;
    }
    if (live > 0 && block.progress == progress_before) {
      fail("deadlock: the threads of a block wait at barriers that cannot complete");
      return false;  // the stuck fibers are abandoned; their stacks are reused by the next launch
    }
  }
  if (std::any_of(block.dynamic_shared.begin() + dynamic_shared, block.dynamic_shared.end(),
                  [](unsigned char byte) { return byte != kGuardByte; })) {
    fail("a write past the end of the block's " + std::to_string(dynamic_shared) + " bytes of dynamic shared memory");
    return false;
  }
  return true;
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t dynamic_shared;

  template <typename... Args>
  void operator()(Args&&... args) const {
    if (!state().error.empty()) return;  // like a sticky error: nothing runs after a failure until it is read
    const auto limit = state().shared_limit.find(reinterpret_cast<const void*>(kernel));
    const size_t allowed = std::min(limit == state().shared_limit.end() ? kDefaultDynamicShared : limit->second,
                                    state().device_shared_limit);
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64) {
      fail("invalid block size " + std::to_string(threads));
      return;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
      fail("invalid grid size");
      return;
    }
    if (dynamic_shared > allowed) {
      fail("dynamic shared memory of " + std::to_string(dynamic_shared) + " bytes exceeds the " +
           std::to_string(allowed) + "-byte limit (cudaFuncSetAttribute raises it up to the device's)");
      return;
    }
    const std::tuple<std::decay_t<Params>...> arguments(std::forward<Args>(args)...);  // converted like a launch
    state().block.body = [this, &arguments] { std::apply(kernel, arguments); };
    blockDim = block;
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          if (!run_block(block, dynamic_shared)) return;
        }
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared = 0,
                         cudaStream_t = nullptr) {
  return Launch<Params...>{kernel, grid, block, dynamic_shared};
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(state().block.dynamic_shared.data());
}

}  // namespace fastbon_emulator

// ---- the runtime API the launchers call ----

inline cudaError_t cudaGetLastError() {
  const bool failed = !fastbon_emulator::state().error.empty();
  return failed ? cudaErrorLaunchFailure : cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : fastbon_emulator::state().error.c_str();
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > fastbon_emulator::state().device_shared_limit)
    return cudaErrorInvalidValue;
  fastbon_emulator::state().shared_limit[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// The emulated device: compute capability 9.0 with the shared memory a test sets (an H100's by default).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attribute) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(fastbon_emulator::state().device_shared_limit);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

#include "device_functions.h"  // the device intrinsics
