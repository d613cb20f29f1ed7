"""How samples are ranked: score rules over finished samples, checked before they pick the best k.

Built-in rules are "mean_logprob" and "sum_logprob"; ``verifier``, ``reward_model`` and ``majority`` build
callables for ``fastbon.generate(score=...)`` from a checker, a reward model, or an answer extractor.
"""

import math
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .prompts import left_pad

SCORE_RULES = ("mean_logprob", "sum_logprob")


@dataclass
class Samples:
    """All n finished samples of each of B prompts, as a score callable receives them.

    prompts: B prompt token-id tensors (1-D, no padding); sequences [B, n, T] generated ids padded with
    ``pad_token_id``; lengths [B, n] (an EOS, when generated, is counted and kept); token_logprobs [B, n, T]
    raw model log-probabilities, 0 on padding.
    """

    prompts: list
    sequences: torch.Tensor
    lengths: torch.Tensor
    token_logprobs: torch.Tensor
    pad_token_id: int
    sample_ids: torch.Tensor | None = None  # [B, m]: which of the n samples each row is, while some are pruned

    def completions(self) -> list:
        """Each sample's generated ids as a list of 1-D tensors per prompt, padding removed."""
        return [[row[:length] for row, length in zip(rows, lengths.tolist(), strict=True)]
                for rows, lengths in zip(self.sequences, self.lengths, strict=True)]


    def mean_logprobs(self) -> torch.Tensor:
        """Mean raw log-probability per sample [B, n] (float64)."""
        return self.token_logprobs.sum(-1, dtype=torch.float64) / self.lengths.clamp(min=1).to(torch.float64)

    def texts(self, tokenizer) -> list:
        """Each sample's completion decoded without special tokens: B lists of n strings."""
        return [tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in self.completions()]

    def prompt_texts(self, tokenizer) -> list:
        return tokenizer.batch_decode(self.prompts, skip_special_tokens=True)


@dataclass(frozen=True)
class Pruning:
    """Early pruning (speculative rejection, Sun et al. 2024) for ``fastbon.generate(prune=...)``.

    After every ``every`` decode steps, each prompt keeps the best ``keep`` fraction (at least ``min_keep``) of
    its samples not pruned yet (finished ones included: they left the batch but still compete), ranked by
    ``score`` on the partial samples ("mean_logprob", "sum_logprob" or a callable on ``Samples``, whose
    ``sample_ids`` say which of the n each row is); the others are pruned and leave the batch.
    """

    every: int = 16
    keep: float = 0.5
    min_keep: int = 1
    score: str | Callable = "mean_logprob"

    def check(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Pruning.every must be an int >= 1, got {self.every!r}")
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"Pruning.keep must lie in (0, 1], got {self.keep!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ValueError(f"Pruning.min_keep must be an int >= 1, got {self.min_keep!r}")
        check_score(self.score)


def check_score(score) -> None:
    if callable(score):
        return
    if score not in SCORE_RULES:
        raise ValueError(f"score must be one of {SCORE_RULES} or a callable(Samples) -> [B, n], got {score!r}")


def compute_scores(score: str | Callable, samples: Samples) -> torch.Tensor:
    """Scores [B, n] float64 (higher is better) under ``score``; a callable's output is checked here.

    float64, so a tie-break below 1e-6 survives next to a score near 1."""
    if score == "sum_logprob":
        return samples.token_logprobs.sum(-1, dtype=torch.float64)
    if score == "mean_logprob":
        return samples.mean_logprobs()
    values = score(samples)
    expected = tuple(samples.lengths.shape)
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values, dtype=torch.float64)
    if tuple(values.shape) != expected:
        raise ValueError(f"the score callable must return shape {expected}, got {tuple(values.shape)}")
    values = values.to(device=samples.lengths.device, dtype=torch.float64)
    if torch.isnan(values).any():
        raise ValueError("the score callable returned NaN")
    return values


def _with_logprob_tiebreak(values: torch.Tensor, samples: Samples) -> torch.Tensor:
    """``values`` plus a tie-break below 1e-6 that prefers the more probable sample (exp of the mean
    log-probability lies in (0, 1]), so equal verdicts or votes rank by the model's own confidence."""
    return values.to(torch.float64) + 1e-6 * torch.exp(samples.mean_logprobs())


def verifier(check: Callable, tokenizer) -> Callable:
    """A score from a checker on decoded texts: the "compiler or unit test as oracle".

    ``check(prompt_texts, completion_texts)`` gets two lists of equal length (every sample of every prompt,
    batched) and returns one bool or float per sample; higher is better, ties go to the more probable sample.
    """

    def score(samples: Samples) -> torch.Tensor:
        prompts, texts = samples.prompt_texts(tokenizer), samples.texts(tokenizer)
        flat_prompts = [prompt for prompt, row in zip(prompts, texts, strict=True) for _ in row]
        flat_texts = [text for row in texts for text in row]
        verdicts = list(check(flat_prompts, flat_texts))
        if len(verdicts) != len(flat_texts):
            raise ValueError(f"the verifier must return one value per sample ({len(flat_texts)}), got {len(verdicts)}")
        values = torch.tensor([float(v) for v in verdicts], dtype=torch.float64).view(samples.lengths.shape)
        if not torch.isfinite(values).all():
            raise ValueError("the verifier returned NaN or infinite values")
        return _with_logprob_tiebreak(values.to(samples.lengths.device), samples)

    return score


