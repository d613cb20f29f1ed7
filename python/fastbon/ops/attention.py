"""Public entry of the shared-prefix decode attention op."""

import math

import torch

from .. import dispatch
from . import _checks


def shared_prefix_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            *, scale=None, window=None, softcap=None, sinks=None, backend=None):
    """Decode attention for N single-token queries over a prefix shared per prompt plus a suffix per sample.

    Args:
        q: [N, Hq, D] queries (float16, bfloat16, float32, float64).
        prefix_k, prefix_v: [B, Hkv, P_max, D] each prompt's keys/values, stored once (HF layout).
        prefix_lens: int32 [B], valid prefix length per prompt (<= P_max).
        suffix_k, suffix_v: [N, Hkv, T_max, D] each sample's own keys/values.
        suffix_lens: int32 [N], valid suffix length per sample (<= T_max).
        sample_to_prompt: int32 [N], the prompt each query belongs to.
        scale: softmax scale, default 1/sqrt(D).
        window: None, or a sliding window w >= 1 (transformers' ``sliding_window``): with the query at position
            prefix_lens[b] + suffix_lens[i] - 1, prefix key p at position p and suffix key t at
            prefix_lens[b] + t, only keys with query position - w < key position count.
        softcap: None, or c > 0: scores become c * tanh(scale * q.k / c) (Gemma 2's ``attn_logit_softcapping``).
        sinks: None, or [Hq] float learned logits (gpt-oss ``sinks``): exp(sinks[h]) joins the softmax
            denominator of query head h and adds no value.
        backend: None (pick), "torch", "triton", "cpu" or "cuda".

    Returns:
        [N, Hq, D] in q's dtype: softmax attention of query i over its prompt's first prefix_lens[b] keys and its
        own first suffix_lens[i] keys (query head h reads KV head h // (Hq // Hkv)); zeros where there are no keys.
        The cuda backend (and a registered one, unless it declares them) implements none of window / softcap /
        sinks: forced, it raises ValueError for a call with them; the default choice never picks it for one.

    Example:
        >>> out = shared_prefix_attention(q, pk, pv, torch.tensor([7], dtype=torch.int32), sk, sv,
        ...                               torch.full((4,), 3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32))
    """
    _checks.tensor("q", q, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    device = q.device
    num_samples, num_q_heads, head_dim = q.shape
    for name, value in (("prefix_k", prefix_k), ("prefix_v", prefix_v), ("suffix_k", suffix_k),
                        ("suffix_v", suffix_v)):
        _checks.tensor(name, value, ndim=4, dtypes=(q.dtype,), device=device)
    num_prompts, num_kv_heads, prefix_max, _ = prefix_k.shape
    suffix_max = suffix_k.shape[2]
    _checks.shape("prefix_k", prefix_k, (num_prompts, num_kv_heads, prefix_max, head_dim))
    _checks.shape("prefix_v", prefix_v, prefix_k.shape)
    _checks.shape("suffix_k", suffix_k, (num_samples, num_kv_heads, suffix_max, head_dim))
    _checks.shape("suffix_v", suffix_v, suffix_k.shape)
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q's head count ({num_q_heads}) must be a multiple of the KV head count ({num_kv_heads})")
    if num_prompts == 0:
        raise ValueError("prefix_k must hold at least one prompt")
    for name, value, length in (("prefix_lens", prefix_lens, num_prompts), ("suffix_lens", suffix_lens, num_samples),
                                ("sample_to_prompt", sample_to_prompt, num_samples)):
        _checks.tensor(name, value, ndim=1, dtypes=(torch.int32,), device=device)
        _checks.shape(name, value, (length,))
    _checks.in_range("prefix_lens", prefix_lens, 0, prefix_max)
    _checks.in_range("suffix_lens", suffix_lens, 0, suffix_max)
    _checks.in_range("sample_to_prompt", sample_to_prompt, 0, num_prompts - 1)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    features = attention_features(window, softcap, sinks, num_q_heads, q.dtype, device)
    tensors = (q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt)
    names = tuple(name for name, value in zip(dispatch.FEATURES, features, strict=True) if value is not None)
    chosen = dispatch.resolve("shared_prefix_attention", device, backend, q.dtype, features=names)
    kernel = dispatch.implementation("shared_prefix_attention", chosen)
    # Features go only to calls that have them: the kernels without any (cuda, a registered one) take 9 arguments.
    return kernel(*(t.contiguous() for t in tensors), float(scale), *(features if names else ()))


def attention_features(window, softcap, sinks, num_q_heads: int, dtype: torch.dtype, device: torch.device):
    """(window, softcap, sinks) checked and in the backend contract's form: window None or int >= 1, softcap None
    or float > 0, sinks None or a contiguous [Hq] tensor in the compute dtype (float64 for float64, else float32)."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or (
                softcap <= 0):
            raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
        softcap = float(softcap)
    if sinks is not None:
        _checks.tensor("sinks", sinks, ndim=1, dtypes=_checks.FLOAT_DTYPES, device=device)
        _checks.shape("sinks", sinks, (num_q_heads,))
        if not torch.isfinite(sinks).all():
            raise ValueError("sinks must be finite")
        sinks = sinks.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).contiguous()
    return window, softcap, sinks


def attention_implementation(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None):
    """The backend function (contract of ``reference.shared_prefix_attention``, inputs unchecked) that runs on
    ``device``: resolved once by a caller that calls it every layer of every step. Calls with window / softcap /
    sinks that the resolved backend lacks go to the registry's choice for them (a forced backend raises)."""
    chosen = dispatch.resolve("shared_prefix_attention", device, backend, dtype)
    kernel = dispatch.implementation("shared_prefix_attention", chosen)
    if dispatch.entry("shared_prefix_attention", chosen).features == frozenset(dispatch.FEATURES):
        return kernel

    def run(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt, scale,
            window=None, softcap=None, sinks=None):
        features = tuple(name for name, value in zip(dispatch.FEATURES, (window, softcap, sinks), strict=True)
                         if value is not None)
        function = kernel
        if features:
            function = dispatch.implementation("shared_prefix_attention", dispatch.resolve(
                "shared_prefix_attention", device, backend, q.dtype, features=features))
        return function(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt, scale,
                        window, softcap, sinks)

    return run
