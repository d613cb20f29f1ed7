"""Waiting on engine requests from the event loop: whole results, stream events merged across a request's prompts
as server-sent events, and the client's disconnect."""

import asyncio
import json
import time

from .errors import APIError
from .responses import StreamText


async def disconnected(request) -> None:
    """Returns when the client has gone. The body is read already, so the ASGI server's next message is the
    disconnect (or the end of the response, after which nobody waits on this)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _failure(error: BaseException) -> APIError:
    from fastbon.engine import Cancelled

    if isinstance(error, Cancelled):
        return APIError(503, "the request was cancelled: the server is shutting down", code="cancelled",
                        headers={"Retry-After": "1"})
    return APIError(500, f"the request failed in the engine: {type(error).__name__}: {error}", code="engine_error")


async def results(handles: list, waiters) -> list:
    """Each handle's ``GenerationResult``; ``request.result()`` blocks, so each waits on a thread of ``waiters``
    (idle threads, woken by the engine), never on the event loop. The request's own failure becomes its answer."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.gather(*(loop.run_in_executor(waiters, handle.result) for handle in handles))
    except Exception as error:
        raise _failure(error) from error


async def _events(handles: list):
    """Lists of (prompt, event) from every handle's ``astream()``: all that has arrived whenever the stream is
    read (one engine step's events of every sample, typically); the first failure ends the stream."""
    queue = asyncio.Queue()

    async def pump(prompt, handle):
        try:
            async for event in handle.astream():
                queue.put_nowait((prompt, event, None))
        except Exception as error:
            queue.put_nowait((prompt, None, error))
            return
        queue.put_nowait((prompt, None, None))

    tasks = [asyncio.ensure_future(pump(prompt, handle)) for prompt, handle in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            items, batch = [await queue.get()], []
            while not queue.empty():
                items.append(queue.get_nowait())
            for prompt, event, error in items:
                if error is not None:
                    raise error
                if event is None:
                    remaining -= 1
                else:
                    batch.append((prompt, event))
            if batch:
                yield batch
    finally:
        for task in tasks:
            task.cancel()


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse(submission, formatter, first_token, start: float):
    """The answer as server-sent events: chunks tagged with their choice, a usage chunk where asked, ``[DONE]``.
    A failure mid-stream is sent as an OpenAI error event (the status line has gone already). Leaving early (the
    client disconnected, shutdown) cancels the engine requests that are still running."""
    texts, completion_tokens, timed = {}, 0, False
    try:
        async for batch in _events(submission.handles):
            # One chunk for all the choices that moved (one per choice: a second piece of one starts the next),
            # rather than one per sample and step: n times fewer writes and parses on both sides.
            chunks, current = [], {}
            for prompt, event in batch:
                index = prompt * formatter.n + event.sample
                fresh = index not in texts
                text = texts.setdefault(index, StreamText(formatter.tokenizer, formatter.stops))
                piece = text.add(event.tokens, event.finish_reason is not None)
                completion_tokens += len(event.tokens)
                if not (piece or fresh or event.finish_reason or formatter.logprobs):
                    continue
                if piece and not timed:
                    first_token.observe(time.perf_counter() - start)
                    timed = True
                if index in current:
                    chunks.append(list(current.values()))
                    current = {}
                current[index] = formatter.choice(index, piece, event, fresh)
            if current:
                chunks.append(list(current.values()))
            for choices in chunks:
                yield _data(formatter.chunk(choices))
        if formatter.include_usage:
            yield _data(formatter.usage_chunk(completion_tokens))
        yield "data: [DONE]\n\n"
    except Exception as error:
        failure = _failure(error)
        yield _data({"error": {"message": failure.message, "type": "server_error", "param": None,
                               "code": failure.code}})
    finally:
        submission.release()
