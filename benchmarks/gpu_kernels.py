"""Kernel timings on a GPU: every backend of each op vs its torch baseline, with achieved GB/s.

Times with ``triton.testing.do_bench`` (median) and compares against the card's measured device-to-device copy
bandwidth. Targets (issue "Triton kernels"): at P=4096, n=64, Hq=32, Hkv=8, D=128, bf16, suffix 256, the
shared-prefix attention reaches >= 70 % of copy bandwidth counting the prefix once, and >= 10x torch SDPA over
the explicitly expanded cache; the sampler at vocab 128256 x 64 rows, top_p=0.95, is >= 3x the torch sort-based
reference. ``--device cpu --small`` runs the same code path on the CPU (perf_counter timing) to check the script.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastbon import dispatch
from fastbon.ops import reference, sample, select_topk, shared_prefix_attention


def timer(device):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    def perf_counter_median(fn, repeats=5):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return perf_counter_median


def copy_bandwidth(device, seconds_of) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB buffer; 64 MiB on CPU)."""
    size = 2**30 if device == "cuda" else 2**26
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * size / seconds_of(lambda: target.copy_(source))


def attention_rows(device, seconds_of, bandwidth, small):
    prompt_len, n, q_heads, kv_heads, head_dim, suffix = (256, 8, 8, 2, 64, 16) if small else (4096, 64, 32, 8, 128,
                                                                                                 256)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(n, q_heads, head_dim, device=device, dtype=dtype)
    prefix_k, prefix_v = (torch.randn(1, kv_heads, prompt_len, head_dim, device=device, dtype=dtype) for _ in "kv")
    suffix_k, suffix_v = (torch.randn(n, kv_heads, suffix, head_dim, device=device, dtype=dtype) for _ in "kv")
    lens = (torch.tensor([prompt_len], dtype=torch.int32, device=device),
            torch.full((n,), suffix, dtype=torch.int32, device=device),
            torch.zeros(n, dtype=torch.int32, device=device))
    args = (q, prefix_k, prefix_v, lens[0], suffix_k, suffix_v, lens[1], lens[2])
    element = q.element_size()
    shared_bytes = (2 * kv_heads * head_dim * (prompt_len + n * suffix) + 2 * n * q_heads * head_dim) * element
    keys = torch.cat([prefix_k.expand(n, -1, -1, -1), suffix_k], dim=2)
    values = torch.cat([prefix_v.expand(n, -1, -1, -1), suffix_v], dim=2)
    sdpa = seconds_of(lambda: F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True))
    rows = [("attention", "torch SDPA, expanded cache", sdpa, shared_bytes, bandwidth, 1.0)]
    for backend in dispatch.BACKENDS:
        if dispatch.unavailable_reason(backend, torch.device(device)) is None:
            seconds = seconds_of(lambda backend=backend: shared_prefix_attention(*args, backend=backend))
            rows.append(("attention", backend, seconds, shared_bytes, bandwidth, sdpa / seconds))
    return rows


def sample_rows(device, seconds_of, bandwidth, small):
    rows_count, vocab = (16, 32000) if small else (64, 128256)
    logits = torch.randn(rows_count, vocab, device=device) * 4
    kwargs = dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0, seed=torch.arange(rows_count, device=device),
                  step=0)
    logit_bytes = logits.numel() * logits.element_size()
    torch_reference = seconds_of(lambda: sample(logits, **kwargs, backend="torch"))
    rows = [("sample", "torch (sort-based reference)", torch_reference, logit_bytes, bandwidth, 1.0)]
    for backend in ("triton", "cuda", "cpu"):
        if dispatch.unavailable_reason(backend, torch.device(device)) is None:
            seconds = seconds_of(lambda backend=backend: sample(logits, **kwargs, backend=backend))
            rows.append(("sample", backend, seconds, logit_bytes, bandwidth, torch_reference / seconds))
    return rows


def topk_rows(device, seconds_of, bandwidth, small):
    scores = torch.randn(64 if small else 256, 1024, device=device)
    score_bytes = scores.numel() * scores.element_size()
    torch_reference = seconds_of(lambda: reference.select_topk(scores, 8))
    rows = [("select_topk", "torch (stable sort)", torch_reference, score_bytes, bandwidth, 1.0)]
    for backend in ("triton", "cuda", "cpu"):
        if dispatch.unavailable_reason(backend, torch.device(device)) is None:
            seconds = seconds_of(lambda backend=backend: select_topk(scores, 8, backend=backend))
            rows.append(("select_topk", backend, seconds, score_bytes, bandwidth, torch_reference / seconds))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (a check of the script)")
    args = parser.parse_args(argv)
    seconds_of = timer(args.device)
    bandwidth = copy_bandwidth(args.device, seconds_of)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{name}: device-to-device copy {bandwidth / 1e9:.0f} GB/s")
    print(f"{'op':<12} {'backend':<30} {'time us':>10} {'GB/s':>8} {'% copy':>7} {'vs torch':>9}")
    for rows in (attention_rows, sample_rows, topk_rows):
        for op, backend, seconds, nbytes, copy, ratio in rows(args.device, seconds_of, bandwidth, args.small):
            achieved = nbytes / seconds
            print(f"{op:<12} {backend:<30} {seconds * 1e6:>10.1f} {achieved / 1e9:>8.1f} "
                  f"{100 * achieved / copy:>6.1f}% {ratio:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
