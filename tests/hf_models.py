"""Tiny random-weight models of each supported family, built from a config (no downloads)."""

import torch
from transformers import (
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


def tiny_model(family: str, seed: int = 0, eos_token_id=None):
    """A small eval-mode model with weights scaled up so its distributions are far from uniform."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
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
