"""``fastbon serve`` under faults: a client that disconnects mid-stream (or times out) frees its rows (the metrics
show it), a full server answers 503 with Retry-After, SIGKILL then a restart on the same port serves again,
hypothesis-generated bodies never get a 5xx and the server keeps serving, SIGTERM drains what can finish, cancels
the rest and exits 0. Each test starts its own server (test_serve.start); every wait is bounded."""

import concurrent.futures
import json
import signal
import time

import pytest

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve import EMBEDDED, KEY, serving, start, stop  # noqa: E402

from fastbon.models import DEFAULT_MODEL_DIR  # noqa: E402

# Random weights with room for requests that outlive any test: 60 000 new tokens at a few ms a step.
LONG_CONTEXT = 1 << 16
LONG = 60_000


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> str:
    """A tiny random Llama on the addition model's tokenizer, whose context admits LONG new tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("long_model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LONG_CONTEXT,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)
    return str(folder)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def _body(model: str, max_tokens: int, **fields) -> dict:
    return {"model": model, "prompt": "12+34=", "n": 8, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 1.0, "seed": 1, **fields}


def test_disconnect_frees_rows_and_a_full_server_says_retry(tmp_path, long_model):
    with serving(tmp_path, "--model", long_model, "--max-requests", "1") as served:
        url = f"{served.url}/v1/completions"
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", url, json=_body(long_model, LONG, stream=True), headers=headers,
                          timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
            assert served.metrics()["fastbon_rows_active"] == 8
            full = served.post("/v1/completions", _body(long_model, 2))
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "overloaded"
        # The client closed the stream: its request is cancelled and its rows freed.
        wait_for(lambda: served.metrics()["fastbon_rows_active"] == 0, 20, "rows freed after the disconnect")
        assert served.metrics()["fastbon_requests_cancelled_total"] == 1
        # An unstreamed request whose client gives up: the same.
        with pytest.raises(httpx.ReadTimeout):
            served.post("/v1/completions", _body(long_model, LONG), timeout=2)
        wait_for(lambda: served.metrics()["fastbon_requests_cancelled_total"] == 2, 20, "the second cancel")
        assert served.metrics()["fastbon_rows_active"] == 0
        assert served.post("/v1/completions", _body(long_model, 4)).status_code == 200, "the slot is free again"


def test_sigkill_then_restart_serves_again(tmp_path):
    body = {"model": EMBEDDED, "prompt": "12+34=", "max_tokens": 4, "temperature": 0}
    first = start(tmp_path / "first.log")
    try:
        answer = first.post("/v1/completions", body).json()["choices"][0]["text"]
        first.process.kill()
        first.process.wait(10)
    finally:
        stop(first)
    again = start(tmp_path / "again.log", port=first.port)
    try:
        assert again.post("/v1/completions", body).json()["choices"][0]["text"] == answer
    finally:
        assert stop(again) == 0, again.output()


# Any JSON value; the fields the endpoints know with any value, on top of a valid body (so that the checks past
# the schema run too); and bytes that are not JSON at all.
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=12)
_FIELDS = ["model", "prompt", "messages", "n", "best_of", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed", "stream", "stream_options", "logprobs",
           "top_logprobs", "echo", "suffix", "ignore_eos", "score", "prune", "logit_bias", "presence_penalty",
           "response_format", "user", "particle_filter"]
_PLAUSIBLE = (st.integers(-3, 140) | st.floats(-1, 3) | st.sampled_from(["1+1=", "", "9", "mean_logprob"]) |
              st.lists(st.integers(-2, 20), max_size=5) | st.booleans() | _JSON)
_EXTRA = st.dictionaries(st.sampled_from(_FIELDS), _PLAUSIBLE, max_size=5)
_REQUESTS = (st.tuples(st.just("/v1/completions"), _EXTRA.map(
    lambda extra: {"model": EMBEDDED, "prompt": "1+1=", "max_tokens": 2, **extra})) |
    st.tuples(st.just("/v1/chat/completions"), _EXTRA.map(
        lambda extra: {"model": EMBEDDED, "messages": [{"role": "user", "content": "1+1="}], **extra})) |
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), _JSON))


def test_generated_bodies_never_get_a_server_error(tmp_path):
    with serving(tmp_path) as served:
        statuses = []

        def send(path: str, content: bytes):
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            response = httpx.post(f"{served.url}{path}", content=content, headers=headers, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, (content, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]

        settings_ = settings(max_examples=120, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

        @settings_
        @given(request=_REQUESTS)
        def json_bodies(request):
            path, body = request
            send(path, json.dumps(body).encode())

        @settings(settings_, max_examples=30)
        @given(content=st.binary(max_size=64))
        def raw_bytes(content):
            send("/v1/completions", content)

        json_bodies()
        raw_bytes()
        assert any(400 <= status < 500 for status in statuses) and 200 in statuses, "both kinds were generated"
        assert served.post("/v1/completions", {"model": EMBEDDED, "prompt": "1+1=", "max_tokens": 2}).status_code \
            == 200, "still serving"


def _read_stream(served, body) -> tuple[int, bool]:
    """(data events, whether [DONE] came) of one stream, read until the server ends it."""
    events, done = 0, False
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        try:
            for line in response.iter_lines():
                events += line.startswith("data: ")
                done = done or line == "data: [DONE]"
        except httpx.RemoteProtocolError:  # the server closed the connection mid-stream
            pass
    return events, done


def test_sigterm_drains_then_cancels_and_exits_cleanly(tmp_path, long_model):
    served = start(tmp_path / "server.log", "--model", long_model, "--shutdown-timeout", "10")
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            endless = pool.submit(_read_stream, served, _body(long_model, LONG, stream=True, seed=2))
            wait_for(lambda: served.metrics()["fastbon_rows_active"] == 8, 30, "the endless stream decoding")
            finishing = pool.submit(served.post, "/v1/completions", _body(long_model, 100), 60)
            wait_for(lambda: served.metrics()["fastbon_rows_active"] == 16, 30, "both requests decoding")
            signalled = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            assert finishing.result(60).status_code == 200, "a request that can finish in the drain time does"
            events, done = endless.result(60)
            assert events > 0 and not done, "the endless stream was cut at the drain's end"
        assert served.process.wait(60) == 0, served.output()
        assert time.monotonic() - signalled < 40
    finally:
        stop(served)
