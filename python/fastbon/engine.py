"""The engine: continuous batching of best-of-n requests over one paged KV tree.

A request's life: waiting → prefilling (its prompt forwarded alone, in chunks of at most ``prefill_chunk`` tokens at
fixed offsets, one chunk per engine step, interleaved with the decode steps; cached prompt blocks are taken instead
of forwarded) → its samples admitted as rows while rows and memory allow (each sample's first token drawn from the
prompt's logits) → every step one forward over all live rows of all requests (``fastbon.decode``) → each row retires
at EOS, a stop string, max_new_tokens or pruning, and frees its blocks → when all n samples have ended, the request
is scored, its top k selected, and it completes.

The same bits whatever the load: a prompt is prefilled alone at chunk boundaries that depend only on the prompt and
``prefill_chunk`` (a cache hit is used only up to a chunk boundary, so the forwarded chunks are the same ones), and
a decode row's sums depend only on the row (``fastbon.decode``): a request's tokens and log-probs equal those of
the same request run alone on an idle engine, whatever else runs, arrives, is preempted or is cancelled.

Policies run after each step, on the host (on CPU the host is the device: a read costs nothing): EOS and length,
stop strings, pruning and forks at the request's own step counts, preemption when the pool is full (the newest
request's rows go back to waiting and are decoded again later, with the same result), admission.
"""

import itertools
import threading
from collections import deque

import torch

from . import dispatch, hf, routing
from .config import SamplingConfig
from .decode import EOS, LENGTH, PRUNED, STOP, Decoder, invariant_rows
from .engine_memory import pool_blocks, prefix_keys, weights_version
from .engine_step import EngineStep, shared_block_rows
from .kv_blocks import BLOCK, BlockPool, PagedCache, PoolFull, PrefixCache
from .prefill_chunks import forward_chunk
from .prompts import special_ids
from .request import Cancelled, Request
from .result import concatenate, samples_tensors, select_best
from .rows import Row
from .scoring import Samples, compute_scores
from .seeds import sample_seeds
from .stop_strings import StopStrings

DEFAULT_MAX_ROWS = 256


