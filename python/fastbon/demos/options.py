"""The command lines of ``fastbon demo``, ``fastbon demo --search`` and ``fastbon bench``, with the defaults they
print: argparse only, so ``--help`` loads neither torch nor transformers (tests/test_imports.py times it)."""

import argparse

DEFAULT_DEVICE_HELP = "cuda when available, else cpu"
OUT = "benchmarks/out"

# fastbon demo: addition problems from their own seed, away from the training stream (seed 0) and its held-out
# set (12345).
FULL_NS, QUICK_NS = (1, 2, 4, 8, 16, 32, 64), (1, 4, 16)
FULL_PROBLEMS, QUICK_PROBLEMS = 200, 24
DEFAULT_SEED = 2024

# fastbon demo --search.
SEARCH_FULL_NS, SEARCH_QUICK_NS = (2, 4, 8, 16, 32), (2, 4)
SEARCH_FULL_PROBLEMS, SEARCH_QUICK_PROBLEMS = 200, 6
# The hard end of what the model was trained on (3-6 operands of 1-2 digits): 4-5 steps of 2-digit operands, where
# a step is right ~73 % of the time at T=1 and a whole chain ~24 %; the full training mix is `--operands 3 6
# --digits 1 2` (88 % a step, 66 % a chain: little left for any method to fix).
DEFAULT_OPERANDS, DEFAULT_DIGITS = (5, 6), (2, 2)
# Tokens between search checkpoints: about one per line (a line is 5-11 tokens), so a wrong line is caught within a
# few tokens of its newline. Every 4 tokens gave the same accuracy at up to 1.5x the wall time per token.
DEFAULT_EVERY = 8


def parse_demo(argv) -> argparse.Namespace:
    """``fastbon demo`` options, plus ``count`` (problems) and ``ns`` (the budgets) resolved from them."""
    parser = argparse.ArgumentParser(prog="fastbon demo",
                                     description="spending more samples at run time makes the embedded model better")
    parser.add_argument("--search", action="store_true",
                        help="instead: search vs best-of-n on the chain model (fastbon demo --search --help)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_PROBLEMS} problems, n in {QUICK_NS} (under a minute on a CPU; what CI runs)")
    parser.add_argument("--problems", type=int, default=None,
                        help=f"how many addition problems (default {FULL_PROBLEMS}, {QUICK_PROBLEMS} with --quick)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the problems and the sampling")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate timing")
    parser.add_argument("--device", default=None, help=f"default: {DEFAULT_DEVICE_HELP}")
    # One CPU thread by default: the model's matrices are too small to split, and on a shared machine a second
    # OpenMP thread that gets descheduled stalls every op by a time slice (we saw 0.04 s runs take 0.3-3 s).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides (default 1)")
    parser.add_argument("--out", default=OUT, help="folder for demo.csv and demo.png")
    args = parser.parse_args(argv)
    args.count = args.problems if args.problems is not None else (QUICK_PROBLEMS if args.quick else FULL_PROBLEMS)
    if args.count < 1:
        parser.error(f"--problems must be >= 1, got {args.count}")
    args.ns = QUICK_NS if args.quick else FULL_NS
    return args


def parse_search(argv) -> argparse.Namespace:
    """``fastbon demo --search`` options (without ``--search``), plus ``count`` and ``ns`` resolved from them."""
    parser = argparse.ArgumentParser(prog="fastbon demo --search",
                                     description="search vs best-of-n on the embedded chain model: where checking "
                                                 "each step beats checking the end")
    parser.add_argument("--quick", action="store_true",
                        help=f"{SEARCH_QUICK_PROBLEMS} problems, n in {SEARCH_QUICK_NS} (for CI)")
    parser.add_argument("--problems", type=int, default=None,
                        help=f"how many chain problems (default {SEARCH_FULL_PROBLEMS}, {SEARCH_QUICK_PROBLEMS} "
                             "with --quick)")
    parser.add_argument("--ns", type=int, nargs="+", default=None, help=f"budgets n (default {SEARCH_FULL_NS})")
    parser.add_argument("--operands", type=int, nargs=2, default=DEFAULT_OPERANDS, metavar=("MIN", "MAX"),
                        help=f"operands per problem (default {DEFAULT_OPERANDS[0]} {DEFAULT_OPERANDS[1]})")
    parser.add_argument("--digits", type=int, nargs=2, default=DEFAULT_DIGITS, metavar=("MIN", "MAX"),
                        help=f"digits per operand (default {DEFAULT_DIGITS[0]} {DEFAULT_DIGITS[1]})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the problems and the sampling")
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY,
                        help=f"tokens between search checkpoints (default {DEFAULT_EVERY})")
    parser.add_argument("--device", default=None, help=f"default: {DEFAULT_DEVICE_HELP}")
    # One thread by default, as in `fastbon demo`: the matrices are too small to split on a shared CPU.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=OUT, help="folder for search.csv and search.png")
    args = parser.parse_args(argv)
    args.count = args.problems if args.problems is not None else (
        SEARCH_QUICK_PROBLEMS if args.quick else SEARCH_FULL_PROBLEMS)
    if args.count < 1:
        parser.error(f"--problems must be >= 1, got {args.count}")
    args.ns = tuple(args.ns) if args.ns else (SEARCH_QUICK_NS if args.quick else SEARCH_FULL_NS)
    if min(args.ns) < 1:
        parser.error(f"--ns must all be >= 1, got {args.ns}")
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    return args


def parse_bench(argv) -> argparse.Namespace:
    """``fastbon bench`` options."""
    parser = argparse.ArgumentParser(prog="fastbon bench", description="best-of-n end to end: fastbon vs HF generate")
    parser.add_argument("--P", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 16, 32, 64])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--device", default=None, help=f"default: {DEFAULT_DEVICE_HELP}")
    parser.add_argument("--shape", choices=["cpu", "gpu", "tiny"], default=None,
                        help="model shape (default: gpu on CUDA, cpu otherwise)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 otherwise)")
    parser.add_argument("--no-hf", action="store_true", help="time fastbon only")
    parser.add_argument("--compile", action="store_true", help="fastbon's decode step under torch.compile (a warm-up "
                        "call of each cell's shapes compiles it, untimed; cold and compile times are reported apart)")
    parser.add_argument("--out", default=OUT, help="folder for e2e.csv and e2e.png")
    return parser.parse_args(argv)
