"""The HF drop-in (model.generate(..., custom_generate=fastbon.integrations.transformers.generate) and
pipeline("text-generation")):
HF's layout, every setting honoured exactly (greedy against HF token for token, sampled draws re-scored against
HF's own processors) or refused by name."""

import pytest
import torch
from hf_models import tiny_model
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MaxTimeCriteria,
    PreTrainedTokenizerFast,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextStreamer,
    pipeline,
)

import fastbon
from fastbon.integrations.transformers import generate as DROP_IN
from fastbon.models import load_default_model


@pytest.fixture(scope="module")
def addition():
    return load_default_model()


def _inputs(tokenizer, texts=("12+3=", "7+85=", "401+9=")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def test_layout_and_ranking(addition):
    """[B·n, L+T] with T the longest completion, prompts repeated, each prompt's samples best first, pad after
    EOS: exactly fastbon.generate's k = n samples."""
    model, tokenizer = addition
    inputs, n = _inputs(tokenizer), 4
    out = model.generate(**inputs, custom_generate=DROP_IN, num_return_sequences=n, do_sample=True, top_k=0,
                         max_new_tokens=8, fastbon_seed=4)
    direct = fastbon.generate(model, inputs["input_ids"], attention_mask=inputs["attention_mask"], n=n, k=n,
                              max_new_tokens=8, top_k=0, seed=4)
    width = int(direct.lengths.max())
    prompt_width = inputs["input_ids"].shape[1]
    assert out.shape == (3 * n, prompt_width + width) and width < 8, "trimmed to the longest completion"
    assert torch.equal(out[:, :prompt_width], inputs["input_ids"].repeat_interleave(n, 0))
    expected = direct.sequences[..., :width].reshape(3 * n, width)
    past_end = torch.arange(width) >= direct.lengths.reshape(-1, 1)
    assert torch.equal(out[:, prompt_width:], expected.masked_fill(past_end, tokenizer.pad_token_id))
    assert torch.all(direct.scores[:, :-1] >= direct.scores[:, 1:]), "best first"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_with_repetition_penalty_equals_hf(family):
    model = tiny_model(family)
    ids = torch.tensor([[0, 5, 6, 7, 5], [9, 3, 3, 8, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    settings = dict(input_ids=ids, attention_mask=mask, do_sample=False, repetition_penalty=1.3, max_new_tokens=9,
                    pad_token_id=0)
    assert torch.equal(model.generate(**settings, custom_generate=DROP_IN), model.generate(**settings))


def _character_tokenizer():
    """A 97-token BPE tokenizer (tiny_model's vocabulary): specials, characters, and two-character merges, so a
    stop string can start inside a token. (HF's stop-string matcher needs letters in the vocabulary, which the
    addition model's tokenizer lacks.)"""
    from tokenizers import Tokenizer, decoders, models

    characters = list("abcdefghijklmnopqrstuvwxyz0123456789+= ")
    merges = [(first, second) for first in "abcde" for second in "abcdefghijk"]
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<bos>", *characters,
                                                         *(first + second for first, second in merges)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def test_stop_strings_equal_hf():
    """Stop strings that start inside a token (matched across token boundaries, the completing token kept whole),
    against HF's StopStringCriteria."""
    model, tokenizer = tiny_model("llama"), _character_tokenizer()
    assert len(tokenizer) == model.config.vocab_size
    prompts = tokenizer(["abc+12=", "de=9", "hello"], return_tensors="pt", padding=True, padding_side="left")
    free = model.generate(**prompts, do_sample=False, max_new_tokens=10, pad_token_id=0)
    width = prompts["input_ids"].shape[1]
    pieces = tokenizer.convert_ids_to_tokens(free[0, width:].tolist())
    split = next(index for index, piece in enumerate(pieces[:-1]) if len(piece) == 2)
    stops = [pieces[split][1] + pieces[split + 1][0], "zzz"]  # starts inside a two-character token
    settings = dict(do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=1)
    expected = model.generate(**prompts, stop_strings=stops, tokenizer=tokenizer, **settings)
    out = model.generate(**prompts, custom_generate=DROP_IN, fastbon_stop_strings=stops, fastbon_tokenizer=tokenizer,
                         **settings)
    assert torch.equal(out, expected)
    first = out[0, width:].tolist()
    stopped_at = split + 2  # the token completing the stop string, kept whole; padding after it
    assert stops[0] in tokenizer.decode(first[:stopped_at]) and all(token == 0 for token in first[stopped_at:])
    with pytest.raises(ValueError, match="tokenizer"):  # transformers keeps tokenizer= from custom_generate
        model.generate(**prompts, custom_generate=DROP_IN, stop_strings=stops, tokenizer=tokenizer, **settings)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**prompts, custom_generate=DROP_IN, fastbon_stop_strings=stops, **settings)


def test_sampled_repetition_penalty_rescored_against_hf(addition):
    """The drop-in passes temperature / repetition_penalty / top-k through (the same draws as fastbon.generate),
    and each sampled token's processed log-prob equals HF's own RepetitionPenalty + Temperature processors."""
    model, tokenizer = addition
    inputs, n = _inputs(tokenizer), 3
    settings = dict(temperature=0.7, top_k=8, repetition_penalty=1.3, max_new_tokens=8)
    out = model.generate(**inputs, custom_generate=DROP_IN, num_return_sequences=n, do_sample=True,
                         fastbon_seed=2, **settings)
    direct = fastbon.generate(model, inputs["input_ids"], attention_mask=inputs["attention_mask"], n=n, k=n, seed=2,
                              logprobs="processed", **settings)
    width = out.shape[1] - inputs["input_ids"].shape[1]
    assert torch.equal(out[:, -width:], direct.sequences[..., :width].reshape(3 * n, width).masked_fill(
        torch.arange(width) >= direct.lengths.reshape(-1, 1), tokenizer.pad_token_id))
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7)])
    error = 0.0
    for b in range(3):
        prompt = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        for j in range(n):
            completion = direct.sequences[b, j, :int(direct.lengths[b, j])]
            sequence = torch.cat([prompt, completion])
            with torch.no_grad():
                logits = model(sequence[None]).logits[0].double()
            for t, token in enumerate(completion.tolist()):
                position = prompt.numel() + t
                processed = processors(sequence[None, :position], logits[position - 1][None].clone())
                expected = torch.log_softmax(processed, dim=-1)[0, token].item()
                error = max(error, abs(direct.token_logprobs[b, j, t].item() - expected))
    assert error <= 1e-4


