"""max_memory: waves of rows that share one prefill, and rows preempted as the suffix grows, give the single-wave
result; a call that cannot fit is refused with the numbers before the prefill."""

import pytest
import torch
from hf_models import VOCAB, tiny_model

import fastbon
from fastbon.cache import SUFFIX_BLOCK
from fastbon.memory import call_bytes, parse_budget


def _prompts():
    generator = torch.Generator().manual_seed(9)
    return [torch.randint(1, VOCAB, (length,), generator=generator) for length in (7, 12)]


def _budget_for_rows(model, prompts, max_new_tokens, rows):
    estimate = call_bytes(model, [prompt.numel() for prompt in prompts], max_new_tokens)
    return estimate["prefix"] + estimate["prefill"] + rows * estimate["per_row"] + estimate["per_row"] // 2


def test_waves_equal_one_wave_and_share_the_prefill():
    model = tiny_model("llama", eos_token_id=5)
    prompts = _prompts()
    settings = dict(n=8, k=3, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=[4, 5], return_all=True)
    single = fastbon.generate(model, prompts, **settings)
    embedded = []
    hook = model.model.embed_tokens.register_forward_hook(lambda module, args, out: embedded.append(args[0].shape))
    waves = fastbon.generate(model, prompts, max_memory=_budget_for_rows(model, prompts, 20, 3), **settings)
    hook.remove()
    assert single.stats["waves"] == 1 and waves.stats["waves"] == 6  # 16 rows, 3 per wave
    prefill_rows = sum(shape[0] for shape in embedded if shape[1] > 1)
    assert prefill_rows == len(prompts), "every wave reads the same prefill"
    assert torch.equal(waves.all_sequences, single.all_sequences)
    assert torch.equal(waves.all_lengths, single.all_lengths)
    assert torch.equal(waves.all_finish_reasons, single.all_finish_reasons)
    assert torch.allclose(waves.all_token_logprobs, single.all_token_logprobs, atol=1e-5)
    assert torch.equal(waves.indices, single.indices)


def test_waves_of_any_width_give_the_bits_of_one_wave():
    """80 rows in one wave, against waves of 32, 32 and 16: every product runs the fixed-order kernel whatever the
    batch's width (torch's BLAS rounds narrow batches differently), so the log-probs match bit for bit."""
    model = tiny_model("llama")
    prompts = _prompts()
    settings = dict(n=40, k=40, max_new_tokens=12, top_p=0.9, seed=[1, 2], return_all=True)
    single = fastbon.generate(model, prompts, **settings)
    waves = fastbon.generate(model, prompts, max_memory=_budget_for_rows(model, prompts, 12, 40), **settings)
    assert single.stats["waves"] == 1 and waves.stats["waves"] == 3  # 40 rows fit: waves of whole 32s
    assert torch.equal(waves.all_sequences, single.all_sequences)
    assert torch.equal(waves.all_token_logprobs, single.all_token_logprobs)


def test_rows_preempted_as_the_suffix_grows_give_the_one_wave_result():
    """Rows are admitted by what they hold now (the first suffix block); when the suffix doubles past the budget the
    newest samples are preempted and decoded again from the prompt in a later wave, with the same tokens."""
    model = tiny_model("llama", eos_token_id=5)
    prompts = _prompts()
    settings = dict(n=8, k=3, max_new_tokens=150, temperature=1.0, top_p=0.9, seed=[4, 5], return_all=True)
    single = fastbon.generate(model, prompts, **settings)
    estimate = call_bytes(model, [prompt.numel() for prompt in prompts], 150)
    fixed = estimate["prefix"] + estimate["prefill"]
    budget = fixed + 6 * (SUFFIX_BLOCK * estimate["per_token"] + estimate["per_row_fixed"])
    preempting = fastbon.generate(model, prompts, max_memory=budget, **settings)
    assert single.stats["preempted"] == 0 and preempting.stats["preempted"] > 0
    assert preempting.stats["waves"] >= 16 // 6 + 1
    # What the rows held never passed the budget's room for them.
    assert preempting.stats["suffix_kv_bytes"] <= budget - fixed
    assert torch.equal(preempting.all_sequences, single.all_sequences)
    assert torch.equal(preempting.all_lengths, single.all_lengths)
    assert torch.equal(preempting.all_finish_reasons, single.all_finish_reasons)
    assert torch.allclose(preempting.all_token_logprobs, single.all_token_logprobs, atol=1e-5)
    assert torch.equal(preempting.indices, single.indices)


def test_a_call_that_cannot_fit_is_refused_before_the_prefill():
    model = tiny_model("llama")
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    prompts = _prompts()
    budget = _budget_for_rows(model, prompts, 50, 0) - call_bytes(model, [7, 12], 50)["per_row"]
    with pytest.raises(MemoryError, match=r"max_memory=.* MiB.*need .* MiB.*up to .* MiB"):
        fastbon.generate(model, prompts, n=4, max_new_tokens=50, max_memory=budget)
    with pytest.raises(MemoryError, match="pruning"):
        fastbon.generate(model, prompts, n=4, max_new_tokens=50, prune=fastbon.Pruning(every=4),
                         max_memory=_budget_for_rows(model, prompts, 50, 2))
    hook.remove()
    assert not calls


@pytest.mark.parametrize("value, expected", [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), (4096, 4096),
                                             ("1.5 GiB", int(1.5 * 2**30)), (None, None)])
def test_budget_sizes(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", ["lots", -5, 0, 1.5, True, "12 parsecs"])
def test_bad_budgets_are_refused(value):
    with pytest.raises(ValueError, match="max_memory"):
        fastbon.generate(tiny_model("llama"), _prompts(), n=2, max_new_tokens=2, max_memory=value)


def test_a_finished_cache_is_freed_without_the_cycle_collector():
    """Waves rely on it: a wave's cache (and its suffix buffers) must be freed when its run is dropped, before the
    next wave allocates, not whenever Python's cycle collector next runs."""
    import gc
    import weakref

    from fastbon.cache import PrefixLevel, SharedPrefixCache

    keys = torch.zeros((1, 2, 5, 8))
    level = PrefixLevel([keys, keys], [keys, keys], torch.tensor([5], dtype=torch.int32), torch.zeros(1).long())
    cache = SharedPrefixCache([level], torch.zeros(4, dtype=torch.int64), max_new_tokens=16)
    cache.fork(torch.tensor([0, 0, 1, 3]))
    alive = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert alive() is None, "the cache is held by a reference cycle"
    finally:
        gc.enable()
