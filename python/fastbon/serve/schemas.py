"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI's fields plus fastbon's extras).

Strict and closed: a field of the wrong JSON type or one the server does not know is a 400 naming it, and a known
field the engine cannot honour is accepted only at its neutral value (``presence_penalty: 0``, ``echo: false``,
``logit_bias: {}``: what clients such as LangChain send by default), so nothing a client asks for is silently
dropped. Value ranges the engine owns (top_p's, n's against best_of's) are checked once, by ``SamplingConfig``.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_SAMPLES = 128  # n and best_of (OpenAI's cap on n); the engine still refuses what its memory budget cannot hold
MAX_TOP_LOGPROBS = 20  # OpenAI's cap on chat top_logprobs; completions' logprobs shares it (vLLM's)
MAX_STOP_STRINGS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class PruneOptions(_Strict):
    """fastbon's early pruning (``fastbon.Pruning``): every ``every`` steps keep the best ``keep`` fraction."""

    every: int = Field(16, ge=1)
    keep: float = Field(0.5, gt=0, le=1)
    min_keep: int = Field(1, ge=1)


class ParticleFilterOptions(_Strict):
    """fastbon's particle filtering (``fastbon.search``): every ``every`` tokens the samples are resampled in
    proportion to exp(step score) (the server's ``--step-score``; by default each partial sample's mean log-prob)."""

    every: int = Field(ge=1)
    resample: Literal["systematic", "multinomial"] = "systematic"


def _neutral(name: str, value, neutral) -> Any:
    if value not in neutral:
        raise ValueError(f"the engine does not implement {name}; only {neutral[0]!r} is accepted")
    return value


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    best_of: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    temperature: float = Field(1.0, ge=0)
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1)  # 0 or -1 (vLLM's "off") both mean no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = Field(None, validate_default=True)  # always a list once validated
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own logs: it changes no output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # fastbon's own
    ignore_eos: bool = False
    score: Literal["mean_logprob", "sum_logprob"] | None = None  # None: the server's --score
    prune: PruneOptions | None = None
    particle_filter: ParticleFilterOptions | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value, info):
        return _neutral(info.field_name, value, (0.0,))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("the engine does not implement logit_bias; only {} or null is accepted")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or ())
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(stop == "" for stop in stops):
            raise ValueError("a stop string must not be empty")
        return stops

    @property
    def samples(self) -> int:
        """How many samples the engine draws (best_of); ``n`` of them are returned."""
        return self.best_of or self.n


def _prompt(value):
    """str | list[str] | list[int] | list[list[int]], non-empty: OpenAI's four prompt forms."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists, "
                         "and not empty")
    if all(isinstance(item, str) for item in value):
        return value
    if all(type(item) is int for item in value):
        return value
    if all(isinstance(item, list) and item and all(type(token) is int for token in item) for item in value):
        return value
    raise ValueError("must be a string, a list of strings, a list of token ids or a list of non-empty lists of "
                     "token ids (one kind only)")


class CompletionRequest(_Sampling):
    prompt: Annotated[Any, AfterValidator(_prompt)]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("the engine does not return the prompt's log-probabilities; only false is accepted")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("insertion (a suffix after the completion) is not supported; only null is accepted")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the model's context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
