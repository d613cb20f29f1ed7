"""From the engine's results and stream events to OpenAI's response bodies and stream chunks (text, finish reasons,
log-probs). Text is cut before the first stop string, as OpenAI returns it; a stream's pieces join to exactly the
text the same request answers unstreamed."""

import time
import uuid
from dataclasses import dataclass

from fastbon import FINISH_REASONS

# The engine's finish reasons in OpenAI's words: EOS and a stop string are both "stop". "pruned" has no OpenAI
# name; it appears only where the request asked for pruning (and k exceeded the samples that survived it).
_FINISH = {"length": "length", "eos": "stop", "stop": "stop", "pruned": "pruned"}


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) the earliest stop string in it."""
    ends = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return text[:min(ends)] if ends else text


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters a stream must hold: an incomplete UTF-8 character (decoded as U+FFFD), or the
    start of a stop string that the next tokens may complete (then those characters are never sent)."""
    held = len(text) - len(text.rstrip("\ufffd"))
    text = text[:len(text) - held]
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return held + longest


@dataclass
class Sample:
    """One returned sample: its text and finish reason in OpenAI's words, its token ids and log-probs (the engine's
    raw log-softmax) and, where asked for, the top alternatives' ids and log-probs per token."""

    text: str
    finish_reason: str
    token_ids: list
    logprobs: list
    top_ids: list | None = None
    top_logprobs: list | None = None


def samples(result, tokenizer, stops: list[str]) -> list[Sample]:
    """The k samples of one prompt's ``GenerationResult``, best first."""
    lengths = result.lengths[0].tolist()
    sequences, logprobs = result.sequences[0].tolist(), result.token_logprobs[0].tolist()
    reasons = result.finish_reasons[0].tolist()
    top_ids, top_values = result.top_logprob_ids, result.top_logprobs
    out = []
    for rank, length in enumerate(lengths):
        ids = sequences[rank][:length]
        sample = Sample(cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops),
                        _FINISH[FINISH_REASONS[reasons[rank]]], ids, logprobs[rank][:length])
        if top_ids is not None:
            sample.top_ids = top_ids[0, rank, :length].tolist()
            sample.top_logprobs = top_values[0, rank, :length].tolist()
        out.append(sample)
    return out


def finish_reason(name: str | None) -> str | None:
    return None if name is None else _FINISH[name]


def _token_strings(tokenizer, ids: list) -> list[str]:
    return tokenizer.batch_decode([[token] for token in ids])


def completion_logprobs(tokenizer, ids: list, logprobs: list, top_ids=None, top_logprobs=None) -> dict:
    """OpenAI's legacy completions log-probs: tokens, their log-probs, character offsets into the text, and the top
    alternatives per position as {token: log-prob} (null where none were asked for)."""
    tokens = _token_strings(tokenizer, ids)
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    top = None
    if top_ids is not None:
        top = [dict(zip(_token_strings(tokenizer, row_ids), row_values, strict=True))
               for row_ids, row_values in zip(top_ids, top_logprobs, strict=True)]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(tokenizer, ids: list, logprobs: list, top_ids=None, top_logprobs=None) -> dict:
    """OpenAI's chat log-probs: one entry per token with its top alternatives (an empty list where none)."""
    tokens = _token_strings(tokenizer, ids)
    content = []
    for position, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
        entry = _chat_token(token, logprob)
        entry["top_logprobs"] = [] if top_ids is None else [
            _chat_token(alternative, value) for alternative, value in
            zip(_token_strings(tokenizer, top_ids[position]), top_logprobs[position], strict=True)]
        content.append(entry)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class StreamText:
    """One choice's text as it streams. Each piece sent is final: the decoded text so far less what a stop string
    or an unfinished character may still change; at the finish, the rest of the unstreamed answer's text."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list = []
        self.sent = ""

    def _decoded(self) -> str:
        # The whole sequence each time (not token by token): a token's text can depend on its neighbours
        # (SentencePiece's leading spaces, byte-level pieces of one character).
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, tokens: list, finished: bool) -> str:
        """The next piece after ``tokens``; with ``finished`` (the sample's last tokens), all that is left."""
        self.ids.extend(tokens)
        text = self._decoded()
        if finished:
            return self._advance(cut_at_stop(text, self.stops))
        return self._advance(text[:len(text) - _held_back(text, self.stops)])

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


class Formatter:
    """One request's answer in its endpoint's shape: the whole body, or stream chunks. Choice ``index`` is
    ``prompt * n + rank`` (OpenAI's order for a list of prompts); in a stream, rank is the sample's number."""

    def __init__(self, served, body, chat: bool, include_usage: bool, prompt_tokens: int):
        self.tokenizer, self.model, self.chat = served.tokenizer, served.name, chat
        self.n, self.stops, self.include_usage, self.prompt_tokens = body.n, body.stop, include_usage, prompt_tokens
        self.logprobs = body.logprobs if chat else body.logprobs is not None
        self.id = response_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _logprobs(self, ids, logprobs, top_ids=None, top_logprobs=None):
        if not self.logprobs:
            return None
        build = chat_logprobs if self.chat else completion_logprobs
        return build(self.tokenizer, ids, logprobs, top_ids, top_logprobs)

    def body(self, results: list) -> dict:
        """The unstreamed answer from each prompt's ``GenerationResult``."""
        choices, completion_tokens = [], 0
        for prompt, result in enumerate(results):
            for rank, sample in enumerate(samples(result, self.tokenizer, self.stops)):
                completion_tokens += len(sample.token_ids)
                choice = {"index": prompt * self.n + rank, "finish_reason": sample.finish_reason,
                          "logprobs": self._logprobs(sample.token_ids, sample.logprobs, sample.top_ids,
                                                     sample.top_logprobs)}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": sample.text}
                else:
                    choice["text"] = sample.text
                choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self.prompt_tokens, completion_tokens)}

    def chunk(self, choices: list) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": choices}

    def choice(self, index: int, piece: str, event, first: bool) -> dict:
        """One choice of a stream chunk: its next piece of text, the event's tokens' log-probs where asked."""
        choice = {"index": index, "logprobs": self._logprobs(event.tokens, event.logprobs),
                  "finish_reason": finish_reason(event.finish_reason)}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": piece} if first else {"content": piece}
        else:
            choice["text"] = piece
        return choice

    def usage_chunk(self, completion_tokens: int) -> dict:
        chunk = self.chunk([])
        chunk["usage"] = usage(self.prompt_tokens, completion_tokens)
        return chunk
