"""The engine's policies, run on the host after each step: EOS, length, stop strings and NaN per row; pruning and
forks at a request's own step counts; preemption when the KV pool is full; completion.

Each decision reads only the request's own samples and steps, so it is taken at the same point of the request
whatever else runs: part of what makes a request's result independent of the load.
"""

import math

import torch

from .decode import EOS, LENGTH, PRUNED, STOP
from .kv_blocks import BLOCK, PoolFull
from .ops.topk import select_topk
from .rows import Row


def check_weights(weights, num_prompts: int, width: int) -> torch.Tensor:
    """``step_score``'s output as float64 [B, width] log-weights; one clear error for a wrong type or shape, NaN or
    +inf, or a prompt whose weights are all -inf (nothing could be kept)."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"step_score must return a torch.Tensor of log-weights, got {type(weights).__name__}")
    if tuple(weights.shape) != (num_prompts, width):
        raise ValueError(f"step_score must return log-weights of shape [B, width] = {(num_prompts, width)}, got "
                         f"{tuple(weights.shape)}")
    weights = weights.detach().double()
    if torch.isnan(weights).any():
        raise ValueError("step_score returned NaN log-weights")
    if (weights == float("inf")).any():
        raise ValueError("step_score returned +inf log-weights")
    dead = torch.isneginf(weights).all(dim=1)
    if dead.any():
        raise ValueError(f"step_score gave every partial sample of prompt {int(dead.nonzero()[0])} log-weight -inf; "
                         "give wrong steps a finite penalty (e.g. log(1e-3)) so the search can go on")
    return weights


def make_room(engine) -> bool:
    """A block for every row whose key starts one this step, oldest rows first; when the pool is full the newest
    rows (a pruning or forking request: all of its rows) are preempted: their samples start again later, from the
    prompt, with the same result. Returns whether rows are left to step."""
    for row in list(engine.rows):
        while row in engine.rows and row.needs_block():
            try:
                row.blocks.append(engine.allocate_block())
            except PoolFull:
                victims = sorted((other for other in engine.rows if other is not row),
                                 key=lambda other: (other.request.id, other.sample))
                if not victims:
                    engine._fail(row.request, MemoryError(
                        f"one sample of request {row.request.id} needs more KV than the pool holds "
                        f"({engine.pool.max_blocks} blocks of {BLOCK} positions): raise max_memory or lower "
                        "max_new_tokens"))
                    break
                preempt(engine, victims[-1])
    return bool(engine.rows)


def preempt(engine, row: Row) -> None:
    """Send the row's sample (all the request's samples, when they prune or fork together) back to waiting for a
    row; the request keeps its prefilled prompt."""
    request = row.request
    whole = request.config.prune is not None or request.search is not None
    victims = [other for other in engine.rows if other.request is request] if whole else [row]
    for victim in victims:
        engine.retire(victim, None)
    samples = range(request.config.n) if whole else [row.sample]
    for index in samples:
        request.samples[index].reset()
    if whole:
        request.steps = 0
        request.pending = list(range(request.config.n))
    else:
        request.pending = sorted(set(request.pending) | {row.sample})
    request.stats["preempted"] += len(victims)
    engine.counters["preempted"] += len(victims)
    if request in engine.decoding and not any(other.request is request for other in engine.rows):
        engine.decoding.remove(request)
    if request not in engine.prefilling:
        engine.prefilling.appendleft(request)


def _stopped_rows(rows: list) -> set:
    """The rows whose newest token completes one of their request's stop strings (checked every step, so the
    window ending at the newest token holds a stop string only if that token completed it)."""
    stopped = set()
    groups = {}
    for row in rows:
        if row.request.stops is not None:
            groups.setdefault(id(row.request.stops), []).append(row)
    for group in groups.values():
        stops = group[0].request.stops
        windows = [row.sample_state().tokens[-stops.window:] for row in group]
        stopped.update(row for row, found in zip(group, stops.holds_stop(windows), strict=True) if found)
    return stopped


def after_step(engine, rows: list) -> None:
    """The rows just recorded a token: end the samples that ended, then each request's hooks."""
    stopped = _stopped_rows(rows)
    stepped = []
    for row in rows:
        request, sample = row.request, row.sample_state()
        if request not in stepped:
            stepped.append(request)
        if row not in engine.rows:
            continue
        if not math.isfinite(sample.logprobs[-1]):
            engine._fail(request, FloatingPointError("the model produced NaN or infinite logits during decoding"))
            continue
        reason = None
        if sample.tokens[-1] in request.eos_ids:
            reason = EOS
        elif row in stopped:
            reason = STOP
        elif len(sample.tokens) >= request.config.max_new_tokens:
            reason = LENGTH
        if reason is not None:
            engine.retire(row, reason)
        if request.search is None:
            request.emit(row.sample)
    for request in stepped:
        if request.done() or request not in engine.decoding:
            continue
        request.steps += 1
        config = request.config
        checkpoint = request.steps < config.max_new_tokens and any(s.finish is None for s in request.samples)
        if config.prune is not None and checkpoint and request.steps % config.prune.every == 0:
            prune(engine, request)
        if request.search is not None and checkpoint and request.steps % request.search.every == 0:
            fork(engine, request)
        if not request.pending and all(sample.finish is not None for sample in request.samples):
            engine.complete(request)


