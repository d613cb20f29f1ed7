"""fastbon.generate's options against Hugging Face's own code: per-prompt seeds, log-prob modes, stop strings,
repetition penalty, finish reasons, bad input."""

import pytest
import torch
from hf_models import VOCAB, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
from transformers.generation.stopping_criteria import StopStringCriteria

import fastbon
from fastbon.kv_blocks import BLOCK

TEXT = ["the stop sign stops the operator", "stopping is the topic of the operation", "a top stopper stood still"]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer with multi-character tokens ("st", "op", ...), trained here on a few lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = __import__("tokenizers").decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0])
    tokenizer.train_from_iterator(TEXT * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    assert len(wrapped) <= VOCAB
    return wrapped


def _prompts(lengths, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (length,), generator=generator) for length in lengths]


def test_per_prompt_seeds_do_not_depend_on_the_batch():
    model = tiny_model("llama")
    prompts = _prompts([6, 3, 9])
    together = fastbon.generate(model, prompts, n=4, k=4, max_new_tokens=9, seed=[11, 12, 13])
    for b, prompt in enumerate(prompts):
        alone = fastbon.generate(model, [prompt], n=4, k=4, max_new_tokens=9, seed=[11 + b])
        as_int = fastbon.generate(model, [prompt], n=4, k=4, max_new_tokens=9, seed=11 + b)
        assert torch.equal(alone.sequences[0], together.sequences[b])
        assert torch.allclose(alone.token_logprobs[0], together.token_logprobs[b], atol=1e-5)
        assert torch.equal(alone.sequences, as_int.sequences)


def test_processed_logprobs_equal_hf_log_softmax_over_temperature():
    model = tiny_model("qwen2")
    prompts = _prompts([5, 8])
    temperature = 0.7
    result = fastbon.generate(model, prompts, n=3, k=3, max_new_tokens=8, temperature=temperature, seed=2,
                              logprobs="processed", score="sum_logprob")
    for b, prompt in enumerate(prompts):
        for j in range(3):
            length = int(result.lengths[b, j])
            completion = result.sequences[b, j, :length]
            with torch.no_grad():
                logits = model(torch.cat([prompt, completion])[None]).logits[0, prompt.numel() - 1:-1]
            expected = torch.log_softmax(logits.double() / temperature, -1).gather(-1, completion[:, None])[:, 0]
            assert (result.token_logprobs[b, j, :length].double() - expected).abs().max() <= 1e-4
            assert abs(result.scores[b, j].item() - expected.sum().item()) <= 1e-3


