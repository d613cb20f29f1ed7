"""One model shared between threads: fastbon's calls and HF's own never see each other, and the model is exactly as
it was after every call, including one that raised mid-decode."""

import threading

import pytest
import torch
from hf_models import VOCAB, tiny_model

import fastbon


def _prompts():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (length,), generator=generator) for length in (6, 4)]


def _hf_greedy(model, prompt):
    return model.generate(input_ids=prompt[None], do_sample=False, max_new_tokens=6, pad_token_id=0)


def test_two_fastbon_threads_and_one_hf_thread_on_one_model():
    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    prompts = _prompts()
    expected = {seed: fastbon.generate(model, prompts, n=3, k=3, max_new_tokens=10, seed=seed) for seed in (1, 2)}
    expected_hf = _hf_greedy(model, prompts[0])
    results, errors = {1: [], 2: [], "hf": []}, []

    def fastbon_calls(seed):
        try:
            for _ in range(5):
                results[seed].append(fastbon.generate(model, prompts, n=3, k=3, max_new_tokens=10, seed=seed))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def hf_calls():
        try:
            for _ in range(5):
                results["hf"].append(_hf_greedy(model, prompts[0]))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=fastbon_calls, args=(1,)), threading.Thread(target=fastbon_calls, args=(2,)),
               threading.Thread(target=hf_calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for seed in (1, 2):
        assert len(results[seed]) == 5
        for result in results[seed]:
            assert torch.equal(result.sequences, expected[seed].sequences)
            assert torch.allclose(result.token_logprobs, expected[seed].token_logprobs, atol=1e-6)
    assert all(torch.equal(output, expected_hf) for output in results["hf"]) and len(results["hf"]) == 5
    assert model.config._attn_implementation == implementation


def test_model_unchanged_after_a_call_that_raised_mid_decode():
    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    prompt = _prompts()[0]
    expected_hf = _hf_greedy(model, prompt)

    class FailingTokenizer:
        """Raises at the first stop-string check, which happens after some decode steps."""

        def batch_decode(self, *args, **kwargs):
            raise RuntimeError("tokenizer failed mid-decode")

    with pytest.raises(RuntimeError, match="mid-decode"):
        fastbon.generate(model, [prompt], n=2, max_new_tokens=20, stop_strings=["x"], tokenizer=FailingTokenizer())
    assert model.config._attn_implementation == implementation
    assert torch.equal(_hf_greedy(model, prompt), expected_hf)
    assert fastbon.generate(model, [prompt], n=2, max_new_tokens=4, seed=0).sequences.shape == (1, 1, 4)
