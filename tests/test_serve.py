"""``fastbon serve`` through real clients: the ``openai`` package (completions and chat with n, best_of, logprobs,
stop and seed; streaming against unstreamed), httpx (errors, metrics, concurrent load) and lm-evaluation-harness's
``local-completions`` model against the in-process ``fastbon`` lm-eval model. Each test starts its own server on
127.0.0.1 (a free port) as a subprocess, and stops it; every wait is bounded."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fastbon.models import DEFAULT_MODEL_DIR, arithmetic  # noqa: E402

KEY = "test-key"
EMBEDDED = "fastbon-addition"
START_TIMEOUT = 90  # seconds for a server to answer /health: torch, transformers and the model load first
# A template that renders the user's turns as the addition model reads them: "<bos>12+34=".
TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """A ``fastbon serve`` subprocess and its base URL; its output goes to ``log`` for the failure message."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **options) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60, **options)

    def post(self, path: str, body, timeout: float = 60, **options) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **options.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=timeout, **options)

    def metrics(self) -> dict:
        """The unlabelled samples of /metrics by name (the engine's gauges and counters)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(log: Path, *arguments: str, port: int | None = None) -> Served:
    """Start ``python -m fastbon.cli serve`` and wait (bounded) until it answers /health. The tests' folder is on
    its path, so ``--score test_serve:addition_verifier`` imports."""
    port = port or free_port()
    command = [sys.executable, "-m", "fastbon.cli", "serve", "--port", str(port), "--api-key", KEY,
               "--log-level", "warning", *arguments]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    with open(log, "ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    served = Served(process, port, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{served.output()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{served.url}/health", timeout=2).status_code == 200:
                return served
        time.sleep(0.2)
    stop(served)
    raise AssertionError(f"the server did not answer /health within {START_TIMEOUT} s:\n{served.output()}")


def stop(served: Served, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL past ``timeout``; the exit code."""
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait(10)
    return served.process.returncode


@contextlib.contextmanager
def serving(tmp_path: Path, *arguments: str):
    served = start(tmp_path / "server.log", *arguments)
    try:
        yield served
    finally:
        assert stop(served) == 0, served.output()


def chat_model_folder(folder: Path) -> Path:
    """The embedded addition model saved with a chat template in its tokenizer."""
    from fastbon.models import load_default_model

    model, tokenizer = load_default_model()
    tokenizer.chat_template = TEMPLATE
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def addition_verifier(tokenizer):
    """``--score test_serve:addition_verifier``: the embedded task's exact checker ranks best_of on the server."""
    from fastbon.scoring import verifier

    return verifier(lambda prompts, texts: [arithmetic.check(prompt, text) for prompt, text in
                                            zip(prompts, texts, strict=True)], tokenizer)


def mean_logprob(choice) -> float:
    values = choice.logprobs.token_logprobs if hasattr(choice.logprobs, "token_logprobs") else [
        entry.logprob for entry in choice.logprobs.content]
    return sum(values) / len(values)


