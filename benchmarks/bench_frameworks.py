"""fastbon inside the frameworks, against each framework's own transformers path, in one run; CSV + PNG.

- GRPO generation phase (TRL 1.16): the same ``GRPOTrainer``'s own transformers generation (``_tokenize_prompts``
  + ``_generate_single_turn``: the prompts repeated ``num_generations`` times, ``model.generate``) vs
  ``fastbon.integrations.trl.rollout_func()``; the trainer's settings on both sides (temperature 1, top_k 0, top_p 1,
  ``max_completion_length`` tokens).
- lm-eval ``generate_until`` with ``repeats``: ``simple_evaluate`` with HF's model class vs the ``fastbon`` model
  (the same weights, saved for lm-eval to load; the same batch size in rows), on a local task of random-word documents.

Both sides run the same random-weight Llama (fp32, no EOS in practice: 1 token id in 32000 ends a sample) and
generate the same number of tokens per sample (reported). One run; GRPO sides timed best of ``--rounds``.

    python benchmarks/bench_frameworks.py                 # the recorded run (a few minutes on 2 CPU cores)
    pytest benchmarks/bench_frameworks.py                 # a seconds-long smoke run of the harness (CI)
"""

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastbon.demos.bench import llama_model

CSV_FIELDS = ["case", "prompt_tokens", "samples_per_prompt", "new_tokens", "prompts", "hf_s", "fastbon_s", "speedup",
              "hf_generated_tokens", "fastbon_generated_tokens"]


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` ids ("<pad>", "<eos>", "<bos>", "<unk>", then "w4", "w5", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"w{index}" for index in range(4, vocab))]
    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def random_text(words: int, vocab: int, rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(words))


def best_of(rounds: int, run):
    """(shortest wall time, the last result) over ``rounds`` calls."""
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def grpo_generation(model, tokenizer, args, workdir) -> dict:
    import datasets
    import trl

    from fastbon.integrations.trl import rollout_func

    rng = random.Random(0)
    texts = [random_text(args.prompt_tokens, args.vocab, rng) for _ in range(args.prompts)]
    config = trl.GRPOConfig(output_dir=str(workdir / "grpo"), per_device_train_batch_size=args.prompts * args.n,
                            num_generations=args.n, max_completion_length=args.new_tokens, temperature=1.0,
                            top_k=0, top_p=1.0, report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                              args=config, train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
                              processing_class=tokenizer)
    prompts = [text for text in texts for _ in range(args.n)]  # TRL's RepeatSampler order

    def trl_path():
        prompt_ids, images, multimodal_fields = trainer._tokenize_prompts(prompts)
        return trainer._generate_single_turn(prompt_ids, images, multimodal_fields, args.n)[0]

    fastbon_rollout = rollout_func()
    hf_s, hf_completions = best_of(args.rounds, trl_path)
    fastbon_s, out = best_of(args.rounds, lambda: fastbon_rollout(prompts, trainer))
    return dict(case="grpo_generation", prompt_tokens=args.prompt_tokens, samples_per_prompt=args.n,
                new_tokens=args.new_tokens, prompts=args.prompts, hf_s=hf_s, fastbon_s=fastbon_s,
                hf_generated_tokens=sum(map(len, hf_completions)),
                fastbon_generated_tokens=sum(map(len, out["completion_ids"])))


def lm_eval_repeats(model, tokenizer, args, workdir) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fastbon.integrations.lm_eval import FastbonLM

    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    rng = random.Random(1)
    with open(workdir / "documents.json", "w") as file:
        for _ in range(args.documents):
            document = {"question": random_text(args.context_tokens, args.vocab, rng), "answer": "w5"}
            file.write(json.dumps(document) + "\n")
    task = {"task": "bench_repeats", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(workdir / "documents.json")}},
            "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            "repeats": args.repeats, "metric_list": [{"metric": "exact_match"}],
            "generation_kwargs": {"until": ["<eos>"], "do_sample": True, "temperature": 1.0, "top_k": 0,
                                  "max_gen_toks": args.eval_new_tokens},
            "filter_list": [{"name": "majority", "filter": [{"function": "majority_vote"},
                                                            {"function": "take_first"}]}]}
    (workdir / "bench_repeats.yaml").write_text(json.dumps(task))
    task_manager = TaskManager(include_path=str(workdir), include_defaults=False)
    rows = args.eval_batch_documents * args.repeats  # the same rows in flight on both sides
    common = dict(pretrained=str(workdir / "model"), device="cpu", batch_size=rows, max_length=8192)

    def evaluate(lm):
        results = lm_eval.simple_evaluate(model=lm, tasks=["bench_repeats"], task_manager=task_manager,
                                          log_samples=True, bootstrap_iters=0)
        texts = [text for sample in results["samples"]["bench_repeats"] for text in sample["resps"][0]]
        return sum(len(text.split()) for text in texts)

    hf_s, hf_tokens = best_of(1, lambda: evaluate(HFLM(**common)))
    fastbon_s, fastbon_tokens = best_of(1, lambda: evaluate(FastbonLM(**common)))
    return dict(case="lm_eval_repeats", prompt_tokens=args.context_tokens, samples_per_prompt=args.repeats,
                new_tokens=args.eval_new_tokens, prompts=args.documents, hf_s=hf_s, fastbon_s=fastbon_s,
                hf_generated_tokens=hf_tokens, fastbon_generated_tokens=fastbon_tokens)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], [row["hf_s"] for row in rows], width=0.4, label="framework's HF path")
    axis.bar([p + 0.2 for p in positions], [row["fastbon_s"] for row in rows], width=0.4, label="fastbon")
    axis.set_xticks(list(positions), [f"{row['case']}\n{row['speedup']:.2f}x" for row in rows])
    axis.set_ylabel("seconds")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--n", type=int, default=16, help="GRPO num_generations")
    parser.add_argument("--new-tokens", type=int, default=128, help="GRPO max_completion_length")
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts in the GRPO generation batch")
    parser.add_argument("--context-tokens", type=int, default=256, help="lm-eval document length")
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--eval-new-tokens", type=int, default=32)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--eval-batch-documents", type=int, default=2, help="batch size in documents (x repeats rows)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=2, help="GRPO rounds (each lm-eval side runs once)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = llama_model(hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2, vocab=args.vocab,
                        intermediate=args.hidden * 8 // 3)
    tokenizer = word_tokenizer(args.vocab)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for case in (grpo_generation, lm_eval_repeats):
            row = case(model, tokenizer, args, Path(workdir))
            row["speedup"] = row["hf_s"] / row["fastbon_s"]
            rows.append(row)
            print(", ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                            for key, value in row.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "frameworks_cpu.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "frameworks_cpu.png")
    return 0


def test_frameworks_smoke(tmp_path):
    """Tiny shapes, both cases, both sides, files written: checks the harness, not the speed."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    assert main(["--prompt-tokens", "8", "--n", "2", "--new-tokens", "3", "--context-tokens", "8", "--repeats", "2",
                 "--eval-new-tokens", "3", "--documents", "2", "--hidden", "32", "--layers", "1", "--vocab", "64",
                 "--rounds", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "frameworks_cpu.csv").read_text().count("\n") == 3


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    sys.exit(main())
