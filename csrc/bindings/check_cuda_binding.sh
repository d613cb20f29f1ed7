#!/usr/bin/env bash
# Type-check csrc/bindings/cuda_ops.cpp (the torch binding of the CUDA kernels) on a machine whose torch is a CPU
# build: g++ -fsyntax-only against the installed torch's headers (they include c10/cuda) and the CUDA toolkit's.
# A CPU wheel lacks one CMake-generated header, c10/cuda/impl/cuda_cmake_macros.h; a stand-in is written to a
# temporary folder. Catches a binding that no longer matches csrc/cuda/ops.cuh before a GPU build does.
# Usage: csrc/bindings/check_cuda_binding.sh   (the toolkit from CUDA_HOME, else /usr/local/cuda)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
[ -f "$cuda_include/cuda_runtime.h" ] || { echo "no CUDA toolkit headers at $cuda_include (set CUDA_HOME)"; exit 1; }
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t includes < <(python -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()['include']]:
    print('-I' + path)")
g++ -std=c++20 -fsyntax-only -Wall -Werror "${includes[@]}" -isystem "$stub" -isystem "$cuda_include" \
  "$here/cuda_ops.cpp"
echo "ok      bindings/cuda_ops.cpp (type-checked against torch $(python -c 'import torch; print(torch.__version__)'))"
