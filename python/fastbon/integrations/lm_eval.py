"""The lm-evaluation-harness model ``fastbon``: HF's model class, with ``generate_until`` drawn by fastbon.

``import fastbon.integrations.lm_eval`` registers it; then ``simple_evaluate(model="fastbon", model_args=...)`` runs a
task as ``model="hf"`` does. lm-eval's command line, with the model registered first:
``python -m fastbon.integrations.lm_eval run --model fastbon --model_args pretrained=DIR --tasks ...``.

lm-eval clones every request ``repeats`` times (self-consistency tasks use 64) and HF's class generates each clone
on its own; here the identical requests of one document (same context, same generation kwargs) become one fastbon
call with n = their count, so the document is prefilled once and its KV cache shared by all its samples. Greedy
requests are drawn once and repeated (they are the same sequence).

What is honoured exactly as HF's class does it: ``until`` (stop strings, matched across token boundaries; the text
is cut at the first one as HF's class cuts it), ``max_gen_toks`` and its aliases, the context's tokenization and
left truncation, ``think_end_token``; sampling kwargs through the HF drop-in's check (``do_sample``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``; anything else away from HF's default
raises, naming it). The log-likelihood methods are HF's own. Extra ``model_args``: ``fastbon_seed`` (an int: each
document's samples then depend only on it, the context and the kwargs — never on batching; default: torch's seed),
``fastbon_backend``, ``fastbon_compile`` (the decode step under torch.compile, ``fastbon.generate(compile=True)``).
"""

import json

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from ..config import SamplingConfig
from ..generate import generate_each, split_keywords
from ..prompts import prompt_seed
from ..seeds import sample_seeds
from .transformers import generation_settings, merged_generation_config


def _key(context: str, gen_kwargs: dict) -> str:
    return json.dumps([context, gen_kwargs], sort_keys=True, default=repr)


@register_model("fastbon")
class FastbonLM(HFLM):
    """``HFLM`` whose ``generate_until`` draws each document's ``repeats`` samples in one shared-prefix call."""

    def __init__(self, *args, fastbon_seed=None, fastbon_backend=None, fastbon_compile=False, **kwargs):
        if fastbon_seed is not None and (isinstance(fastbon_seed, bool) or not isinstance(fastbon_seed, int)):
            raise TypeError(f"fastbon_seed must be an int or None, got {type(fastbon_seed).__name__}")
        if not isinstance(fastbon_compile, bool):
            raise TypeError(f"fastbon_compile must be a bool, got {type(fastbon_compile).__name__}")
        super().__init__(*args, **kwargs)
        self.fastbon_seed, self.fastbon_backend = fastbon_seed, fastbon_backend
        self.fastbon_compile = fastbon_compile

    def _request_settings(self, gen_kwargs: dict, eos: str, context_length: int) -> tuple[dict, list]:
        """(fastbon.generate keywords, stop strings) for one request's kwargs, as HF's class reads them."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if not kwargs.get("do_sample"):
            kwargs.pop("temperature", None)  # as HF's class: greedy needs no temperature
        max_length = kwargs.pop("max_length", None)
        config = merged_generation_config(self.model, max_new_tokens=max_gen_toks, **kwargs)
        if max_length is not None:  # HF's class lets max_length (context + generation) override max_gen_toks
            config.max_new_tokens, config.max_length = None, max_length
        settings = generation_settings(config, context_length)
        stops = [stop for stop in until if stop]
        if stops:
            settings.update(stop_strings=stops, tokenizer=self.tokenizer)
        return settings, until

    def _text(self, tokens: list, until: list) -> str:
        """A completion's text as HF's class makes it: after the last thinking token, cut at the first stop."""
        if isinstance(self.think_end_token, int) and self.think_end_token in tokens:
            tokens = tokens[len(tokens) - tokens[::-1].index(self.think_end_token):]
            text = self.tok_decode(tokens).lstrip()
        else:
            text = self.tok_decode(tokens)
        think = self.think_end_token if isinstance(self.think_end_token, str) else None
        return postprocess_generated_text(generation=text, stop=until, think_end_token=think)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = {}
        for position, request in enumerate(requests):
            context, gen_kwargs = request.args
            if not isinstance(gen_kwargs, dict):
                raise TypeError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
            groups.setdefault(_key(context, gen_kwargs), (context, gen_kwargs, []))[2].append(position)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        seed = self.fastbon_seed if self.fastbon_seed is not None else torch.initial_seed()
        # Every document's request at once, on one engine: n = its number of identical requests (1 when greedy).
        prompts, configs, seeds, untils = [], [], [], []
        for key, (context, gen_kwargs, positions) in groups.items():
            budget = self.max_length - normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)["max_gen_toks"]
            prompt = self.tok_batch_encode([context], left_truncate_len=budget, truncation=self.truncation)[0][0]
            settings, until = self._request_settings(gen_kwargs, eos, prompt.numel())
            sampling, _ = split_keywords(settings)
            n = 1 if sampling["temperature"] == 0.0 else len(positions)
            sampling.update(n=n, k=1, return_all=True)
            prompts.append(prompt.cpu())
            configs.append(SamplingConfig(**sampling))
            seeds.append(sample_seeds([prompt_seed(seed, key)], 1, n))
            untils.append(until)
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            outputs, _ = generate_each(self.model, prompts, configs, seeds, tokenizer=self.tokenizer,
                                       backend=self.fastbon_backend, compile=self.fastbon_compile)
        results = [None] * len(requests)
        for (context, gen_kwargs, positions), result, until in zip(groups.values(), outputs, untils, strict=True):
            sequences, lengths = result.all_sequences[0].tolist(), result.all_lengths[0].tolist()
            drawn = [self._text(sequences[sample][:lengths[sample]], until) for sample in range(len(sequences))]
            texts = drawn * len(positions) if len(drawn) == 1 else drawn
            for position, text in zip(positions, texts, strict=True):
                results[position] = text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


if __name__ == "__main__":  # python -m fastbon.integrations.lm_eval run --model fastbon ...: lm-eval CLI, registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
