"""The Hugging Face entry: ``model.generate(..., custom_generate=fastbon.integrations.transformers.generate)``, also
under ``pipeline("text-generation")``.

Every generation setting that reaches this entry is either honoured exactly or refused with one error that names
it — never dropped:

- honoured: ``do_sample`` (False = greedy), ``temperature``, ``top_k`` (HF's default 50 included), ``top_p``,
  ``min_p``, ``repetition_penalty``, ``max_new_tokens`` / ``max_length``, ``eos_token_id``,
  ``num_return_sequences``, and stop strings as ``fastbon_stop_strings=[...], fastbon_tokenizer=tok``: transformers
  (5.x) does not hand ``tokenizer=`` to a callable ``custom_generate``, so its own ``stop_strings=`` check fails
  before this entry runs (with HF's error, nothing silent);
- inert here (they cannot change which tokens come out): special-token ids, HF's own cache and compile choices,
  beam-only and assistant-only knobs, ``negative_prompt_ids`` without ``guidance_scale`` (HF ignores them too);
- refused: any other setting away from HF's default (``num_beams > 1``, ``no_repeat_ngram_size``,
  ``bad_words_ids``, ``min_new_tokens``, ``typical_p``, ``guidance_scale``, ``output_scores``, ...), custom
  ``logits_processor`` / ``stopping_criteria`` entries, ``prefix_allowed_tokens_fn`` (HF builds a processor of
  it), and model inputs other than ids and their mask.

transformers (5.x) keeps two arguments of its ``generate`` from any callable ``custom_generate``: ``streamer``
(it receives the prompt ids, then nothing: the completions come back at the end) and ``assistant_model``
(assisted decoding only speeds up drawing from the model itself; HF refuses it with ``num_return_sequences > 1``).
This entry never sees them, so it can refuse neither; it refuses them when a later transformers passes them.

The same check serves the other adapters (``generation_settings``), so TRL's and lm-eval's settings go through it.
"""

import copy

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process, stopping_criteria

from ..generate import generate as fastbon_generate

ENTRY = "fastbon.integrations.transformers.generate"  # how errors name this entry

HONOURED = frozenset({"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
                      "max_length", "eos_token_id", "stop_strings", "num_return_sequences"})
INERT = frozenset({"pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation",
                   "cache_config", "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size",
                   "low_memory", "continuous_batching_config", "renormalize_logits", "early_stopping",
                   "length_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule",
                   "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
                   "max_matching_ngram_size", "is_assistant", "transformers_version"})
# HF applies these warpers only when sampling; greedy decoding ignores them, and so does this entry.
SAMPLING_ONLY = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                           "top_h"})
# The model inputs HF's generate prepares for any decoder-only model; fastbon builds its own mask, positions, cache.
MODEL_INPUTS = frozenset({"attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep",
                          "cache_position"})
# The processors and criteria HF builds from the honoured settings, each with the setting it must carry.
PROCESSORS = {logits_process.TemperatureLogitsWarper: ("temperature", "temperature"),
              logits_process.TopKLogitsWarper: ("top_k", "top_k"), logits_process.TopPLogitsWarper: ("top_p", "top_p"),
              logits_process.MinPLogitsWarper: ("min_p", "min_p"),
              logits_process.RepetitionPenaltyLogitsProcessor: ("penalty", "repetition_penalty")}
CRITERIA = (stopping_criteria.MaxLengthCriteria, stopping_criteria.EosTokenCriteria,
            stopping_criteria.StopStringCriteria)


def merged_generation_config(model, **settings) -> GenerationConfig:
    """The generation config ``model.generate(**settings)`` would run with: the model's own config updated with
    ``settings``, HF's global defaults where neither sets a value. An unknown setting raises, naming it."""
    config = copy.deepcopy(model.generation_config)
    unknown = config.update(**settings)
    if unknown:
        raise ValueError(f"unknown generation settings {sorted(unknown)}")
    for name, value in GenerationConfig._get_default_generation_params().items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    return config


def _is_default(value, default) -> bool:
    """A flag left off reads False in some configs and None in others: both are HF's default."""
    return value == default or (value in (None, False) and default in (None, False) and type(value) is not int)


