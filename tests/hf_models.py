"""Tiny random-weight models built from a config (no downloads): ``FAMILIES`` for the end-to-end tests of the
decode loop, ``ARCHITECTURES`` for the architecture matrix (tests/test_architectures.py), each with the attention
features of its family and windows small enough to bind within a few tokens."""

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=16)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=None)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
}

WINDOW = 4  # every sliding window of ARCHITECTURES: prompts of 3 and 7 tokens and 6 new ones cross it
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_HALF_SLIDING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])

# model type -> config overrides on top of _TINY. The features each exercises: sliding windows on every layer
# (mistral, mixtral, phi3, starcoder2) or on some (qwen2, qwen2_moe, qwen3, qwen3_moe, gemma2, gemma3_text, smollm3,
# gpt_oss, cohere2, olmo3, ministral, exaone4), soft-capping (gemma2), sinks (gpt_oss), a custom scale (granite,
# gemma2/3's query_pre_attn_scalar), MoE MLPs, learned positions (gpt2), partial rotary (phi, glm).
_ARCHITECTURE_CONFIGS = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, num_experts=4,
                      shared_expert_intermediate_size=32, **_MOE),
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3_moe": dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, num_experts=4, **_MOE),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                   **_HALF_SLIDING),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, **_HALF_SLIDING),
    "phi3": dict(sliding_window=WINDOW),
    "olmo2": {},
    "granite": dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
    "smollm3": dict(use_sliding_window=True, sliding_window=WINDOW, no_rope_layers=[1, 0]),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, **_HALF_SLIDING),
    "cohere2": dict(**_HALF_SLIDING),
    "olmo3": dict(**_HALF_SLIDING),
    "ministral": dict(head_dim=16, **_HALF_SLIDING),
    "starcoder2": dict(sliding_window=WINDOW),
    "exaone4": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(partial_rotary_factor=0.5),
    "glm4": dict(head_dim=16),
    "helium": dict(head_dim=16),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, attention_multiplier=0.3),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "seed_oss": dict(head_dim=16),
}
ARCHITECTURES = {name: (lambda name=name, overrides=overrides: AutoModelForCausalLM.from_config(
    CONFIG_MAPPING[name](**{**_TINY, **overrides}))) for name, overrides in _ARCHITECTURE_CONFIGS.items()}
ARCHITECTURES["gpt2"] = FAMILIES["gpt2"]


def tiny_model(family: str, seed: int = 0, eos_token_id=None, builders=FAMILIES):
    """A small eval-mode model of ``builders`` (``FAMILIES``; ``ARCHITECTURES`` for the matrix) with weights scaled
    up so its distributions are far from uniform."""
    torch.manual_seed(seed)
    model = builders[family]().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    return model


def hf_token_logprobs(model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Raw log-probabilities of ``completion`` after ``prompt`` from one fresh HF forward (float64 softmax)."""
    with torch.no_grad():
        logits = model(torch.cat([prompt, completion])[None]).logits[0]
    log_softmax = torch.log_softmax(logits[prompt.numel() - 1:-1].double(), dim=-1)
    return log_softmax.gather(-1, completion[:, None])[:, 0]
