"""Plain-PyTorch implementations of the three ops: the oracle every other backend is tested against.

They take inputs already validated and normalised by the public functions in ``fastbon.ops`` (the backend
contract, written out in each function's docstring) and compute in float64 when given float64, else float32.
They are written for clarity, not speed, but avoid copying the shared prefix per sample.

Why top-p by a full sort here (the CPU selects from a histogram, CUDA by radix passes, Triton by bisection): a sort
states the rule directly (the k-th largest, the cumulative mass of the largest) and torch runs it on any device;
the oracle's job is to be obviously right, and the others are timed against it.
"""

import torch

from .philox import philox_uniform


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_states(out_a, lse_a, out_b, lse_b):
    """Merge two partial attentions over disjoint key sets by their log-sum-exp (FlashInfer's ``merge_state``).

    ``out_*`` [..., D] are softmax-weighted values over each key set, ``lse_*`` [...] the log-sum-exp of the
    scores; an empty key set has lse = -inf and contributes nothing. Both empty gives out = 0, lse = -inf.
    """
    lse_max = torch.maximum(lse_a, lse_b)
    safe_max = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    weight_a = torch.exp(lse_a - safe_max)
    weight_b = torch.exp(lse_b - safe_max)
    total = weight_a + weight_b
    out = (weight_a[..., None] * out_a + weight_b[..., None] * out_b) / torch.where(total > 0, total, 1)[..., None]
    return out, safe_max + torch.log(total)


def _partial_attention(scores, values_fn):
    """Softmax-weighted values and lse for masked scores [..., K] (-inf = masked); ``values_fn(probs)`` -> [..., D]."""
    lse = torch.logsumexp(scores, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse[..., None])
    return values_fn(probs), lse


def shared_prefix_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            scale, window=None, softcap=None, sinks=None):
    """Single-token decode attention over a shared prefix and a per-sample suffix.

    q [N, Hq, D]; prefix_k/v [B, Hkv, P_max, D]; prefix_lens int32 [B]; suffix_k/v [N, Hkv, T_max, D];
    suffix_lens int32 [N]; sample_to_prompt int32 [N]; scale a float; window None or an int >= 1; softcap None or
    a float > 0; sinks None or [Hq] in the compute dtype (float64 for float64 q, else float32). Returns [N, Hq, D]
    in q's dtype:

        o_i = merge(attn(q_i, prefix[b_i][:prefix_lens[b_i]]), attn(q_i, suffix[i][:suffix_lens[i]]), sink)

    Query head h reads KV head h // (Hq // Hkv). Positions: prefix key p is at position p, suffix key t at
    prefix_lens[b_i] + t, the query at prefix_lens[b_i] + suffix_lens[i] - 1. The score of a key is
    s = scale * q.k, or softcap * tanh(scale * q.k / softcap) with a soft-cap; a window w keeps the keys with
    query position - w < key position (transformers' sliding_window_causal); a sink adds exp(sinks[h]) to the
    softmax denominator and nothing to the values (gpt-oss). A query with no keys at all gets zeros.
    """
    num_samples, num_q_heads, head_dim = q.shape
    num_prompts, num_kv_heads, prefix_max, _ = prefix_k.shape
    suffix_max = suffix_k.shape[2]
    group = num_q_heads // num_kv_heads
    work = _compute_dtype(q.dtype)
    query = q.to(work).view(num_samples, num_kv_heads, group, head_dim) * scale
    prompt = sample_to_prompt.long()
    sample_prefix_lens = prefix_lens.long()[prompt]
    lengths = suffix_lens.long()

    def capped(scores):
        return scores if softcap is None else softcap * torch.tanh(scores / softcap)

    # Prefix: every query against every prompt's prefix in one batched product (the prefix is read once, not
    # gathered per sample); each query then keeps the row of its own prompt.
    scores = capped(torch.einsum("nhgd,bhpd->nbhgp", query, prefix_k.to(work)))
    scores = scores[torch.arange(num_samples, device=q.device), prompt]
    prefix_positions = torch.arange(prefix_max, device=q.device)
    prefix_valid = prefix_positions < sample_prefix_lens[:, None]
    if window is not None:
        prefix_valid &= prefix_positions > (sample_prefix_lens + lengths - 1 - window)[:, None]
    scores = scores.masked_fill(~prefix_valid[:, None, None, :], float("-inf"))

    # Positions past a length may hold anything (a preallocated buffer): zero them so 0 * garbage stays 0.
    prompt_valid = prefix_positions < prefix_lens.long()[:, None]
    prefix_values_valid = torch.where(prompt_valid[:, None, :, None], prefix_v.to(work), 0)

    def prefix_values(probs):
        per_prompt = torch.einsum("nhgp,bhpd->nbhgd", probs, prefix_values_valid)
        return per_prompt[torch.arange(num_samples, device=q.device), prompt]

    out_prefix, lse_prefix = _partial_attention(scores, prefix_values)

    scores = capped(torch.einsum("nhgd,nhtd->nhgt", query, suffix_k.to(work)))
    suffix_positions = torch.arange(suffix_max, device=q.device)
    suffix_stored = suffix_positions < lengths[:, None]
    suffix_valid = suffix_stored if window is None else suffix_stored & (
        suffix_positions >= (lengths - window)[:, None])
    scores = scores.masked_fill(~suffix_valid[:, None, None, :], float("-inf"))
    suffix_values_valid = torch.where(suffix_stored[:, None, :, None], suffix_v.to(work), 0)
    out_suffix, lse_suffix = _partial_attention(
        scores, lambda probs: torch.einsum("nhgt,nhtd->nhgd", probs, suffix_values_valid))

    out, lse = merge_states(out_prefix, lse_prefix, out_suffix, lse_suffix)
    if sinks is not None:  # a key of logit sinks[h] whose value is zero
        sink_lse = sinks.to(work).view(1, num_kv_heads, group).expand_as(lse)
        out, _ = merge_states(out, lse, torch.zeros_like(out), sink_lse)
    return out.reshape(num_samples, num_q_heads, head_dim).to(q.dtype)


