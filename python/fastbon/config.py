"""``SamplingConfig``: every option of a best-of-n request, validated once, in one place.

``fastbon.generate``, the search functions, ``fastbon batch``, the CLI, the server and the framework adapters all
build one, so a bad option is refused with the same message whichever way it came in. The field names are
``fastbon.generate``'s keyword names.
"""

import math
from dataclasses import dataclass, fields

from .scoring import Pruning, check_score

LOGPROB_MODES = ("raw", "processed")
MAX_TOP_LOGPROBS = 20  # what OpenAI's API allows; each costs a top-k over the vocabulary per step


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (64-bit by default), or one TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"{name} must fit in 64 bits, got {value}")
    return value


def check_number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or (low_open and value <= low) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def _eos_ids(value):
    """None (the model's own), or a tuple of token ids (empty: no EOS, samples run to max_new_tokens)."""
    if value is None:
        return None
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {value!r}")
    return tuple(ids)


def _stop_strings(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"stop_strings must be a non-empty list of strings, got {value!r}")
    for string in value:
        if not isinstance(string, str) or not string:
            raise ValueError(f"stop_strings must hold non-empty strings, got {string!r}")
    return tuple(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How one prompt is sampled, scored and selected.

    n samples are drawn; the best k (1 <= k <= n) by ``score`` are returned (all n too with ``return_all``).
    temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are off. ``eos_token_id``: None
    takes the model's, ``[]`` ignores EOS. ``seed``: an int makes the request reproducible: its tokens and
    log-probs depend only on the prompt, this config and the seed, never on what else the engine runs.
    ``logprobs``: "raw" (log_softmax of the model's logits) or "processed" (after temperature and the repetition
    penalty, TRL's and vLLM's sense); scores use the same. ``top_logprobs``: also record that many most probable
    tokens (raw log-probabilities) at every position. ``prune``: a ``fastbon.Pruning``.
    """

    n: int = 16
    k: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: object = None
    stop_strings: object = None
    seed: int | None = None
    logprobs: str = "raw"
    score: object = "mean_logprob"
    prune: Pruning | None = None
    return_all: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        check_int("n", self.n, 1)
        check_int("k", self.k, 1)
        if self.k > self.n:
            raise ValueError(f"k must be <= n, got k={self.k} > n={self.n}")
        check_int("max_new_tokens", self.max_new_tokens, 1)
        object.__setattr__(self, "temperature", check_number("temperature", self.temperature, 0.0, math.inf))
        check_int("top_k", self.top_k, 0, 2**31 - 1)
        object.__setattr__(self, "top_p", check_number("top_p", self.top_p, 0.0, 1.0, low_open=True))
        object.__setattr__(self, "min_p", check_number("min_p", self.min_p, 0.0, 1.0))
        if isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, (int, float)) or not (
                0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty must be a positive finite number, got {self.repetition_penalty!r}")
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        object.__setattr__(self, "eos_token_id", _eos_ids(self.eos_token_id))
        object.__setattr__(self, "stop_strings", _stop_strings(self.stop_strings))
        if self.seed is not None:
            check_int("seed", self.seed)
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"logprobs must be one of {LOGPROB_MODES}, got {self.logprobs!r}")
        check_score(self.score)
        if self.prune is not None:
            if not isinstance(self.prune, Pruning):
                raise TypeError(f"prune must be a fastbon.Pruning or None, got {type(self.prune).__name__}")
            self.prune.check()
        if not isinstance(self.return_all, bool):
            raise TypeError(f"return_all must be a bool, got {type(self.return_all).__name__}")
        check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)

    def replace(self, **changes) -> "SamplingConfig":
        """A copy with ``changes`` applied (and validated)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingConfig(**values)


__all__ = ["LOGPROB_MODES", "MAX_TOP_LOGPROBS", "SamplingConfig", "check_int", "check_number"]
