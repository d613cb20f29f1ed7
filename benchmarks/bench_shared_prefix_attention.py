"""shared_prefix_attention: each backend vs torch SDPA over the explicitly expanded cache (what a stack without
prefix sharing runs: K/V [N, Hkv, P+S, D] per sample, F.scaled_dot_product_attention with enable_gqa).

Bytes are counted explicitly: the shared op reads the prefix once (B·Hkv·P·D·2) and each suffix (N·Hkv·S·D·2);
the baseline reads N·Hkv·(P+S)·D·2 elements. Both also read q and write out. Backends are timed through their
contract functions (fastbon.dispatch.implementation), without the public function's input validation.
"""

import torch
import torch.nn.functional as F

from fastbon import dispatch

# (prompts, samples per prompt, Hq, Hkv, D, prefix P, suffix S, dtype): the CPU target shape, then a bf16 GQA shape.
CASES = {
    "P2048-n32-S64-fp32": (1, 32, 8, 4, 64, 2048, 64, torch.float32),
    "P1024-n16-S32-bf16": (1, 16, 8, 2, 128, 1024, 32, torch.bfloat16),
}
QUICK = {"P256-n4-S8-fp32": (1, 4, 8, 4, 64, 256, 8, torch.float32)}


def _inputs(shape, device):
    num_prompts, per_prompt, q_heads, kv_heads, head_dim, prefix, suffix, dtype = shape
    samples = num_prompts * per_prompt
    generator = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    q = rand(samples, q_heads, head_dim)
    prefix_k, prefix_v = rand(num_prompts, kv_heads, prefix, head_dim), rand(num_prompts, kv_heads, prefix, head_dim)
    suffix_k, suffix_v = rand(samples, kv_heads, suffix, head_dim), rand(samples, kv_heads, suffix, head_dim)
    lens = [torch.full((count,), length, dtype=torch.int32, device=device)
            for count, length in ((num_prompts, prefix), (samples, suffix))]
    sample_to_prompt = torch.arange(num_prompts, dtype=torch.int32, device=device).repeat_interleave(per_prompt)
    return q, prefix_k, prefix_v, lens[0], suffix_k, suffix_v, lens[1], sample_to_prompt


def test_shared_prefix_attention(measure, case, device, backend):
    shape = {**QUICK, **CASES}[case]
    q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, s2p = _inputs(shape, device)
    element = q.element_size()
    io_bytes = 2 * q.numel() * element
    if backend == "baseline":
        keys = torch.cat([prefix_k[s2p.long()], suffix_k], dim=2)  # the expanded cache, built outside the timing
        values = torch.cat([prefix_v[s2p.long()], suffix_v], dim=2)
        query = q[:, :, None]

        def fn():
            return F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

        bytes_moved = 2 * keys.numel() * element + io_bytes
    else:
        implementation = dispatch.implementation("shared_prefix_attention", backend)
        scale = q.shape[-1] ** -0.5

        def fn():
            return implementation(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, s2p, scale)

        bytes_moved = (prefix_k.numel() + prefix_v.numel() + suffix_k.numel() + suffix_v.numel()) * element + io_bytes
    measure("shared_prefix_attention", case, backend, fn, bytes_moved, device)
