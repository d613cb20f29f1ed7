"""select_topk: each backend vs the torch reference (a stable sort of each row) on best-of-n score matrices.

Bytes: the scores read plus the k values and indices written.
"""

import torch
from fastbon.ops import reference, select_topk

# (prompts B, samples n, k)
CASES = {"B64-n32-k4": (64, 32, 4), "B256-n1024-k16": (256, 1024, 16)}
QUICK = {"B8-n32-k4": (8, 32, 4)}


def test_select_topk(measure, case, device, backend):
    prompts, samples, k = {**QUICK, **CASES}[case]
    scores = torch.randn(prompts, samples, generator=torch.Generator().manual_seed(0)).to(device)
    if backend == "baseline":
        def fn():
            return reference.select_topk(scores, k)
    else:
        def fn():
            return select_topk(scores, k, backend=backend)

    measure("select_topk", case, backend, fn, scores.numel() * 4 + prompts * k * 12, device)
