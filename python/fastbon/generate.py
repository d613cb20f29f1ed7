"""Best-of-n decoding: ``fastbon.generate``, a blocking call over B prompts on an engine of its own."""

import torch

from . import hf
from .config import SamplingConfig
from .decode import FINISH_REASONS
from .engine import Engine
from .prompts import prepare_prompts, special_ids
from .result import GenerationResult, concatenate
from .seeds import check_seed, sample_seeds

__all__ = ["FINISH_REASONS", "GenerationResult", "generate", "generate_each", "run_requests", "split_keywords"]


def generate(model, input_ids, n=16, k=1, max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             eos_token_id=None, score="mean_logprob", seed=None, attention_mask=None, return_all=False, prune=None,
             backend=None, logprobs="raw", stop_strings=None, tokenizer=None, repetition_penalty=1.0,
             max_memory=None, compile=False):
    """Best-of-n sampling from a Hugging Face causal LM with one shared KV cache per prompt.

    Args:
        model: a Hugging Face decoder-only causal LM (``fastbon.hf.check_model`` says what is served).
        input_ids: [B, L] ids with ``attention_mask`` (left or right padding, unequal lengths), or a list of
            1-D id tensors, on the model's device.
        n: samples per prompt. k: how many of them to return (best first), 1 <= k <= n.
        max_new_tokens: the most tokens each sample generates (memory follows what is generated, not this).
        temperature, top_k, top_p, min_p: sampling (temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off).
        eos_token_id: an id or a list; default the model's generation config. A sample stops at EOS and is padded.
        score: "mean_logprob" (default), "sum_logprob", or a callable taking ``fastbon.scoring.Samples`` and
            returning [B, n] scores (higher is better).
        seed: an int makes the run reproducible; a list of B ints gives each prompt its own seed (its samples then
            depend on nothing else in the batch); None draws the seeds from torch's generator.
        return_all: also return all n samples with their scores.
        prune: a ``fastbon.Pruning`` to drop each prompt's weakest partial samples at checkpoints (they leave
            the batch, so later steps cost less; they come back unfinished, with score -inf).
        backend: force one backend for every op (see ``fastbon.backends()``).
        logprobs: "raw" — log_softmax(logits), the model's own probability of each token (default); or
            "processed" — log_softmax(logits / temperature) after ``repetition_penalty`` (TRL's policy log-probs,
            vLLM's processed log-probs; at temperature 0 the temperature is taken as 1). Scores use the same mode.
        stop_strings: strings that end a sample when its decoded completion first contains one; the token that
            completes it is kept whole (as Hugging Face does), nothing after it. Needs ``tokenizer``.
        repetition_penalty: Hugging Face's repetition penalty over prompt + generated tokens (1 = off).
        max_memory: the bytes this call may use beyond the model (an int or "512MiB"; default 90 % of what the
            device has free). Rows are admitted by what they hold now; when the suffixes would grow past it the
            newest samples are preempted and decoded again in a later wave that shares the prefill (same results);
            a call that cannot fit even one sample is refused with the numbers before the prefill
            (``fastbon.memory``).
        compile: run the decode steps under ``torch.compile`` (``fastbon.compiled``): same tokens as eager; the
            first call of each shape pays the compile time (``stats["compile_seconds"]``), later calls reuse it.

    Returns:
        GenerationResult: sequences/lengths/scores/token_logprobs/finish_reasons of the best k per prompt, and all
        n on request.
    """
    config = SamplingConfig(n=n, k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                            stop_strings=stop_strings, logprobs=logprobs, score=score, prune=prune,
                            return_all=return_all)
    return run_requests(model, input_ids, attention_mask, config, seed, tokenizer=tokenizer, backend=backend,
                        max_memory=max_memory, compile=compile)


def run_requests(model, input_ids, attention_mask, config: SamplingConfig, seed, *, tokenizer=None, backend=None,
                 max_memory=None, compile=False, search=None) -> GenerationResult:
    """The B prompts of ``input_ids`` under one config as one ``GenerationResult`` (``generate_each``);
    ``search(prompt_index)`` gives each request's fork hook (``fastbon.search``)."""
    hf.check_model(model, 0)
    special_ids(model, None if config.eos_token_id is None else list(config.eos_token_id))
    device = model.get_output_embeddings().weight.device
    prompts = prepare_prompts(input_ids, attention_mask, model.get_input_embeddings().weight.shape[0], device)
    check_seed(seed, len(prompts))
    seeds = sample_seeds(seed, len(prompts), config.n).view(len(prompts), config.n)
    results, stats = generate_each(model, prompts, [config] * len(prompts), list(seeds), tokenizer=tokenizer,
                                   backend=backend, max_memory=max_memory, compile=compile, search=search)
    _, pad_token_id = special_ids(model, None if config.eos_token_id is None else list(config.eos_token_id))
    result = concatenate(results, pad_token_id)
    result.stats = stats
    return result


ENGINE_KEYWORDS = ("tokenizer", "backend", "max_memory", "compile")


def split_keywords(keywords: dict) -> tuple[dict, dict]:
    """``fastbon.generate`` keywords as (``SamplingConfig`` fields, engine keywords); anything else is refused."""
    fields = set(SamplingConfig.__dataclass_fields__)
    unknown = sorted(set(keywords) - fields - set(ENGINE_KEYWORDS))
    if unknown:
        raise TypeError(f"unknown fastbon settings {unknown}")
    return ({name: value for name, value in keywords.items() if name in fields},
            {name: value for name, value in keywords.items() if name in ENGINE_KEYWORDS})


def generate_each(model, prompts: list, configs: list, seeds: list, *, tokenizer=None, backend=None,
                  max_memory=None, compile=False, search=None) -> tuple[list, dict]:
    """Every prompt (1-D id tensors) under its own config and its samples' seeds (int64 [n] each), submitted at once
    to one engine driven from this thread: (one ``GenerationResult`` per prompt, the call's stats). What the
    framework adapters call: a trainer step's groups, an evaluation's requests, all in one continuous batch."""
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    engine = Engine(model, tokenizer, max_rows=sum(config.n for config in configs), max_memory=max_memory,
                    backend=backend, compile=compile, prefix_cache=False, background=False)
    with torch.no_grad():
        requests = [engine.submit(prompt, config, seeds=prompt_seeds,
                                  search=None if search is None else search(index))
                    for index, (prompt, config, prompt_seeds) in enumerate(zip(prompts, configs, seeds, strict=True))]
        engine.run_until(lambda: all(request.done() for request in requests))
        results = [request.result() for request in requests]
    return results, _call_stats([request.stats for request in requests], engine)


def _call_stats(per_request: list, engine) -> dict:
    """The call's stats: the requests' counts summed, the engine's steps and its KV peak."""
    stats = {name: sum(stats.get(name, 0) for stats in per_request)
             for name in ("prefill_tokens", "prefix_cache_hit_tokens", "tokens_generated", "preempted", "pruned",
                          "prefix_kv_bytes", "checkpoints", "prefill_seconds")}
    # A step is a token drawn by every live row: the first from the prompt's logits, then one per forward.
    stats.update(decode_steps=max(request.get("decode_steps", 0) for request in per_request),
                 forwards=engine.counters["decode_steps"], kv_bytes=engine.counters["peak_kv_bytes"])
    if "compile_seconds" in engine.decoder.stats:  # only when this call compiled a shape
        stats["compile_seconds"] = engine.decoder.stats["compile_seconds"]
    if any("generated_kv_bytes" in stats for stats in per_request):
        stats["generated_kv_bytes"] = [request.get("generated_kv_bytes", []) for request in per_request]
    return stats