def test_completions_best_of_logprobs_stop_seed_and_auth(tmp_path):
    with serving(tmp_path) as served:
        client = served.client()
        assert [model.id for model in client.models.list()] == [EMBEDDED]
        asked = dict(model=EMBEDDED, prompt="347+58=", n=4, best_of=8, max_tokens=6, temperature=1.0, logprobs=2,
                     seed=11)
        first = client.completions.create(**asked)
        assert [choice.index for choice in first.choices] == [0, 1, 2, 3]
        scores = [mean_logprob(choice) for choice in first.choices]
        assert scores == sorted(scores, reverse=True), "the best n of best_of, best first, by mean log-prob"
        for choice in first.choices:
            logprobs = choice.logprobs
            assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) > 0
            assert all(len(top) <= 2 and max(top.values()) >= value - 1e-6
                       for top, value in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True))
            assert choice.finish_reason in ("stop", "length")
        assert first.usage.prompt_tokens == 8 and first.usage.completion_tokens >= 4
        again = client.completions.create(**asked)
        assert [c.text for c in again.choices] == [c.text for c in first.choices], "same seed, same text"
        other = client.completions.create(**{**asked, "seed": 12, "n": 8, "temperature": 3.0})
        assert len({c.text for c in other.choices}) > 1, "eight samples at temperature 3 differ"

        # Particle filtering (fastbon's extra field): resampled every 2 tokens; seeded, so repeatable.
        filtered = dict(model=EMBEDDED, prompt="347+58=", n=2, best_of=4, max_tokens=6, temperature=1.5, seed=4,
                        extra_body={"particle_filter": {"every": 2}})
        searched = client.completions.create(**filtered)
        assert len(searched.choices) == 2
        assert [c.text for c in client.completions.create(**filtered).choices] == [c.text for c in searched.choices]
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=EMBEDDED, prompt="1+1=", n=2, stream=True,
                                      extra_body={"particle_filter": {"every": 2}})
        assert refused.value.body["param"] == "particle_filter", "a filter's samples change: not streamed"

        # A stop string: the text ends before it, whether EOS or the stop string ended the sample.
        greedy = client.completions.create(model=EMBEDDED, prompt="347+58=", max_tokens=6, temperature=0)
        text = greedy.choices[0].text
        assert len(text) >= 2 and greedy.choices[0].finish_reason == "stop", "an answer, then <eos>"
        cut = client.completions.create(model=EMBEDDED, prompt="347+58=", max_tokens=6, temperature=0, stop=text[1])
        assert cut.choices[0].text == text[:text.index(text[1])] and cut.choices[0].finish_reason == "stop"
        stopped = client.completions.create(model=EMBEDDED, prompt="347+58=", n=4, max_tokens=6, stop=["0", "1"],
                                            seed=3, temperature=1.0)
        assert all("0" not in choice.text and "1" not in choice.text for choice in stopped.choices)

        # Several prompts (texts or token ids): choices prompt-major, n each.
        batch = client.completions.create(model=EMBEDDED, prompt=["12+34=", "347+58="], n=2, max_tokens=6,
                                          temperature=0)
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        assert batch.choices[0].text == batch.choices[1].text and batch.choices[2].text == text
        vocab = json.loads(Path(DEFAULT_MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"]
        by_ids = client.completions.create(model=EMBEDDED, prompt=[vocab[c] for c in ["<bos>", *"347+58="]],
                                           max_tokens=6, temperature=0)
        assert by_ids.choices[0].text == text

        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert refused.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{served.url}/v1/models", timeout=10).status_code == 401, "no key"
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=EMBEDDED, prompt="1+1=", n=4, best_of=2)
        assert bad.value.body["param"] == "best_of"
        too_long = served.post("/v1/completions", {"model": EMBEDDED, "prompt": "1+1=" * 20, "max_tokens": 4})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
        chat = served.post("/v1/chat/completions", {"model": EMBEDDED, "messages": [{"role": "user",
                                                                                     "content": "1+1="}]})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages", "no chat template: 400"
        assert served.post("/v1/completions", {"model": "gpt-4", "prompt": "1"}).status_code == 404


def _streamed_texts(stream) -> tuple[dict, dict, object]:
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_streaming_equals_unstreamed_and_a_verifier_ranks(tmp_path):
    with serving(tmp_path, "--score", "test_serve:addition_verifier") as served:
        client = served.client()
        # The server's verifier ranks: with the same seed, the one answer of best_of=16 is right exactly when one
        # of the 16 samples is, and the right samples come first.
        hard = dict(model=EMBEDDED, prompt="937+485=", max_tokens=6, temperature=1.5, seed=9, logprobs=0)
        every = client.completions.create(**hard, n=16).choices
        right = [arithmetic.check("937+485=", choice.text) for choice in every]
        assert right == sorted(right, reverse=True) and any(right) and not all(right), "a spread to rank"
        best = client.completions.create(**hard, n=1, best_of=16).choices[0]
        assert arithmetic.check("937+485=", best.text)
        assert client.completions.create(**hard, n=1, best_of=16, extra_body={"score": "mean_logprob"}).choices[
            0].text == max(every, key=mean_logprob).text, "a request's own rule instead of the server's"

        asked = dict(model=EMBEDDED, prompt=["347+58=", "9+91="], n=3, max_tokens=6, seed=5, temperature=1.5,
                     stop=["9"])
        whole = client.completions.create(**asked)
        texts, reasons, usage = _streamed_texts(client.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}))
        # Unstreamed choices come best first; streamed ones by sample number: the same texts per prompt.
        for prompt in range(2):
            indices = range(3 * prompt, 3 * prompt + 3)
            assert sorted(texts[i] for i in indices) == sorted(whole.choices[i].text for i in indices)
            assert sorted(reasons[i] for i in indices) == sorted(whole.choices[i].finish_reason for i in indices)
        assert usage.completion_tokens == whole.usage.completion_tokens
        assert usage.prompt_tokens == whole.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=EMBEDDED, prompt="1+1=", n=1, best_of=2, stream=True)
        assert refused.value.body["param"] == "best_of", "best_of > n is not streamed, as OpenAI"


