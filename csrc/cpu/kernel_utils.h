// Shared pieces of the CPU kernels: element types, a vectorisable exp, and instruction-set dispatch.
//
// The hot loops are written once as always-inline templates in plain C++ that GCC/Clang vectorise; each op
// instantiates them inside functions compiled for AVX-512, AVX2+FMA and the x86-64 baseline and picks one at run
// time. So the extension is built without -march=native and still uses the machine's widest vectors. Only
// always-inline code runs inside the ISA-specific functions: nothing compiled for AVX-512 can leak into code
// that runs on a machine without it. AMX tiles (bfloat16 matrix products) are a fourth variant where an op has one.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "../common/dtype.h"

#define FASTBON_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTBON_X86_DISPATCH 1
#define FASTBON_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTBON_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#define FASTBON_TARGET_AVX512_BF16 \
  __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#define FASTBON_TARGET_AMX                                                                               \
  __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c," \
                        "prefer-vector-width=512")))
#else
#define FASTBON_X86_DISPATCH 0
#define FASTBON_TARGET_AVX2
#define FASTBON_TARGET_AVX512
#endif

namespace fastbon::cpu {

using fastbon::DType;

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

enum class Isa : int32_t { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set this CPU runs, lowered by FASTBON_CPU_ISA=baseline|avx2 (tests compare variants);
// FASTBON_CPU_ISA=avx512 keeps AVX-512 but turns AMX off (amx_bf16_active).
inline Isa active_isa() {
#if FASTBON_X86_DISPATCH
  static const Isa hardware = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  const char* requested = std::getenv("FASTBON_CPU_ISA");
  if (requested != nullptr) {
    if (std::strcmp(requested, "baseline") == 0) return Isa::kBaseline;
    if (std::strcmp(requested, "avx2") == 0 && hardware != Isa::kBaseline) return Isa::kAvx2;
  }
  return hardware;
#else
  return Isa::kBaseline;
#endif
}

// Whether AMX bfloat16 tiles may run: AVX-512 is active and not lowered to plain avx512, the CPU has AMX-TILE,
// AMX-BF16 and AVX512-BF16 (its conversions feed the tiles), and Linux granted this process the tile state
// (arch_prctl ARCH_REQ_XCOMP_PERM; without that grant the first tile instruction faults).
inline bool amx_bf16_active() {
#if FASTBON_X86_DISPATCH && defined(__linux__)
  static const bool usable = [] {
    constexpr int kArchRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
           __builtin_cpu_supports("avx512bf16") &&
           syscall(SYS_arch_prctl, kArchRequestPermission, kTileData) == 0;
  }();
  const char* requested = std::getenv("FASTBON_CPU_ISA");
  return usable && active_isa() == Isa::kAvx512 && (requested == nullptr || std::strcmp(requested, "avx512") != 0);
#else
  return false;
#endif
}

// Whether bfloat16 dot products (AVX512-BF16's VDPBF16PS) may run: AVX-512 is active and not lowered to plain
// avx512 (FASTBON_CPU_ISA=avx512 turns them off, as it does AMX), and the CPU has AVX512-BF16.
inline bool avx512_bf16_active() {
#if FASTBON_X86_DISPATCH
  static const bool usable = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  const char* requested = std::getenv("FASTBON_CPU_ISA");
  return usable && active_isa() == Isa::kAvx512 && (requested == nullptr || std::strcmp(requested, "avx512") != 0);
#else
  return false;
#endif
}

// OpenMP team size for `work` units when `per_thread` units keep a thread busy enough to pay for waking it: small
// calls stay on one thread, where a team would spend more on its barrier (on a loaded machine, much more).
inline int team_size(int requested, int64_t work, int64_t per_thread) {
  const int64_t useful = work / per_thread + 1;
  return static_cast<int>(useful < requested ? useful : (requested > 0 ? requested : 1));
}

template <typename To, typename From>
FASTBON_INLINE To bit_cast(From value) {
  return __builtin_bit_cast(To, value);
}

FASTBON_INLINE float to_float(float value) { return value; }
FASTBON_INLINE double to_float(double value) { return value; }
FASTBON_INLINE float to_float(BFloat16 value) { return bit_cast<float>(static_cast<uint32_t>(value.bits) << 16); }
// Branch-free so that conversion loops vectorise: rebias the exponent by a multiply (exact for normals and
// subnormals), then restore inf/NaN and the sign.
FASTBON_INLINE float to_float(Half value) {
  const uint32_t magnitude = value.bits & 0x7FFFu;
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t finite = bit_cast<uint32_t>(bit_cast<float>(magnitude << 13) * 0x1p112f);
  const uint32_t special = (magnitude << 13) | 0x7F800000u;
  return bit_cast<float>((magnitude >= 0x7C00u ? special : finite) | sign);
}

template <typename T>
FASTBON_INLINE T from_float(float value);
template <>
FASTBON_INLINE float from_float<float>(float value) { return value; }
template <>
FASTBON_INLINE BFloat16 from_float<BFloat16>(float value) {
  // A select, not a branch, so that rounding loops vectorise.
  const uint32_t bits = bit_cast<uint32_t>(value);
  const uint32_t quiet_nan = (bits >> 16) | 0x40u, nearest_even = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return BFloat16{static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : nearest_even)};
}
template <>
FASTBON_INLINE Half from_float<Half>(float value) {
  const uint32_t bits = bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return Half{static_cast<uint16_t>(sign | 0x7E00u)};
  if (magnitude >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds past 65504: inf
  if (magnitude < 0x38800000u) {  // subnormal half: let the float adder round at the right bit
    const float rounded = bit_cast<float>(magnitude) + 0.5f;
    return Half{static_cast<uint16_t>(sign | (bit_cast<uint32_t>(rounded) - bit_cast<uint32_t>(0.5f)))};
  }
  const uint32_t odd = (magnitude >> 13) & 1u;
  return Half{static_cast<uint16_t>(sign | ((magnitude + 0xC8000FFFu + odd) >> 13))};
}

// An accumulator value stored as element type T (rounded to nearest even for the 16-bit types).
template <typename T, typename Acc>
FASTBON_INLINE T narrow(Acc value) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
    return static_cast<T>(value);
  else
    return from_float<T>(static_cast<float>(value));
}

// exp(x) for x <= 0 (softmax numerators), ~2 ulp, vectorisable: 2^n by exponent bits times a degree-6 polynomial
// on [-ln2/2, ln2/2]. Below -87.3 (and at -inf) it returns 0.
FASTBON_INLINE float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = clamped - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// Double precision callers (float64 inputs) take the library exp: correctness, not speed, is their point.
FASTBON_INLINE double exp_nonpositive(double x) { return __builtin_exp(x); }

// Calls run(element, accumulator) with default-constructed values of the element type `dtype` names and of its
// accumulator type (float for the 16- and 32-bit types, double for float64): one place maps dtypes to types.
template <typename Run>
void visit_dtype(DType dtype, Run&& run) {
  switch (dtype) {
    case DType::kFloat32: return run(float{}, float{});
    case DType::kBFloat16: return run(BFloat16{}, float{});
    case DType::kFloat16: return run(Half{}, float{});
    case DType::kFloat64: return run(double{}, double{});
  }
}

}  // namespace fastbon::cpu