def plan_tree(plan):
    """The torch backend plans nothing: it reads the plan's level structure on every call."""
    return None


def tree_attention(plan, q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, scale, window=None,
                   softcap=None, sinks=None):
    """Tree (cascade) attention of N single-token queries (``fastbon.ops.tree_attention``).

    plan: a ``TreePlan`` (its ``level_lens`` [S_l] and ``level_segments`` [L, N]); q [N, Hq, D]; level_keys/values
    per level [S_l, Hkv, C_l, D]; suffix_k/v [N, Hkv, T, D]; suffix_lens int32 [N]; scale, window, softcap, sinks as
    in ``shared_prefix_attention``. Row i reads segment level_segments[l, i] of every level, then its suffix; keys
    are placed along its path (level l's key t at the lengths of i's earlier segments + t) and the query is at the
    path's last position. Written for clarity: each row's segments are gathered, then every level's partial
    attention is merged by log-sum-exp.
    """
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = suffix_k.shape[1]
    group = num_q_heads // num_kv_heads
    work = _compute_dtype(q.dtype)
    query = q.to(work).view(num_rows, num_kv_heads, group, head_dim) * scale
    suffix_lengths = suffix_lens.long()
    segments = [plan.level_segments[level].long() for level in range(plan.num_levels)]
    lengths = [plan.level_lens[level].long()[segments[level]] for level in range(plan.num_levels)] + [suffix_lengths]
    starts = [sum(lengths[:level], torch.zeros_like(suffix_lengths)) for level in range(len(lengths))]
    query_position = starts[-1] + suffix_lengths - 1
    keys = [level_keys[level][segments[level]] for level in range(plan.num_levels)] + [suffix_k]
    values = [level_values[level][segments[level]] for level in range(plan.num_levels)] + [suffix_v]

    out = torch.zeros((num_rows, num_kv_heads, group, head_dim), dtype=work, device=q.device)
    lse = torch.full((num_rows, num_kv_heads, group), float("-inf"), dtype=work, device=q.device)
    for level_k, level_v, length, start in zip(keys, values, lengths, starts, strict=True):
        index = torch.arange(level_k.shape[2], device=q.device)
        stored = index < length[:, None]
        visible = stored if window is None else stored & (start[:, None] + index > (query_position - window)[:, None])
        scores = torch.einsum("nhgd,nhtd->nhgt", query, level_k.to(work))
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        stored_values = torch.where(stored[:, None, :, None], level_v.to(work), 0)  # 0 * garbage stays 0
        level_out, level_lse = _partial_attention(
            scores, lambda probs, v=stored_values: torch.einsum("nhgt,nhtd->nhgd", probs, v))
        out, lse = merge_states(out, lse, level_out, level_lse)
    if sinks is not None:
        sink_lse = sinks.to(work).view(1, num_kv_heads, group).expand_as(lse)
        out, _ = merge_states(out, lse, torch.zeros_like(out), sink_lse)
    return out.reshape(num_rows, num_q_heads, head_dim).to(q.dtype)


