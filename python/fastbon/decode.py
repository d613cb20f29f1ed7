"""The decode loop: prefill once, then every sample steps in lockstep over one SharedPrefixCache.

The host reads the device only at sync points (every ``SYNC_EVERY`` steps, and at pruning checkpoints): the
"all finished" and "NaN seen" flags, stop strings, and finished rows leaving the batch.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from . import hf
from .cache import SUFFIX_BLOCK, SharedPrefixCache
from .compiled import bucket_rows, compiled_forward
from .memory import Budget, call_budget
from .ops.sampling import SamplingParams, sample_implementation
from .ops.topk import select_topk
from .prefill import prefill
from .scoring import Pruning, Samples, compute_scores
from .stop_strings import StopStrings

SYNC_EVERY = 8
LOGPROB_MODES = ("raw", "processed")
# Why each sample ended: ``GenerationResult.finish_reasons`` holds indices into this tuple.
FINISH_REASONS = ("length", "eos", "stop", "pruned")
EOS, STOP, PRUNED = (FINISH_REASONS.index(reason) for reason in ("eos", "stop", "pruned"))
FIRST_COLUMNS = 64  # result columns allocated at the start, then doubling
# Waves and preemption keep a multiple of this many rows (when they keep more). torch's eager CPU elementwise kernels
# (SiLU, seen) compute the last (length mod 32) elements of each thread's chunk on a scalar path whose last bit can
# differ from the vector path's; the chunks are the op's elements split evenly over the threads. With a multiple of
# 32 rows every chunk holds whole 32-element blocks (for any even row width on 2 threads, any width on 1), so a row
# gets the same bits in a wave as in the single-wave run; the products are fixed-order anyway (hf.SkinnyLinears).
WAVE_ROWS_MULTIPLE = 32


def whole_vectors(rows: int) -> int:
    """``rows`` rounded down to a multiple of WAVE_ROWS_MULTIPLE when it holds one; else ``rows``."""
    return rows if rows < WAVE_ROWS_MULTIPLE else rows // WAVE_ROWS_MULTIPLE * WAVE_ROWS_MULTIPLE


@dataclass(frozen=True)
class DecodeSettings:
    n: int
    max_new_tokens: int
    eos_ids: list
    pad_token_id: int
    backend: str | None
    prune: Pruning | None
    logprobs: str
    stops: StopStrings | None
    repetition_penalty: float
    compile: bool = False


@dataclass
class DecodeOutput:
    """Per sample (N = B·n, prompt-major): tokens [N, T], logprobs [N, T] (0 on padding), lengths [N],
    finish_reasons int8 [N], pruned bool [N]."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    finish_reasons: torch.Tensor
    pruned: torch.Tensor


