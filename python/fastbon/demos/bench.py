"""End-to-end best-of-n timing: ``fastbon.generate`` vs Hugging Face ``generate(num_return_sequences=n)``.

Both sides get the same work: the same random-weight Llama, the same prompt, top_k=0 (HF would otherwise apply
its default top_k=50), the same top_p, exactly ``new_tokens`` tokens per sample (no EOS). Each cell reports wall
time, generated tokens/s, peak memory (RSS growth on CPU, max_memory_allocated on GPU), the KV bytes each side
holds, the bytes one decode step must read under the sharing model, and the ratio HF / fastbon.
Used by ``benchmarks/bench_e2e.py`` and ``fastbon bench``.
"""

import itertools
import os
import threading
import time

import torch

from .. import generate
from . import options
from .common import default_device, synchronize, write_csv

CSV_FIELDS = ["device", "P", "n", "new_tokens", "compiled", "cold_s", "compile_s",
              "fastbon_s", "hf_s", "speedup", "fastbon_tokens_per_s",
              "hf_tokens_per_s", "fastbon_peak_mb", "hf_peak_mb", "fastbon_kv_mb", "hf_kv_mb", "kv_ratio",
              "step_bytes_model_mb", "fastbon_decode_gbps"]


def llama_model(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376, max_positions=8192,
                dtype=torch.float32, device="cpu", seed=0):
    """A random-weight ``LlamaForCausalLM`` of the given shape, without EOS (every sample runs to the end)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, eos_token_id=None, bos_token_id=None,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class PeakMemory:
    """Peak memory growth during a block: CUDA's allocator counter, or this process's RSS sampled every 5 ms."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self._highest = max(self._highest, self._rss())
            self._stop.wait(0.005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._highest = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._highest, self._rss()) - self._start


def _timed(function, device):
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        output = function()
        synchronize(device)
        seconds = time.perf_counter() - start
    return output, seconds, memory.peak_bytes


def kv_bytes_per_token(model) -> int:
    """K and V bytes one token adds to the cache, over all layers."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element


def kv_bytes_hf(model, prompt_len, n, new_tokens) -> int:
    """HF's cache at the end: every one of the n rows holds prompt + generated K and V in every layer."""
    return kv_bytes_per_token(model) * n * (prompt_len + new_tokens)


def step_bytes_model(model, prompt_len, n, new_tokens) -> int:
    """Bytes one decode step must read with sharing (weights + prefix once + n mean-length suffixes)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + kv_bytes_per_token(model) * (prompt_len + n * new_tokens // 2)


def run_cell(model, prompt_len, n, new_tokens, *, top_p=0.95, run_hf=True, seed=0, compile=False) -> dict:
    """One cell. With ``compile``, an untimed first call of the same shapes compiles the decode step (its time
    and the compile time are reported as ``cold_s`` and ``compile_s``) before the timed call."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=generator).to(device)

    def call(tokens=new_tokens):
        return generate(model, prompt, n=n, k=1, max_new_tokens=tokens, temperature=1.0, top_k=0, top_p=top_p,
                        seed=seed, compile=compile)

    def hf_call(tokens=new_tokens):
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                  num_return_sequences=n, max_new_tokens=tokens, min_new_tokens=tokens, top_k=0,
                                  top_p=top_p, temperature=1.0, pad_token_id=0)

    cold = {}
    if compile:
        warm, cold_s, _ = _timed(call, device)
        cold = dict(cold_s=cold_s, compile_s=warm.stats.get("compile_seconds", 0.0))
    else:  # each side warmed by an untimed call of the same prompt and n (a few steps: the same shapes)
        call(2)
    if run_hf:
        hf_call(2)
    result, fastbon_s, fastbon_peak = _timed(call, device)
    generated = n * new_tokens
    assert result.lengths.min().item() == new_tokens, "EOS must not end a benchmark sample early"
    fastbon_kv = result.stats["kv_bytes"]  # the KV pool at its peak: prompts and generated tokens
    step_bytes = step_bytes_model(model, prompt_len, n, new_tokens)
    row = dict(device=str(device), P=prompt_len, n=n, new_tokens=new_tokens, fastbon_s=fastbon_s,
               fastbon_tokens_per_s=generated / fastbon_s, fastbon_peak_mb=fastbon_peak / 2**20,
               fastbon_kv_mb=fastbon_kv / 2**20, step_bytes_model_mb=step_bytes / 2**20,
               fastbon_decode_gbps=step_bytes * new_tokens / fastbon_s / 1e9, compiled=compile, **cold)
    if run_hf:
        _, hf_s, hf_peak = _timed(hf_call, device)
        hf_kv = kv_bytes_hf(model, prompt_len, n, new_tokens)
        row.update(hf_s=hf_s, hf_tokens_per_s=generated / hf_s, hf_peak_mb=hf_peak / 2**20, hf_kv_mb=hf_kv / 2**20,
                   speedup=hf_s / fastbon_s, kv_ratio=hf_kv / fastbon_kv)
    return row


