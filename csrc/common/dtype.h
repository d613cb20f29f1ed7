// Element types the C++ and CUDA kernels take, named without torch (the bindings translate torch dtypes).
#pragma once

#include <cstdint>

namespace fastbon {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace fastbon
