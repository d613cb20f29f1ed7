#!/usr/bin/env bash
# One script for a GPU machine, under 8 minutes: build with CUDA, GPU tests, kernel timings, end to end vs HF.
# Usage (repository root): bash benchmarks/gpu_check.sh [OUT_DIR]   — record its output in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out}}
mkdir -p "$out"
status=0
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'triton', triton.__version__)"

step "build fastbon with CUDA (sm_90a)"
FASTBON_BUILD_CUDA=1 FASTBON_CUDA_ARCHS="${FASTBON_CUDA_ARCHS:-9.0a}" MAX_JOBS=16 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; status=1; }
python3 -c "import fastbon; print(fastbon.backends())"

step "GPU tests: every op on cuda and triton against the float64 reference, end to end on the GPU"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests -k "cuda and not emulat" 2>&1 | tee "$out/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "kernel timings (triton.testing.do_bench, median)"
timeout 120 python3 benchmarks/gpu_kernels.py 2>&1 | tee "$out/gpu_kernels.txt" || status=1

step "end to end: fastbon vs HF generate, Llama-3.2-1B shape, bf16, P=4096, n=64, 64 new tokens"
timeout 200 python3 -m fastbon.bench --shape gpu --P 4096 --n 64 --new-tokens 64 --out "$out" 2>&1 \
  | grep -v "it/s\]" | tee "$out/gpu_e2e.txt" || status=1

step "summary"
cat "$out/gpu_kernels.txt" "$out/gpu_e2e.txt" 2>/dev/null
exit $status