def test_pipeline_returns_n_texts_best_first(addition):
    model, tokenizer = addition
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["12+3=", "7+85="]
    outputs = generator(prompts, custom_generate=DROP_IN, num_return_sequences=4, do_sample=True, max_new_tokens=6,
                        fastbon_seed=3)
    assert [len(texts) for texts in outputs] == [4, 4]
    for prompt, texts in zip(prompts, outputs, strict=True):  # the pipeline runs one prompt per generate call
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        direct = fastbon.generate(model, ids, n=4, k=4, max_new_tokens=6, temperature=0.7, top_k=50, seed=3)
        expected = [prompt + tokenizer.decode(sequence[:length], skip_special_tokens=True)
                    for sequence, length in zip(direct.sequences[0], direct.lengths[0].tolist(), strict=True)]
        assert [text["generated_text"] for text in texts] == expected, "pipeline defaults (T 0.7, top-k 50) honoured"
    greedy = dict(do_sample=False, max_new_tokens=6)
    assert generator(prompts, custom_generate=DROP_IN, **greedy) == generator(prompts, **greedy)


class _AddOne(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores + 1


@pytest.mark.parametrize("change, name", [
    (dict(num_beams=2), "num_beams"), (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
    (dict(bad_words_ids=[[3]]), "bad_words_ids"), (dict(min_new_tokens=2), "min_new_tokens"),
    (dict(do_sample=True, typical_p=0.5), "typical_p"), (dict(output_scores=True), "output_scores"),
    (dict(return_dict_in_generate=True), "return_dict_in_generate"), (dict(max_time=5.0), "max_time"),
    (dict(logits_processor=LogitsProcessorList([_AddOne()])), "_AddOne"),
    (dict(do_sample=True, logits_processor=LogitsProcessorList([TemperatureLogitsWarper(0.5)])),
     "TemperatureLogitsWarper"),
    (dict(stopping_criteria=StoppingCriteriaList([MaxTimeCriteria(100.0)])), "MaxTimeCriteria"),
    (dict(prefix_allowed_tokens_fn=lambda batch, ids: [3]), "prefix_allowed_tokens_fn"),
    (dict(token_type_ids=torch.zeros(1, 3, dtype=torch.int64)), "token_type_ids"),
])
def test_unhonoured_settings_are_refused_by_name(addition, change, name):
    model, tokenizer = addition
    inputs = _inputs(tokenizer, ("12+3=",))
    with pytest.raises(ValueError, match=name):
        model.generate(**inputs, custom_generate=DROP_IN, max_new_tokens=4, **change)


class _Recorder(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.puts = 0

    def put(self, value):
        self.puts += 1


def test_what_transformers_keeps_from_the_entry(addition):
    """transformers (5.x) hands a custom_generate callable neither streamer nor assistant_model (docs/frameworks.md):
    the streamer gets the prompt only, an assistant changes no token (greedy here) and HF itself refuses it with
    n > 1. Should a transformers pass them on, the entry refuses them by name."""
    model, tokenizer = addition
    inputs = _inputs(tokenizer, ("12+3=",))
    plain = model.generate(**inputs, custom_generate=DROP_IN, max_new_tokens=4)
    streamer = _Recorder(tokenizer)
    assert torch.equal(model.generate(**inputs, custom_generate=DROP_IN, max_new_tokens=4, streamer=streamer), plain)
    assert streamer.puts == 1, "the prompt, put by transformers before the entry runs"
    assert torch.equal(model.generate(**inputs, custom_generate=DROP_IN, max_new_tokens=4, assistant_model=model),
                       plain)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**inputs, custom_generate=DROP_IN, max_new_tokens=4, assistant_model=model, do_sample=True,
                       num_return_sequences=2)
    config = model.generation_config
    for name, value in (("streamer", streamer), ("assistant_model", model)):
        with pytest.raises(ValueError, match=name):
            DROP_IN(model, inputs["input_ids"], generation_config=config, **{name: value})


def test_bad_inputs(addition):
    model, tokenizer = addition
    ids = torch.tensor([tokenizer("12+3=")["input_ids"]])
    with pytest.raises(ValueError, match="logprobs"):
        fastbon.generate(model, ids, logprobs="softmax")
    with pytest.raises(ValueError, match="tokenizer"):
        fastbon.generate(model, ids, stop_strings=["5"])
    with pytest.raises(TypeError, match="generation_config"):
        DROP_IN(model, ids)
