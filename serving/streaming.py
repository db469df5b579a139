# HTTP streaming helpers: SSE framing, errors after the 200, racing a handler against a disconnect, merging streams.
"""Server-sent events as OpenAI sends them: ``data: <json>\\n\\n`` per event and ``data: [DONE]\\n\\n`` at the end.
An error once the 200 is out cannot change the status any more: it is sent as a ``data: {"error": ...}`` event,
then ``[DONE]``.

Client disconnects: a streamed response is cancelled by Starlette when the client goes away (it listens for
``http.disconnect`` beside the body); a non-streamed handler is raced against that message here
(:func:`until_disconnect`, as vLLM's ``with_cancellation``). Either way the request's stream is closed and the
request aborted in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .errors import APIError
from .generation import ChoiceDelta, RequestStream

log = logging.getLogger("pipeloom.serving")
DONE = "data: [DONE]\n\n"


def sse(payload: dict | str) -> str:
    """One SSE event carrying ``payload`` (a dict is JSON-encoded compactly)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A ``text/event-stream`` response of ``events``; an exception mid-stream becomes an error event + [DONE]."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as err:
            yield sse(err.body())
            yield DONE
        except Exception as err:  # the engine failed after the 200: tell the client in-band, as vLLM does
            log.exception("error while streaming")
            yield sse(APIError(500, f"the engine failed while streaming: {type(err).__name__}: {err}").body())
            yield DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable) -> Response | object:
    """Run ``work``; if the client disconnects first, cancel it (its streams close and abort) and return a 499."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return task.result()


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, list[ChoiceDelta]]]:
    """(stream index, deltas) from several streams as they come (one stream: in order, no tasks)."""
    if len(streams) == 1:
        async for deltas in streams[0]:
            yield 0, deltas
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for deltas in stream:
                queue.put_nowait((i, deltas))
        except Exception as err:  # handed to the consumer, which raises it
            queue.put_nowait((i, err))
            return
        queue.put_nowait((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
