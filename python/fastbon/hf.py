"""Hugging Face glue: the attention function behind ``SharedPrefixCache``, model checks, and the HF-style entry.

The unmodified HF model runs every forward. Prefill uses the model's own attention implementation; decode
steps switch the model's config to ``"fastbon"``, registered here with transformers' ``AttentionInterface``,
whose function reads the shared prefix and the sample's suffix from the cache and calls
``fastbon.ops.shared_prefix_attention``.
"""

import contextlib
import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "fastbon"
CACHE_KWARG = "shared_prefix_cache"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2")


def shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """AttentionInterface function for decode steps: query [N, Hq, 1, D] -> ([N, 1, Hq, D], None).

    ``key``/``value`` are the suffix buffers the cache returned; the prefix and the lengths come from the
    ``SharedPrefixCache`` passed down the forward as the keyword ``shared_prefix_cache``.
    """
    cache = kwargs.get(CACHE_KWARG)
    if cache is None or query.shape[2] != 1:
        raise RuntimeError("the fastbon attention runs only decode steps of fastbon.generate (one token per sample, "
                           f"with {CACHE_KWARG}= passed to the model)")
    layer = cache.layers[module.layer_idx]
    # The backend was chosen and the metadata checked once per generate call: no per-layer validation here.
    out = cache.attention(query[:, :, 0].contiguous(), layer.prefix_keys, layer.prefix_values, cache.prefix_lens,
                          layer.suffix_keys, layer.suffix_values, cache.suffix_lens, cache.sample_to_prompt,
                          scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out[:, None], None


def _no_mask(*args, **kwargs):
    """The decode mask is implied by the cache's lengths; nothing to build."""
    return None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


@contextlib.contextmanager
def decode_attention(model):
    """Run the block's forwards with the fastbon attention; the model's own implementation comes back after."""
    config = model.config
    original = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = original


def forward_parameters(model) -> set:
    """The keyword names the model's forward accepts."""
    return set(inspect.signature(model.forward).parameters)


def cache_argument(model) -> str:
    """The name the model's forward takes its cache by (transformers renamed past_key_values to cache in 5.x)."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def check_model(model, max_total_length: int) -> None:
    """Raise a clear error, before any work, for a model this path cannot serve exactly."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "forward"):
        raise TypeError(f"model must be a Hugging Face causal LM (a PreTrainedModel), got {type(model).__name__}")
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model type {model_type!r} is encoder-decoder; fastbon serves decoder-only models")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise ValueError(f"model type {model_type!r} is not supported; fastbon serves {supported}")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"model type {model_type!r} uses attention logit soft-capping, which fastbon does not serve")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ())
    if window is not None and uses_window and max_total_length > window:
        raise ValueError(f"model type {model_type!r} uses a sliding window of {window} tokens and prompt + "
                         f"max_new_tokens reaches {max_total_length}; fastbon serves full attention only")
    learned_positions = getattr(config, "n_positions", None)  # GPT-2's position table has no entry past it
    if learned_positions is not None and max_total_length > learned_positions:
        raise ValueError(f"model type {model_type!r} has {learned_positions} learned positions and prompt + "
                         f"max_new_tokens reaches {max_total_length}")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"model type {model_type!r} has no language-model head")


def generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus=False, streamer=None, fastbon_score="mean_logprob", fastbon_seed=None, **model_kwargs):
    """``model.generate(..., custom_generate=fastbon.hf.generate, num_return_sequences=n, do_sample=True)``.

    transformers hands over ``input_ids`` already repeated n times per prompt (token ids only, a cheap copy);
    this takes every n-th row, so each prompt is still prefilled and stored once, runs ``fastbon.generate``
    with the generation config's temperature / top_k / top_p / min_p / max_new_tokens / eos, and returns
    HF's layout: [B·n, L + T] prompt + completion, each prompt's n samples ranked best first by
    ``fastbon_score`` ("mean_logprob", "sum_logprob" or a callable, as in ``fastbon.generate``).
    Custom logits processors and stopping criteria are not applied (transformers' defaults are implied by
    the generation config, which is honoured).
    """
    from .generate import generate as fastbon_generate

    config = generation_config
    n = config.num_return_sequences or 1
    attention_mask = model_kwargs.get("attention_mask")
    prompts, prompt_mask = input_ids[::n], (attention_mask[::n] if attention_mask is not None else None)
    sampling = dict(temperature=config.temperature if config.temperature is not None else 1.0,
                    top_k=config.top_k or 0, top_p=config.top_p if config.top_p is not None else 1.0,
                    min_p=config.min_p or 0.0)
    if not config.do_sample:
        sampling = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    max_new_tokens = config.max_new_tokens or max(1, config.max_length - input_ids.shape[1])
    result = fastbon_generate(model, prompts, n=n, k=n, max_new_tokens=max_new_tokens, eos_token_id=config.eos_token_id,
                              score=fastbon_score, seed=fastbon_seed, attention_mask=prompt_mask, **sampling)
    completions = result.sequences.reshape(prompts.shape[0] * n, -1)
    return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)