def run_grid(model, prompt_lens, ns, new_tokens_list, *, top_p=0.95, run_hf=True, progress=True,
             compile=False) -> list:
    cells = list(itertools.product(prompt_lens, ns, new_tokens_list))
    if progress:
        from tqdm import tqdm

        cells = tqdm(cells, desc="best-of-n vs HF", unit="cell")
    rows = []
    for prompt_len, n, new_tokens in cells:
        rows.append(run_cell(model, prompt_len, n, new_tokens, top_p=top_p, run_hf=run_hf, compile=compile))
    return rows


def plot(rows, path) -> None:
    """Speedup over HF against prompt length, a line per n (per new-token count)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: the benchmark also runs in CI and over ssh, without a display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for n, new_tokens in sorted({(row["n"], row["new_tokens"]) for row in rows if "speedup" in row}):
        points = sorted((row["P"], row["speedup"]) for row in rows if row["n"] == n and row["new_tokens"] == new_tokens
                        and "speedup" in row)
        axis.plot([p for p, _ in points], [s for _, s in points], marker="o", label=f"n={n}, {new_tokens} new")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("prompt length P")
    axis.set_ylabel("speedup over HF generate (x)")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.legend(fontsize=7)
    axis.set_title("fastbon best-of-n vs HF generate(num_return_sequences=n)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summary_table(rows) -> str:
    header = f"{'P':>6} {'n':>4} {'new':>4} {'fastbon s':>10} {'HF s':>8} {'speedup':>8} {'KV ratio':>9} {'GB/s':>6}"
    lines = [header]
    for row in rows:
        lines.append(f"{row['P']:>6} {row['n']:>4} {row['new_tokens']:>4} {row['fastbon_s']:>10.2f} "
                     f"{row.get('hf_s', float('nan')):>8.2f} {row.get('speedup', float('nan')):>8.2f} "
                     f"{row.get('kv_ratio', float('nan')):>9.1f} {row['fastbon_decode_gbps']:>6.1f}")
    return "\n".join(lines)


CPU_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
GPU_SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=8, vocab=128256, intermediate=8192)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=500, intermediate=128)


def run(args) -> int:
    """``fastbon bench`` with the options ``options.parse_bench`` read."""
    device = args.device or default_device()
    shape = {"cpu": CPU_SHAPE, "gpu": GPU_SHAPE, "tiny": TINY_SHAPE}[
        args.shape or ("gpu" if device.startswith("cuda") else "cpu")]
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = llama_model(**shape, dtype=dtype, device=device)
    rows = run_grid(model, args.P, args.n, args.new_tokens, top_p=args.top_p, run_hf=not args.no_hf,
                    compile=args.compile)
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "e2e.csv"), CSV_FIELDS)
    plot(rows, os.path.join(args.out, "e2e.png"))
    print(summary_table(rows))
    print(f"wrote {args.out}/e2e.csv and {args.out}/e2e.png")
    return 0


def main(argv=None) -> int:
    return run(options.parse_bench(argv))


if __name__ == "__main__":
    raise SystemExit(main())
