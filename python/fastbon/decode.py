"""One decode step of the engine's rows: one forward of the model over every live row of every request, then the
fused sample + score op, per row.

The step is pure: it takes the rows' inputs (their last tokens, positions, KV paths, sampling settings) and returns
each row's next token, its log-probability and, on request, the most probable alternatives. The engine owns the
rows and calls the policies (EOS, stop strings, pruning, forks, preemption, admission) after it.

A row's results depend only on the row: every product it takes part in sums in a fixed order whatever the batch
(the cpu skinny kernel for the linear layers, the tree-attention kernel per row and key chunk, the sampler per row),
and the batch is padded to a multiple of ``invariant_rows`` rows so that torch's elementwise kernels (SiLU's exp,
RoPE's cos / sin), whose vector path and scalar tail round differently, put each element on the same path whatever
the number of rows.
"""

import contextlib
import math
from dataclasses import dataclass

import torch

from . import hf, routing
from .compiled import compiled_forward
from .ops.sampling import sample_implementation

# Why each sample ended: ``GenerationResult.finish_reasons`` holds indices into this tuple.
FINISH_REASONS = ("length", "eos", "stop", "pruned")
LENGTH, EOS, STOP, PRUNED = range(4)
# torch's widest vector loop on CPU processes 2 vectors of 64 bytes per iteration: elements past the last whole
# iteration of a thread's chunk take the scalar path.
_VECTOR_LOOP_BYTES = 128


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """Hugging Face's ``RepetitionPenaltyLogitsProcessor``: logits of seen tokens divided by ``penalty`` where
    positive and multiplied where negative (``penalty`` a number or a [rows, 1] tensor)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def token_logprobs(logits: torch.Tensor, token: torch.Tensor, temperature: torch.Tensor | None) -> torch.Tensor:
    """log_softmax(logits / temperature)[token] per row in float32 (temperature None or 0: no scaling)."""
    rows = logits.float()
    if temperature is not None:
        rows = rows / torch.where(temperature > 0, temperature, 1.0)[:, None]
    return rows.gather(1, token[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)


def invariant_rows(model) -> int:
    """The row count the decode batch is padded to a multiple of, so that every elementwise op of the forward
    splits its elements over torch's threads at whole vector-loop boundaries (see the module docstring): for each
    row width W of the model (hidden, MLP, attention projections, head dim), W x rows must be a multiple of
    threads x the loop's elements."""
    config = model.get_text_config() if hasattr(model, "get_text_config") else model.config
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    element = next(model.parameters()).element_size()
    quantum = torch.get_num_threads() * _VECTOR_LOOP_BYTES // element
    multiple = 1
    for width in (hidden, intermediate, heads * head_dim, kv_heads * head_dim, head_dim):
        needed = quantum // math.gcd(int(width), quantum)
        multiple = multiple * needed // math.gcd(multiple, needed)
    return multiple


@dataclass
class StepInputs:
    """The live rows of one step (R of them; the forward pads to ``padded_rows``)."""

    tokens: list  # the token each row feeds
    positions: list  # its position in the row's sequence
    temperature: torch.Tensor  # float32 [R]
    top_k: torch.Tensor  # int32 [R]
    top_p: torch.Tensor  # float32 [R]
    min_p: torch.Tensor  # float32 [R]
    seed: torch.Tensor  # int64 [R]
    step: torch.Tensor  # int64 [R]: the token's index in its sample (Philox offset)
    penalty: torch.Tensor | None  # float32 [R, 1] repetition penalties (1 = off), or None when no row has one
    seen: torch.Tensor | None  # bool [R, V] tokens of each row's prompt and completion (with ``penalty``)
    processed: torch.Tensor | None  # int64 rows whose log-probs are the processed ones, or None
    penalized_raw: torch.Tensor | None  # int64 rows with a penalty whose log-probs are the raw ones, or None
    top_rows: torch.Tensor | None  # int64 rows that record top log-probs, or None
    top_count: int  # how many