class _Batch:
    """The rows still decoding: per-row state that shrinks together when samples finish or are pruned.

    ``sample_ids`` maps each row to its sample (prompt-major, so a prompt's rows stay adjacent; prompts hold
    different numbers of rows once samples finish); the result buffers are indexed by it and never shrink.
    ``seen`` [rows, V] marks the tokens of each row's prompt and completion (for the repetition penalty).
    """

    def __init__(self, sample_ids, next_position, params, seen):
        self.sample_ids, self.next_position, self.params, self.seen = sample_ids, next_position, params, seen
        self.finished = torch.zeros_like(sample_ids, dtype=torch.bool)
        self.token = None  # the previous step's draw, fed back from step 1 on
        self._refresh()

    def _refresh(self):
        rows = self.sample_ids.shape[0]
        self.rows = torch.arange(rows, device=self.sample_ids.device)
        # A prepared 4-D mask makes HF skip its mask construction; the fastbon attention reads lengths instead.
        self.decode_mask = torch.ones((rows, 1, 1, 1), dtype=torch.bool, device=self.sample_ids.device)

    def select(self, rows):
        self.sample_ids, self.next_position = self.sample_ids[rows], self.next_position[rows]
        self.finished, self.token, self.params = self.finished[rows], self.token[rows], self.params.select(rows)
        if self.seen is not None:
            self.seen = self.seen[rows]
        self._refresh()


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's ``RepetitionPenaltyLogitsProcessor``: logits of seen tokens divided by ``penalty`` where
    positive and multiplied where negative."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def token_logprobs(logits: torch.Tensor, token: torch.Tensor, temperature: torch.Tensor | None) -> torch.Tensor:
    """log_softmax(logits / temperature)[token] per row in float32 (temperature None or 0: no scaling)."""
    rows = logits.float()
    if temperature is not None:
        rows = rows / torch.where(temperature > 0, temperature, 1.0)[:, None]
    return rows.gather(1, token[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)


def _widen(buffer: torch.Tensor, columns: int, fill) -> torch.Tensor:
    wider = buffer.new_full((buffer.shape[0], columns), fill)
    wider[:, :buffer.shape[1]] = buffer
    return wider


class _Run:
    """One decode: the cache, the live rows and the result buffers (which grow with the steps taken)."""

    def __init__(self, model, prefilled, prompts, sample_ids, params: SamplingParams, settings: DecodeSettings,
                 stats: dict, first_capacity: int = SUFFIX_BLOCK, budget: Budget | None = None):
        """``prefilled``: what ``prefill`` returned; ``sample_ids``: the samples (of all B·n, prompt-major) this run
        decodes, with their sampling ``params``; ``first_capacity``: the suffix positions allocated at the start;
        ``budget``: when given, rows past what it holds are preempted as the suffix grows (``preempt_past``)."""
        self.model, self.settings, self.stats, self.budget = model, settings, stats, budget
        self.device = params.seed.device
        self.num_prompts, self.n = len(prompts), settings.n
        num_samples = sample_ids.shape[0]
        self.logits = prefilled.logits
        sample_to_prompt = sample_ids // settings.n
        self.cache = SharedPrefixCache(prefilled.levels, sample_to_prompt, settings.max_new_tokens, settings.backend,
                                       first_capacity)
        self.sample = sample_implementation(self.device, settings.backend, self.logits.dtype)
        self.row_index = sample_to_prompt  # step 0 samples every sample of a prompt from the prompt's row
        seen = None
        if settings.repetition_penalty != 1.0:
            self.prompt_seen = torch.zeros_like(self.logits, dtype=torch.bool)
            for row, prompt in enumerate(prompts):
                self.prompt_seen[row, prompt.to(self.device)] = True
            seen = self.prompt_seen[sample_to_prompt]
        # Rows are numbered within this run; ``sample_ids`` maps them back when the run's output is stored.
        self.batch = _Batch(torch.arange(num_samples, device=self.device), prefilled.prompt_lens[sample_to_prompt],
                            params, seen)
        columns = min(FIRST_COLUMNS, settings.max_new_tokens)
        self.tokens = torch.full((num_samples, columns), settings.pad_token_id, dtype=torch.int64, device=self.device)
        self.logprobs = torch.zeros((num_samples, columns), dtype=torch.float32, device=self.device)
        self.lengths = torch.zeros(num_samples, dtype=torch.int64, device=self.device)
        self.finish_reasons = torch.zeros(num_samples, dtype=torch.int8, device=self.device)
        self.pruned = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        self.not_finite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.candidates = torch.arange(num_samples, device=self.device)  # samples not pruned: what pruning ranks
        self.preempted = []  # rows (of this run) that left unfinished, to be decoded again in a later wave
        self.eos = torch.tensor(settings.eos_ids, dtype=torch.int64, device=self.device)
        self.steps = self.checked_steps = self.tokens_generated = 0
        self.peak_suffix_bytes = self.cache.nbytes()[1]  # rises only when reserve() grows the buffers or a fork
        self.forward_extra = {"logits_to_keep": 1} if "logits_to_keep" in hf.forward_parameters(model) else {}
        self.cache_argument = hf.cache_argument(model)
        self.compiled = compiled_forward(model) if settings.compile else None
        # The steps' linear layers: fastbon's skinny kernel on CPU (hf.SkinnyLinears), else the model's own.
        self.linears = hf.skinny_linears(model, settings.backend)

    def _forward(self):
        """One decode step of the model over the live rows: logits [rows, V]."""
        batch, cache = self.batch, self.cache
        if self.budget is not None and cache.is_full():
            self.preempt_past(self.budget.rows_fitting(cache.grown_capacity()))
        if cache.reserve():
            self.peak_suffix_bytes = max(self.peak_suffix_bytes, cache.nbytes()[1])
        inputs = dict(input_ids=batch.token[:, None], position_ids=batch.next_position[:, None],
                      attention_mask=batch.decode_mask, use_cache=True,
                      **{self.cache_argument: cache, hf.CACHE_KWARG: cache}, **self.forward_extra)
        # The first decode step runs eagerly: it checks that every attention layer is fastbon's. Every step, of any
        # width, runs in the linear-routing mode (compiled steps too: dynamo traces it into the graph).
        with self.linears or contextlib.nullcontext():
            if self.compiled is None or self.steps == 1:
                logits = self.model(**inputs).logits[:, -1]
            else:
                logits = self.compiled(self.stats, (batch.sample_ids.shape[0], cache.suffix_capacity), **inputs)
                logits = logits.logits[:, -1]
        if self.steps == 1 and cache.attention_calls != len(cache.layers):
            raise RuntimeError(f"model type {self.model.config.model_type!r}: {cache.attention_calls} of "
                               f"{len(cache.layers)} attention layers ran through transformers' AttentionInterface; "
                               "fastbon serves only models whose attention does")
        cache.advance()
        batch.next_position = batch.next_position + 1
        return logits

    def step(self):
        """Sample the next token of every live row and record it."""
        batch, settings, step = self.batch, self.settings, self.steps
        logits = self.logits if step == 0 else self._forward()
        row_index = self.row_index if step == 0 else None  # None: one logits row per batch row
        params = batch.params
        sampled_logits = logits
        if batch.seen is not None:
            sampled_logits = penalize_repetitions(logits, self.prompt_seen if step == 0 else batch.seen,
                                                  settings.repetition_penalty)
        rows = batch.rows if row_index is None else row_index
        batch.token, logprob = self.sample(sampled_logits.contiguous(), rows, params.temperature, params.top_k,
                                           params.top_p, params.min_p, params.seed,
                                           torch.full_like(batch.sample_ids, step))
        if settings.logprobs == "processed" or batch.seen is not None:
            source = sampled_logits if settings.logprobs == "processed" else logits
            source = source if row_index is None else source.index_select(0, row_index)
            logprob = token_logprobs(source, batch.token,
                                     params.temperature if settings.logprobs == "processed" else None)
        if batch.seen is not None:
            batch.seen[batch.rows, batch.token] = True
        if step >= self.tokens.shape[1]:
            columns = min(2 * self.tokens.shape[1], settings.max_new_tokens)
            self.tokens = _widen(self.tokens, columns, settings.pad_token_id)
            self.logprobs = _widen(self.logprobs, columns, 0.0)
        live = ~batch.finished
        self.tokens[batch.sample_ids, step] = torch.where(live, batch.token, settings.pad_token_id)
        self.logprobs[batch.sample_ids, step] = torch.where(live, logprob, 0.0)
        self.lengths[batch.sample_ids] += live
        self.not_finite |= (live & ~torch.isfinite(logprob)).any()
        if self.eos.numel():
            at_eos = live & torch.isin(batch.token, self.eos)
            self.finish_reasons[batch.sample_ids] = torch.where(at_eos, EOS, self.finish_reasons[batch.sample_ids])
            batch.finished |= at_eos
        self.steps += 1
        self.tokens_generated += batch.sample_ids.shape[0]

    def check_stops(self):
        """Stop strings over the tokens since the last check: a stopping sample keeps up to its completing token
        (the overshoot, at most one sync interval, is trimmed) and finishes like at EOS."""
        stops, batch = self.settings.stops, self.batch
        if stops is None or self.checked_steps == self.steps:
            return
        start = max(0, self.checked_steps + 1 - stops.window)
        found = stops.first_stops(self.tokens[batch.sample_ids, start:self.steps],
                                  self.lengths[batch.sample_ids] - start, self.checked_steps - start)
        self.checked_steps = self.steps
        rows = [row for row, position in enumerate(found) if position is not None]
        if not rows:
            return
        row_index = torch.tensor(rows, device=self.device)
        last = torch.tensor([start + found[row] for row in rows], device=self.device)
        samples = batch.sample_ids[row_index]
        after = torch.arange(self.steps, device=self.device)[None, :] > last[:, None]
        self.tokens[samples, :self.steps] = self.tokens[samples, :self.steps].masked_fill(
            after, self.settings.pad_token_id)
        self.logprobs[samples, :self.steps] = self.logprobs[samples, :self.steps].masked_fill(after, 0.0)
        self.lengths[samples] = last + 1
        self.finish_reasons[samples] = STOP
        batch.finished[row_index] = True

    def preempt_past(self, fitting: int) -> None:
        """Before the suffix grows: when more than ``fitting`` rows would hold it, finished rows leave first, then
        the newest samples past ``fitting`` are preempted. They are decoded again from the prompt in a later wave
        and give the same tokens (a sample depends only on its own seed and history); the first row always stays,
        so every wave finishes at least one sample."""
        batch = self.batch
        if batch.sample_ids.shape[0] <= fitting:
            return
        fitting = whole_vectors(fitting)
        live = (~batch.finished).nonzero().flatten()  # a host sync, only when the budget binds
        if live.numel() > fitting:
            self.preempted.append(batch.sample_ids[live[fitting:]])
            self.stats["preempted"] = self.stats.get("preempted", 0) + live.numel() - fitting
            live = live[:fitting]
        self.keep_rows(live if live.numel() else batch.rows[:1])  # all finished: one row stays until the sync

    def finished_rows(self) -> torch.Tensor:
        """This run's rows whose samples are final (all but the preempted), in order."""
        done = torch.ones(self.lengths.shape[0], dtype=torch.bool, device=self.device)
        for rows in self.preempted:
            done[rows] = False
        return done.nonzero().flatten()

    def keep_rows(self, rows):
        self.batch.select(rows)
        self.cache.select_samples(rows)

    def fork(self, parent_rows: torch.Tensor, capacity: int) -> None:
        """Each row becomes a child of row ``parent_rows[j]`` (int64 [rows], on the device): it takes the parent's
        tokens and log-probs so far, its state and its KV path (shared, not copied: ``SharedPrefixCache.fork``),
        and keeps its own sampling seed, so the children of one parent diverge from here on."""
        batch = self.batch
        slots, parent_slots = batch.sample_ids, batch.sample_ids[parent_rows]
        for name in ("tokens", "logprobs", "lengths", "finish_reasons"):
            buffer = getattr(self, name)
            buffer[slots] = buffer[parent_slots]
        batch.token, batch.finished = batch.token[parent_rows], batch.finished[parent_rows]
        batch.next_position = batch.next_position[parent_rows]
        if batch.seen is not None:
            batch.seen = batch.seen[parent_rows]
        self.cache.fork(parent_rows, capacity)
        self.peak_suffix_bytes = max(self.peak_suffix_bytes, self.cache.nbytes()[1])

    def samples_so_far(self, sample_ids, prompts):
        ids = sample_ids.view(self.num_prompts, -1)
        return Samples(prompts=prompts, sequences=self.tokens[ids, :self.steps], lengths=self.lengths[ids],
                       token_logprobs=self.logprobs[ids, :self.steps], pad_token_id=self.settings.pad_token_id,
                       sample_ids=ids % self.n)

    def prune(self, prompts):
        """Keep the best ``prune.keep`` of each prompt's candidates (its samples not pruned yet, finished or not;
        the same number for every prompt) by the partial score; the others are marked pruned and leave."""
        prune, candidates = self.settings.prune, self.candidates
        per_prompt = candidates.shape[0] // self.num_prompts
        keep = max(prune.min_keep, math.ceil(per_prompt * prune.keep))
        if keep >= per_prompt:
            return
        partial = compute_scores(prune.score, self.samples_so_far(candidates, prompts))
        _, best = select_topk(partial, keep)
        kept = candidates.view(self.num_prompts, per_prompt).gather(1, best.sort(dim=-1).values).flatten()
        is_kept = torch.zeros_like(self.pruned)
        is_kept[kept] = True
        self.pruned[candidates[~is_kept[candidates]]] = True
        self.keep_rows(is_kept[self.batch.sample_ids].nonzero().flatten())
        self.stats["pruned"] = self.stats.get("pruned", 0) + (per_prompt - keep) * self.num_prompts
        self.candidates = kept


def _scatter(output: DecodeOutput | None, run: _Run, rows, sample_ids, num_samples: int, pad_token_id: int):
    """The run's ``rows`` stored at ``sample_ids`` of the call's output (created, or widened, as the runs need)."""
    steps = run.steps
    if output is None:
        device = run.device
        output = DecodeOutput(tokens=torch.full((num_samples, steps), pad_token_id, dtype=torch.int64, device=device),
                              logprobs=torch.zeros((num_samples, steps), dtype=torch.float32, device=device),
                              lengths=torch.zeros(num_samples, dtype=torch.int64, device=device),
                              finish_reasons=torch.zeros(num_samples, dtype=torch.int8, device=device),
                              pruned=torch.zeros(num_samples, dtype=torch.bool, device=device))
    if steps > output.tokens.shape[1]:
        output.tokens, output.logprobs = _widen(output.tokens, steps, pad_token_id), _widen(output.logprobs, steps, 0.0)
    output.tokens[sample_ids, :steps] = run.tokens[rows, :steps]
    output.logprobs[sample_ids, :steps] = run.logprobs[rows, :steps]
    output.lengths[sample_ids], output.finish_reasons[sample_ids] = run.lengths[rows], run.finish_reasons[rows]
    output.pruned[sample_ids] = run.pruned[rows]
    return output


def _decode_rows(run: _Run, prompts: list) -> None:
    """Step ``run`` until its rows finish or reach max_new_tokens."""
    max_new_tokens, prune = run.settings.max_new_tokens, run.settings.prune
    while run.steps < max_new_tokens:
        run.step()
        if run.steps % SYNC_EVERY == 0 or run.steps == max_new_tokens:
            if bool(run.not_finite):
                raise FloatingPointError("the model produced NaN or infinite logits during decoding")
            run.check_stops()
            unfinished = (~run.batch.finished).nonzero().flatten()
            if unfinished.numel() == 0 or run.steps == max_new_tokens:
                break
            # Finished samples leave the batch while the host looks anyway (a compiled step: in halving buckets).
            if unfinished.numel() < run.batch.sample_ids.numel():
                rows = bucket_rows(unfinished, run.batch.finished) if run.compiled is not None else unfinished
                if rows is not None:
                    run.keep_rows(rows)
        if prune is not None and run.steps % prune.every == 0 and run.steps < max_new_tokens:
            run.check_stops()  # the partial scores must see stopped samples as finished
            run.prune(prompts)
            if not bool((~run.batch.finished).any()):  # only finished samples survived (pruning read the host anyway)
                break


def decode(model, prompts: list, params: SamplingParams, settings: DecodeSettings, stats: dict,
           max_memory=None) -> DecodeOutput:
    """Prefill once, then sample n continuations per prompt in lockstep (``prompts``: B 1-D CPU id tensors), in
    waves of rows when all of them do not fit in ``max_memory`` (``fastbon.memory``): a wave admits the rows that
    fit now, and rows preempted as the suffixes grow go first into the next one."""
    device = params.seed.device
    num_samples = len(prompts) * settings.n
    budget = call_budget(model, [prompt.numel() for prompt in prompts], settings.max_new_tokens, max_memory, device)
    # Pruning ranks a prompt's samples together, so they cannot be preempted: admitted by the worst case.
    admit_capacity = settings.max_new_tokens if settings.prune is not None else min(SUFFIX_BLOCK,
                                                                                     settings.max_new_tokens)
    rows_per_wave = min(num_samples, budget.rows_fitting(admit_capacity))
    if rows_per_wave < num_samples:
        rows_per_wave = whole_vectors(rows_per_wave)
    if rows_per_wave < num_samples and settings.prune is not None:
        raise MemoryError(f"pruning ranks all n={settings.n} samples of a prompt together, and only {rows_per_wave} "
                          f"of the {num_samples} rows fit in max_memory={budget.budget} bytes at once")
    hf.route_attention(model.config._attn_implementation)
    start = time.perf_counter()
    prefilled = prefill(model, prompts, settings.pad_token_id, device, stats)
    if device.type == "cuda":  # one sync per call, so the prefill's time is its own
        torch.cuda.synchronize(device)
    stats["prefill_seconds"] = time.perf_counter() - start
    stats["prefix_kv_bytes"] = prefilled.nbytes()
    device_prompts = [prompt.to(device) for prompt in prompts]
    output, steps, generated, peak, waves = None, 0, 0, 0, 0
    pending = torch.arange(num_samples, device=device)  # ascending: preempted samples rejoin ahead of the rest
    while pending.numel():
        sample_ids, pending = pending[:rows_per_wave], pending[rows_per_wave:]
        run = _Run(model, prefilled, device_prompts, sample_ids, params.select(sample_ids), settings, stats,
                   budget=None if settings.prune is not None else budget)
        _decode_rows(run, device_prompts)
        done = run.finished_rows()
        output = _scatter(output, run, done, sample_ids[done], num_samples, settings.pad_token_id)
        if run.preempted:
            pending = torch.cat([sample_ids[torch.cat(run.preempted).sort().values], pending])
        steps, generated = max(steps, run.steps), generated + run.tokens_generated
        peak, waves = max(peak, run.peak_suffix_bytes), waves + 1
        del run  # its buffers are freed here, before the next wave's are allocated (cache._Cursor: no cycle)
    stats.update(decode_steps=steps, tokens_generated=generated, suffix_kv_bytes=peak, waves=waves,
                 preempted=stats.get("preempted", 0))
    return output
