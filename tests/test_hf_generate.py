"""fastbon.generate end to end, against Hugging Face itself, for every supported family."""

import copy

import pytest
import torch
from hf_models import FAMILIES, VOCAB, hf_token_logprobs, tiny_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

import fastbon
from fastbon.kv_blocks import BLOCK


def _unequal_prompts(padding_side: str):
    generator = torch.Generator().manual_seed(7)
    lengths = [5, 11, 2]
    prompts = [torch.randint(1, VOCAB, (length,), generator=generator) for length in lengths]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(ids.shape[1] - prompt.numel(), None) if padding_side == "left" else slice(0, prompt.numel())
        ids[row, span], mask[row, span] = prompt, 1
    return prompts, ids, mask


def _on_cpu(result):
    """A GenerationResult with its tensors moved to the CPU."""
    return fastbon.GenerationResult(*(value.cpu() if isinstance(value, torch.Tensor) else value
                                      for value in vars(result).values()))


def _check_against_hf(model, prompts, result, n, score="mean_logprob"):
    for b, prompt in enumerate(prompts):
        for j in range(n):
            length = int(result.all_lengths[b, j])
            completion = result.all_sequences[b, j, :length]
            expected = hf_token_logprobs(model, prompt, completion)
            got = result.all_token_logprobs[b, j, :length].double()
            assert (got - expected).abs().max().item() <= 1e-4
            assert torch.all(result.all_token_logprobs[b, j, length:] == 0)
            total = expected.sum().item()
            rule = total / length if score == "mean_logprob" else total
            assert abs(result.all_scores[b, j].item() - rule) <= 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logprobs_match_fresh_hf_forward(family, padding_side):
    model = tiny_model(family)
    prompts, ids, mask = _unequal_prompts(padding_side)
    n, k = 3, 2
    result = fastbon.generate(model, ids, attention_mask=mask, n=n, k=k, max_new_tokens=7, temperature=1.0,
                              top_p=0.9, seed=3, return_all=True)
    assert result.sequences.shape == (3, k, 7) and result.all_sequences.shape == (3, n, 7)
    _check_against_hf(model, prompts, result, n)
    # The k returned are the best of n by the score, best first, ties to the lower index.
    expected_scores, expected_index = result.all_scores.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(result.indices, expected_index[:, :k])
    assert torch.equal(result.scores, expected_scores[:, :k])
    assert torch.equal(result.sequences, result.all_sequences.gather(1, result.indices[..., None].expand(-1, -1, 7)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_hf_greedy(family):
    model = tiny_model(family)
    _, ids, mask = _unequal_prompts("left")
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    result = fastbon.generate(model, ids, attention_mask=mask, n=1, k=1, max_new_tokens=10, temperature=0.0)
    assert torch.equal(result.sequences[:, 0], expected[:, ids.shape[1]:])


def test_sum_logprob_and_callable_scores():
    model = tiny_model("llama")
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9, 3])]
    result = fastbon.generate(model, prompts, n=4, k=1, max_new_tokens=5, seed=0, score="sum_logprob",
                              return_all=True)
    _check_against_hf(model, prompts, result, 4, score="sum_logprob")

    def prefer_token_11(samples):
        return (samples.sequences == 11).sum(-1).float() - samples.lengths

    chosen = fastbon.generate(model, prompts, n=4, k=2, max_new_tokens=5, seed=0, score=prefer_token_11,
                              return_all=True)
    assert torch.equal(chosen.all_sequences, result.all_sequences), "the same seed draws the same samples"
    expected = prefer_token_11(fastbon.Samples(prompts, chosen.all_sequences, chosen.all_lengths,
                                               chosen.all_token_logprobs, 0))
    assert torch.equal(chosen.scores, expected.sort(dim=-1, descending=True, stable=True).values[:, :2])


def test_eos_stops_and_pads():
    model = tiny_model("llama")
    prompt = torch.tensor([[4, 8, 15, 16]])
    free = fastbon.generate(model, prompt, n=1, max_new_tokens=8, temperature=0.0)
    eos = int(free.sequences[0, 0, 2])
    first = int((free.sequences[0, 0] == eos).nonzero()[0])
    stopped = fastbon.generate(model, prompt, n=1, max_new_tokens=8, temperature=0.0, eos_token_id=eos)
    assert stopped.lengths[0, 0].item() == first + 1
    assert torch.equal(stopped.sequences[0, 0, :first + 1], free.sequences[0, 0, :first + 1])
    assert torch.all(stopped.sequences[0, 0, first + 1:] == 0) and torch.all(stopped.token_logprobs[0, 0, first + 1:]
                                                                             == 0)
    assert stopped.stats["decode_steps"] == first + 1, "the row retires at the step that drew EOS"


