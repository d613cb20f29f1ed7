"""``fastbon serve`` under load, against the same requests submitted to an in-process engine.

    python benchmarks/bench_serve.py [--clients 32] [--requests 8] [--n 8] [--max-tokens 8] [--overhead-requests 40]
                                     [--prompt-tokens 1100]
    pytest benchmarks/bench_serve.py        # a seconds-long smoke run (CI): every request answered once

1. Load: ``clients`` concurrent clients each send ``requests`` streamed completions (n samples, ``max_tokens`` new
   tokens each, EOS ignored so both sides generate exactly the same tokens) to a ``fastbon serve`` subprocess; then
   the same requests go to an ``Engine`` in this process, ``clients`` asyncio tasks reading ``astream()`` (the
   server's own structure, without HTTP), alternated ``repeats`` times. Reported: tokens/s, latency and time to
   first token (p50/p99), CPU seconds (the server process's; this process's for the engine), and the server's
   throughput as a fraction of the engine's (the HTTP layer's cost).
2. Overhead: one request at a time (n=1, one token): the median latency through HTTP less the engine's.
3. Best-of-8 of one prompt of ``prompt_tokens`` tokens (a random-weight Llama with the context for it): one n=8
   request, against 8 n=1 requests sent together (how llama.cpp's server must run it) and one after another;
   the prompt tokens each way prefilled and taken from the prefix cache, from the server's /metrics.
Writes benchmarks/out/serve.csv and serve.png.
"""

import argparse
import asyncio
import csv
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from fastbon import SamplingConfig
from fastbon.engine import Engine
from fastbon.models import DEFAULT_MODEL_DIR, arithmetic, load_default_model

OUT = Path(__file__).parent / "out"
MODEL = "fastbon-addition"


def percentile(values: list, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Server:
    """A ``fastbon serve`` subprocess on a free loopback port, up until ``close()``."""

    def __init__(self, *arguments: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "fastbon.cli", "serve", "--port", str(port),
                                          "--log-level", "warning", *arguments])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("fastbon serve did not start within 120 s")

    def metrics(self) -> dict:
        samples = [line.split() for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines()
                   if line and line[0] != "#" and "{" not in line]
        return {name: float(value) for name, value in samples}

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc): what the server spent, whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(side: str, records: list, wall: float, cpu: float) -> dict:
    latencies, firsts = [r["latency"] for r in records], [r["first"] for r in records]
    tokens = sum(r["tokens"] for r in records)
    return dict(side=side, requests=len(records), tokens=tokens, wall_s=wall, cpu_s=cpu, tokens_per_s=tokens / wall,
                p50_latency_s=percentile(latencies, 0.5), p99_latency_s=percentile(latencies, 0.99),
                p50_ttft_s=percentile(firsts, 0.5), p99_ttft_s=percentile(firsts, 0.99))


async def _closed_loop(clients: int, count: int, one) -> tuple[list, float]:
    """``clients`` workers sending the ``count`` requests (each one once) back to back; (records, wall seconds)."""
    pending, records = list(range(count)), [None] * count

    async def worker():
        while pending:
            index = pending.pop()
            records[index] = await one(index)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return records, time.perf_counter() - start


async def http_load(url: str, bodies: list, clients: int) -> tuple[list, float]:
    import json

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(index):
            start, first, usage, done = time.perf_counter(), None, None, False
            async with client.stream("POST", f"{url}/v1/completions", json=bodies[index]) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if first is None and any(choice["text"] for choice in chunk["choices"]):
                            first = time.perf_counter() - start
                        usage = chunk.get("usage") or usage
            assert done and usage is not None, f"request {index} ended without [DONE] or usage"
            return dict(latency=time.perf_counter() - start, first=first, tokens=usage["completion_tokens"])

        return await _closed_loop(clients, len(bodies), one)


async def engine_load(engine: Engine, prompts: list, configs: list, clients: int) -> tuple[list, float]:
    async def one(index):
        start, first, tokens = time.perf_counter(), None, 0
        # Submitted from a thread, as the server does: the event loop only reads the streams.
        request = await asyncio.to_thread(engine.submit, prompts[index], configs[index])
        async for event in request.astream():
            if first is None and event.tokens:
                first = time.perf_counter() - start
            tokens += len(event.tokens)
        return dict(latency=time.perf_counter() - start, first=first, tokens=tokens)

    return await _closed_loop(clients, len(prompts), one)


