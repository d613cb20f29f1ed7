"""Hugging Face model checks: what fastbon needs to know about a model before any work (the keywords its forward
takes, the name of its cache argument, whether this path serves it). The routing of its attention and linear layers
is ``fastbon.routing``; the ``model.generate(custom_generate=...)`` entry is ``fastbon.integrations.transformers``.
"""

import inspect

from . import capabilities


def forward_parameters(model) -> set:
    """The keyword names the model's forward accepts."""
    return set(inspect.signature(model.forward).parameters)


def cache_argument(model) -> str:
    """The name the model's forward takes its cache by (transformers renamed past_key_values to cache in 5.x)."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def check_model(model, max_total_length: int) -> None:
    """Raise one clear error, before any work, for a model this path cannot serve exactly (what is served:
    ``fastbon.capabilities``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "forward"):
        raise TypeError(f"model must be a Hugging Face causal LM (a PreTrainedModel), got {type(model).__name__}")
    model_type = getattr(config, "model_type", type(model).__name__)
    capabilities.model_needs(model)
    learned_positions = getattr(config, "n_positions", None)  # GPT-2's position table has no entry past it
    if learned_positions is not None and max_total_length > learned_positions:
        raise ValueError(f"model type {model_type!r} has {learned_positions} learned positions and prompt + "
                         f"max_new_tokens reaches {max_total_length}")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"model type {model_type!r} has no language-model head")