def prune(engine, request) -> None:
    """Keep the best ``prune.keep`` of the request's samples not pruned yet (finished ones included) by the partial
    score; the others are pruned and their rows leave."""
    prune_config = request.config.prune
    candidates = [index for index, sample in enumerate(request.samples) if not sample.pruned]
    keep = max(prune_config.min_keep, math.ceil(len(candidates) * prune_config.keep))
    if keep >= len(candidates):
        return
    partial = engine.partial_scores(prune_config.score, request, candidates)
    _, best = select_topk(partial, keep)
    kept = {candidates[index] for index in best[0].tolist()}
    rows = {row.sample: row for row in engine.rows if row.request is request}
    for index in candidates:
        if index in kept:
            continue
        if index in rows:
            engine.retire(rows[index], PRUNED)
        request.samples[index].pruned = True
        if request.samples[index].finish is None:
            request.samples[index].finish = PRUNED
        request.emit(index)
    request.stats["pruned"] += len(candidates) - keep


def fork(engine, request) -> None:
    """A search checkpoint: the population is rebuilt from parents chosen by the request's fork hook; a child takes
    its parent's tokens, log-probs and KV (the full blocks shared, the partial one copied) and keeps its own seed."""
    search, width = request.search, request.config.n
    members = list(range(width))
    weights = check_weights(search.step_score(engine.samples_so_far(request, members)), 1, width)
    finished = torch.tensor([[sample.finish is not None for sample in request.samples]])
    parents = search.choose(weights, finished, search.generator)[0].tolist()
    old_rows = {row.sample: row for row in engine.rows if row.request is request}
    old_samples = request.samples
    children = []
    for child, parent in enumerate(parents):
        if parent in old_rows:
            blocks = []
            for block in old_rows[parent].blocks:
                if int(engine.pool.lens[block]) == BLOCK:
                    engine.pool.ref(block)
                    blocks.append(block)
                else:
                    blocks.append(engine.pool.copy_block(block))
            engine.pool.reserved += engine.row_blocks
            children.append(Row(request, child, blocks))
    request.samples = [old_samples[parent].copy() for parent in parents]
    for row in old_rows.values():
        engine.retire(row, None)
    engine.rows.extend(children)
    request.stats["checkpoints"] = request.stats.get("checkpoints", 0) + 1
    held = {block for row in children for block in row.blocks}
    request.stats.setdefault("generated_kv_bytes", []).append(len(held) * engine.pool.block_bytes)
