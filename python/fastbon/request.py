"""A request to the engine: its prompt, its config, its samples' state, its result and its token stream.

The engine's loop thread writes a request's state; any thread reads its result or its stream. A sample's tokens are
streamed once they are final: after the step's EOS and stop-string checks (so nothing streamed is taken back), and
only once even if the sample is preempted and decoded again (it then gives the same tokens).
"""

import asyncio
import threading
from dataclasses import dataclass, field

import torch

from .config import SamplingConfig
from .decode import FINISH_REASONS


class Cancelled(Exception):
    """The request was cancelled before it completed."""


@dataclass
class StreamEvent:
    """New final tokens of one sample; ``finish_reason`` ("length", "eos", "stop", "pruned") on its last event."""

    sample: int
    tokens: list
    logprobs: list
    finish_reason: str | None = None


@dataclass
class Sample:
    """One of a request's n samples: what it generated so far (host lists), and why it ended."""

    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_ids: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    finish: int | None = None  # index into FINISH_REASONS once final
    pruned: bool = False
    streamed: int = 0  # tokens already sent to the stream (kept when preempted: the same tokens come again)
    announced: bool = False  # the finish reason was streamed

    def copy(self) -> "Sample":
        """A fork's child: the parent's history so far (nothing streamed: a forking request streams at the end)."""
        return Sample(list(self.tokens), list(self.logprobs), list(self.top_ids), list(self.top_logprobs),
                      self.finish, self.pruned)

    def reset(self) -> None:
        """Back to nothing generated (a preempted sample is decoded again from its prompt)."""
        self.tokens, self.logprobs, self.top_ids, self.top_logprobs = [], [], [], []
        self.finish, self.pruned = None, False


class Request:
    """Returned by ``Engine.submit``: ``result()``, ``cancel()``, ``done()``, ``stream()`` and ``astream()``."""

    def __init__(self, engine, request_id: int, prompt: torch.Tensor, config: SamplingConfig, seeds: torch.Tensor,
                 eos_ids: tuple, stops, search=None):
        self.engine, self.id, self.prompt, self.config = engine, request_id, prompt, config
        self.seeds, self.eos_ids, self.stops, self.search = seeds, eos_ids, stops, search
        self.samples = [Sample() for _ in range(config.n)]
        self.pending = list(range(config.n))  # samples waiting for a row (all at first; preempted ones again)
        self.stats = {"prefill_tokens": 0, "prefix_cache_hit_tokens": 0, "decode_steps": 0, "tokens_generated": 0,
                      "preempted": 0, "pruned": 0, "suffix_kv_bytes": 0}
        # Filled by the engine: the prompt's blocks, the prefill's position and cache, the first token's logits.
        self.prompt_blocks, self.prefilled, self.prefill_cache, self.first_logits = [], 0, None, None
        self.cache_keys = None  # the prompt's prefix-cache keys, one per full block (set when its prefill starts)
        self.prompt_seen = None
        self.steps = 0  # decode steps taken by this request's rows (the same for all of them while it prunes/forks)
        self.cancel_requested = False
        self._done = threading.Event()
        self._result, self._error = None, None
        self._events, self._condition = [], threading.Condition()
        self._async_queues = []  # (loop, asyncio.Queue) of astream() readers

    # --- read by any thread -----------------------------------------------------------------------------------
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Cancel the request: its rows and KV are freed at the engine's next step; ``result()`` raises
        ``Cancelled``. No effect once it completed."""
        if not self._done.is_set():
            self.cancel_requested = True
            self.engine._wake()

    def result(self, timeout: float | None = None):
        """The ``GenerationResult`` of this prompt (B = 1), waiting for it up to ``timeout`` seconds."""
        if not self.engine._background and not self._done.is_set():
            self.engine.run_until(lambda: self._done.is_set())
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not complete within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    async def aresult(self):
        """``result()`` for asyncio: awaits the request's completion without holding a thread."""
        async for _ in self.astream():
            pass
        return self.result()

    def stream(self):
        """A blocking iterator of ``StreamEvent``s, ending when the request completes (raising its error, or
        ``Cancelled``)."""
        position = 0
        while True:
            with self._condition:
                while position == len(self._events) and not self._done.is_set():
                    if not self.engine._background:
                        break
                    self._condition.wait()
                events, finished = self._events[position:], self._done.is_set()
            if not events and not finished and not self.engine._background:
                self.engine.step()
                continue
            position += len(events)
            yield from events
            if finished and position == len(self._events):
                if self._error is not None:
                    raise self._error
                return

    async def astream(self):
        """``stream()`` for asyncio: the events are handed to the caller's event loop as the engine makes them."""
        queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._condition:
            for event in self._events:
                queue.put_nowait(event)
            finished = self._done.is_set()
            if not finished:
                self._async_queues.append((loop, queue))
        if finished:
            queue.put_nowait(None)
        while True:
            event = await queue.get()
            if event is None:
                break
            yield event
        if self._error is not None:
            raise self._error

    # --- written by the engine ----------------------------------------------------------------------------------
    def emit(self, sample_index: int) -> None:
        """Stream the sample's tokens not streamed yet, and its finish reason once it ended."""
        sample = self.samples[sample_index]
        tokens, logprobs = sample.tokens[sample.streamed:], sample.logprobs[sample.streamed:]
        ending = sample.finish is not None and not sample.announced
        if not tokens and not ending:
            return
        sample.streamed += len(tokens)
        sample.announced = ending or sample.announced
        reason = ("pruned" if sample.pruned else FINISH_REASONS[sample.finish]) if ending else None
        self._publish(StreamEvent(sample_index, tokens, logprobs, reason))

    def _publish(self, event) -> None:
        with self._condition:
            self._events.append(event)
            self._condition.notify_all()
            for loop, queue in self._async_queues:
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def finish(self, result=None, error: BaseException | None = None) -> None:
        with self._condition:
            self._result, self._error = result, error
            self._done.set()
            self._condition.notify_all()
            for loop, queue in self._async_queues:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            self._async_queues.clear()


__all__ = ["Cancelled", "Request", "Sample", "StreamEvent"]