def test_chat_with_a_template(tmp_path):
    folder = chat_model_folder(tmp_path / "chat_model")
    with serving(tmp_path, "--model", str(folder)) as served:
        client = served.client()
        messages = [{"role": "user", "content": "347+58="}]
        asked = dict(model=str(folder), messages=messages, n=4, max_tokens=6, logprobs=True, top_logprobs=2,
                     seed=21, temperature=1.0, extra_body={"best_of": 8})
        first = client.chat.completions.create(**asked)
        assert len(first.choices) == 4 and all(c.message.role == "assistant" for c in first.choices)
        scores = [mean_logprob(choice) for choice in first.choices]
        assert scores == sorted(scores, reverse=True)
        assert all(len(entry.top_logprobs) == 2 for c in first.choices for entry in c.logprobs.content)
        again = client.chat.completions.create(**asked)
        assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
        greedy = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=6, temperature=0)
        text = greedy.choices[0].message.content
        assert len(text) >= 2 and greedy.choices[0].finish_reason == "stop"
        completed = client.completions.create(model=str(folder), prompt="347+58=", max_tokens=6, temperature=0)
        assert completed.choices[0].text == text, "the template renders the prompt /v1/completions reads"
        stopped = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=6,
                                                 temperature=0, stop=[text[-1]])
        assert stopped.choices[0].message.content == text[:text.index(text[-1])]

        sampled = dict(model=str(folder), messages=messages, n=4, max_tokens=6, seed=2, temperature=1.5)
        whole = client.chat.completions.create(**sampled)
        texts, _, _ = _streamed_texts(client.chat.completions.create(**sampled, stream=True))
        assert sorted(texts.values()) == sorted(c.message.content for c in whole.choices)


def _answer(served: Served, index: int) -> tuple:
    body = {"model": EMBEDDED, "prompt": f"{index}+{index}=", "n": 8, "max_tokens": 6, "seed": index,
            "temperature": 1.0}
    response = served.post("/v1/completions", body, timeout=120)
    return index, response.status_code, response.json()


def test_concurrent_clients_each_answered_once(tmp_path):
    clients, each = 8, 2
    with serving(tmp_path) as served:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda index: _answer(served, index), range(clients * each)))
        assert [status for _, status, _ in answers] == [200] * (clients * each)
        assert len({body["id"] for _, _, body in answers}) == clients * each
        assert all(len(body["choices"]) == 8 for _, _, body in answers)
        # The answers are those of each request alone (seeded): the load changed nothing.
        alone = _answer(served, 5)[2]
        assert [c["text"] for c in answers[5][2]["choices"]] == [c["text"] for c in alone["choices"]]
        metrics = served.metrics()
        assert metrics["fastbon_requests_finished_total"] >= clients * each
        assert metrics["fastbon_rows_active"] == 0


def test_lm_eval_local_completions_equals_in_process(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    from lm_eval.tasks import TaskManager

    folder = chat_model_folder(tmp_path / "model")
    with open(tmp_path / "addition.json", "w") as file:
        for question, answer in arithmetic.make_problems(4, seed=3):
            file.write(json.dumps({"question": question, "answer": answer}) + "\n")
    task = {"task": "addition_repeats", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / "addition.json")}},
            "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            "repeats": 4, "generation_kwargs": {"until": ["+"], "do_sample": False, "max_gen_toks": 6},
            "filter_list": [{"name": "majority", "filter": [{"function": "majority_vote"},
                                                            {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match"}]}
    (tmp_path / "addition_repeats.yaml").write_text(json.dumps(task))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def evaluate(lm, **model_args):
        results = lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=["addition_repeats"],
                                          task_manager=manager, log_samples=True, bootstrap_iters=0)
        samples = sorted(results["samples"]["addition_repeats"], key=lambda sample: sample["doc_id"])
        return results["results"]["addition_repeats"]["exact_match,majority"], [s["resps"] for s in samples]

    import fastbon.integrations.lm_eval  # noqa: F401  (registers "fastbon")

    ours = evaluate("fastbon", pretrained=str(folder), device="cpu", batch_size=8)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions reads its key from the environment
    with serving(tmp_path, "--model", str(folder)) as served:
        # add_bos_token: lm-eval's API models send token ids without <bos> unless told; its HF class (and so
        # the in-process model) lets the tokenizer add it.
        theirs = evaluate("local-completions", model=str(folder), base_url=f"{served.url}/v1/completions",
                          tokenizer_backend="huggingface", add_bos_token=True, batch_size=4, max_retries=1)
    assert theirs == ours