class Decoder:
    """The model's decode forward and the sampler, resolved once per engine."""

    def __init__(self, model, backend, compile: bool):
        self.model, self.backend = model, backend
        self.device = model.get_output_embeddings().weight.device
        self.forward_extra = {"logits_to_keep": 1} if "logits_to_keep" in hf.forward_parameters(model) else {}
        self.cache_argument = hf.cache_argument(model)
        self.linears = routing.skinny_linears(model, backend)
        self.compiled = compiled_forward(model) if compile else None
        self.sample = sample_implementation(self.device, backend, model.get_output_embeddings().weight.dtype)
        self.routing_checked = False
        self.stats = {}

    def forward(self, cache, inputs: StepInputs, padded_rows: int) -> torch.Tensor:
        """Logits [R, V] of the live rows (``cache`` already holds this step's paths: ``PagedCache.set_rows``)."""
        live = len(inputs.tokens)
        pad = padded_rows - live
        ids = torch.tensor(inputs.tokens + [0] * pad, dtype=torch.int64, device=self.device)[:, None]
        positions = torch.tensor(inputs.positions + [0] * pad, dtype=torch.int64, device=self.device)[:, None]
        # A prepared 4-D mask makes HF skip its mask construction; the fastbon attention reads the paths instead.
        mask = torch.ones((padded_rows, 1, 1, 1), dtype=torch.bool, device=self.device)
        arguments = dict(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         **{self.cache_argument: cache, routing.CACHE_KWARG: cache}, **self.forward_extra)
        cache.attention_calls = 0
        with self.linears or contextlib.nullcontext():
            if self.compiled is None or not self.routing_checked:
                logits = self.model(**arguments).logits[:, -1]
            else:
                logits = self.compiled(self.stats, (padded_rows, cache.num_levels), **arguments).logits[:, -1]
        if not self.routing_checked:
            if cache.attention_calls != len(cache.layers):
                raise RuntimeError(f"model type {self.model.config.model_type!r}: {cache.attention_calls} of "
                                   f"{len(cache.layers)} attention layers ran through transformers' "
                                   "AttentionInterface; fastbon serves only models whose attention does")
            self.routing_checked = True
        return logits[:live]

    def sample_rows(self, logits: torch.Tensor, inputs: StepInputs, row_index: torch.Tensor | None = None):
        """(tokens int64 [R], log-probs float32 [R], top ids / log-probs [R, top] or None) of each row from
        ``logits`` (one row per row, or ``row_index`` maps rows to logits rows: a request's first token)."""
        rows = inputs.seed.shape[0]
        source = logits if row_index is None else logits.index_select(0, row_index)
        sampled = source
        if inputs.penalty is not None:
            sampled = penalize_repetitions(source, inputs.seen, inputs.penalty.to(source.dtype))
        tokens, logprobs = self.sample(sampled.contiguous(), torch.arange(rows, device=self.device),
                                       inputs.temperature, inputs.top_k, inputs.top_p, inputs.min_p, inputs.seed,
                                       inputs.step)
        # The sampler's log-prob is of the logits it was given: the penalized ones where a penalty applies.
        for picked, logits_used, temperature in ((inputs.processed, sampled, inputs.temperature),
                                                 (inputs.penalized_raw, source, None)):
            if picked is not None:
                logprobs = logprobs.clone()
                logprobs[picked] = token_logprobs(logits_used.index_select(0, picked), tokens[picked],
                                                  None if temperature is None else temperature[picked])
        top = None
        if inputs.top_rows is not None:
            raw = torch.log_softmax(source.index_select(0, inputs.top_rows).float(), dim=-1)
            top = raw.topk(min(inputs.top_count, raw.shape[-1]), dim=-1)
        return tokens, logprobs, top


__all__ = ["EOS", "FINISH_REASONS", "LENGTH", "PRUNED", "STOP", "Decoder", "StepInputs", "invariant_rows",
           "penalize_repetitions", "token_logprobs"]
