"""The decode steps between two host sync points make no host-device synchronisation: they run under
``torch.cuda.set_sync_debug_mode("error")``, which raises at the first call that would synchronise (a ``.item()``,
a ``bool()`` of a device tensor, a blocking copy, ``nonzero``).

The decode loop reads the device only every ``SYNC_EVERY`` steps (fastbon.decode); this runs one full call to
warm up (kernel compilation, allocator), then a fresh decode's first two steps (the first forward checks the
attention layers), then the steps up to the next sync point under the error mode. Run by benchmarks/gpu_check.sh;
``--device cpu`` runs the same code path (where the mode has no effect) as a smoke test.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastbon
from fastbon import decode
from fastbon.ops.sampling import sampling_params
from fastbon.prefill import prefill


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
    steps = decode.SYNC_EVERY
    with torch.no_grad():
        fastbon.generate(model, prompts, n=args.n, max_new_tokens=steps, seed=0)  # warm-up
        settings = decode.DecodeSettings(n=args.n, max_new_tokens=steps, eos_ids=[], pad_token_id=0, backend=None,
                                         prune=None, logprobs="raw", stops=None, repetition_penalty=1.0)
        num_samples = len(prompts) * args.n
        params = sampling_params(num_samples, device, temperature=1.0, top_k=0, top_p=0.95, min_p=0.0,
                                 seed=torch.arange(num_samples))
        stats = {}
        prefilled = prefill(model, prompts, 0, device, stats)
        device_prompts = [prompt.to(device) for prompt in prompts]
        run = decode._Run(model, prefilled, device_prompts, torch.arange(num_samples, device=device), params,
                          settings, stats)
        run.step()
        run.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps - 2):
                run.step()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    print(f"ok: {steps - 2} decode steps of {num_samples} rows on {device} without a host sync "
          f"(backends: {fastbon.backends()})")


if __name__ == "__main__":
    main()