def test_prefilled_once_and_stored_once():
    model = tiny_model("llama")
    _, ids, mask = _unequal_prompts("left")
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda module, args, output: seen.append(args[0].shape))
    n, steps = 8, 6
    try:
        result = fastbon.generate(model, ids, attention_mask=mask, n=n, max_new_tokens=steps, seed=1)
    finally:
        hook.remove()
    prefill = [shape for shape in seen if shape[1] > 1]
    assert sum(shape[0] for shape in prefill) == ids.shape[0], "each prompt prefilled once, not n times"
    prompt_tokens = int(mask.sum())
    assert sum(shape.numel() for shape in prefill) == result.stats["prefill_tokens"] <= 1.1 * prompt_tokens
    decode_steps = [shape for shape in seen if shape[1] == 1]
    # Prefill chunks interleave with decode steps: the first prompt's rows decode while the next prompt prefills.
    assert all(shape[0] <= ids.shape[0] * n for shape in decode_steps) and len(decode_steps) <= steps + 1
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    block_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * BLOCK * head_dim * 4
    blocks = sum(-(-int(length) // BLOCK) for length in mask.sum(-1))
    assert result.stats["prefix_kv_bytes"] == blocks * block_bytes, "the prompt KV is stored once per prompt"


def test_a_decode_step_reads_nothing_on_the_host(monkeypatch):
    """The step itself (the forward over every row and the fused sampler) never waits for the device: every way a
    tensor reaches the host (``item``, ``tolist``, ``bool``, ``nonzero``, ``cpu``, ``numpy``) is counted while the
    engine's decoder runs one prepared step. The engine reads the step's tokens after it, once."""
    from fastbon.engine import Engine
    from fastbon.rows import step_inputs

    model = tiny_model("llama")
    engine = Engine(model, background=False)
    config = fastbon.SamplingConfig(n=4, max_new_tokens=32, top_p=0.9, repetition_penalty=1.2, logprobs="processed",
                                    top_logprobs=2, seed=0)
    for prompt in ([3, 4, 5], [6, 7, 8, 9]):
        engine.submit(prompt, config)
    while len(engine.rows) < 8:
        engine.step()
    engine.step()
    rows = engine.rows
    padded = -(-len(rows) // engine.row_multiple) * engine.row_multiple
    engine.cache.set_rows([row.path() for row in rows], [row.blocks[-1] for row in rows],
                          [row.write_offset() for row in rows], padded)
    inputs = step_inputs(rows, engine.device)
    reads = []
    for name in ("__bool__", "item", "tolist", "nonzero", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.no_grad():
        logits = engine.decoder.forward(engine.cache, inputs, padded)
        engine.decoder.sample_rows(logits, inputs)
    monkeypatch.undo()
    assert reads == [], f"host reads in a decode step: {reads}"


def test_reproducible_with_seed():
    model = tiny_model("qwen2")
    runs = [fastbon.generate(model, torch.tensor([[3, 4, 5]]), n=5, max_new_tokens=6, seed=s) for s in (11, 11, 12)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)


def test_bad_inputs():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    cases = [
        (dict(n=0), ValueError, "n must"), (dict(n=2, k=3), ValueError, "k must"), (dict(top_p=0.0), ValueError,
                                                                                     "top_p"),
        (dict(temperature=-1.0), ValueError, "temperature"), (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(attention_mask=torch.ones(1, 4)), ValueError, "attention_mask"),
        (dict(score="best"), ValueError, "score"), (dict(n=1.5), TypeError, "n must"),
        (dict(seed="x"), TypeError, "seed"), (dict(backend="tpu"), ValueError, "backend"),
    ]
    for change, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fastbon.generate(model, **{"input_ids": ids, **change})
    with pytest.raises(ValueError, match="empty"):
        fastbon.generate(model, [torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64)])
    with pytest.raises(ValueError, match="empty"):
        fastbon.generate(model, ids, attention_mask=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="input_ids"):
        fastbon.generate(model, torch.ones(1, 3))
    with pytest.raises(ValueError, match="shape"):
        fastbon.generate(model, torch.tensor([[1, 2]]), n=2, score=lambda samples: torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        fastbon.generate(model, torch.tensor([[1, 2]]), n=2, score=lambda samples: torch.full((1, 2), float("nan")))


def test_unsupported_models_fail_before_work():
    """Refusals by capability (every refused family: tests/test_architectures.py); OPT and a binding sliding window,
    once refused by name, are served."""
    mamba = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1))
    with pytest.raises(ValueError, match="'mamba'"):
        fastbon.generate(mamba, torch.tensor([[1, 2]]))
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16))
    windowed = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                sliding_window=8))
    for served in (opt, windowed):
        assert fastbon.generate(served, torch.tensor([[1, 2, 3]]), max_new_tokens=10).sequences.shape == (1, 1, 10)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match="model"):
        fastbon.generate(object(), torch.tensor([[1, 2]]))
    assert fastbon.generate(gpt2, torch.tensor([[1, 2]]), n=2, max_new_tokens=2).sequences.shape == (1, 1, 2)
    with pytest.raises(ValueError, match="learned positions"):
        fastbon.generate(gpt2, torch.tensor([[1, 2]]), max_new_tokens=gpt2.config.n_positions)


