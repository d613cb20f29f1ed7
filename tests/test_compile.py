"""``compile=True``: the decode step under torch.compile gives the eager path's tokens, with fastbon's attention
and linear layers inside the graph (no graph break), and later calls of the same shapes reuse the compiled step."""

import pytest
import torch
from hf_models import VOCAB, tiny_model
from torch._dynamo.utils import counters

import fastbon


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compiled_decode_equals_eager(backend):
    if fastbon.dispatch.unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(fastbon.dispatch.unavailable_reason(backend, torch.device("cpu")))
    model = tiny_model("llama", eos_token_id=7)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, VOCAB, (length,), generator=generator) for length in (5, 9)]
    settings = dict(n=4, k=4, max_new_tokens=24, temperature=1.0, seed=[3, 4], backend=backend)
    eager = fastbon.generate(model, prompts, **settings)
    torch._dynamo.reset()
    counters.clear()
    compiled = fastbon.generate(model, prompts, compile=True, **settings)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled.stats["compile_seconds"] > 0
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.finish_reasons, eager.finish_reasons)
    assert (compiled.finish_reasons == fastbon.FINISH_REASONS.index("eos")).any(), "rows must finish mid-run"
    assert torch.allclose(compiled.token_logprobs, eager.token_logprobs, atol=1e-5)
    with torch.profiler.profile() as profile:
        again = fastbon.generate(model, prompts, compile=True, **settings)
    assert "compile_seconds" not in again.stats, "the same shapes reuse the compiled step"
    assert torch.equal(again.sequences, eager.sequences)
    ran = {event.key for event in profile.key_averages()}
    assert ("fastbon::skinny_linear_out" in ran) == (backend == "cpu"), "the compiled steps' linear layers"


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile"):
        fastbon.generate(tiny_model("llama"), [torch.tensor([1, 2])], n=2, max_new_tokens=2, compile="yes")
