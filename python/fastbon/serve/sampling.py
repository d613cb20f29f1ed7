"""From an OpenAI request to the engine's inputs: each prompt's token ids and one ``SamplingConfig``. Every refusal
is a 400 naming the request's field, raised before any engine work."""

import re
from dataclasses import dataclass

from .errors import APIError, bad_field
from .schemas import ChatCompletionRequest, CompletionRequest

# SamplingConfig's names for the request's fields, to name the right one when the config refuses a value.
_API_NAMES = {"n": "best_of", "k": "n", "max_new_tokens": "max_tokens", "stop_strings": "stop",
              "eos_token_id": "ignore_eos", "prune": "prune", "score": "score", "seed": "seed",
              "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
              "repetition_penalty": "repetition_penalty", "top_logprobs": "logprobs"}


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the model's id, tokenizer, vocabulary and context (positions), and the
    server's score (a rule name or a callable built once from ``--score``)."""

    name: str
    tokenizer: object
    vocab_size: int
    context_length: int | None
    score: object = "mean_logprob"
    step_score: object = None  # a particle filter's Samples -> log-weights; None: fastbon.scoring.mean_logprob_so_far

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def completion_prompts(body: CompletionRequest, served: ServedModel) -> list[list[int]]:
    """The request's prompts as token ids: strings tokenized as the model's tokenizer does by default (with its
    special tokens, e.g. ``<bos>``), ids checked against the vocabulary."""
    prompt = body.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        texts = [prompt] if isinstance(prompt, str) else prompt
        prompts = [served.tokenizer(text).input_ids for text in texts]
    else:
        prompts = [prompt] if isinstance(prompt[0], int) else prompt
    for position, ids in enumerate(prompts):
        if not ids:
            raise bad_field("prompt", f"prompt {position} has no tokens")
        if not all(0 <= token < served.vocab_size for token in ids):
            raise bad_field("prompt", f"prompt {position} holds a token id outside the vocabulary "
                                      f"[0, {served.vocab_size})")
    return prompts


def chat_prompt(body: ChatCompletionRequest, served: ServedModel) -> list[int]:
    """The conversation rendered by the tokenizer's own chat template, with the assistant's turn opened."""
    if not served.has_chat_template:
        raise bad_field("messages", f"the served model ({served.name}) has no chat template in its tokenizer; "
                                    "send the text to /v1/completions instead", code="no_chat_template")
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    try:
        rendered = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # the template's own checks (e.g. roles that must alternate) raise anything
        raise bad_field("messages", f"the chat template refused them: {error}") from error
    # The template writes the special tokens itself (e.g. <bos>): tokenizing must not add them again.
    return served.tokenizer(rendered, add_special_tokens=False).input_ids


def search_hooks(body, count: int, served: ServedModel) -> list:
    """The engine's fork hook per prompt for ``particle_filter`` (None each without it): resampling at every
    checkpoint by the step score, drawn from the request's seed (a fresh one without it)."""
    if body.particle_filter is None:
        return [None] * count
    if body.stream:
        raise bad_field("particle_filter", "samples are rebuilt from their parents at each checkpoint, so they "
                                           "cannot be streamed; use stream false")
    if body.prune is not None:
        raise bad_field("particle_filter", "give prune or particle_filter, not both")
    import torch

    from fastbon.scoring import mean_logprob_so_far
    from fastbon.search import ForkHook, resample_parents

    options = body.particle_filter

    def choose(weights, finished, generator):
        return resample_parents(weights, options.resample, generator)

    hooks = []
    for prompt in range(count):
        generator = torch.Generator()
        if body.seed is None:
            generator.seed()
        else:
            generator.manual_seed((body.seed * 1_000_003 + prompt) % 2**63)
        hooks.append(ForkHook(options.every, served.step_score or mean_logprob_so_far, choose, generator))
    return hooks


def _check_fields(body, top_logprobs: int) -> None:
    if body.best_of is not None and body.best_of < body.n:
        raise bad_field("best_of", f"must be >= n ({body.n}), got {body.best_of}")
    if body.stream and body.samples > body.n:
        raise bad_field("best_of", "best_of > n cannot be streamed: the best are known only at the end (as OpenAI)")
    if body.stream and top_logprobs:
        name = "logprobs" if isinstance(body, CompletionRequest) else "top_logprobs"
        raise bad_field(name, "top alternatives are not streamed by the engine; ask for 0 or stream false")


def max_new_tokens(body, prompts: list[list[int]], served: ServedModel) -> int:
    """The request's token limit, refused where a prompt and its completion would not fit the model's positions."""
    limit = body.max_tokens if isinstance(body, CompletionRequest) else body.token_limit
    name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    longest = max(len(ids) for ids in prompts)
    context = served.context_length
    if context is not None:
        if longest >= context:
            field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
            raise bad_field(field, f"{longest} prompt tokens leave no room in the model's context of {context}",
                            code="context_length_exceeded")
        if limit is None:
            return context - longest
        if longest + limit > context:
            raise bad_field(name, f"{longest} prompt tokens + {limit} new tokens exceed the model's context of "
                                  f"{context}", code="context_length_exceeded")
    if limit is None:
        raise bad_field(name, "required: the model does not state its context length")
    return limit


def sampling_config(body, new_tokens: int, served: ServedModel):
    """The engine's ``SamplingConfig``: the best ``n`` of ``best_of`` samples by the request's score rule (or the
    server's), with the request's sampling fields; ``ignore_eos`` runs every sample to ``max_tokens``."""
    from fastbon import Pruning, SamplingConfig

    top_logprobs = (body.logprobs or 0) if isinstance(body, CompletionRequest) else (body.top_logprobs or 0)
    _check_fields(body, top_logprobs)
    score = body.score or served.score
    prune = None
    if body.prune is not None:
        prune = Pruning(every=body.prune.every, keep=body.prune.keep, min_keep=body.prune.min_keep,
                        score=body.score or "mean_logprob")
    try:
        return SamplingConfig(n=body.samples, k=body.n, max_new_tokens=new_tokens, temperature=body.temperature,
                              top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty,
                              eos_token_id=[] if body.ignore_eos else None, stop_strings=body.stop or None,
                              seed=body.seed, score=score, prune=prune, top_logprobs=top_logprobs)
    except (TypeError, ValueError) as error:
        raise engine_error(error) from error


def engine_error(error: Exception):
    """A SamplingConfig or engine refusal as a 400 naming the request field it is about (the first config field
    its message names)."""
    for word in re.findall(r"[A-Za-z_]+", str(error)):
        if word in _API_NAMES:
            return bad_field(_API_NAMES[word], str(error))
    return APIError(400, str(error), code="invalid_value")