def test_repetition_penalty_matches_hf_processor():
    model = tiny_model("llama")
    prompt = _prompts([7])[0]
    penalty = 1.8
    expected = model.generate(input_ids=prompt[None], do_sample=False, max_new_tokens=12, repetition_penalty=penalty,
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    result = fastbon.generate(model, [prompt], n=1, max_new_tokens=12, temperature=0.0, repetition_penalty=penalty,
                              logprobs="processed")
    assert torch.equal(result.sequences[0, 0], expected.sequences[0, prompt.numel():])
    hf_processed = torch.log_softmax(torch.stack(expected.scores)[:, 0].double(), -1)
    tokens = result.sequences[0, 0]
    assert (result.token_logprobs[0, 0].double() - hf_processed.gather(-1, tokens[:, None])[:, 0]).abs().max() <= 1e-4
    # Sampled rows re-scored against HF's processor applied to a fresh forward's logits.
    sampled = fastbon.generate(model, [prompt], n=4, k=4, max_new_tokens=10, temperature=0.9,
                               repetition_penalty=penalty, logprobs="processed", seed=4)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for j in range(4):
        completion = sampled.sequences[0, j]
        sequence = torch.cat([prompt, completion])
        with torch.no_grad():
            logits = model(sequence[None]).logits[0]
        for t in range(completion.numel()):
            context = sequence[None, :prompt.numel() + t]
            scores = processor(context, logits[prompt.numel() + t - 1][None].clone())
            expected_logprob = torch.log_softmax(scores.double() / 0.9, -1)[0, completion[t]]
            assert abs(sampled.token_logprobs[0, j, t].item() - expected_logprob.item()) <= 1e-4


def test_stop_strings_end_samples_where_hf_stopping_criteria_would(bpe_tokenizer):
    model = tiny_model("llama", eos_token_id=bpe_tokenizer.eos_token_id)
    prompts = [torch.tensor(bpe_tokenizer(text).input_ids) for text in ("the stop", "a top")]
    stops = ["st", "er"]
    result = fastbon.generate(model, prompts, n=8, k=8, max_new_tokens=40, temperature=1.5, seed=0,
                              stop_strings=stops, tokenizer=bpe_tokenizer)
    criteria = StopStringCriteria(bpe_tokenizer, stops)
    reasons = result.finish_reasons
    assert (reasons == fastbon.FINISH_REASONS.index("stop")).any(), "the test must see stop strings fire"
    for b in range(len(prompts)):
        for j in range(8):
            length = int(result.lengths[b, j])
            completion = result.sequences[b, j, :length]
            assert torch.all(result.sequences[b, j, length:] == 0)
            assert torch.all(result.token_logprobs[b, j, length:] == 0)
            # HF's criterion over the completion alone (the stop string must lie in the completion).
            fired = [bool(criteria(completion[None, :t + 1], None)[0]) for t in range(length)]
            reason = fastbon.FINISH_REASONS[int(reasons[b, j])]
            if reason == "stop":
                assert fired[-1] and not any(fired[:-1]), (b, j)
                assert any(stop in bpe_tokenizer.decode(completion) for stop in stops)
            else:
                assert not any(fired), (b, j, reason)
                assert reason in ("eos", "length")


def test_finish_reasons_and_growth_past_the_first_block():
    model = tiny_model("llama", eos_token_id=3)
    result = fastbon.generate(model, _prompts([4, 6]), n=6, k=6, max_new_tokens=150, temperature=1.0, seed=1)
    eos, length = fastbon.FINISH_REASONS.index("eos"), fastbon.FINISH_REASONS.index("length")
    for b in range(2):
        for j in range(6):
            size = int(result.lengths[b, j])
            if int(result.finish_reasons[b, j]) == eos:
                assert int(result.sequences[b, j, size - 1]) == 3
            else:
                assert int(result.finish_reasons[b, j]) == length and size == 150
    # The suffix KV follows the tokens generated: its peak is within 2x of the longest live sample's positions.
    config = model.config
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 4
    assert result.stats["kv_bytes"] <= (2 * 12 + 2) * BLOCK * -(-int(result.lengths.max()) // BLOCK) * per_position


def test_memory_follows_tokens_not_max_new_tokens():
    model = tiny_model("llama", eos_token_id=3)
    result = fastbon.generate(model, _prompts([5]), n=4, k=4, max_new_tokens=100_000, temperature=1.0, seed=3)
    assert int(result.lengths.max()) < 1000, "the tiny model reaches EOS early at this seed"
    config = model.config
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 4
    assert result.stats["kv_bytes"] <= (4 * 2 + 2) * BLOCK * -(-int(result.lengths.max()) // BLOCK) * per_position
    assert result.sequences.shape[-1] == result.stats["decode_steps"] < 1000


@pytest.mark.parametrize("case", ["vocab", "negative", "float_mask", "device", "logprobs", "stop_no_tokenizer",
                                  "seed_count", "seed_type", "penalty"])
def test_bad_input_is_refused_before_any_work(case):
    model = tiny_model("llama")
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, VOCAB, (2, 5))
    arguments = dict(n=2, max_new_tokens=3)
    expected = {"vocab": (ValueError, "vocabulary"), "negative": (ValueError, "vocabulary"),
                "float_mask": (TypeError, "attention_mask"), "device": (ValueError, "model is on"),
                "logprobs": (ValueError, "logprobs"), "stop_no_tokenizer": (ValueError, "tokenizer"),
                "seed_count": (ValueError, "seed"), "seed_type": (TypeError, "seed"),
                "penalty": (ValueError, "repetition_penalty")}[case]
    if case == "vocab":
        ids[1, 2] = VOCAB
    elif case == "negative":
        ids[0, 0] = -1
    elif case == "float_mask":
        arguments["attention_mask"] = torch.ones(2, 5)
    elif case == "device":
        ids = ids.to("meta")
    elif case == "logprobs":
        arguments["logprobs"] = "softmax"
    elif case == "stop_no_tokenizer":
        arguments["stop_strings"] = ["x"]
    elif case == "seed_count":
        arguments["seed"] = [1, 2, 3]
    elif case == "seed_type":
        arguments["seed"] = 1.5
    elif case == "penalty":
        arguments["repetition_penalty"] = 0.0
    with pytest.raises(expected[0], match=expected[1]):
        fastbon.generate(model, ids, **arguments)
    hook.remove()
    assert not calls
