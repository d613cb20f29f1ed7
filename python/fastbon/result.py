"""What a request returns: ``GenerationResult``, the best k of n samples per prompt, selected on the device."""

from dataclasses import dataclass, field

import torch

from .decode import PRUNED
from .ops.topk import select_topk
from .scoring import Samples, compute_scores


@dataclass
class GenerationResult:
    """The best k of n samples per prompt (and all n with ``return_all=True``).

    sequences [B, k, T] generated ids only, padded with the pad id; lengths [B, k]; scores [B, k];
    token_logprobs [B, k, T] per-token log-probabilities in the call's ``logprobs`` mode (0 on padding);
    ``indices`` [B, k] which of the n samples each is; finish_reasons [B, k] int8 indices into
    ``fastbon.FINISH_REASONS``. ``stats`` holds what the run did: tokens prefilled, KV bytes (the suffix at its
    peak), decode steps, tokens generated (the rows each step ran: finished and pruned samples leave the batch),
    samples pruned.
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    token_logprobs: torch.Tensor
    indices: torch.Tensor
    finish_reasons: torch.Tensor | None = None
    all_sequences: torch.Tensor | None = None
    all_lengths: torch.Tensor | None = None
    all_scores: torch.Tensor | None = None
    all_token_logprobs: torch.Tensor | None = None
    all_finish_reasons: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    top_logprob_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def samples_tensors(samples: list, pad_token_id: int, device, top_count: int = 0) -> dict:
    """A request's samples (``fastbon.request.Sample``) as padded tensors: tokens [m, T], logprobs [m, T], lengths
    [m], finish reasons int8 [m] (PRUNED where pruned), pruned [m], and top ids / log-probs [m, T, top]."""
    width = max(1, max(len(sample.tokens) for sample in samples))
    tokens = torch.full((len(samples), width), pad_token_id, dtype=torch.int64)
    logprobs = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, sample in enumerate(samples):
        tokens[row, :len(sample.tokens)] = torch.tensor(sample.tokens, dtype=torch.int64)
        logprobs[row, :len(sample.logprobs)] = torch.tensor(sample.logprobs, dtype=torch.float32)
    pruned = torch.tensor([sample.pruned for sample in samples], dtype=torch.bool)
    reasons = torch.tensor([PRUNED if sample.pruned else sample.finish or 0 for sample in samples], dtype=torch.int8)
    out = dict(tokens=tokens, logprobs=logprobs, lengths=torch.tensor([len(s.tokens) for s in samples]),
               finish_reasons=reasons, pruned=pruned)
    if top_count:
        top_ids = torch.zeros((len(samples), width, top_count), dtype=torch.int64)
        top_logprobs = torch.full((len(samples), width, top_count), float("-inf"), dtype=torch.float32)
        for row, sample in enumerate(samples):
            if sample.top_ids:
                top_ids[row, :len(sample.top_ids)] = torch.tensor(sample.top_ids, dtype=torch.int64)
                top_logprobs[row, :len(sample.top_logprobs)] = torch.tensor(sample.top_logprobs)
        out.update(top_ids=top_ids, top_logprobs=top_logprobs)
    return {name: value.to(device) for name, value in out.items()}


def select_best(prompt: torch.Tensor, output: dict, score, k: int, return_all: bool, backend, pad_token_id: int,
                stats: dict) -> GenerationResult:
    """One prompt's ``GenerationResult`` (B = 1) from its samples' tensors (``samples_tensors``): every sample
    scored, the best k selected on the device; a pruned sample ranks below every sample that ran to the end."""
    device = output["tokens"].device
    samples = Samples(prompts=[prompt.to(device)], sequences=output["tokens"][None], lengths=output["lengths"][None],
                      token_logprobs=output["logprobs"][None], pad_token_id=pad_token_id)
    finish_reasons = output["finish_reasons"][None]
    scores = compute_scores(score, samples).masked_fill(output["pruned"][None], float("-inf"))
    best_scores, best = select_topk(scores, k, backend=backend)

    def pick(values):
        index = best.view(1, k, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
        return values.gather(1, index)

    result = GenerationResult(sequences=pick(samples.sequences), lengths=pick(samples.lengths), scores=best_scores,
                              token_logprobs=pick(samples.token_logprobs), indices=best,
                              finish_reasons=pick(finish_reasons), stats=stats)
    if "top_ids" in output:
        result.top_logprob_ids, result.top_logprobs = pick(output["top_ids"][None]), pick(output["top_logprobs"][None])
    if return_all:
        result.all_sequences, result.all_lengths = samples.sequences, samples.lengths
        result.all_scores, result.all_token_logprobs = scores, samples.token_logprobs
        result.all_finish_reasons = finish_reasons
    return result


def concatenate(results: list, pad_token_id: int) -> GenerationResult:
    """Per-prompt results (B = 1 each) as one result of B prompts: the time axis padded to the longest."""
    def cat(name, fill):
        values = [getattr(result, name) for result in results]
        if values[0] is None:
            return None
        if values[0].dim() >= 3:
            width = max(value.shape[2] for value in values)
            values = [torch.nn.functional.pad(value, (0, 0) * (value.dim() - 3) + (0, width - value.shape[2]),
                                              value=fill) for value in values]
        return torch.cat(values)

    merged = {name: cat(name, fill) for name, fill in (
        ("sequences", pad_token_id), ("lengths", 0), ("scores", 0), ("token_logprobs", 0.0), ("indices", 0),
        ("finish_reasons", 0), ("all_sequences", pad_token_id), ("all_lengths", 0), ("all_scores", 0),
        ("all_token_logprobs", 0.0), ("all_finish_reasons", 0), ("top_logprob_ids", 0),
        ("top_logprobs", float("-inf")))}
    return GenerationResult(**merged, stats={})
