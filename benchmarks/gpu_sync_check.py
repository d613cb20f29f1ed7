"""A decode step makes no host-device synchronisation: the engine's forward over its rows and the fused sampler run
under ``torch.cuda.set_sync_debug_mode("error")``, which raises at the first call that would synchronise (a
``.item()``, a ``bool()`` of a device tensor, a blocking copy, ``nonzero``).

The engine reads each step's tokens on the host after the step (rows retire at once); the step itself, the part
that runs on the device, must not wait for the host. This runs one request to warm up (kernel compilation,
allocator), then drives a fresh engine to its decode rows and runs one step's forward and sampling under the error
mode. Run by benchmarks/gpu_check.sh; ``--device cpu`` runs the same code path (where the mode has no effect) as a
smoke test.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastbon
from fastbon.engine import Engine
from fastbon.rows import step_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompts = [torch.randint(0, config.vocab_size, (length,)) for length in (37, 100)]
    sampling = fastbon.SamplingConfig(n=args.n, max_new_tokens=16, top_p=0.95, eos_token_id=[], seed=0)
    with torch.no_grad():
        fastbon.generate(model, prompts, n=args.n, max_new_tokens=8, seed=0)  # warm-up
        engine = Engine(model, background=False)
        for prompt in prompts:
            engine.submit(prompt, sampling)
        while len(engine.rows) < len(prompts) * args.n:
            engine.step()
        engine.step()  # a first decode step: it checks the attention routing
        rows = list(engine.rows)
        padded = -(-len(rows) // engine.row_multiple) * engine.row_multiple
        engine.cache.set_rows([row.path() for row in rows], [row.blocks[-1] for row in rows],
                              [row.write_offset() for row in rows], padded)
        inputs = step_inputs(rows, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            logits = engine.decoder.forward(engine.cache, inputs, padded)
            engine.decoder.sample_rows(logits, inputs)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        engine.close()
    print(f"ok: a decode step of {len(rows)} rows on {device} without a host sync (backends: {fastbon.backends()})")


if __name__ == "__main__":
    main()
