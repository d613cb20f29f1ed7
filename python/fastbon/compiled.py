"""A compiled decode step: ``fastbon.generate(..., compile=True)``.

The model's decode forward (with fastbon's attention, a registered ``torch.library`` custom op, inside it) runs
under ``torch.compile``: inductor on CPU, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA. Shapes are static per
compiled graph, so what would change them is kept to a few values: the cache writes its position from a device
tensor (not a Python int), the suffix capacity only doubles, and the batch width only halves (finished rows stay,
masked, until at most half the rows are live: ``bucket_rows``). One compiled entry per model is kept for the
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


def bucket_rows(unfinished: torch.Tensor, finished: torch.Tensor) -> torch.Tensor | None:
    """The rows to keep when finished rows leave a compiled batch: None (keep all) while more than half the rows
    are live; else every live row plus finished ones as filler, up to the next power of two, in row order."""
    width, live = finished.shape[0], unfinished.shape[0]
    if 2 * live > width:
        return None
    target = 1 << max(0, live - 1).bit_length()
    filler = finished.nonzero().flatten()[:target - live]
    return torch.cat([unfinished, filler]).sort().values