def load(args, model, tokenizer) -> list:
    """The same requests through the server and on the engine, alternated ``repeats`` times (a shared machine's
    other load drifts); one row per run."""
    texts = [question for question, _ in arithmetic.make_problems(args.clients * args.requests, seed=7)]
    fields = dict(n=args.n, max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True)
    bodies = [dict(model=MODEL, prompt=text, seed=index, stream=True, stream_options={"include_usage": True},
                   **fields) for index, text in enumerate(texts)]
    configs = [SamplingConfig(n=args.n, k=args.n, max_new_tokens=args.max_tokens, eos_token_id=[], seed=index)
               for index in range(len(texts))]
    prompts = [tokenizer(text).input_ids for text in texts]
    rows = []
    for _ in range(args.repeats):
        server = Server()
        try:
            cpu, client_cpu = cpu_seconds(server.process.pid), time.process_time()
            records, wall = asyncio.run(http_load(server.url, bodies, args.clients))
            cpu, client_cpu = cpu_seconds(server.process.pid) - cpu, time.process_time() - client_cpu
            finished = server.metrics()["fastbon_requests_finished_total"]
        finally:
            server.close()
        assert all(record is not None for record in records) and finished == len(bodies), "each answered once"
        rows.append(_summary("server", records, wall, cpu))
        rows[-1]["client_cpu_s"] = client_cpu  # the HTTP clients' own CPU: on a 2-core machine, taken from the server
        engine = Engine(model, tokenizer)
        try:
            cpu = time.process_time()
            records, wall = asyncio.run(engine_load(engine, prompts, configs, args.clients))
            cpu = time.process_time() - cpu
        finally:
            engine.close()
        rows.append(_summary("engine", records, wall, cpu))
        rows[-1]["client_cpu_s"] = 0.0  # the engine's clients run in its process: counted in cpu_s
        assert rows[-2]["tokens"] == rows[-1]["tokens"], "both sides generated the same tokens"
    return rows


def overhead(args, model, tokenizer) -> dict:
    """Median latency of one small request at a time through HTTP and submitted to the engine, interleaved (the
    idle side waits on a condition: it takes no CPU from the other), so drifting load touches both alike."""
    body = dict(model=MODEL, prompt="12+34=", max_tokens=1, temperature=0)
    config, prompt = SamplingConfig(n=1, max_new_tokens=1, temperature=0.0), tokenizer("12+34=").input_ids
    server, engine = Server(), Engine(model, tokenizer)
    http, direct = [], []
    try:
        with httpx.Client(timeout=60) as client:
            for repeat in range(args.overhead_requests + 1):  # the first of each: a warm-up, not counted
                start = time.perf_counter()
                client.post(f"{server.url}/v1/completions", json=body).raise_for_status()
                middle = time.perf_counter()
                engine.submit(prompt, config).result()
                if repeat:
                    http.append(middle - start)
                    direct.append(time.perf_counter() - middle)
    finally:
        server.close()
        engine.close()
    return dict(http_ms=statistics.median(http) * 1e3, engine_ms=statistics.median(direct) * 1e3,
                overhead_ms=statistics.median(h - d for h, d in zip(http, direct, strict=True)) * 1e3)


def _long_model(folder: Path, context: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)


def best_of(args) -> list:
    """Best-of-8 of one long prompt: one n=8 request, 8 n=1 together, 8 n=1 in turn (a fresh prompt each)."""
    generator = torch.Generator().manual_seed(3)
    with tempfile.TemporaryDirectory() as folder:
        _long_model(Path(folder), args.prompt_tokens + args.max_tokens + 1)
        server = Server("--model", folder)
        try:
            def body(prompt, n, seed):
                return dict(model=folder, prompt=prompt, n=n, max_tokens=args.max_tokens, ignore_eos=True, seed=seed)

            async def together(prompt):
                async with httpx.AsyncClient(timeout=600) as client:
                    responses = await asyncio.gather(*(client.post(f"{server.url}/v1/completions",
                                                                   json=body(prompt, 1, seed)) for seed in range(8)))
                for response in responses:
                    response.raise_for_status()

            def in_turn(prompt):
                for seed in range(8):
                    httpx.post(f"{server.url}/v1/completions", json=body(prompt, 1, seed), timeout=600
                               ).raise_for_status()

            ways = {"one n=8 request": lambda prompt: httpx.post(f"{server.url}/v1/completions",
                                                                   json=body(prompt, 8, 0), timeout=600
                                                                   ).raise_for_status(),
                    "8 n=1 requests together": lambda prompt: asyncio.run(together(prompt)),
                    "8 n=1 requests in turn": in_turn}
            rows = []
            for way, run in ways.items():
                prompt = torch.randint(4, 16, (args.prompt_tokens,), generator=generator).tolist()
                before, start = server.metrics(), time.perf_counter()
                run(prompt)
                wall, after = time.perf_counter() - start, server.metrics()
                rows.append(dict(way=way, wall_s=wall, prefilled_tokens=after["fastbon_prefill_tokens_total"] -
                                 before["fastbon_prefill_tokens_total"],
                                 cache_hit_tokens=after["fastbon_prefix_cache_hit_tokens_total"] -
                                 before["fastbon_prefix_cache_hit_tokens_total"]))
        finally:
            server.close()
    return rows


