// The emulator's warp matrix functions (nvcuda::wmma, see cuda_runtime.h): the API of CUDA's <mma.h> for the
// shapes and types fastbon uses (16x16x16; __half or __nv_bfloat16 inputs, float accumulators).
//
// How a real fragment spreads its elements over the lanes is unspecified, so here every lane holds the whole tile
// (num_elements = rows x cols, row-major): code that only touches x[] element-wise, as the API allows, behaves the
// same. Loads, stores and mma_sync are warp collectives (every lane must reach the same call, as on the GPU) and
// check the documented requirements: a 256-bit aligned pointer and ldm a multiple of 16 bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float widen(float value) { return value; }
inline float widen(__half value) { return __half2float(value); }
inline float widen(__nv_bfloat16 value) { return __bfloat162float(value); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = T;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Value>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& target, const Value& value) {
  for (int i = 0; i < target.num_elements; ++i) target.x[i] = value;
}

namespace detail {

template <typename T>
void check_operand(const T* pointer, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0)
    fastbon_emulator::fail(std::string(what) + ": the pointer must be 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) fastbon_emulator::fail(std::string(what) + ": ldm must be a multiple of 16 bytes");
}

// Reads (or writes) element (r, c) of a tile at pointer with leading dimension ldm.
template <typename T>
T& at(T* pointer, unsigned ldm, bool row_major_layout, int r, int c) {
  return row_major_layout ? pointer[r * ldm + c] : pointer[c * ldm + r];
}

template <typename Fragment, typename T>
void load(Fragment& target, const T* pointer, unsigned ldm, bool row_major_layout, fastbon_emulator::Site site) {
  check_operand(pointer, ldm, "load_matrix_sync");
  fastbon_emulator::warp_sync(site);  // every lane arrives before any reads
  for (int r = 0; r < Fragment::rows; ++r)
    for (int c = 0; c < Fragment::cols; ++c)
      target.x[r * Fragment::cols + c] = at(const_cast<T*>(pointer), ldm, row_major_layout, r, c);
  fastbon_emulator::warp_sync(site);  // every lane has read before anyone writes the memory again
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& target, const T* pointer, unsigned ldm,
                      FASTBON_EMULATOR_SITE) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  detail::load(target, pointer, ldm, std::is_same_v<Layout, row_major>, {file, line});
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& target, const float* pointer, unsigned ldm,
                      layout_t layout, FASTBON_EMULATOR_SITE) {
  detail::load(target, pointer, ldm, layout == mem_row_major, {file, line});
}

template <int M, int N, int K>
void store_matrix_sync(float* pointer, const fragment<accumulator, M, N, K, float>& source, unsigned ldm,
                       layout_t layout, FASTBON_EMULATOR_SITE) {
  detail::check_operand(pointer, ldm, "store_matrix_sync");
  fastbon_emulator::warp_sync({file, line});
  for (int r = 0; r < M; ++r)  // every lane writes the same values: the result is the same whoever goes last
    for (int c = 0; c < N; ++c) detail::at(pointer, ldm, layout == mem_row_major, r, c) = source.x[r * N + c];
  fastbon_emulator::warp_sync({file, line});
}

// d = a b + c, products and sums in float32 (inputs of 16-bit types are exact in float32).
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c,
              FASTBON_EMULATOR_SITE) {
  fastbon_emulator::warp_sync({file, line});
  float result[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += detail::widen(a.x[i * K + k]) * detail::widen(b.x[k * N + j]);
      result[i * N + j] = sum;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = result[i];
}

}  // namespace nvcuda::wmma
