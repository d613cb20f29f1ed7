"""The ``cuda`` backend's kernels run on the CPU: csrc/cuda compiled by the host C++ compiler against the emulator in
csrc/cuda/emulator (threads as fibers, warp collectives checked; see its cuda_runtime.h), and bound with ctypes.

``build(directory)`` compiles the emulated library; ``EmulatedCudaBackend`` exposes the three ops with the backend
contract of ``fastbon.ops.reference`` on CPU tensors, so the backend tests run the CUDA source on a machine without
a GPU (conftest's ``cuda-emulated`` case). Only the kernels and launchers are emulated; the torch binding
(csrc/bindings/cuda_ops.cpp) needs a CUDA build of torch to run (CI type-checks it: check_cuda_binding.sh).
"""

import ctypes
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fastbon.ops._alloc import new_output

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
EMULATOR = CUDA_SOURCES / "emulator"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# `kernel<T><<<grid, block, shared, stream>>>(` becomes `fastbon_emulator::launch(kernel<T>, grid, ...)(`.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
# `extern __shared__ float shared[];` becomes a pointer into the block's dynamic shared memory.
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?(\w+(?:\s+\w+)*?)\s+(\w+)\s*\[\s*\]\s*;")


def unavailable_reason() -> str | None:
    """None when the emulator can be built here, else why not."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return "the CUDA emulator's fiber switch is x86-64 System V assembly (Linux x86-64 only)"
    if shutil.which("g++") is None:
        return "the CUDA emulator needs g++"
    return None


def translate(source: str) -> str:
    """CUDA C++ that the host compiler takes once the emulator's headers stand in for CUDA's."""
    source = _LAUNCH.sub(lambda m: f"fastbon_emulator::launch({m.group(1)}, {m.group(2)})(", source)
    return _DYNAMIC_SHARED.sub(r"\1* \2 = fastbon_emulator::dynamic_shared<\1>();", source)


def compile_library(directory: Path, cuda_sources: list[Path], host_sources: list[Path], name: str) -> ctypes.CDLL:
    """One shared library from CUDA sources (translated) and host C++ sources, against the emulator's headers, with
    fastbon_emulated_take_error()."""
    directory.mkdir(parents=True, exist_ok=True)
    for header in CUDA_SOURCES.glob("*.cuh"):  # found next to the translated units, before the originals
        (directory / header.name).write_text(translate(header.read_text()))
    units = []
    for source in cuda_sources:
        unit = directory / f"{source.stem}.cpp"
        unit.write_text(translate(source.read_text()))
        units.append(str(unit))
    units += [str(source) for source in [*host_sources, EMULATOR / "take_error.cpp"]]
    library = directory / f"lib{name}.so"
    switch = directory / "fiber_switch.o"
    commands = [
        ["g++", "-c", str(EMULATOR / "fiber_switch.S"), "-o", str(switch)],
        ["g++", "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-w", f"-I{EMULATOR}", f"-iquote{CUDA_SOURCES}",
         "-include", "cuda_runtime.h", *units, str(switch), "-o", str(library)],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"building with the CUDA emulator failed:\n{' '.join(command)}\n{result.stderr}")
    library = ctypes.CDLL(str(library))
    library.fastbon_emulated_take_error.restype = ctypes.c_char_p
    return library


def build(directory: Path) -> ctypes.CDLL:
    """Every csrc/cuda/*.cu with the C entry points of emulator/c_api.cpp."""
    return _declare(compile_library(directory, sorted(CUDA_SOURCES.glob("*.cu")), [EMULATOR / "c_api.cpp"],
                                    "fastbon_cuda_emulated"))


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    library.fastbon_emulated_attention_workspace_bytes.restype = ctypes.c_size_t
    library.fastbon_emulated_attention_workspace_bytes.argtypes = [i32] + [i64] * 4
    library.fastbon_emulated_shared_prefix_attention.argtypes = [i32] + [pointer] * 9 + [i64] * 7 + [f32, pointer]
    library.fastbon_emulated_sample.argtypes = [i32, pointer, i64] + [pointer] * 7 + [i64, pointer, pointer]
    library.fastbon_emulated_select_topk.argtypes = [i32, pointer, i64, i64, i64, pointer, pointer]
    library.fastbon_emulated_set_shared_memory_limit.argtypes = [ctypes.c_size_t]
    return library


class EmulatedCudaBackend:
    """The backend contract (``fastbon.ops.reference``) over the emulated CUDA launchers, on CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library

    def set_shared_memory_limit(self, size: int) -> None:
        """The emulated device's opt-in shared memory per block (the kernels size their tiles to it)."""
        self.library.fastbon_emulated_set_shared_memory_limit(size)

    def _check(self, status: int, op: str) -> None:
        message = self.library.fastbon_emulated_take_error().decode()
        if status != 0 or message:
            raise RuntimeError(f"emulated CUDA {op}: {message or f'error {status}'}")

    def shared_prefix_attention(self, q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                                sample_to_prompt, scale):
        out = new_output(q.shape, q.dtype, q.device)
        num_samples, num_q_heads, head_dim = q.shape
        num_prompts, num_kv_heads, prefix_max, _ = prefix_k.shape
        workspace_bytes = self.library.fastbon_emulated_attention_workspace_bytes(
            _DTYPE_CODES[q.dtype], num_samples, num_q_heads, head_dim, prefix_max)
        workspace = new_output((workspace_bytes // 4 + 1,), torch.float32, q.device)
        status = self.library.fastbon_emulated_shared_prefix_attention(
            _DTYPE_CODES[q.dtype], *(t.data_ptr() for t in (q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                                                             suffix_lens, sample_to_prompt, out)),
            num_samples, num_prompts, num_q_heads, num_kv_heads, head_dim, prefix_max, suffix_k.shape[2],
            float(scale), workspace.data_ptr())
        self._check(status, "shared_prefix_attention")
        return out

    def sample(self, logits, row_index, temperature, top_k, top_p, min_p, seed, step):
        num_rows = row_index.shape[0]
        tokens = new_output((num_rows,), torch.int64, logits.device)
        logprobs = new_output((num_rows,), torch.float32, logits.device)
        status = self.library.fastbon_emulated_sample(
            _DTYPE_CODES[logits.dtype], logits.data_ptr(), logits.shape[1],
            *(t.data_ptr() for t in (row_index, temperature, top_k, top_p, min_p, seed, step)), num_rows,
            tokens.data_ptr(), logprobs.data_ptr())
        self._check(status, "sample")
        return tokens, logprobs

    def select_topk(self, scores, k):
        values = new_output((scores.shape[0], k), scores.dtype, scores.device)
        indices = new_output((scores.shape[0], k), torch.int64, scores.device)
        status = self.library.fastbon_emulated_select_topk(_DTYPE_CODES[scores.dtype], scores.data_ptr(),
                                                           scores.shape[0], scores.shape[1], k, values.data_ptr(),
                                                           indices.data_ptr())
        self._check(status, "select_topk")
        return values, indices
