"""What decides a data-set job's samples (``BatchConfig``, written to the output's manifest) and its score option."""

import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import SamplingConfig
from ..scoring import SCORE_RULES
from . import parquet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BatchConfig:
    """What decides a job's samples: a rerun into the same folder must match it (the manifest)."""

    model: str | None = None  # a local Hugging Face folder; None = the embedded default model
    n: int = 16
    k: int = 1
    return_all: bool = False  # write all n samples per prompt (ranked), not the best k
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    score: str = "mean_logprob"  # a rule, a reward-model folder, or "module:function"
    stop: tuple = field(default_factory=tuple)
    logprobs: str = "raw"
    dtype: str = "float32"
    jsonl: bool = False

    def sampling(self, score="mean_logprob") -> SamplingConfig:
        """The sampling options as the one validated ``fastbon.SamplingConfig`` (``score``: the built score)."""
        return SamplingConfig(n=self.n, k=self.k, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, stop_strings=list(self.stop) or None,
                              seed=self.seed, logprobs=self.logprobs, score=score)

    def check(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        self.sampling()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a Hugging Face model folder (no config.json)")
        check_score_option(self.score)

    def manifest(self) -> dict:
        """The configuration as written to ``_manifest.json``, with fingerprints of the model (and reward model)
        folders so a changed checkpoint under the same path is caught too."""
        from ..models import DEFAULT_MODEL_DIR

        manifest = asdict(self)
        manifest["stop"] = list(self.stop)
        manifest["model_fingerprint"] = parquet.fingerprint_folder(self.model or DEFAULT_MODEL_DIR)
        if Path(self.score).is_dir():
            manifest["score_fingerprint"] = parquet.fingerprint_folder(self.score)
        return manifest


def check_score_option(score) -> None:
    """``score`` is a rule, a reward-model folder, or an importable ``module:function``: checked before any work."""
    if not isinstance(score, str):
        raise TypeError(f"score must be a string (a rule, a reward-model folder or module:function), got "
                        f"{type(score).__name__}")
    if score in SCORE_RULES:
        return
    if Path(score).is_dir():
        if not (Path(score) / "config.json").is_file():
            raise ValueError(f"score: {score} is a folder without config.json, not a reward model")
        return
    if ":" in score:
        _score_factory(score)
        return
    raise ValueError(f"score must be one of {SCORE_RULES}, a reward-model folder or module:function, got {score!r}")


def _score_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"score: cannot import {spec!r}: {error}") from error
    if not callable(factory):
        raise TypeError(f"score: {spec} is not callable")
    return factory


def build_score(score: str, tokenizer, device, dtype):
    """What ``fastbon.generate(score=...)`` takes: a rule name; ``fastbon.scoring.reward_model`` of the
    sequence-classification folder; or ``function(tokenizer)`` for ``module:function``, which returns the score
    callable (e.g. ``fastbon.scoring.verifier(check, tokenizer)``) and runs once per worker."""
    if score in SCORE_RULES:
        return score
    from ..scoring import reward_model

    if Path(score).is_dir():
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(score, dtype=dtype).to(device).eval()
        return reward_model(model)
    built = _score_factory(score)(tokenizer)
    if not callable(built):
        raise TypeError(f"score: {score}(tokenizer) must return a score callable, got {type(built).__name__}")
    return built
