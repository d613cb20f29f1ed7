"""The CUDA emulator (csrc/cuda/emulator) that runs the cuda backend's kernels in the CPU tests: it computes warp and
block collectives right, and it reports the kernel bugs it exists to catch instead of hiding them."""

import ctypes

import cuda_emulator
import pytest
import torch

pytestmark = pytest.mark.skipif(cuda_emulator.unavailable_reason() is not None,
                                reason=str(cuda_emulator.unavailable_reason()))

# Each kernel has a host entry point `int run_<name>(float* out, int threads, int shared_bytes)` that launches one
# block and returns the launch status.
KERNELS = r"""
#include <mma.h>

#include "device_utils.cuh"

namespace {

__global__ void warp_sums(float* out) {
  const float total = fastbon::cuda::warp_sum(static_cast<float>(threadIdx.x));
  out[threadIdx.x] = total;
}

__global__ void prefix_sums(float* out) {
  __shared__ float scratch[32];
  float total;
  out[threadIdx.x] = fastbon::cuda::block_exclusive_sum(1.0f + threadIdx.x % 3, scratch, &total);
  out[blockDim.x + threadIdx.x] = total;
}

// Inexact values: each thread's inclusive prefix must equal the next thread's exclusive one bit for bit.
__global__ void prefix_tiles(float* out) {
  __shared__ float scratch[32];
  float total, inclusive;
  out[threadIdx.x] = fastbon::cuda::block_exclusive_sum(1.0f / (1 + threadIdx.x % 7), scratch, &total, &inclusive);
  out[blockDim.x + threadIdx.x] = inclusive;
  if (threadIdx.x == 0) out[2 * blockDim.x] = total;
}

// Lanes 0-7 take one more loop trip than the rest, each with a full-mask shuffle: the bug the emulator found in
// the first CUDA attention kernel for head_dim = 40.
__global__ void divergent_shuffle(float* out) {
  float acc = 0.0f;
  for (int d = threadIdx.x % 32; d < 40; d += 32) acc += __shfl_sync(0xFFFFFFFFu, 1.0f, 0);
  __syncwarp();
  out[threadIdx.x] = acc;
}

// The same divergence, where the short lanes go on to a different shuffle instead of a __syncwarp.
__global__ void divergent_shuffles(float* out) {
  float acc = 0.0f;
  for (int d = threadIdx.x % 32; d < 40; d += 32) acc += __shfl_sync(0xFFFFFFFFu, 1.0f, 0);
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, acc, 1);
}

// Thread 0 publishes a value the others read with no barrier in between.
__global__ void missing_barrier(float* out) {
  extern __shared__ float shared[];
  if (threadIdx.x == 0) shared[0] = 42.0f;
  out[threadIdx.x] = shared[0];
}

__global__ void with_barrier(float* out) {
  extern __shared__ float shared[];
  if (threadIdx.x == 0) shared[0] = 42.0f;
  __syncthreads();
  out[threadIdx.x] = shared[0];
}

// Half of warp 0 waits at a shuffle that the other half never reaches.
__global__ void deadlock(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, 1.0f, 0);
  else __syncthreads();
}

__global__ void shared_overflow(float* out) {
  extern __shared__ float shared[];
  shared[threadIdx.x] = 1.0f;  // the launch gives one float fewer than there are threads
  out[threadIdx.x] = 0.0f;
}

__global__ void large_shared(float* out) {
  extern __shared__ float shared[];
  shared[threadIdx.x] = 1.0f;
  out[threadIdx.x] = shared[threadIdx.x];
}

// out[0:256] = A B for A[i][k] = i - k, B[k][j] = (k + 2j) / 8 (exact in bfloat16), via wmma with B column-major.
__global__ void matrix_product(float* out) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __nv_bfloat16 a[16 * 16], b[16 * 16];
  for (int i = threadIdx.x; i < 256; i += 32) {
    a[i] = __float2bfloat16_rn(static_cast<float>(i / 16 - i % 16));
    b[i] = __float2bfloat16_rn((i % 16 + 2 * (i / 16)) / 8.0f);  // column-major: element (i % 16, i / 16)
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

// A load from a pointer that is not 256-bit aligned.
__global__ void misaligned_load(float* out) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __nv_bfloat16 a[16 * 17];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 1, 16);
  out[threadIdx.x] = 0.0f;
}

}  // namespace

#define ENTRY(name, prepare)                                                        \
  extern "C" int run_##name(float* out, int threads, int shared_bytes) {            \
    prepare;                                                                        \
    name<<<1, threads, shared_bytes>>>(out);                                        \
    return static_cast<int>(cudaGetLastError());                                    \
  }

ENTRY(warp_sums, )
ENTRY(prefix_sums, )
ENTRY(prefix_tiles, )
ENTRY(divergent_shuffle, )
ENTRY(divergent_shuffles, )
ENTRY(missing_barrier, )
ENTRY(with_barrier, )
ENTRY(deadlock, )
ENTRY(shared_overflow, )
ENTRY(large_shared, )
ENTRY(matrix_product, )
ENTRY(misaligned_load, )
extern "C" int run_large_shared_raised(float* out, int threads, int shared_bytes) {
  cudaFuncSetAttribute(large_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  large_shared<<<1, threads, shared_bytes>>>(out);
  return static_cast<int>(cudaGetLastError());
}
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    directory = tmp_path_factory.mktemp("emulator_kernels")
    source = directory / "emulator_kernels.cu"
    source.write_text(KERNELS)
    return cuda_emulator.compile_library(directory, [source], [], "emulator_kernels")


def _run(kernels, name, threads, shared_bytes=0, outputs=None):
    """(out, error message) of one single-block launch; out starts as NaN."""
    out = torch.full((outputs or 2 * threads,), float("nan"))
    entry = getattr(kernels, f"run_{name}")
    entry.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    status = entry(out.data_ptr(), threads, shared_bytes)
    message = kernels.fastbon_emulated_take_error().decode()
    assert (status != 0) == bool(message)
    return out, message


def test_translate_rewrites_launches_and_dynamic_shared_memory():
    source = ("extern __shared__ float shared[];\n"
              "prefix_kernel<T><<<grid, kWarps * 32, bytes, stream>>>(a, b);\n"
              "other<<<1, 256>>>(x);")
    translated = cuda_emulator.translate(source)
    assert "float* shared = fastbon_emulator::dynamic_shared<float>();" in translated
    assert "fastbon_emulator::launch(prefix_kernel<T>, grid, kWarps * 32, bytes, stream)(a, b);" in translated
    assert "fastbon_emulator::launch(other, 1, 256)(x);" in translated


def test_warp_and_block_collectives(kernels):
    out, message = _run(kernels, "warp_sums", 64)
    assert message == ""
    assert out[:64].tolist() == [float(sum(range(32)))] * 32 + [float(sum(range(32, 64)))] * 32

    threads = 96
    out, message = _run(kernels, "prefix_sums", threads)
    values = 1.0 + torch.arange(threads) % 3
    assert message == ""
    assert torch.equal(out[:threads], torch.cumsum(values, 0) - values)
    assert torch.all(out[threads:] == values.sum())


def test_block_prefix_sum_segments_tile_the_total(kernels):
    """The sampler's draw gives the target to the one thread with exclusive <= target < inclusive: that needs the
    intervals to tile [0, total) exactly, with float rounding."""
    threads = 512
    out, message = _run(kernels, "prefix_tiles", threads, outputs=2 * threads + 1)
    exclusive, inclusive, total = out[:threads], out[threads:2 * threads], out[2 * threads]
    assert message == ""
    assert exclusive[0] == 0 and torch.equal(inclusive[:-1], exclusive[1:]) and inclusive[-1] == total
    values = 1.0 / (1 + torch.arange(threads, dtype=torch.float64) % 7)
    torch.testing.assert_close(total.double(), values.sum(), rtol=1e-6, atol=0)


def test_sampler_is_deterministic_where_float_atomics_were_not(emulated_cuda_backend):
    """Rows whose top-p cutoff lies within float rounding of a bucket's mass: the emulator runs the threads in a new
    random order every launch, so float atomicAdd histograms gave these rows different thresholds (and tokens) from
    one launch to the next (3-6 of the 48 rows differed in 3 launches); fixed-point masses give the same tokens."""
    generator = torch.Generator().manual_seed(0)
    # Token 0 (p = 0.124, the next bucket down) is kept or not depending on the mass of the 1000 tokens in
    # [0.13, 0.49): being first in vocabulary order, it shifts every CDF boundary of the draw.
    probs = torch.cat([torch.tensor([0.124, 1.0], dtype=torch.float64),
                       torch.rand(1000, generator=generator, dtype=torch.float64) * 0.36 + 0.13])
    logits = probs.log().float()[None]
    rounded = logits[0].double().exp()
    critical = (1 + rounded[2:].sum()) / rounded.sum()  # top_p at which token 0 enters the kept set
    rows = 48
    top_p = (critical * (1 + torch.linspace(-4e-7, 4e-7, rows, dtype=torch.float64))).float()
    arguments = (logits, torch.zeros(rows, dtype=torch.int64), torch.ones(rows), torch.zeros(rows, dtype=torch.int32),
                 top_p, torch.zeros(rows), torch.arange(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64))
    first, _ = emulated_cuda_backend.sample(*arguments)
    for _ in range(2):
        again, _ = emulated_cuda_backend.sample(*arguments)
        assert torch.equal(again, first), f"rows {(again != first).nonzero().flatten().tolist()} changed"


def test_lanes_on_different_collectives_are_an_error(kernels):
    for name in ("divergent_shuffle", "divergent_shuffles"):
        _, message = _run(kernels, name, 32)
        assert "diverged onto different warp collectives" in message, name


def test_a_missing_barrier_shows_and_the_barrier_fixes_it(kernels):
    out, message = _run(kernels, "missing_barrier", 128, shared_bytes=4)
    assert message == ""
    assert torch.isnan(out[:128]).any(), "some thread read shared memory before thread 0 wrote it"
    out, message = _run(kernels, "with_barrier", 128, shared_bytes=4)
    assert message == "" and torch.all(out[:128] == 42.0)


def test_deadlock_is_reported(kernels):
    _, message = _run(kernels, "deadlock", 64)
    assert "deadlock" in message
    out, message = _run(kernels, "warp_sums", 32)  # the emulator recovers for the next launch
    assert message == "" and out[0] == sum(range(32))


def test_shared_memory_limits(kernels):
    big = 64 * 1024
    _, message = _run(kernels, "large_shared", 128, shared_bytes=big)
    assert "exceeds the 49152-byte limit" in message
    out, message = _run(kernels, "large_shared_raised", 128, shared_bytes=big)
    assert message == "" and torch.all(out[:128] == 1.0)
    _, message = _run(kernels, "large_shared", 2048)
    assert "invalid block size" in message
    _, message = _run(kernels, "shared_overflow", 64, shared_bytes=63 * 4)
    assert "past the end" in message


def test_warp_matrix_functions(kernels):
    out, message = _run(kernels, "matrix_product", 32, outputs=256)
    assert message == ""
    index = torch.arange(16, dtype=torch.float64)
    a = index[:, None] - index[None, :]
    b = (index[:, None] + 2 * index[None, :]) / 8
    assert torch.equal(out.view(16, 16).double(), a @ b)
    _, message = _run(kernels, "misaligned_load", 32)
    assert "256-bit aligned" in message