def _plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['side']} {position // 2 + 1}" for position, row in enumerate(rows)]  # runs alternate
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 3.4))
    throughput.bar(labels, [r["tokens_per_s"] for r in rows], color=["tab:blue", "tab:grey"] * (len(rows) // 2))
    throughput.set_ylabel("tokens/s")
    for offset, key in enumerate(["p50_latency_s", "p99_latency_s", "p50_ttft_s", "p99_ttft_s"]):
        latency.bar([i * 5 + offset for i in range(len(rows))], [r[key] for r in rows], label=key)
    latency.set_xticks([i * 5 + 1.5 for i in range(len(rows))], labels)
    latency.set_ylabel("seconds")
    latency.legend(fontsize=7)
    figure.suptitle("fastbon serve vs the in-process engine, the same load")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args) -> dict:
    model, tokenizer = load_default_model()
    load_average = os.getloadavg()[0]  # the machine's other load, which these numbers are not immune to
    rows = load(args, model, tokenizer)

    def median(side, key):
        return statistics.median(row[key] for row in rows if row["side"] == side)

    result = dict(load=rows, ratio=median("server", "tokens_per_s") / median("engine", "tokens_per_s"),
                  cpu_ratio=median("server", "cpu_s") / median("engine", "cpu_s"),
                  overhead=overhead(args, model, tokenizer), best_of=best_of(args))
    result["load_average"] = (load_average, os.getloadavg()[0])
    OUT.mkdir(exist_ok=True)
    with open(OUT / "serve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, OUT / "serve.png")
    return result


def report(result: dict, args) -> None:
    print(f"load: {args.clients} clients x {args.requests} streamed requests, n={args.n}, {args.max_tokens} tokens "
          f"(torch threads {torch.get_num_threads()}; 1-minute load average {result['load_average'][0]:.1f} at the "
          f"start, {result['load_average'][1]:.1f} at the end)")
    for row in result["load"]:
        print(f"  {row['side']:<7} {row['tokens_per_s']:8.1f} tokens/s  latency p50 {row['p50_latency_s']:.3f} "
              f"p99 {row['p99_latency_s']:.3f} s  TTFT p50 {row['p50_ttft_s']:.3f} p99 {row['p99_ttft_s']:.3f} s  "
              f"({row['requests']} requests, {row['tokens']} tokens, {row['wall_s']:.1f} s, CPU {row['cpu_s']:.1f} s, "
              f"clients' CPU {row['client_cpu_s']:.1f} s)")
    print(f"  server / engine throughput (medians): {result['ratio']:.3f}; CPU seconds: {result['cpu_ratio']:.3f}")
    overhead_row = result["overhead"]
    print(f"one request at a time (n=1, 1 token): HTTP {overhead_row['http_ms']:.2f} ms, engine "
          f"{overhead_row['engine_ms']:.2f} ms, overhead {overhead_row['overhead_ms']:.2f} ms")
    print(f"best-of-8 of a {args.prompt_tokens}-token prompt, {args.max_tokens} tokens each:")
    for row in result["best_of"]:
        print(f"  {row['way']:<26} {row['wall_s']:6.2f} s  prefilled {row['prefilled_tokens']:6.0f}  "
              f"from the prefix cache {row['cache_hit_tokens']:6.0f}")


def options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--overhead-requests", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=1100, help="the best-of-8 prompt")
    parser.add_argument("--repeats", type=int, default=2, help="load runs per side, alternated")
    return parser.parse_args(argv)


def test_bench_serve_smoke():
    args = options(["--clients", "3", "--requests", "2", "--n", "2", "--max-tokens", "2", "--overhead-requests", "2",
                    "--prompt-tokens", "40", "--repeats", "1"])
    result = run(args)
    report(result, args)
    assert [row["requests"] for row in result["load"]] == [6, 6]
    assert [row["prefilled_tokens"] for row in result["best_of"]][0] == 40, "one n=8 request prefills once"


if __name__ == "__main__":
    arguments = options()
    report(run(arguments), arguments)