def generation_settings(config: GenerationConfig, prompt_width: int, tokenizer=None) -> dict:
    """``fastbon.generate`` keywords (n, max_new_tokens, sampling, eos, stop strings) for an HF generation config.

    ``prompt_width`` is the padded prompt length, which ``max_length`` counts as HF does. Raises ValueError naming
    the first setting that is away from HF's default and not honoured.
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(config).__name__}")
    defaults = GenerationConfig._get_default_generation_params()
    sampling = bool(config.do_sample)
    refused = [f"{name}={value!r}" for name, value in sorted(config.to_dict().items())
               if not (name.startswith("_") or name in HONOURED or name in INERT
                       or (not sampling and name in SAMPLING_ONLY)) and not _is_default(value, defaults.get(name))]
    if refused:
        raise ValueError(f"generation settings {', '.join(refused)} are not supported by fastbon (each differs from "
                         f"HF's default); fastbon honours {', '.join(sorted(HONOURED))}")
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    elif config.max_length is not None:
        max_new_tokens = config.max_length - prompt_width
        if max_new_tokens < 1:
            raise ValueError(f"max_length={config.max_length} leaves no room after the {prompt_width}-token prompt")
    else:
        raise ValueError("generation_config sets neither max_new_tokens nor max_length")
    settings = dict(n=config.num_return_sequences or 1, max_new_tokens=max_new_tokens,
                    eos_token_id=[] if config.eos_token_id is None else config.eos_token_id,
                    repetition_penalty=1.0 if config.repetition_penalty is None else config.repetition_penalty)
    if sampling:
        settings.update(temperature=1.0 if config.temperature is None else config.temperature,
                        top_k=config.top_k or 0, top_p=1.0 if config.top_p is None else config.top_p,
                        min_p=config.min_p or 0.0)
    else:
        settings.update(temperature=0.0)
    if config.stop_strings:
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        settings.update(stop_strings=stops, tokenizer=tokenizer)
    return settings


def _check_prepared_lists(config, logits_processor, stopping) -> None:
    """What HF built from the config is fine; anything else in its lists (a custom processor or criterion, a prefix
    constraint) would be dropped, so it is refused by its class name."""
    for processor in logits_processor or ():
        expected = PROCESSORS.get(type(processor))
        if type(processor) is logits_process.LogitNormalization:
            continue  # renormalize_logits: the sampled distribution is the same
        if type(processor) is logits_process.PrefixConstrainedLogitsProcessor:
            raise ValueError(f"prefix_allowed_tokens_fn is not supported by {ENTRY}")
        if expected is None or getattr(processor, expected[0]) != getattr(config, expected[1]):
            raise ValueError(f"logits_processor {type(processor).__name__} is not supported by fastbon (only what "
                             "the generation config's honoured settings build)")
    for criterion in stopping or ():
        if not isinstance(criterion, CRITERIA) or (isinstance(criterion, stopping_criteria.MaxLengthCriteria)
                                                   and criterion.max_length != config.max_length):
            raise ValueError(f"stopping_criteria {type(criterion).__name__} is not supported by fastbon (only "
                             "max_new_tokens / max_length, eos_token_id and stop_strings)")


def generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus=False, streamer=None, assistant_model=None, fastbon_score="mean_logprob", fastbon_seed=None,
             fastbon_stop_strings=None, fastbon_tokenizer=None, **model_kwargs):
    """``model.generate(**inputs, custom_generate=fastbon.integrations.transformers.generate,
    num_return_sequences=n, ...)``.

    transformers hands over ``input_ids`` already repeated n times per prompt (token ids only, a cheap copy); this
    takes every n-th row, so each prompt is still prefilled and stored once, runs ``fastbon.generate`` with the
    generation config's settings, and returns HF's layout: [B·n, L + T] prompt + completion, T the longest
    completion, each prompt's n samples ranked best first by ``fastbon_score`` ("mean_logprob", "sum_logprob" or a
    callable, as in ``fastbon.generate``), padded with the pad id (HF's choice: the eos id when no pad id is set).
    ``fastbon_seed``: an int or one int per prompt, as ``fastbon.generate``'s ``seed``. ``fastbon_stop_strings``
    with ``fastbon_tokenizer``: stop strings, matched as HF's ``stop_strings`` are.
    """
    if generation_config is None:
        raise TypeError(f"{ENTRY} runs as model.generate(..., custom_generate={ENTRY}), which passes "
                        "generation_config")
    for name, value in (("streamer", streamer), ("assistant_model", assistant_model)):
        if value is not None:
            raise ValueError(f"{name} is not supported by {ENTRY}")
    if synced_gpus:
        raise ValueError(f"synced_gpus is not supported by {ENTRY}")
    unsupported = sorted(set(model_kwargs) - MODEL_INPUTS)
    if unsupported:
        raise ValueError(f"model inputs {unsupported} are not supported by {ENTRY} (ids and mask only)")
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"{name}: continuing from a filled cache is not supported by {ENTRY}")
    settings = generation_settings(generation_config, input_ids.shape[1])
    if fastbon_stop_strings is not None:
        settings.update(stop_strings=fastbon_stop_strings, tokenizer=fastbon_tokenizer)
    _check_prepared_lists(generation_config, logits_processor, stopping_criteria)
    n = settings["n"]
    attention_mask = model_kwargs.get("attention_mask")
    prompts, prompt_mask = input_ids[::n], (attention_mask[::n] if attention_mask is not None else None)
    if settings["temperature"] == 0.0:
        settings["n"] = 1  # greedy: HF's n rows per prompt are n copies of one sequence
    result = fastbon_generate(model, prompts, k=settings["n"], score=fastbon_score, seed=fastbon_seed,
                              attention_mask=prompt_mask, **settings)
    sequences, lengths = result.sequences, result.lengths
    if settings["n"] != n:
        sequences, lengths = sequences.expand(-1, n, -1), lengths.expand(-1, n)
    width = max(int(lengths.max()), 1)
    eos = generation_config.eos_token_id
    pad = generation_config.pad_token_id
    if pad is None:
        pad = (eos if isinstance(eos, int) else eos[0]) if eos not in (None, []) else 0
    completions = sequences[..., :width].reshape(prompts.shape[0] * n, width)
    past_end = torch.arange(width, device=completions.device) >= lengths.reshape(-1, 1)
    completions = completions.masked_fill(past_end, pad)
    return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)
