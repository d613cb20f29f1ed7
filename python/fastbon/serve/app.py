"""The HTTP routes on one engine: ``/v1/completions``, ``/v1/chat/completions`` (both streamed as server-sent events
on request), ``/v1/models``, ``/health`` and ``/metrics``.

A route turns its body into prompt ids and one ``SamplingConfig`` (sampling.py), submits one engine request per
prompt, and turns the results into OpenAI's body (responses.py). The decoding, scoring and selection all happen in
the engine; a client that goes away cancels its engine requests, which frees their rows and KV.
"""

import asyncio
import hmac
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask

from . import errors, stream
from .errors import APIError
from .metrics import Metrics
from .responses import Formatter
from .sampling import (
    ServedModel,
    chat_prompt,
    completion_prompts,
    engine_error,
    max_new_tokens,
    sampling_config,
    search_hooks,
)
from .schemas import ChatCompletionRequest, CompletionRequest

_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class _Recorder:
    """ASGI middleware: every answer counted by endpoint and status, its latency to the last byte (a stream's
    included). Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would hide disconnects from streams."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _cancel(handles: list) -> None:
    for handle in handles:
        handle.cancel()


class Submission:
    """One HTTP request's engine requests, counted against the server's bound from before they are submitted until
    released (once)."""

    def __init__(self, server: "Server", count: int):
        self.server, self.count, self.handles, self.released = server, count, [], False
        server.in_flight += count

    def release(self) -> None:
        """Cancel what is still running (a gone client, a failed sibling, shutdown) and free the slots."""
        if self.released:
            return
        self.released = True
        self.server.in_flight -= self.count
        running = [handle for handle in self.handles if not handle.done()]
        if running:
            self.server.calls.submit(_cancel, running)

    async def results(self, request: Request) -> list | None:
        """Each engine request's result, or None when the client disconnects first (they are then cancelled)."""
        gathered = asyncio.ensure_future(stream.results(self.handles, self.server.waiters))
        disconnected = asyncio.ensure_future(stream.disconnected(request))
        try:
            await asyncio.wait({gathered, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            return gathered.result() if gathered.done() else None
        finally:
            disconnected.cancel()
            self.release()  # wakes the waiting threads of cancelled requests
            if not gathered.done():
                gathered.cancel()
                # the cancelled requests' Cancelled errors are expected: retrieved so asyncio does not report them
                gathered.add_done_callback(lambda future: future.cancelled() or future.exception())


class Server:
    """What the routes share: the engine, the served model, the bound on engine requests in flight, and the
    threads that call the engine. ``Engine.submit`` checks and builds a request (tensor and tokenizer work; before
    the engine's inbox it also waited for a whole step) and ``Request.result`` blocks until the end: neither runs
    on the event loop, which serves every other stream meanwhile."""

    def __init__(self, engine, served: ServedModel, max_requests: int):
        self.engine, self.served, self.max_requests = engine, served, max_requests
        self.in_flight = 0  # engine requests submitted and not yet released; only the event loop touches it
        self.calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fastbon-serve-call")
        # Threads that block in request.result() for unstreamed answers: one per request in flight at most.
        self.waiters = ThreadPoolExecutor(max_workers=max_requests, thread_name_prefix="fastbon-serve-wait")

    def _submit(self, prompts: list, config, hooks: list) -> list:
        handles = []
        try:
            for ids, hook in zip(prompts, hooks, strict=True):
                handles.append(self.engine.submit(ids, config, search=hook))
        except (TypeError, ValueError) as error:
            _cancel(handles)
            raise engine_error(error) from error
        return handles

    async def submit(self, prompts: list, config, hooks: list) -> Submission:
        """One engine request per prompt (``hooks``: each one's fork hook or None), or a 503 with Retry-After when
        the bound would be passed."""
        if self.in_flight + len(prompts) > self.max_requests:
            raise APIError(503, f"the server is full ({self.in_flight} requests in flight, at most "
                                f"{self.max_requests}); retry shortly", code="overloaded", headers={"Retry-After": "1"})
        submission = Submission(self, len(prompts))
        submitting = asyncio.get_running_loop().run_in_executor(self.calls, self._submit, prompts, config, hooks)
        try:
            submission.handles = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            # Gone while submitting (a disconnect, shutdown): what gets submitted is cancelled once it is.
            submitting.add_done_callback(
                lambda done: done.cancelled() or done.exception() or self.calls.submit(_cancel, done.result()))
            submission.release()
            raise
        except Exception:
            submission.release()
            raise
        return submission


def _authorize(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorize(request: Request):
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: the key is not guessable byte by byte
            message = "missing API key" if not given else "incorrect API key"
            raise APIError(401, f"{message}: send 'Authorization: Bearer <key>' (the server's --api-key)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return authorize


def create_app(engine, served: ServedModel, *, api_key: str | None = None, max_requests: int = 256) -> FastAPI:
    """The ASGI app serving ``engine`` as the model ``served.name``; ``api_key`` guards ``/v1``."""
    app = FastAPI(title="fastbon", summary="OpenAI-compatible best-of-n on the fastbon engine")
    errors.install(app)
    metrics = Metrics(engine)
    server = Server(engine, served, max_requests)
    app.state.server = server
    guarded = [Depends(_authorize(api_key))]

    def check_model(name: str) -> None:
        if name != served.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus():  # not async: reading the engine's stats waits for its lock, so FastAPI runs it on a thread
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "fastbon",
                "max_model_len": served.context_length}
        return {"object": "list", "data": [card]}

    async def generate(body, request: Request, prompts: list, chat: bool):
        start = time.perf_counter()
        config = sampling_config(body, max_new_tokens(body, prompts, served), served)
        submission = await server.submit(prompts, config, search_hooks(body, len(prompts), served))
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = Formatter(served, body, chat, include_usage, prompt_tokens)
            events = stream.sse(submission, chunks, metrics.first_token.labels(request.url.path), start)
            # The release also runs after the response: a client gone before the first chunk leaves the generator
            # unstarted, so its own cleanup never runs.
            return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(
                submission.release), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await submission.results(request)
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        metrics.first_token.labels(request.url.path).observe(time.perf_counter() - start)
        return Formatter(served, body, chat, False, prompt_tokens).body(results)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        return await generate(body, request, completion_prompts(body, served), chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        return await generate(body, request, [chat_prompt(body, served)], chat=True)

    app.add_middleware(_Recorder, metrics=metrics)
    return app
