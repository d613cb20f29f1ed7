"""The engine against its own oracle: the same request run alone on an idle engine (bits, not tolerances)."""

import random
import threading

import pytest
import torch
from hf_models import VOCAB, tiny_model

import fastbon
from fastbon.engine import Engine
from fastbon.kv_blocks import BLOCK
from fastbon.request import Cancelled


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, name), getattr(b, name))
               for name in ("sequences", "lengths", "token_logprobs", "scores", "indices", "finish_reasons"))


def _random_request(rng: random.Random):
    prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))]
    config = fastbon.SamplingConfig(n=rng.choice([1, 2, 3, 5]), k=1, max_new_tokens=rng.randrange(1, 12),
                                    temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 20]),
                                    top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1000),
                                    eos_token_id=rng.choice([None, [], [rng.randrange(3, VOCAB)]]),
                                    repetition_penalty=rng.choice([1.0, 1.3]),
                                    logprobs=rng.choice(["raw", "processed"]))
    return prompt, config


def test_results_do_not_depend_on_the_load():
    """8 threads submit 50 random requests each at random times to one busy engine: every result equals, bit for
    bit, the same request alone on an idle engine; none is lost or answered twice."""
    model = tiny_model("llama")
    engine = Engine(model, max_rows=24)
    rng = random.Random(0)
    plans = [[_random_request(rng) for _ in range(50)] for _ in range(8)]
    results = {}

    def client(index):
        local = random.Random(index)
        for position, (prompt, config) in enumerate(plans[index]):
            threading.Event().wait(local.random() * 0.01)
            results[(index, position)] = engine.submit(prompt, config).result(timeout=600)

    with torch.no_grad():
        threads = [threading.Thread(target=client, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    engine.close()
    assert len(results) == 400
    assert engine.stats["requests_finished"] == 400 and engine.stats["rows_active"] == 0
    alone = Engine(model, background=False)
    for (index, position), result in results.items():
        prompt, config = plans[index][position]
        assert _same(result, alone.submit(prompt, config).result()), (index, position)


def test_prefix_cache_forwards_the_shared_prompt_once_with_the_same_bits():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    system = torch.randint(3, VOCAB, (2 * BLOCK + 10,), generator=generator).tolist()
    prompts = [system + torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (3, 9, 30, 1)]
    config = fastbon.SamplingConfig(n=3, k=3, max_new_tokens=4, seed=1)
    cached = Engine(model, prefill_chunk=BLOCK, background=False)
    with torch.no_grad():
        warm = cached.submit(prompts[0], config).result()
        results = [cached.submit(prompt, config).result() for prompt in prompts[1:]]
        uncached = Engine(model, prefill_chunk=BLOCK, prefix_cache=False, background=False)
        reference = [uncached.submit(prompt, config).result() for prompt in prompts]
    assert _same(warm, reference[0])
    assert all(_same(result, expected) for result, expected in zip(results, reference[1:], strict=True))
    own_tokens = sum(len(prompt) - 2 * BLOCK for prompt in prompts[1:])
    assert cached.stats["prefill_tokens"] == len(prompts[0]) + own_tokens
    assert cached.stats["prefix_cache_hit_tokens"] == 3 * 2 * BLOCK


def test_200_requests_share_a_1024_token_system_prompt():
    """The issue's shape: 200 requests behind one 1,024-token system prompt forward it once (prefill tokens = 1,024 +
    their own tokens) and give the same bits as with the cache off."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(1)
    system = torch.randint(3, VOCAB, (4 * BLOCK,), generator=generator).tolist()
    prompts = [system + torch.randint(3, VOCAB, (1 + index % 17,), generator=generator).tolist()
               for index in range(200)]
    config = fastbon.SamplingConfig(n=2, k=1, max_new_tokens=2, seed=3)
    with torch.no_grad():
        cached = Engine(model, prefill_chunk=BLOCK, background=False)
        requests = [cached.submit(prompt, config) for prompt in prompts]
        cached.run_until(lambda: all(request.done() for request in requests))
        uncached = Engine(model, prefill_chunk=BLOCK, prefix_cache=False, background=False)
        reference = [uncached.submit(prompt, config) for prompt in prompts]
        uncached.run_until(lambda: all(request.done() for request in reference))
    assert all(_same(a.result(), b.result()) for a, b in zip(requests, reference, strict=True))
    own = sum(len(prompt) - len(system) for prompt in prompts)
    assert cached.stats["prefill_tokens"] <= len(system) + own
    assert uncached.stats["prefill_tokens"] == 200 * len(system) + own


def test_weights_updated_in_place_are_forwarded_again():
    model = tiny_model("llama")
    prompt = [3 + index % (VOCAB - 3) for index in range(BLOCK + 5)]
    config = fastbon.SamplingConfig(n=1, max_new_tokens=2, seed=0)
    engine = Engine(model, prefill_chunk=BLOCK, background=False)
    with torch.no_grad():
        engine.submit(prompt, config).result()
        engine.submit(prompt, config).result()
        assert engine.stats["prefix_cache_hit_tokens"] == BLOCK
        model.model.embed_tokens.weight.mul_(1.01)  # what an optimizer step does
        engine.submit(prompt, config).result()
    assert engine.stats["prefix_cache_hit_tokens"] == BLOCK, "KV of other weights is never served"
    assert engine.stats["prefill_tokens"] == 3 * len(prompt) - BLOCK


def test_cancel_frees_rows_and_kv():
    model = tiny_model("llama")
    engine = Engine(model, background=False, prefix_cache=False)
    config = fastbon.SamplingConfig(n=4, max_new_tokens=200, eos_token_id=[], seed=0)
    with torch.no_grad():
        request = engine.submit([5, 6, 7], config)
        for _ in range(5):
            engine.step()
        assert engine.stats["rows_active"] == 4 and engine.stats["kv_bytes"] > 0
        request.cancel()
        engine.step()
    assert engine.stats["rows_active"] == 0 and engine.stats["kv_bytes"] == 0
    assert engine.stats["requests_cancelled"] == 1
    with pytest.raises(Cancelled):
        request.result()


def test_stream_gives_the_result_tokens():
    model = tiny_model("llama")
    engine = Engine(model, background=False)
    config = fastbon.SamplingConfig(n=3, k=3, max_new_tokens=6, seed=4, return_all=True)
    with torch.no_grad():
        request = engine.submit([5, 6, 7], config)
        streamed = {index: [] for index in range(3)}
        for event in request.stream():
            streamed[event.sample].extend(event.tokens)
        result = request.result()
    for index in range(3):
        length = int(result.all_lengths[0, index])
        assert streamed[index] == result.all_sequences[0, index, :length].tolist()


def test_bad_engine_arguments_name_the_argument():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, prefill_chunk=300)
    with pytest.raises(TypeError, match="max_rows"):
        Engine(model, max_rows=1.5)
    engine = Engine(model, background=False)
    with pytest.raises(TypeError, match="config"):
        engine.submit([1, 2], dict(n=2))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([1, 10**6], fastbon.SamplingConfig())


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(monkeypatch):
    """A step that raises outside any one request's part: the requests it held get the error, none waits forever,
    and the background loop serves the next request."""
    model = tiny_model("llama")
    engine = Engine(model)
    config = fastbon.SamplingConfig(n=2, max_new_tokens=3, seed=0)
    original = Engine._admit_rows
    calls = []

    def broken(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a broken step")
        return original(self)

    monkeypatch.setattr(Engine, "_admit_rows", broken)
    first = engine.submit([5, 6, 7], config)
    with pytest.raises(RuntimeError, match="a broken step"):
        first.result(timeout=60)
    assert engine.submit([5, 6, 7], config).result(timeout=60).sequences.shape[1] == 1
    engine.close()