def sampling_threshold(probs, top_k, top_p, min_p):
    """The smallest kept probability per row: tokens with ``probs >= threshold`` (and > 0) are the sampling set.

    probs [N, V] temperature-scaled and divided by the row maximum (so the maximum is 1); top_k int [N]
    (0 = off), top_p [N] (1 = off), min_p [N] (0 = off). Ties at a threshold are all kept:
      top-k   keeps p >= the k-th largest p;
      top-p   then keeps the fewest largest p whose mass reaches top_p of the top-k mass;
      min-p   keeps p >= min_p (min_p times the maximum, which is 1).
    """
    vocab = probs.shape[-1]
    sorted_probs = probs.sort(dim=-1, descending=True).values
    kth = sorted_probs.gather(-1, (top_k.long() - 1).clamp(0, vocab - 1)[:, None])[:, 0]
    threshold_k = torch.where((top_k > 0) & (top_k < vocab), kth, torch.zeros_like(kth))
    cumulative = torch.where(sorted_probs >= threshold_k[:, None], sorted_probs, 0).cumsum(-1)
    target = top_p.to(probs.dtype) * cumulative[:, -1]
    crossing = (cumulative < target[:, None]).sum(-1).clamp(max=vocab - 1)
    threshold_p = sorted_probs.gather(-1, crossing[:, None])[:, 0]
    threshold_p = torch.where(top_p < 1, threshold_p, torch.zeros_like(threshold_p))
    threshold_min = min_p.to(probs.dtype)
    return torch.maximum(torch.maximum(threshold_k, threshold_p), threshold_min)


def sample(logits, row_index, temperature, top_k, top_p, min_p, seed, step):
    """Draw one token per output row and return its raw log-probability.

    logits [R, V] float; row_index int64 [N] (output row i reads logits row row_index[i]); temperature, top_p,
    min_p float32 [N]; top_k int32 [N]; seed, step int64 [N]. Returns tokens int64 [N], logprobs float32 [N].

    temperature 0 is greedy (the first maximal logit). Otherwise, with p = exp((x - max x) / T) and the kept set
    from ``sampling_threshold``, the token is the first index j (vocabulary order) whose cumulative kept mass
    exceeds u times the total, u = philox_uniform(seed, step). The log-probability is x_token - logsumexp(x) of
    the unprocessed logits x: the model's own number, independent of the sampling parameters.
    """
    work = _compute_dtype(logits.dtype)
    rows = logits.index_select(0, row_index).to(work)
    vocab = rows.shape[-1]
    greedy = temperature == 0
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature).to(work)
    scaled = rows / safe_temperature[:, None]
    probs = torch.exp(scaled - scaled.amax(-1, keepdim=True))
    threshold = sampling_threshold(probs, top_k, top_p, min_p)
    kept = torch.where((probs >= threshold[:, None]) & (probs > 0), probs, 0)
    cdf = kept.cumsum(-1)
    target = philox_uniform(seed, step).to(work) * cdf[:, -1]
    drawn = (cdf <= target[:, None]).sum(-1)
    last_kept = vocab - 1 - (kept > 0).flip(-1).int().argmax(-1)
    drawn = torch.minimum(drawn, last_kept)  # only reachable through rounding in the cumulative sum
    tokens = torch.where(greedy, rows.argmax(-1), drawn)
    logprobs = rows.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(rows, -1)
    return tokens, logprobs.float()


def select_topk(scores, k):
    """Top k of each row of scores [B, n]: values and int64 indices [B, k], best first, ties to the lower index."""
    values, indices = scores.sort(dim=-1, descending=True, stable=True)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()
