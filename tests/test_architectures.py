"""The architecture matrix: every served family (tests/hf_models.py ARCHITECTURES, tiny random configs with windows
of 4 tokens) decodes exactly what Hugging Face computes, on every backend; every refused family raises before any
work. Prompts of 3 and 7 tokens and 6 new tokens put each sliding window's start first in the prefix, then in the
sample's own suffix.

Every architecture runs on the torch and cpu backends. The Triton interpreter takes about a second per kernel launch
on a 2-core CI machine, so triton (and the emulated CUDA kernels) run the architectures that between them reach
every path of the kernels: no features, a window on every layer, windows on some layers with a soft-cap and a custom
scale, windows with sinks, MoE with windows on some layers. The kernels
themselves see the same features from every architecture: tests/test_shared_prefix_attention.py covers them at odd
sizes."""

import pytest
import torch
from conftest import EMULATED_CUDA
from hf_models import _TINY, ARCHITECTURES, VOCAB, WINDOW, hf_token_logprobs, tiny_model
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import fastbon
from fastbon import capabilities

NEW_TOKENS = 6
PROMPT_LENGTHS = (3, 7)
TRITON_ARCHITECTURES = ["llama", "mistral", "gemma2", "gpt_oss", "qwen2_moe"]
CASES = ([(name, backend) for name in sorted(ARCHITECTURES) for backend in ("torch", "cpu")]
         + [(name, "triton") for name in TRITON_ARCHITECTURES])


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = tiny_model(name, builders=ARCHITECTURES)
    return models[name]


def _prompts():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (length,), generator=generator) for length in PROMPT_LENGTHS]


def test_matrix_covers_the_issue_list():
    required = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                "gemma3_text", "phi3", "olmo2", "granite", "smollm3", "gpt2", "gpt_oss"}
    assert required <= set(ARCHITECTURES) and len(ARCHITECTURES) >= 16


def test_windows_bind(models):
    """Each windowed architecture's window is shorter than its prompts plus new tokens, on the layers the config
    marks sliding (and only those)."""
    for name in ("mistral", "qwen2", "gemma2", "gemma3_text", "gpt_oss", "smollm3", "cohere2"):
        needs = capabilities.model_needs(_model(models, name))
        assert WINDOW in {need.window for need in needs}, name
        assert WINDOW < min(PROMPT_LENGTHS) + NEW_TOKENS - 1 and WINDOW < max(PROMPT_LENGTHS)
    assert {need.window for need in capabilities.model_needs(_model(models, "llama"))} == {None}
    gemma2 = capabilities.model_needs(_model(models, "gemma2"))
    assert [need.window for need in gemma2] == [WINDOW, None] and all(need.softcap == 2.0 for need in gemma2)
    assert all(need.sinks for need in capabilities.model_needs(_model(models, "gpt_oss")))


@pytest.mark.parametrize(("name", "backend"), CASES, ids=[f"{name}-{backend}" for name, backend in CASES])
def test_matches_hugging_face(models, name, backend):
    """Sampled tokens' log-probs equal a fresh HF forward over prompt + sample within 1e-4; greedy equals HF's
    greedy generate token for token."""
    model = _model(models, name)
    prompts = _prompts()
    # No EOS (eos_token_id=[]): every sample runs the full length, as HF's greedy generate with min_new_tokens.
    result = fastbon.generate(model, prompts, n=2, k=2, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=3,
                              eos_token_id=[], backend=backend)
    for b, prompt in enumerate(prompts):
        for j in range(2):
            length = int(result.lengths[b, j])
            completion = result.sequences[b, j, :length]
            expected = hf_token_logprobs(model, prompt, completion)
            error = (result.token_logprobs[b, j, :length].double() - expected).abs().max().item()
            assert error < 1e-4, f"{name} prompt {b} sample {j}: log-prob error {error}"
    greedy = fastbon.generate(model, prompts, n=1, k=1, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=[],
                             backend=backend)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)[0, prompt.numel():]
        assert torch.equal(greedy.sequences[b, 0, :NEW_TOKENS], expected), f"{name} prompt {b}: greedy differs"


def _from_config(model_type, **overrides):
    return lambda: AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**{**_TINY, **overrides}))


# model type -> (builder, the feature the error names). Each is a family transformers ships whose decode fastbon's
# attention cannot reproduce exactly.
REFUSED = {
    "mamba": (_from_config("mamba", hidden_size=32, num_hidden_layers=2), "linear_attention"),
    "qwen3_next": (_from_config("qwen3_next", head_dim=16, layer_types=["linear_attention", "full_attention"],
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, linear_num_value_heads=2, linear_num_key_heads=2,
                                linear_key_head_dim=16, linear_value_head_dim=16), "linear_attention"),
    "deepseek_v3": (_from_config("deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=16, first_k_dense_replace=2), "latent attention"),
    "diffllama": (_from_config("diffllama"), "differential attention"),
    "bert": (_from_config("bert", is_decoder=False), "bidirectional"),
    "stablelm": (_from_config("stablelm"), "AttentionInterface"),
    "llama4_text": (_from_config("llama4_text", head_dim=16, num_local_experts=2, moe_layers=[],
                                 layer_types=["chunked_attention", "full_attention"]), "chunked_attention"),
    "t5": (lambda: __import__("transformers").T5ForConditionalGeneration(CONFIG_MAPPING["t5"](
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)), "encoder-decoder"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_before_any_work(name):
    build, feature = REFUSED[name]
    torch.manual_seed(0)
    model = build().eval()
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=feature):
        fastbon.generate(model, _prompts(), n=2, max_new_tokens=4)
    assert not forwards, "the model ran before the refusal"


def test_forced_cuda_declines_the_engines_trees(emulated_cuda_backend):
    """The CUDA kernels (emulated here) take one-level trees; the engine's rows read two levels at least (their
    prompt's blocks and their own), so a forced cuda backend is refused before any work, naming what it lacks."""
    model = tiny_model("llama", builders=ARCHITECTURES)
    with pytest.raises(ValueError, match="levels"):
        fastbon.generate(model, _prompts(), n=2, max_new_tokens=2, backend=EMULATED_CUDA)
