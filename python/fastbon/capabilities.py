"""What a model needs from fastbon's decode attention, read from its config and attention modules, and the check
that serves it or names what is missing.

fastbon serves a Hugging Face causal LM when every layer is a causal softmax attention that goes through
transformers' ``AttentionInterface`` (the decode step swaps in the shared-prefix attention there; everything else
— MLP or MoE, norms, rotary or learned positions, the head and its final soft-cap — is the model's own code) and
each layer's needs are among the features the op implements:

  window    the layer's sliding window, where the modeling file builds sliding-window masks at all
            (``create_sliding_window_causal_mask``; a ``sliding_window`` in the config of a model that never
            builds one means nothing): ``config.sliding_window`` on the layers ``config.layer_types`` marks
            "sliding_attention", on every layer when the config has no ``layer_types`` (Mistral, Mixtral, Phi-3)
  softcap   attention logit soft-capping (``config.attn_logit_softcapping``, Gemma 2)
  sinks     learned per-head sinks (the module's ``sinks`` parameter, gpt-oss)
  scaling   any softmax scale (the module's ``scaling``)
  head dims keys and values of one head size (multi-head latent attention's differ)

Refused, each with one ValueError naming the missing feature, before any work: encoder-decoder and multimodal
models, models whose attention does not go through the AttentionInterface, layers of other kinds (state-space,
linear attention, convolutions, chunked or compressed attention, hybrids), bidirectional attention, multi-head
latent attention, attention called more than once per layer, keys rearranged after the cache.
"""

import functools
import inspect
import re
from dataclasses import dataclass

SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")
# Config entries that make a model multimodal: fastbon decodes text from token ids only.
_MODALITY_CONFIGS = ("vision_config", "audio_config", "speech_config", "text_config", "vision_tower_config")


@dataclass(frozen=True)
class LayerNeeds:
    """What layer ``index``'s attention needs from the decode attention op."""

    index: int
    window: int | None
    softcap: float | None
    sinks: bool
    scaling: float | None
    head_dim: int


@functools.cache
def _builds_sliding_masks(modeling_file) -> bool:
    """Whether a modeling file builds sliding-window masks (``create_sliding_window_causal_mask``)."""
    try:
        return "create_sliding_window_causal_mask" in inspect.getsource(modeling_file)
    except (OSError, TypeError):
        return False


def layer_window(module) -> int | None:
    """The sliding window transformers' mask applies to attention module ``module``'s layer (None: full causal
    attention), from its config, its ``layer_idx`` and its modeling file."""
    config = module.config
    window = getattr(config, "sliding_window", None)
    if window is None or not _builds_sliding_masks(inspect.getmodule(type(module))):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[module.layer_idx] != "sliding_attention":
        return None
    return window


@functools.cache
def _forward_source(module_class) -> str:
    try:
        return inspect.getsource(module_class.forward)
    except (OSError, TypeError):
        return ""


def _changes_cached_keys(module_class) -> bool:
    """Whether ``module_class.forward`` assigns its keys again after the cache update (JetMoE tiles them for its
    own query-to-key head mapping): the decode attention reads the cache's keys, so it would not see that."""
    source = _forward_source(module_class)
    update = source.find(".update(")
    if update < 0:
        return False
    after_update = source[source.find("\n", update) + 1:]
    return re.search(r"\bkey_states\s*=", after_update) is not None


def _calls_attention_interface(module_class) -> bool:
    """Whether ``module_class.forward`` picks its attention function from transformers' AttentionInterface."""
    return "ALL_ATTENTION_FUNCTIONS" in _forward_source(module_class)


def attention_modules(model) -> dict:
    """{layer index: attention module} of the modules whose forward goes through the AttentionInterface."""
    modules = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and _calls_attention_interface(type(module)):
            modules.setdefault(module.layer_idx, module)
    return modules


def _refuse(model_type: str, what: str) -> None:
    raise ValueError(f"model type {model_type!r} {what}, which fastbon does not serve (see fastbon.capabilities)")


def model_needs(model) -> list:
    """Each layer's ``LayerNeeds``; a ValueError naming the first missing feature when fastbon cannot serve the
    model exactly."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        _refuse(model_type, "is encoder-decoder")
    modalities = [name for name in _MODALITY_CONFIGS if getattr(config, name, None) is not None]
    if modalities:
        _refuse(model_type, f"is multimodal ({', '.join(modalities)})")
    num_layers = getattr(config, "num_hidden_layers", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - set(SERVED_LAYER_TYPES))
        if other:
            _refuse(model_type, f"has layers of type {', '.join(map(repr, other))} (state-space, linear, chunked, "
                                "compressed or hybrid attention, not full or sliding-window softmax attention)")
    if not getattr(type(model), "_supports_attention_backend", False):
        _refuse(model_type, "runs its own attention code, not transformers' AttentionInterface")
    modules = attention_modules(model)
    if not modules or (num_layers is not None and sorted(modules) != list(range(num_layers))):
        _refuse(model_type, f"has {len(modules)} AttentionInterface attention layers for {num_layers} decoder "
                            "layers (state-space, recurrent or convolution layers)")
    qk_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None)
    v_dim = getattr(config, "v_head_dim", None)
    if v_dim is not None and qk_dim is not None and v_dim != qk_dim:
        _refuse(model_type, f"has value heads of another size than its key heads (key head dim {qk_dim}, value "
                            f"head dim {v_dim}: multi-head latent attention or similar)")
    needs = []
    for index, module in sorted(modules.items()):
        if getattr(module, "is_causal", True) is False:
            _refuse(model_type, f"has bidirectional attention in layer {index}")
        calls = _forward_source(type(module)).count("attention_interface(")
        if calls > 1:  # one decode attention per layer and step (the cache appends one key per call)
            _refuse(model_type, f"calls the attention function {calls} times per layer (differential attention)")
        if _changes_cached_keys(type(module)):
            _refuse(model_type, f"rearranges the cached keys before attention in layer {index} (its own head "
                                "mapping)")
        softcap = getattr(module, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
        needs.append(LayerNeeds(index, layer_window(module), float(softcap) if softcap else None,
                                getattr(module, "sinks", None) is not None, getattr(module, "scaling", None),
                                head_dim))
    return needs