def test_pruning_keeps_the_oracle_best_and_saves_work():
    model = tiny_model("llama")
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 3])]
    n, steps = 8, 12
    full = fastbon.generate(model, prompts, n=n, k=1, max_new_tokens=steps, seed=5, return_all=True)

    def exact_final_score(samples):
        """The partial score is exact: the final score of the sample each row will become (the engine scores each
        prompt's samples apart: the prompt says which row of the full run)."""
        return full.all_scores[_prompt_row(prompts, samples)].gather(1, samples.sample_ids)

    pruned = fastbon.generate(model, prompts, n=n, k=1, max_new_tokens=steps, seed=5, return_all=True,
                              prune=fastbon.Pruning(every=4, keep=0.5, score=exact_final_score))
    assert torch.equal(pruned.indices, full.indices), "the oracle's best sample survives every checkpoint"
    assert torch.equal(pruned.sequences, full.sequences)
    torch.testing.assert_close(pruned.scores, full.scores)
    # 16 rows for 4 steps, 8 for 4, 4 for 4 instead of 16 for 12; pruned samples are unfinished, scored -inf.
    # Rows retire at once: every token drawn is a token of the result (no preemption here), far fewer than 16 x 12.
    assert pruned.stats["tokens_generated"] == int(pruned.all_lengths.sum()) <= 16 * 4 + 8 * 4 + 4 * 4
    assert pruned.stats["pruned"] == 12
    assert (pruned.all_scores == float("-inf")).sum().item() == 12
    survivors = pruned.all_scores > float("-inf")
    assert torch.equal(pruned.all_sequences[survivors], full.all_sequences[survivors]), "seeds are per sample"
    with pytest.raises(ValueError, match="keep"):
        fastbon.generate(model, prompts, prune=fastbon.Pruning(keep=0.0))
    with pytest.raises(TypeError, match="prune"):
        fastbon.generate(model, prompts, prune=0.5)


def _prompt_row(prompts, samples) -> slice:
    """The row of ``prompts`` that ``samples`` (one prompt's, as the engine scores them) belong to."""
    row = next(index for index, prompt in enumerate(prompts) if torch.equal(prompt, samples.prompts[0].cpu()))
    return slice(row, row + 1)


CHECKPOINT = 8  # steps between pruning checkpoints in the tests below


def _frequent_token(model, prompts, n, steps):
    """The most common token of a free run's first CHECKPOINT steps: as an EOS, many samples stop early."""
    free = fastbon.generate(model, prompts, n=n, max_new_tokens=steps, seed=9, return_all=True)
    return int(torch.mode(free.all_sequences[:, :, :CHECKPOINT].flatten()).values)