class Engine(EngineStep):
    """One scheduler over one KV tree for ``model`` (thread-safe: submit from any thread).

    Args:
        model: a Hugging Face causal LM (``fastbon.hf.check_model`` says what is served).
        tokenizer: needed for stop strings.
        max_rows: the most sample rows decoding at once (default 256).
        max_memory: the bytes the engine's KV pool and step buffers may use (an int or "2GiB"; default 90 % of
            what the device has free): admission waits, the prefix cache evicts, then the newest rows are preempted.
        prefill_chunk: the most prompt tokens forwarded per engine step (a multiple of 256).
        backend: force one backend for the ops. compile: decode steps under ``torch.compile``.
        prefix_cache: keep prompt blocks across requests (keyed by the weights' versions).
        background: run the loop on a thread of its own (else the caller drives it: ``step()``, ``generate``).
    """

    def __init__(self, model, tokenizer=None, *, max_rows=None, max_memory=None, prefill_chunk=512, backend=None,
                 compile=False, prefix_cache=True, background=True):
        from .engine_memory import check_engine_arguments

        check_engine_arguments(max_rows, prefill_chunk, compile, prefix_cache, background, max_memory)
        hf.check_model(model, 0)
        # Every row reads at least two levels of blocks (its prompt's, its own): a forced backend without trees
        # declines here, before any work.
        dispatch.resolve("tree_attention", model.get_output_embeddings().weight.device, backend,
                         model.get_output_embeddings().weight.dtype, levels=2)
        routing.route_attention(model.config._attn_implementation)
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.max_rows = max_rows or DEFAULT_MAX_ROWS
        self.prefill_chunk, self.max_memory, self.use_prefix_cache = prefill_chunk, max_memory, prefix_cache
        self.device = model.get_output_embeddings().weight.device
        self.vocab = model.get_input_embeddings().weight.shape[0]
        self.decoder = Decoder(model, backend, compile)
        self.row_multiple = invariant_rows(model)
        self.rows_per_shared_block = shared_block_rows(model)
        self.pool, self.prefix_cache, self.cache = None, None, None
        self.waiting, self.prefilling, self.decoding = deque(), deque(), []
        self.rows: list[Row] = []
        self.counters = dict(prefill_tokens=0, prefix_cache_hit_tokens=0, decode_steps=0, tokens_generated=0,
                             preempted=0, requests_finished=0, requests_cancelled=0, requests_failed=0,
                             peak_kv_bytes=0)
        # Submitting never waits for a step: new requests go to an inbox (a deque: thread-safe appends) that the
        # step drains, under the step's lock; the loop thread sleeps on a condition of its own.
        self._ids = itertools.count()
        self._inbox = deque()
        self._lock = threading.RLock()
        self._wakeup = threading.Condition()
        self._background, self._thread, self._closed = background, None, False

    # --- the public surface -----------------------------------------------------------------------------------
    def submit(self, prompt_ids, config: SamplingConfig, *, search=None, seeds=None) -> Request:
        """Queue one prompt (a list of ids or a 1-D integer tensor) under ``config``; returns its ``Request``.
        Every check runs here, before any work. ``search``: a fork hook (``fastbon.search``); ``seeds``: the n
        samples' Philox seeds (int64 [n]; default drawn from ``config.seed``)."""
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"config must be a fastbon.SamplingConfig, got {type(config).__name__}")
        prompt = self._check_prompt(prompt_ids, config)
        if (config.prune is not None or search is not None) and config.n > self.max_rows:
            raise ValueError(f"n={config.n} samples that prune or fork must decode together, and max_rows is "
                             f"{self.max_rows}")
        stops = StopStrings(list(config.stop_strings), self.tokenizer) if config.stop_strings else None
        eos_ids, self.pad_token_id = special_ids(self.model, None if config.eos_token_id is None
                                                 else list(config.eos_token_id))
        if seeds is None:
            seeds = sample_seeds(config.seed, 1, config.n)
        if self._closed:
            raise RuntimeError("the engine is closed")
        request = Request(self, next(self._ids), prompt, config, seeds, tuple(eos_ids), stops, search)
        self._inbox.append(request)
        if self._closed:  # closed meanwhile: taken back, unless the closing loop has cancelled it already
            try:
                self._inbox.remove(request)
            except ValueError:
                return request
            raise RuntimeError("the engine is closed")
        self._wake()
        if self._background:
            self._ensure_thread()
        return request

    def generate(self, prompts, config: SamplingConfig):
        """Blocking: every prompt (a list of id lists or 1-D tensors) under ``config``; one ``GenerationResult``
        of B prompts (each prompt's seed: ``config.seed`` + its index when set)."""
        requests = [self.submit(prompt, config if config.seed is None else config.replace(seed=config.seed + index))
                    for index, prompt in enumerate(prompts)]
        results = [request.result() for request in requests]
        _, pad = special_ids(self.model, None)
        return concatenate(results, pad)

    @property
    def stats(self) -> dict:
        """Counters a server exports: tokens prefilled and taken from the prefix cache, decode steps, tokens
        generated, rows decoding, requests waiting (for a row or their prefill) and running, KV bytes held,
        preemptions, requests finished / cancelled / failed. A snapshot read without waiting for the step under
        way (each value is read whole; together they may straddle a step)."""
        stats = dict(self.counters)
        stats.update(rows_active=len(self.rows), requests_running=len(self.decoding),
                     requests_waiting=len(self._inbox) + len(self.waiting) + len(self.prefilling),
                     kv_bytes=self.pool.nbytes() if self.pool else 0,
                     prefix_cache_blocks=len(self.prefix_cache) if self.prefix_cache else 0, max_rows=self.max_rows)
        return stats

    def invalidate_prefix_cache(self) -> None:
        """Forget every cached prompt block (the weights' versions already key them; this is for weights
        replaced by other means)."""
        with self._lock:
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def close(self) -> None:
        """Cancel what is left and stop the loop thread."""
        self._closed = True
        for request in [*self._inbox, *self.waiting, *self.prefilling, *self.decoding]:
            request.cancel_requested = True
        self._wake()
        if self._thread is not None:
            self._thread.join()
        else:
            with self._lock:
                self._take_inbox()
                self._cancel_requested()

    # --- the loop ---------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _ensure_thread(self) -> None:
        with self._wakeup:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fastbon-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed and not self._has_work():
                    self._wakeup.wait()
            if self._closed:
                with self._lock:
                    self._take_inbox()
                    self._cancel_requested()
                return
            try:
                self.step()
            except Exception as error:  # a step that fails outside any one request's part: its requests get the
                with self._lock:        # error, and the loop goes on for the requests that come next
                    for request in [*self.waiting, *self.prefilling, *self.decoding]:
                        self._fail(request, error)

    def _has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.prefilling or self.decoding)

    def _take_inbox(self) -> None:
        while self._inbox:
            self.waiting.append(self._inbox.popleft())

    def run_until(self, done) -> None:
        """Drive the loop from the caller's thread until ``done()`` (an engine without a loop thread)."""
        while not done():
            with self._lock:
                if not self._has_work():
                    raise RuntimeError("the engine has nothing left to run")
                self.step()

    def step(self) -> bool:
        """One engine step: cancellations, admission, one prefill chunk, new rows' first tokens, one decode forward
        over every live row, then the policies. Returns whether there was anything to do."""
        # Inference only: with gradients on, the products would leave the fixed-order kernel (routing.SkinnyLinears).
        with self._lock, torch.no_grad():
            self._take_inbox()
            self._cancel_requested()
            if not self._has_work():
                return False
            self._admit_prefills()
            self._prefill_one_chunk()
            self._admit_rows()
            if self.rows:
                self._decode()
            return True

    # --- requests in ------------------------------------------------------------------------------------------
    def _check_prompt(self, prompt_ids, config) -> torch.Tensor:
        prompt = torch.as_tensor(prompt_ids)
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool or prompt.numel() == 0:
            raise ValueError(f"prompt_ids must be a non-empty 1-D list or tensor of token ids, got {prompt.dtype} "
                             f"{tuple(prompt.shape)}")
        prompt = prompt.cpu().to(torch.int64)
        low, high = int(prompt.min()), int(prompt.max())
        if low < 0 or high >= self.vocab:
            raise ValueError(f"prompt_ids holds token id {low if low < 0 else high}, outside the model's vocabulary "
                             f"[0, {self.vocab})")
        hf.check_model(self.model, prompt.numel() + config.max_new_tokens)
        return prompt

    def _rows_promised(self) -> int:
        """Rows decoding plus the samples of the requests already prefilling."""
        return len(self.rows) + sum(len(request.pending) for request in self.prefilling)

    def _admit_prefills(self) -> None:
        """Start prefilling waiting requests while their samples would find rows soon."""
        while self.waiting and (not self.prefilling or self._rows_promised() < self.max_rows):
            self.prefilling.append(self.waiting.popleft())

    def _take_cached_prefix(self, request: Request) -> None:
        """Looked up when the request's prefill starts, not when it is admitted: prompts are prefilled one at a
        time, so 200 requests submitted together behind one system prompt find it cached by the first one."""
        if not self.use_prefix_cache or self.pool is None:
            return
        request.cache_keys = prefix_keys(request.prompt, weights_version(self.model))
        blocks = self.prefix_cache.lookup(request.cache_keys)
        # Only up to a chunk boundary the prompt's own prefill would have reached, and never its last token (its
        # logits draw the first samples): the chunks forwarded are then the same ones, with the same bits.
        usable = min(len(blocks) * BLOCK, request.prompt.numel() - 1) // self.prefill_chunk * self.prefill_chunk
        for block in blocks[:usable // BLOCK]:
            self.pool.ref(block)
            request.prompt_blocks.append(block)
        request.prefilled = usable
        request.stats["prefix_cache_hit_tokens"] = usable
        self.counters["prefix_cache_hit_tokens"] += usable

    def _prefill_one_chunk(self) -> None:
        request = next((r for r in self.prefilling if r.first_logits is None), None)
        if request is None:
            return
        if request.prefilled == 0 and request.cache_keys is None:
            self._take_cached_prefix(request)
        try:
            out, cache = forward_chunk(self, request)
        except PoolFull:
            if not self.rows:
                self._fail(request, MemoryError(f"the prompt of request {request.id} ({request.prompt.numel()} "
                                                f"tokens) does not fit in the KV pool ({self.pool.max_blocks} "
                                                f"blocks of {BLOCK} positions)"))
            return
        except Exception as error:  # a failing request never fails another
            self._fail(request, error)
            return
        if request.prefilled == request.prompt.numel():
            request.first_logits = out.logits[0, -1]
            request.prefill_cache = None
            if request.config.repetition_penalty != 1.0:
                request.prompt_seen = torch.zeros(request.first_logits.shape[-1], dtype=torch.bool,
                                                  device=self.device)
                request.prompt_seen[request.prompt.to(self.device)] = True
        del cache

    def make_pool(self, layer_shapes: list, dtype) -> None:
        """The pool, sized by the budget, on the first prefill (when the model's KV shapes are known)."""
        blocks, self.row_blocks = pool_blocks(self, layer_shapes, dtype)
        self.pool = BlockPool(layer_shapes, dtype, self.device, blocks)
        self.prefix_cache = PrefixCache(self.pool)
        self.cache = PagedCache(self.pool, getattr(self.model.config, "max_position_embeddings", None) or 2**31,
                                self.backend)

    def allocate_block(self) -> int:
        """A free block: from the pool, else by evicting cached prompt blocks (least recently used first)."""
        if not self.pool.can_allocate(1):
            self.prefix_cache.evict(1)
        return self.pool.allocate()

    # --- requests out -------------------------------------------------------------------------------------------
    def retire(self, row: Row, reason: int | None) -> None:
        """The row leaves the batch and frees its blocks (its sample ended with ``reason``, or was preempted or
        replaced by a fork when None)."""
        self.rows.remove(row)
        self._release_row(row)
        if reason is not None:
            sample = row.sample_state()
            sample.finish = reason
            sample.pruned = sample.pruned or reason == PRUNED

    def _release_row(self, row: Row) -> None:
        row.release(self.pool)
        self.pool.reserved -= self.row_blocks

    def complete(self, request: Request) -> None:
        """All samples ended: score, select the best k, hand the result over."""
        config = request.config
        request.stats.update(prefix_kv_bytes=len(request.prompt_blocks) * self.pool.block_bytes,
                             decode_steps=request.steps)
        self._drop(request)
        try:
            output = samples_tensors(request.samples, self.pad_token_id, self.device, config.top_logprobs)
            result = select_best(request.prompt, output, config.score, config.k, config.return_all, self.backend,
                                 self.pad_token_id, dict(request.stats))
        except Exception as error:
            request.finish(error=error)
            self.counters["requests_failed"] += 1
            return
        if request.search is not None:
            for index in range(config.n):
                request.emit(index)
        request.finish(result)
        self.counters["requests_finished"] += 1

    def _drop(self, request: Request) -> None:
        """The request leaves every queue; its rows and its prompt blocks are freed (the prefix cache keeps its own
        references to the prompt's full blocks)."""
        for row in [row for row in self.rows if row.request is request]:
            self.retire(row, None)
        for queue in (self.waiting, self.prefilling):
            if request in queue:
                queue.remove(request)
        if request in self.decoding:
            self.decoding.remove(request)
        for block in request.prompt_blocks:
            self.pool.release(block)
        request.prompt_blocks, request.prefill_cache, request.first_logits = [], None, None

    def _fail(self, request: Request, error: BaseException) -> None:
        self._drop(request)
        request.finish(error=error)
        self.counters["requests_failed"] += 1

    def _cancel_requested(self) -> None:
        for request in [r for r in (*self.waiting, *self.prefilling, *self.decoding) if r.cancel_requested]:
            self._drop(request)
            request.finish(error=Cancelled(f"request {request.id} was cancelled"))
            self.counters["requests_cancelled"] += 1

    def samples_so_far(self, request: Request, members: list) -> Samples:
        """The partial samples ``members`` (indices into the request's n) as score callables receive them."""
        output = samples_tensors([request.samples[index] for index in members], self.pad_token_id, self.device)
        return Samples(prompts=[request.prompt.to(self.device)], sequences=output["tokens"][None],
                       lengths=output["lengths"][None], token_logprobs=output["logprobs"][None],
                       pad_token_id=self.pad_token_id,
                       sample_ids=torch.tensor([members], dtype=torch.int64, device=self.device))

    def partial_scores(self, score, request: Request, members: list) -> torch.Tensor:
        return compute_scores(score, self.samples_so_far(request, members))


__all__ = ["DEFAULT_MAX_ROWS", "EOS", "LENGTH", "STOP", "Cancelled", "Engine", "Request"]
