"""How samples are ranked: score rules over finished samples, checked before they pick the best k."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

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

    def completions(self) -> list:
        """Each sample's generated ids as a list of 1-D tensors per prompt, padding removed."""
        return [[row[:length] for row, length in zip(rows, lengths.tolist(), strict=True)]
                for rows, lengths in zip(self.sequences, self.lengths, strict=True)]


def check_score(score) -> None:
    if callable(score):
        return
    if score not in SCORE_RULES:
        raise ValueError(f"score must be one of {SCORE_RULES} or a callable(Samples) -> [B, n], got {score!r}")


def compute_scores(score: str | Callable, samples: Samples) -> torch.Tensor:
    """Scores [B, n] float32 (higher is better) under ``score``; a callable's output is checked here."""
    sums = samples.token_logprobs.sum(-1, dtype=torch.float32)
    if score == "sum_logprob":
        return sums
    if score == "mean_logprob":
        return sums / samples.lengths.clamp(min=1).to(torch.float32)
    values = score(samples)
    expected = tuple(samples.lengths.shape)
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values, dtype=torch.float32)
    if tuple(values.shape) != expected:
        raise ValueError(f"the score callable must return shape {expected}, got {tuple(values.shape)}")
    values = values.to(device=samples.lengths.device, dtype=torch.float32)
    if torch.isnan(values).any():
        raise ValueError("the score callable returned NaN")
    return values
