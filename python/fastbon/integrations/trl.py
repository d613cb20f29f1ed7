"""TRL rollouts on fastbon: each GRPO / RLOO group's prompt is prefilled once and its n samples share its KV cache.

GRPO::

    from fastbon.integrations.trl import rollout_func
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, rollout_func=rollout_func())

RLOO, or GRPO without ``rollout_func``: a mix-in that replaces the trainer's single-turn generation::

    from fastbon.integrations.trl import FastbonGeneration
    class FastbonRLOOTrainer(FastbonGeneration, RLOOTrainer): ...

TRL (1.16) hands both paths the prompts already repeated ``num_generations`` times in a row (its ``RepeatSampler``
order; a group may straddle two processes, so a process's first and last groups may be partial). Runs of one
prompt become one fastbon sample group (a run of m prompts gets n = m), and each call holds every run of one size.
The sampling settings are the trainer's own (``args.temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``max_completion_length``, ``generation_kwargs``, checked like HF's ``generate`` settings);
the per-token log-probs are fastbon's "processed" ones, log_softmax(logits / temperature), what TRL recomputes for
its policy ratio. Completions keep their EOS (or the token that completed a stop string) and nothing after it.
Weights come straight from the trainer's model, unwrapped as TRL unwraps it for generation: no copy, no server.
"""

import inspect

import torch
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from ..config import SamplingConfig
from ..generate import generate_each, split_keywords
from ..seeds import sample_seeds
from .transformers import generation_settings, merged_generation_config

# What a caller may set over the trainer's settings (rollout_func's keywords, FastbonGeneration.fastbon_sampling).
SETTINGS = frozenset({"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "stop_strings",
                      "backend", "compile"})


def _check_overrides(overrides: dict) -> dict:
    unknown = sorted(set(overrides) - SETTINGS)
    if unknown:
        raise TypeError(f"unknown fastbon rollout settings {unknown}; these can be set: {sorted(SETTINGS)}")
    SamplingConfig(**{name: value for name, value in overrides.items() if name in SamplingConfig.__dataclass_fields__})
    return dict(overrides)


def _tokenizer(trainer):
    processing_class = trainer.processing_class
    return getattr(processing_class, "tokenizer", processing_class)


def _settings(trainer, model, overrides: dict) -> dict:
    """fastbon.generate keywords from the trainer's generation settings (what TRL's transformers path runs with)."""
    args = trainer.args
    config = merged_generation_config(model, do_sample=True, max_new_tokens=args.max_completion_length,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                      eos_token_id=list(trainer.eos_token_ids), **(args.generation_kwargs or {}))
    settings = generation_settings(config, 0, _tokenizer(trainer))
    del settings["n"]
    settings.update(overrides)
    if settings.get("stop_strings") is not None:
        settings["tokenizer"] = _tokenizer(trainer)
    return settings


def _runs(items: list) -> list[tuple[int, int]]:
    """(start, length) of each run of equal consecutive items."""
    runs = []
    for position, item in enumerate(items):
        if runs and items[runs[-1][0]] == item:
            runs[-1][1] += 1
        else:
            runs.append([position, 1])
    return [tuple(run) for run in runs]


def generate_rollouts(trainer, prompt_ids: list, overrides: dict) -> tuple[list, list]:
    """One completion (token ids) and its per-token processed log-probs for each prompt of ``prompt_ids`` (lists of
    ids, each group's prompt repeated in a row): every group of the step submitted at once to one engine, a group of
    m prompts as one request of n = m samples."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one prompt")
    runs = _runs([list(ids) for ids in prompt_ids])
    completions, logprobs = [None] * len(prompt_ids), [None] * len(prompt_ids)
    args = trainer.args
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                     gather_deepspeed3_params=args.ds3_gather_for_generation,
                                     gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs) as model:
        sampling, engine = split_keywords(_settings(trainer, model, overrides))
        configs = [SamplingConfig(n=length, k=1, return_all=True, logprobs="processed", **sampling)
                   for _, length in runs]
        prompts = [torch.as_tensor(list(prompt_ids[start]), dtype=torch.int64) for start, _ in runs]
        seeds = [sample_seeds(None, 1, length) for _, length in runs]
        results, _ = generate_each(model, prompts, configs, seeds, **engine)
        for (start, length), result in zip(runs, results, strict=True):
            lengths, sequences = result.all_lengths[0].tolist(), result.all_sequences[0].tolist()
            token_logprobs = result.all_token_logprobs[0].tolist()
            for sample in range(length):
                completions[start + sample] = sequences[sample][:lengths[sample]]
                logprobs[start + sample] = token_logprobs[sample][:lengths[sample]]
    return completions, logprobs


def _group_size(trainer) -> int:
    if trainer.model.training:
        return trainer.num_generations
    return getattr(trainer, "num_generations_eval", None) or trainer.num_generations


def check_groups(prompts: list, group: int, processes: int) -> None:
    """Each run of identical prompts must hold a multiple of ``group`` (num_generations: TRL's RepeatSampler order;
    identical neighbouring prompts merge into longer runs); with several processes a group may straddle two, so the
    first and last runs of a process's slice may be partial."""
    runs = _runs(prompts)
    for index, (start, length) in enumerate(runs):
        at_edge = index in (0, len(runs) - 1)
        if length % group and not (processes > 1 and at_edge):
            raise ValueError(f"rollout prompts must come in runs of num_generations={group} identical prompts "
                             f"(TRL's RepeatSampler order); the run at position {start} holds {length}")