def test_finished_samples_leave_the_batch_under_pruning():
    """Pruning ranks all samples not pruned yet, finished ones included, while finished rows leave the batch the
    step they end: every sample ran for exactly its own length, pruned or not. With an exact partial score the best
    sample still survives."""
    model = tiny_model("llama")
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 3])]
    n, steps = 8, 4 * CHECKPOINT
    eos = _frequent_token(model, prompts, n, steps)
    full = fastbon.generate(model, prompts, n=n, max_new_tokens=steps, seed=9, return_all=True, eos_token_id=eos)

    def exact_final_score(samples):
        return full.all_scores[_prompt_row(prompts, samples)].gather(1, samples.sample_ids)

    pruned = fastbon.generate(model, prompts, n=n, max_new_tokens=steps, seed=9, return_all=True, eos_token_id=eos,
                              prune=fastbon.Pruning(every=CHECKPOINT, keep=0.5, score=exact_final_score))
    width = pruned.sequences.shape[2]  # a call's results are as wide as its longest returned sample
    assert torch.equal(pruned.indices, full.indices) and torch.equal(pruned.sequences, full.sequences[..., :width])
    assert torch.equal(pruned.lengths, full.lengths)
    assert pruned.stats["tokens_generated"] == int(pruned.all_lengths.sum())
    assert pruned.stats["pruned"] > 0 and (pruned.all_finish_reasons == fastbon.FINISH_REASONS.index("eos")).any()


def _declines_engine_trees(backend, device) -> bool:
    """The cuda backend's attention takes one-level trees only; the engine's rows read two levels at least (prompt
    and generated blocks), so forced, it declines before any work with one ValueError."""
    if "cuda" not in backend:
        return False
    with pytest.raises(ValueError, match="levels"):
        fastbon.generate(tiny_model("llama").to(device), torch.tensor([[1, 2, 3]], device=device), n=2,
                         max_new_tokens=2, backend=backend)
    return True


def test_every_backend_end_to_end(backend_device):
    """The HF re-scoring check with every op on one backend (Triton runs in its interpreter on CPU)."""
    backend, device = backend_device
    if _declines_engine_trees(backend, device):
        return
    model = tiny_model("llama").to(device)
    prompts, ids, mask = _unequal_prompts("left")
    result = fastbon.generate(model, ids.to(device), attention_mask=mask.to(device), n=3, k=2, max_new_tokens=5,
                              top_p=0.9, top_k=20, seed=2, return_all=True, backend=backend)
    _check_against_hf(model.cpu(), prompts, _on_cpu(result), 3)


def test_finished_samples_leave_the_batch():
    """With an EOS that most samples hit early, finished rows leave the batch the step they end; what remains still
    matches HF token for token in log-probability."""
    model = tiny_model("llama")
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 3])]
    n, steps = 6, 3 * CHECKPOINT
    eos = _frequent_token(model, prompts, n, steps)
    result = fastbon.generate(model, prompts, n=n, max_new_tokens=steps, seed=9, return_all=True, eos_token_id=eos)
    assert (result.all_lengths < steps).sum().item() > 0
    assert result.stats["tokens_generated"] == int(result.all_lengths.sum()), "no step past a sample's end"
    _check_against_hf(model, prompts, result, n)
    for b in range(len(prompts)):
        for j in range(n):
            length = int(result.all_lengths[b, j])
            assert length == steps or int(result.all_sequences[b, j, length - 1]) == eos


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model_matches_hf(backend_device, dtype):
    """A bfloat16 / float16 model on every backend (head_dim 32: the cpu backend's bfloat16 attention takes the AMX
    kernel where the CPU has it, the cuda backend's 16-bit attention its tensor-core kernel): against a float32
    forward of the same weights, fastbon's log-probs err no more than HF's own forward in that dtype does (twice,
    plus 1e-3)."""
    backend, device = backend_device
    if _declines_engine_trees(backend, device):
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)  # far from uniform, as in hf_models.tiny_model
    model.generation_config.eos_token_id = None
    model = model.to(dtype)
    wide = copy.deepcopy(model).float()
    prompts = [torch.arange(5, 40), torch.tensor([9, 3])]
    result = fastbon.generate(model.to(device), [prompt.to(device) for prompt in prompts], n=4, max_new_tokens=12,
                              seed=1, return_all=True, backend=backend)
    model, result = model.cpu(), _on_cpu(result)
    ours = theirs = 0.0
    for b, prompt in enumerate(prompts):
        for j in range(4):
            completion = result.all_sequences[b, j, :int(result.all_lengths[b, j])]
            reference = hf_token_logprobs(wide, prompt, completion)
            got = result.all_token_logprobs[b, j, :completion.numel()].double()
            ours = max(ours, (got - reference).abs().max().item())
            theirs = max(theirs, (hf_token_logprobs(model, prompt, completion) - reference).abs().max().item())
    assert ours <= 2 * theirs + 1e-3, f"fastbon {ours} vs HF's own {dtype} error {theirs}"
