"""max_memory: waves of rows that share one prefill, and rows preempted as the suffix grows, give the single-wave
result; a call that cannot fit is refused with the numbers before the prefill."""

import pytest
import torch
from hf_models import VOCAB, tiny_model

import fastbon
from fastbon.kv_blocks import BLOCK
from fastbon.memory import call_bytes, parse_budget


def _prompts():
    generator = torch.Generator().manual_seed(9)
    return [torch.randint(1, VOCAB, (length,), generator=generator) for length in (7, 12)]


def _budget_for_rows(model, prompts, max_new_tokens, rows):
    estimate = call_bytes(model, [prompt.numel() for prompt in prompts], max_new_tokens)
    return estimate["prefix"] + estimate["prefill"] + rows * estimate["per_row"] + estimate["per_row"] // 2


def test_preempted_rows_give_the_unbounded_result():
    """A budget of a few KV blocks: rows wait for blocks and the newest are preempted as they grow; every sample
    still equals, bit for bit, the run without a budget, and the prompts are prefilled once."""
    model = tiny_model("llama")
    prompts = _prompts()
    settings = dict(n=6, k=6, max_new_tokens=300, seed=3, return_all=True, eos_token_id=[])
    free = fastbon.generate(model, prompts, **settings)
    engine_blocks = 12
    block_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * BLOCK * (
        model.config.hidden_size // model.config.num_attention_heads) * 4
    budget = call_bytes(model, [12], 1)["prefill"] + call_bytes(model, [12], 1)["prefix"] + engine_blocks * block_bytes
    tight = fastbon.generate(model, prompts, max_memory=budget, **settings)
    assert tight.stats["preempted"] > 0
    assert tight.stats["prefill_tokens"] == free.stats["prefill_tokens"] == sum(p.numel() for p in prompts)
    assert torch.equal(tight.all_sequences, free.all_sequences)
    assert torch.equal(tight.all_token_logprobs, free.all_token_logprobs)


def test_a_call_that_cannot_fit_is_refused():
    model = tiny_model("llama")
    with pytest.raises(MemoryError, match="max_memory"):
        fastbon.generate(model, _prompts(), n=4, max_new_tokens=50, max_memory=4096)


@pytest.mark.parametrize("value, expected", [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), (4096, 4096),
                                             ("1.5 GiB", int(1.5 * 2**30)), (None, None)])
def test_budget_sizes(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", ["lots", -5, 0, 1.5, True, "12 parsecs"])
def test_bad_budgets_are_refused(value):
    with pytest.raises(ValueError, match="max_memory"):
        fastbon.generate(tiny_model("llama"), _prompts(), n=2, max_new_tokens=2, max_memory=value)
