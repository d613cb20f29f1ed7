"""A compiled decode step: ``fastbon.generate(..., compile=True)``.

The model's decode forward (with fastbon's attention, a registered ``torch.library`` custom op, inside it) runs
under ``torch.compile``: inductor on CPU, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA. Shapes are static per
compiled graph: the engine pads a compiled step's rows to a power of two and its tree to a power of two of levels,
so a few graphs serve every batch. One compiled entry per model is kept for the
process and reused by later calls with the same shapes; the time spent compiling is reported apart
(``stats["compile_seconds"]``). Weights are graph inputs, not constants, so a trainer updating them in place
needs no recompile.
"""

import threading
import time
import weakref

import torch

_COMPILED = weakref.WeakKeyDictionary()
_COMPILED_LOCK = threading.Lock()


class CompiledForward:
    """``torch.compile`` of one model's forward, and the shapes it has compiled so far."""

    def __init__(self, model):
        device = model.get_output_embeddings().weight.device
        self.function = torch.compile(model, dynamic=False,
                                      mode="reduce-overhead" if device.type == "cuda" else None)
        self.shapes = set()
        self.lock = threading.Lock()  # compiling one model from two threads at once is not supported by dynamo

    def __call__(self, stats: dict, shape: tuple, **inputs):
        if shape in self.shapes:
            return self.function(**inputs)
        with self.lock:
            start = time.perf_counter()
            out = self.function(**inputs)
            self.shapes.add(shape)
            stats["compile_seconds"] = stats.get("compile_seconds", 0.0) + time.perf_counter() - start
        return out


def compiled_forward(model) -> CompiledForward:
    """The process-wide compiled forward of ``model`` (made on first use)."""
    with _COMPILED_LOCK:
        entry = _COMPILED.get(model)
        if entry is None:
            entry = _COMPILED[model] = CompiledForward(model)
        return entry
