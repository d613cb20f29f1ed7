"""skinny_linear: the cpu kernel vs torch's ``F.linear`` (its BLAS) on a decode step's linear layers.
Timed through the contract function (``fastbon._cpp_ops.skinny_linear``), without input validation.

Shapes are the benchmark Llama's (hidden 512, MLP 1376, vocabulary 32000) at the decode widths of the end-to-end
cells (4, 16 and 32 rows). Bytes: the weights read once (the rows and the output are small beside them).
"""

import pytest
import torch

# (rows, in_features, out_features)
CASES = {"r4-512x1376": (4, 512, 1376), "r4-1376x512": (4, 1376, 512), "r4-lm_head": (4, 512, 32000),
         "r16-512x1376": (16, 512, 1376), "r16-lm_head": (16, 512, 32000), "r32-512x1376": (32, 512, 1376),
         "r32-lm_head": (32, 512, 32000)}
QUICK = {"r4-97x111": (4, 97, 111)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skinny_linear(measure, case, device, backend, dtype):
    if backend not in ("baseline", "cpu"):
        pytest.skip("skinny_linear runs on torch (the baseline) and cpu")
    rows, in_features, out_features = {**QUICK, **CASES}[case]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    if backend == "baseline":
        def fn():
            return torch.nn.functional.linear(x, weight)
    else:
        from fastbon import _cpp_ops

        def fn():
            return _cpp_ops.skinny_linear(x, weight)

    measure("skinny_linear", f"{case}-{str(dtype).removeprefix('torch.')}", backend, fn,
            weight.numel() * weight.element_size(), device)
