"""select_topk: each backend vs the torch reference (a stable sort of each row) on best-of-n score matrices.
Backends are timed through their contract functions (fastbon.dispatch.implementation), without input validation.

Bytes: the scores read plus the k values and indices written.
"""

import torch

from fastbon import dispatch
from fastbon.ops import reference

# (prompts B, samples n, k)
CASES = {"B64-n32-k4": (64, 32, 4), "B256-n1024-k16": (256, 1024, 16)}
QUICK = {"B8-n32-k4": (8, 32, 4)}


def test_select_topk(measure, case, device, backend):
    prompts, samples, k = {**QUICK, **CASES}[case]
    scores = torch.randn(prompts, samples, generator=torch.Generator().manual_seed(0)).to(device)
    implementation = reference.select_topk if backend == "baseline" else dispatch.implementation("select_topk", backend)

    def fn():
        return implementation(scores, k)

    measure("select_topk", case, backend, fn, scores.numel() * 4 + prompts * k * 12, device)
