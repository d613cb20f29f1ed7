"""Score rules against hand computations on hand-built samples, and score callables through fastbon.generate.

The hand-built batch: two addition prompts, three samples each, completions over a 14-token character vocabulary.

    prompt "12+3="   sample 0 "15<eos>"  log-probs -0.5 -0.25 -0.25  sum -1.0  mean -1/3   correct
                     sample 1 "16<eos>"            -0.1 -0.1  -0.1   sum -0.3  mean -0.1   wrong
                     sample 2 "15" (no eos)        -2.0 -1.0         sum -3.0  mean -1.5   correct
    prompt "4+4="    sample 0 "8<eos>"             -0.2 -0.2         sum -0.4  mean -0.2   correct
                     sample 1 "+"                  -3.0              sum -3.0  mean -3.0   malformed (no answer)
                     sample 2 "9<eos>"             -1.0 -0.5         sum -1.5  mean -0.75  wrong
"""

import math

import pytest
import torch
from hf_models import tiny_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from fastbon import generate
from fastbon.models.arithmetic import check, extract_answer
from fastbon.scoring import Samples, check_score, compute_scores, majority, reward_model, verifier

CHARACTERS = "0123456789+="
PAD, EOS = 12, 13
TIEBREAK = 1e-6  # verifier and majority add 1e-6 * exp(mean log-prob) so equal verdicts rank by probability


class CharacterTokenizer:
    """The one tokenizer method the score rules call: ids 0-11 are characters, PAD and EOS are special, any
    larger id (from a random model's bigger vocabulary) reads as "?"."""

    def batch_decode(self, rows, skip_special_tokens=False):
        special = {PAD: "<pad>", EOS: "<eos>"}
        return ["".join(self._text(token, special, skip_special_tokens) for token in torch.as_tensor(row).tolist())
                for row in rows]

    @staticmethod
    def _text(token, special, skip_special_tokens):
        if token in special:
            return "" if skip_special_tokens else special[token]
        return CHARACTERS[token] if token < len(CHARACTERS) else "?"


def ids(text):
    return torch.tensor([CHARACTERS.index(character) for character in text])


MEANS = [[-1 / 3, -0.1, -1.5], [-0.2, -3.0, -0.75]]
SUMS = [[-1.0, -0.3, -3.0], [-0.4, -3.0, -1.5]]


@pytest.fixture
def samples():
    return Samples(
        prompts=[ids("12+3="), ids("4+4=")],
        sequences=torch.tensor([[[1, 5, EOS], [1, 6, EOS], [1, 5, PAD]],
                                [[8, EOS, PAD], [10, PAD, PAD], [9, EOS, PAD]]]),
        lengths=torch.tensor([[3, 3, 2], [2, 1, 2]]),
        token_logprobs=torch.tensor([[[-0.5, -0.25, -0.25], [-0.1, -0.1, -0.1], [-2.0, -1.0, 0.0]],
                                     [[-0.2, -0.2, 0.0], [-3.0, 0.0, 0.0], [-1.0, -0.5, 0.0]]]),
        pad_token_id=PAD)


def with_tiebreak(values):
    return torch.tensor(values, dtype=torch.float64) + TIEBREAK * torch.tensor(MEANS, dtype=torch.float64).exp()


def test_logprob_rules_match_hand_sums_and_means(samples):
    torch.testing.assert_close(compute_scores("sum_logprob", samples), torch.tensor(SUMS, dtype=torch.float64))
    torch.testing.assert_close(compute_scores("mean_logprob", samples), torch.tensor(MEANS, dtype=torch.float64))


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="score must be one of"):
        check_score("max_logprob")


def test_verifier_sees_every_sample_and_ranks_verdict_first_then_probability(samples):
    calls = []

    def check_all(prompts, texts):
        calls.append((list(prompts), list(texts)))
        return [check(prompt, text) for prompt, text in zip(prompts, texts, strict=True)]

    scores = compute_scores(verifier(check_all, CharacterTokenizer()), samples)
    assert calls == [(["12+3="] * 3 + ["4+4="] * 3, ["15", "16", "15", "8", "+", "9"])]
    torch.testing.assert_close(scores.double(), with_tiebreak([[1, 0, 1], [1, 0, 0]]), atol=1e-7, rtol=0)
    assert scores[0, 2] > scores[0, 1], "a correct but improbable sample must beat a wrong probable one"
    assert scores[0, 0] > scores[0, 2], "among correct samples the higher mean log-prob must win"
    assert scores[1, 2] > scores[1, 1], "among wrong samples the higher mean log-prob must win"


def test_verifier_tiebreak_resolves_close_mean_logprobs():
    close = Samples(prompts=[ids("1+1=")], sequences=torch.tensor([[[2, EOS], [2, EOS]]]),
                    lengths=torch.tensor([[2, 2]]), token_logprobs=torch.tensor([[[-1.1, -1.1], [-1.0, -1.0]]]),
                    pad_token_id=PAD)
    scores = compute_scores(verifier(lambda prompts, texts: [True] * len(texts), CharacterTokenizer()), close)
    assert scores[0, 1] > scores[0, 0]


