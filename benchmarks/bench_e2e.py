"""Best-of-n end to end: fastbon.generate vs HF generate(num_return_sequences=n) over a grid; CSV + PNG.

    python benchmarks/bench_e2e.py                      # the full grid on this machine (long on CPU)
    python benchmarks/bench_e2e.py --P 2048 --n 32 --new-tokens 64   # one cell: the CPU target of the project
    pytest benchmarks/bench_e2e.py                      # a seconds-long smoke run of the harness (CI)
    fastbon bench --P 2048 --n 32 --new-tokens 64       # the same from the installed package

CPU: fp32 Llama, hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 32000 (~56M params).
GPU: bf16 Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 128256).
"""

import sys

from fastbon.demos.bench import main


def test_e2e_smoke(tmp_path):
    """Quick mode: a tiny model, two cells, both sides, files written; checks the harness, not the speed."""
    assert main(["--P", "16", "--n", "2", "3", "--new-tokens", "4", "--shape", "tiny", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "e2e.csv").read_text().count("\n") == 3


if __name__ == "__main__":
    sys.exit(main())
