"""``fastbon serve``: an OpenAI-compatible HTTP server on the fastbon engine (docs/serving.md).

``n`` and ``best_of`` draw one request's samples over one prompt KV; the engine scores them (mean log-prob, or the
server's ``--score``: a reward model or a verifier) and returns the best ``n``. Needs the ``fastbon[serve]`` extra.
"""

import argparse
import os
import signal

DEFAULT_MODEL_NAME = "fastbon-addition"  # the id the embedded model is served under


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a local Hugging Face model folder (default: the embedded addition model)")
    parser.add_argument("--served-model-name", default=None,
                        help="the id clients send as 'model' (default: --model as given, or "
                             f"{DEFAULT_MODEL_NAME!r})")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("FASTBON_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $FASTBON_API_KEY; none: open)")
    parser.add_argument("--max-memory", default=None,
                        help="the engine's KV budget, e.g. 8GiB (default: what the device has free)")
    parser.add_argument("--max-rows", type=int, default=None, help="the most sample rows decoding at once")
    parser.add_argument("--max-requests", type=int, default=256,
                        help="engine requests (one per prompt) in flight; past it, 503 with Retry-After")
    parser.add_argument("--score", default="mean_logprob",
                        help="how best_of samples are ranked: mean_logprob | sum_logprob | a reward-model folder | "
                             "module:function (function(tokenizer) returns a score callable)")
    parser.add_argument("--step-score", default=None, metavar="MODULE:FUNCTION",
                        help="the particle filter's step score: function(tokenizer) returns Samples -> log-weights, "
                             "e.g. fastbon.scoring.step_checker(...) (default: each partial sample's mean log-prob)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda where available)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on GPUs)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for requests in flight before cancelling them")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _load(model_dir, device: str, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name) if dtype_name else (torch.bfloat16 if device.startswith("cuda") else
                                                           torch.float32)
    if model_dir is None:
        from ..models import load_default_model

        return load_default_model(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def build(args):
    """(engine, ASGI app) from parsed ``fastbon serve`` arguments: the model loaded, the score built, both once."""
    import torch

    from ..engine import Engine
    from ..jobs.config import build_score, check_score_option
    from .app import create_app
    from .sampling import ServedModel

    check_score_option(args.score)
    if args.step_score is not None and ":" not in args.step_score:
        raise SystemExit(f"--step-score must be module:function, got {args.step_score!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load(args.model, device, args.dtype)
    score = build_score(args.score, tokenizer, device, model.dtype)
    step_score = build_score(args.step_score, tokenizer, device, model.dtype) if args.step_score else None
    engine = Engine(model, tokenizer, max_rows=args.max_rows, max_memory=args.max_memory)
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    served = ServedModel(name=name, tokenizer=tokenizer, vocab_size=model.get_input_embeddings().num_embeddings,
                         context_length=getattr(model.config, "max_position_embeddings", None), score=score,
                         step_score=step_score)
    return engine, create_app(engine, served, api_key=args.api_key, max_requests=args.max_requests)


def main(args) -> int:
    """Serve until SIGINT or SIGTERM: then no new connections; requests in flight get ``--shutdown-timeout``
    seconds to finish, the rest are cancelled, and the engine stops."""
    import uvicorn

    engine, app = build(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)

    def stop(signum, frame):
        server.should_exit = True

    # uvicorn handles the signals while it runs, then re-raises the one that stopped it to die of it; by then it
    # has shut down, so this handler takes that signal as done (and one before uvicorn starts as a stop): the
    # engine is closed below and the process exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        server.run()
    finally:
        engine.close()
    return 0
