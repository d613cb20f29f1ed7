#!/usr/bin/env bash
# Compile every CUDA source under csrc/cuda with nvcc alone (no torch, no GPU) for sm_75, sm_80 and sm_90a: the CI
# check that the torch-free kernels and launchers build (sm_75: the tensor-core kernel's sm_80 guard holds).
# Usage: csrc/cuda/compile_check.sh [nvcc]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvcc="${1:-${NVCC:-nvcc}}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
for source in "$here"/*.cu; do
  name="$(basename "$source" .cu)"
  if "$nvcc" -std=c++17 -O3 -Xcompiler -Wall -Werror=all-warnings \
      -gencode arch=compute_75,code=sm_75 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
      -c "$source" -o "$out/$name.o"; then
    echo "ok      $name.cu (sm_75, sm_80, sm_90a)"
  else
    echo "FAILED  $name.cu"
    status=1
  fi
done
exit $status
