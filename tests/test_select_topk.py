"""select_topk: exact sets and order against an independent Python ranking, ties to the lower index."""

import pytest
import torch

from fastbon.ops import select_topk


def _python_topk(row, k):
    ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
    return [row[j] for j in ranked], ranked


@pytest.mark.parametrize("num_prompts,n", [(1, 1), (3, 2), (2, 7), (5, 16), (2, 1024), (1, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backend_exact(backend_device, num_prompts, n, dtype):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(n)
    # Few distinct values, so ties are common; -inf ranks last.
    scores = torch.randint(0, max(2, n // 3), (num_prompts, n), generator=generator).to(dtype) / 4 - 1
    scores[0, 0] = float("-inf")
    for k in sorted({1, min(2, n), n // 2 or 1, n}):
        values, indices = select_topk(scores.to(device), k, backend=backend)
        assert values.dtype == dtype and indices.dtype == torch.int64 and values.shape == (num_prompts, k)
        for b in range(num_prompts):
            expected_values, expected_indices = _python_topk(scores[b].tolist(), k)
            assert indices[b].tolist() == expected_indices
            assert values[b].tolist() == expected_values


def test_bad_inputs():
    scores = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k must"):
        select_topk(scores, 6)
    with pytest.raises(ValueError, match="k must"):
        select_topk(scores, 0)
    with pytest.raises(TypeError, match="k must"):
        select_topk(scores, 1.5)
    with pytest.raises(ValueError, match="scores"):
        select_topk(scores[0], 1)
    with pytest.raises(TypeError, match="scores"):
        select_topk(scores.half(), 1)
    with pytest.raises(ValueError, match="NaN"):
        select_topk(torch.tensor([[0.0, float("nan")]]), 1)