@pytest.mark.parametrize(("verdicts", "message"), [
    (lambda texts: [True] * (len(texts) - 1), "one value per sample"),
    (lambda texts: [True] * (len(texts) + 1), "one value per sample"),
    (lambda texts: [float("nan")] + [1.0] * (len(texts) - 1), "NaN"),
])
def test_verifier_rejects_wrong_count_and_nan(samples, verdicts, message):
    score = verifier(lambda prompts, texts: verdicts(texts), CharacterTokenizer())
    with pytest.raises(ValueError, match=message):
        compute_scores(score, samples)


def test_majority_scores_vote_shares(samples):
    score = majority(extract_answer, CharacterTokenizer())
    scores = compute_scores(score, samples)
    # "15" has 2 of 3 votes, "16" 1 of 3; "8" and "9" one each, "+" gives no answer and no vote.
    torch.testing.assert_close(scores.double(), with_tiebreak([[2 / 3, 1 / 3, 2 / 3], [1 / 2, 0, 1 / 2]]),
                               atol=1e-7, rtol=0)
    assert scores[1, 1] < TIEBREAK
    assert scores[0, 0] > scores[0, 2] and scores[1, 0] > scores[1, 2], "equal shares rank by mean log-prob"


def test_weighted_majority_weights_votes_by_sequence_probability(samples):
    scores = compute_scores(majority(extract_answer, CharacterTokenizer(), weighted=True), samples)
    # Votes weigh exp(sum log-prob); shares are over the samples that gave an answer.
    first = [math.exp(value) for value in SUMS[0]]
    share_15 = (first[0] + first[2]) / sum(first)
    second = {"8": math.exp(SUMS[1][0]), "9": math.exp(SUMS[1][2])}
    share_8 = second["8"] / sum(second.values())
    expected = with_tiebreak([[share_15, 1 - share_15, share_15], [share_8, 0, 1 - share_8]])
    torch.testing.assert_close(scores.double(), expected, atol=1e-7, rtol=0)


def test_reward_model_callable_gets_left_padded_prompt_plus_completion(samples):
    batches = []

    def token_sum(input_ids, attention_mask):
        batches.append((input_ids.clone(), attention_mask.clone()))
        return (input_ids * attention_mask).sum(-1)

    scores = compute_scores(reward_model(token_sum, batch_size=4), samples)
    # prompt "12+3=" sums to 27, "4+4=" to 29; completions add their ids (EOS = 13 included, padding not).
    torch.testing.assert_close(scores, torch.tensor([[27 + 19, 27 + 20, 27 + 6], [29 + 21, 29 + 10, 29 + 22]],
                                                    dtype=torch.float64))
    assert [tuple(batch.shape) for batch, _ in batches] == [(4, 8), (2, 6)]
    first_ids, first_mask = batches[0]
    assert first_ids[2].tolist() == [PAD] + ids("12+3=").tolist() + [1, 5]
    assert first_mask[2].tolist() == [0] + [1] * 7
    assert first_ids[:, -1].tolist() == [EOS, EOS, 5, EOS], "every row's last position is its last token"


def test_reward_model_rejects_wrong_count(samples):
    with pytest.raises(ValueError, match="one value per sample"):
        compute_scores(reward_model(lambda input_ids, attention_mask: torch.zeros(1)), samples)


def test_reward_model_hf_classifier_matches_one_call_per_sequence(samples):
    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, num_labels=1, pad_token_id=PAD)).eval()
    with torch.no_grad():
        scores = compute_scores(reward_model(classifier, batch_size=4), samples)
        expected = torch.tensor([[classifier(torch.cat([prompt, completion])[None]).logits[0, 0].item()
                                  for completion in row]
                                 for prompt, row in zip(samples.prompts, samples.completions(), strict=True)])
    assert expected.std() > 0, "a classifier with one output everywhere would not test the pairing"
    torch.testing.assert_close(scores, expected.double(), atol=1e-5, rtol=1e-5)


PROMPTS = [torch.tensor([3, 7, 11, 5, 40]), torch.tensor([9, 2])]


def test_generate_selects_the_best_k_by_a_score_callable():
    model = tiny_model("llama")

    def position_weighted_ids(samples):
        # a score that differs between samples and depends on every generated token
        positions = torch.arange(1, samples.sequences.shape[-1] + 1)
        return (samples.sequences * positions).sum(-1).float() + 1e-3 * samples.mean_logprobs()

    result = generate(model, PROMPTS, n=6, k=3, max_new_tokens=5, seed=1, score=position_weighted_ids,
                      return_all=True)
    all_samples = Samples(prompts=PROMPTS, sequences=result.all_sequences, lengths=result.all_lengths,
                          token_logprobs=result.all_token_logprobs, pad_token_id=0)
    expected = position_weighted_ids(all_samples)
    torch.testing.assert_close(result.all_scores, expected)
    best_scores, best_indices = expected.topk(3, dim=-1)
    torch.testing.assert_close(result.scores, best_scores)
    assert torch.equal(result.indices, best_indices)


@pytest.mark.parametrize(("score", "message"), [
    (lambda samples: torch.zeros(samples.lengths.shape[0]), "shape"),
    (lambda samples: torch.zeros(samples.lengths.shape[1], samples.lengths.shape[0]), "shape"),
    (lambda samples: torch.full(samples.lengths.shape, float("nan")), "NaN"),
    (verifier(lambda prompts, texts: [True], CharacterTokenizer()), "one value per sample"),
], ids=["vector", "transposed", "nan", "verifier-count"])
def test_generate_rejects_a_bad_scorer(score, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        generate(model, PROMPTS, n=3, k=1, max_new_tokens=4, seed=0, score=score)
