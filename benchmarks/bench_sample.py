"""sample: each backend vs the torch sort-based reference (fastbon.ops.reference.sample) on decode-sized logits.

Backends are timed through their contract functions (fastbon.dispatch.implementation), like the baseline: the
kernels, without the public function's input validation (full passes over the logits for NaN/inf and host syncs).

Bytes: the logits each row reads (rows · V · element size) plus the outputs; a fused sampler is bound by them.
"""

import torch

from fastbon import dispatch
from fastbon.ops import reference

# (rows, vocab, temperature, top_k, top_p, dtype)
CASES = {
    "V128256-r64-p0.95-fp32": (64, 128256, 1.0, 0, 0.95, torch.float32),
    "V128256-r64-k50-p0.95-T0.8-fp32": (64, 128256, 0.8, 50, 0.95, torch.float32),
    "V128256-r64-p0.95-bf16": (64, 128256, 1.0, 0, 0.95, torch.bfloat16),
}
QUICK = {"V32000-r8-p0.95-fp32": (8, 32000, 1.0, 0, 0.95, torch.float32)}


def test_sample(measure, case, device, backend):
    rows, vocab, temperature, top_k, top_p, dtype = {**QUICK, **CASES}[case]
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(device=device, dtype=dtype)
    seed = torch.arange(rows, device=device)
    row_index = torch.arange(rows, device=device)
    params = [torch.full((rows,), value, dtype=kind, device=device) for value, kind in (
        (temperature, torch.float32), (top_k, torch.int32), (top_p, torch.float32), (0.0, torch.float32))]
    step = torch.zeros(rows, dtype=torch.int64, device=device)
    implementation = reference.sample if backend == "baseline" else dispatch.implementation("sample", backend)

    def fn():
        return implementation(logits, row_index, *params, seed, step)

    measure("sample", case, backend, fn, logits.numel() * logits.element_size() + rows * 12, device)