def _tokenize(trainer, prompts: list) -> list:
    """Token ids of each prompt: chat messages through the processing class's chat template (as TRL renders them),
    text through the tokenizer."""
    processing_class = trainer.processing_class
    if is_conversational({"prompt": prompts[0]}):
        chat_template = getattr(trainer, "chat_template", None)
        if chat_template is None and getattr(_tokenizer(trainer), "chat_template", None) is None:
            raise ValueError("the prompts are chat messages but the trainer's processing class has no chat template")
        return processing_class.apply_chat_template(
            conversation=prompts, tools=getattr(trainer, "tools", None) or None, chat_template=chat_template,
            add_generation_prompt=True, tokenize=True, return_dict=True,
            **(getattr(trainer, "chat_template_kwargs", None) or {}))["input_ids"]
    return processing_class(text=prompts)["input_ids"]


def rollout_func(**sampling):
    """A ``rollout_func(prompts, trainer) -> dict`` for ``GRPOTrainer(..., rollout_func=...)``.

    ``sampling`` overrides the trainer's settings (keys in ``SETTINGS``; a different temperature also changes what
    the returned log-probs are relative to). Returns ``prompt_ids``, ``completion_ids`` and ``logprobs``: one entry
    per prompt received, in its order; a group's samples in the order fastbon drew them.
    """
    overrides = _check_overrides(sampling)

    def rollout(prompts: list, trainer) -> dict:
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a non-empty list (TRL's per-process prompt slice)")
        check_groups(prompts, _group_size(trainer), trainer.accelerator.num_processes)
        runs = _runs(prompts)
        first_ids = _tokenize(trainer, [prompts[start] for start, _ in runs])
        prompt_ids = [list(ids) for ids, (_, length) in zip(first_ids, runs, strict=True) for _ in range(length)]
        completion_ids, logprobs = generate_rollouts(trainer, prompt_ids, overrides)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout


class FastbonGeneration:
    """Mix-in that makes a TRL trainer draw its samples with fastbon: ``class T(FastbonGeneration, RLOOTrainer)``
    (or ``GRPOTrainer``). ``fastbon_sampling`` (a class attribute) overrides settings as ``rollout_func``'s keywords.

    It replaces ``_generate_single_turn`` and relies on what TRL 1.16 does around it: the method receives the
    tokenized prompts (``prompt_ids``, each group repeated ``num_generations`` times in a row), ``images`` and
    ``multimodal_fields`` (text only here: both must be empty), and returns the completion ids (RLOO) or the
    completion ids and their log-probs (GRPO, whose method takes ``num_generations``); the trainer provides
    ``args`` (the sampling settings, ``use_vllm`` off), ``eos_token_ids``, ``processing_class``, ``model_wrapped``
    and ``accelerator``. Multi-turn tool calls re-enter the method with distinct prompts: groups of one.
    """

    fastbon_sampling: dict = {}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        if getattr(self.args, "use_vllm", False):
            raise ValueError("FastbonGeneration replaces the trainer's generation: set use_vllm=False")
        if images is not None or multimodal_fields:
            raise ValueError("FastbonGeneration serves text prompts only (got images or multimodal fields)")
        completion_ids, logprobs = self._fastbon_rollout(prompt_ids)
        returns_logprobs = "num_generations" in inspect.signature(super()._generate_single_turn).parameters
        return (completion_ids, logprobs) if returns_logprobs else completion_ids

    def _fastbon_rollout(self, prompt_ids) -> tuple[list, list]:
        """(completion ids, processed log-probs) for the repeated prompt ids."""
        return generate_rollouts(self, prompt_ids, _check_overrides(self.fastbon_sampling))