def reward_model(model, batch_size: int = 32) -> Callable:
    """A score from a reward model run on the device in batches over prompt + completion ids.

    ``model``: a Hugging Face sequence-classification model sharing the generator's tokenizer (its first logit
    is the reward), or any callable taking (input_ids [R, L], attention_mask [R, L]) and returning [R] rewards.
    """

    def rewards(input_ids, attention_mask):
        if hasattr(model, "config") and hasattr(model, "forward"):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        return model(input_ids, attention_mask)

    def score(samples: Samples) -> torch.Tensor:
        sequences = [torch.cat([prompt.to(completion.device), completion])
                     for prompt, row in zip(samples.prompts, samples.completions(), strict=True) for completion in row]
        device = samples.sequences.device
        values = []
        for start in range(0, len(sequences), batch_size):
            ids, mask = left_pad(sequences[start:start + batch_size], samples.pad_token_id, device)
            values.append(torch.as_tensor(rewards(ids, mask)).reshape(-1).float())
        values = torch.cat(values)
        if values.numel() != len(sequences):
            raise ValueError(f"the reward model must return one value per sample ({len(sequences)}), "
                             f"got {values.numel()}")
        return values.view(samples.lengths.shape)

    return score


def majority(extract: Callable, tokenizer, weighted: bool = False) -> Callable:
    """Self-consistency: each sample scores the share of its prompt's votes that its answer got.

    ``extract(completion_text)`` returns the answer (hashable) or None (no vote, score 0). With ``weighted``,
    a vote counts the sample's probability, exp(sum of log-probs), normalised over the prompt's samples.
    Ties go to the more probable sample.
    """

    def score(samples: Samples) -> torch.Tensor:
        texts = samples.texts(tokenizer)
        weights = torch.softmax(samples.token_logprobs.sum(-1, dtype=torch.float64), dim=-1) if weighted else (
            torch.ones(samples.lengths.shape, dtype=torch.float64))
        values = torch.zeros(samples.lengths.shape, dtype=torch.float64)
        for prompt, row in enumerate(texts):
            answers = [extract(text) for text in row]
            votes = Counter()
            for answer, weight in zip(answers, weights[prompt].tolist(), strict=True):
                if answer is not None:
                    votes[answer] += weight
            total = sum(votes.values())
            for j, answer in enumerate(answers):
                if answer is not None and total > 0 and math.isfinite(total):
                    values[prompt, j] = votes[answer] / total
        return _with_logprob_tiebreak(values.to(samples.lengths.device), samples)

    return score


def step_checker(steps_correct: Callable, tokenizer, wrong_step_logweight: float = math.log(1e-3)) -> Callable:
    """Log-weights [B, n] for search (particle filtering, beam search, pruning) from a step-by-step checker.

    ``steps_correct(prompt_text, completion_text)`` judges the steps a partial completion has finished so far
    and returns ``(steps judged, steps right, ...)`` — e.g. :func:`fastbon.models.chain.steps_correct`, a
    calculator on ``a+b=c`` lines. Texts keep their special tokens, so a checker can tell a sample that ended
    (``<eos>``) from one still being written. Each wrong step adds ``wrong_step_logweight``: finite, because a
    search whose particles all weigh -inf has nothing to resample from; 0 when every step so far is right.
    """
    if not isinstance(wrong_step_logweight, (int, float)) or not -math.inf < wrong_step_logweight < 0:
        raise ValueError(f"wrong_step_logweight must be a finite negative number, got {wrong_step_logweight!r}")

    def score(samples: Samples) -> torch.Tensor:
        # Search calls this at every checkpoint on every particle: plain lists and one batched decode, not a
        # tensor write per sample (those cost 5x the checking itself).
        prompts = tokenizer.batch_decode(samples.prompts, skip_special_tokens=True)
        width = samples.lengths.shape[1]
        rows = [row[:length] for rows, lengths in zip(samples.sequences.tolist(), samples.lengths.tolist(), strict=True)
                for row, length in zip(rows, lengths, strict=True)]
        texts = decode_keeping_special_tokens(tokenizer, rows)
        wrong = [operator.sub(*steps_correct(prompts[index // width], text)[:2]) for index, text in enumerate(texts)]
        values = torch.tensor(wrong, dtype=torch.float64).view(samples.lengths.shape) * wrong_step_logweight
        return values.to(samples.lengths.device)

    return score


def decode_keeping_special_tokens(tokenizer, rows: list) -> list:
    """``tokenizer.batch_decode(rows, skip_special_tokens=False)``, by the Rust batch decoder where that gives the
    same text (a fast tokenizer without clean-up): 5x faster than batch_decode's per-row Python."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend.decode_batch(rows, skip_special_tokens=False)
    return tokenizer.batch_decode(rows, skip_special_tokens=False)


def mean_logprob_so_far(samples: Samples) -> torch.Tensor:
    """The model's own step score, no checker: each partial sample's mean log-probability so far, [B, n].

    The checker-free baseline for search: a log-weight that prefers the particles the model is surest of."""
    return samples.mean_logprobs()
