"""Search on the KV tree: particle filtering and beam search against Hugging Face's own forward, forks that copy no
KV, reproducibility, the common prefix stored once, and bad input."""

import pytest
import torch
from hf_models import VOCAB, hf_token_logprobs, tiny_model

import fastbon
from fastbon import search
from fastbon.kv_blocks import BLOCK
from fastbon.search import check_weights, resample_parents

EOS = 5


def _prompts():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(6, VOCAB, (length,), generator=generator) for length in (7, 3)]


def even_tokens(samples):
    """A step score that can be checked by hand: -0.5 per odd token so far (padding excluded)."""
    odd = (samples.sequences % 2 == 1) & (samples.sequences != samples.pad_token_id)
    return -0.5 * odd.sum(-1).double()


def _check_against_hf(model, prompts, result):
    """Every returned sample's token log-probs equal a fresh HF forward of its full path (prompt + tokens)."""
    for b, prompt in enumerate(prompts):
        for j in range(result.all_sequences.shape[1]):
            length = int(result.all_lengths[b, j])
            expected = hf_token_logprobs(model, prompt, result.all_sequences[b, j, :length])
            torch.testing.assert_close(result.all_token_logprobs[b, j, :length], expected.float(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_particle_filter_matches_hf_and_is_reproducible(backend):
    if backend == "cpu":
        pytest.importorskip("fastbon._C")
    model = tiny_model("llama", eos_token_id=EOS)
    prompts = _prompts()
    run = dict(step_score=even_tokens, every=3, max_new_tokens=20, seed=3, return_all=True, backend=backend)
    result = search.particle_filter(model, prompts, 6, **run)
    assert 6 <= result.stats["checkpoints"] <= 12  # per prompt, until its population has finished
    _check_against_hf(model, prompts, result)
    again = search.particle_filter(model, prompts, 6, **run)
    assert torch.equal(result.all_sequences, again.all_sequences)
    assert torch.equal(result.all_token_logprobs, again.all_token_logprobs)
    other = search.particle_filter(model, prompts, 6, **{**run, "seed": 4})
    assert not torch.equal(result.all_sequences, other.all_sequences)


def test_resampling_favours_the_step_score():
    """Against plain sampling with the same seeds, particles resampled by the even-token score end with fewer odd
    tokens."""
    model = tiny_model("llama")
    prompts = _prompts()
    plain = fastbon.generate(model, prompts, n=16, k=16, max_new_tokens=24, seed=0, eos_token_id=[])
    searched = search.particle_filter(model, prompts, 16, step_score=even_tokens, every=2, max_new_tokens=24, seed=0,
                                      eos_token_id=[], k=16)
    assert searched.sequences.remainder(2).float().mean() < plain.sequences.remainder(2).float().mean() - 0.15


def test_beam_search_keeps_the_best_beams():
    model = tiny_model("llama", eos_token_id=EOS)
    prompts = _prompts()
    result = search.beam_search(model, prompts, 2, 3, step_score=even_tokens, every=4, max_new_tokens=16, seed=1,
                                return_all=True)
    _check_against_hf(model, prompts, result)
    assert result.all_sequences.shape[:2] == (2, 6)
    # The final rows are three children of each of two beams: each child shares its beam's tokens up to the last
    # checkpoint (step 12).
    for b in range(2):
        heads = result.all_sequences[b, :, :12]
        assert all(torch.equal(heads[3 * beam], heads[3 * beam + child]) for beam in range(2) for child in range(3))


def test_forks_share_full_blocks():
    """A fork's children share their parent's full KV blocks and copy only its partial last block: after each
    checkpoint the generated KV stays within one partial block per row of the tokens written."""
    model = tiny_model("llama")
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 4
    rows, every = 6, 4
    result = search.particle_filter(model, _prompts(), 6, step_score=even_tokens, every=every, max_new_tokens=24,
                                    seed=0, eos_token_id=[])
    for per_prompt in result.stats["generated_kv_bytes"]:
        assert per_prompt and all(held <= rows * BLOCK * per_token for held in per_prompt)


def test_systematic_resampling_counts():
    """Systematic resampling gives a particle of weight w floor(n w) or ceil(n w) children; multinomial is unbiased."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    for _ in range(50):
        counts = torch.bincount(resample_parents(weights, "systematic", generator)[0], minlength=8)
        assert counts.tolist() == [4, 2, 1, 1, 0, 0, 0, 0]
    draws = torch.cat([resample_parents(weights, "multinomial", generator)[0] for _ in range(2000)])
    frequencies = torch.bincount(draws, minlength=8).double() / draws.numel()
    torch.testing.assert_close(frequencies, weights.exp()[0], rtol=0, atol=0.01)


def test_bad_input_one_clear_error_each():
    model = tiny_model("llama")
    prompts = _prompts()
    run = dict(every=2, max_new_tokens=6, seed=0)
    with pytest.raises(ValueError, match=r"shape \[B, width\] = \(1, 4\), got \(2, 3\)"):
        search.particle_filter(model, prompts, 4, step_score=lambda s: torch.zeros(2, 3), **run)
    with pytest.raises(ValueError, match="NaN"):
        search.particle_filter(model, prompts, 4, step_score=lambda s: torch.full((1, 4), float("nan")), **run)
    with pytest.raises(ValueError, match="prompt 0 log-weight -inf"):  # each prompt's request scores its own
        search.particle_filter(model, prompts, 4, step_score=lambda s: torch.full((1, 4), -float("inf")), **run)
    with pytest.raises(TypeError, match="step_score must return a torch.Tensor"):
        search.particle_filter(model, prompts, 4, step_score=lambda s: [0.0] * 4, **run)
    with pytest.raises(ValueError, match="every must be >= 1"):
        search.particle_filter(model, prompts, 4, step_score=even_tokens, every=0, max_new_tokens=6)
    with pytest.raises(ValueError, match="resample must be one of"):
        search.particle_filter(model, prompts, 4, step_score=even_tokens, resample="stratified", **run)
    with pytest.raises(ValueError, match="expand must be >= 1"):
        search.beam_search(model, prompts, 2, 0, step_score=even_tokens, **run)
    # All 4096 rows of a prompt decode together: refused once its prompt is prefilled, naming the numbers.
    with pytest.raises(MemoryError, match="all 4096 sample row.*do not fit in max_memory"):
        search.beam_search(model, prompts, 64, 64, step_score=even_tokens, every=2, max_new_tokens=512,
                           max_memory="8MiB")
    assert check_weights(torch.zeros(1, 2), 1, 2).dtype == torch.float64
