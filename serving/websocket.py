# WebSocket /v1/ws: completion requests as JSON messages, one event per delta, cancel, RFC 6455 close codes.
"""One connection carries any number of requests, one at a time (OpenAI Realtime style, events keyed by type)::

    client -> {"type": "request", "prompt": "def f(", "max_tokens": 32, "temperature": 0}   (a /v1/jobs body)
    server <- {"type": "created", "id": "ws-..."}
    server <- {"type": "delta", "id", "index", "text", "token_ids", "finish_reason"}          (per choice delta)
    server <- {"type": "done", "id", "choices": [{"index", "text", "token_ids", "finish_reason"}], "usage"}
    client -> {"type": "cancel"}             (while a request runs: it is aborted, "done" has finish_reason abort)
    server <- {"type": "error", "error": {"message", "type", "param", "code"}}  (bad input; the connection stays)

Close codes (RFC 6455 §7.4.1): 1000 normal, 1008 policy (missing or wrong API key), 1011 server error (the
engine failed), 1013 try again later (admission control refused the request); a message larger than
``server.max_body_bytes`` is closed with 1009 by the server library. A client that goes away mid-stream has
its request aborted in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from .auth import key_matches, unauthorized
from .errors import APIError, bad_request, validation_message
from .generation import Generation, RequestStream
from .responses import JobChoice, Usage
from .schemas import JobRequest

router = APIRouter()
log = logging.getLogger("pipeloom.serving")
NORMAL, POLICY, SERVER_ERROR, TRY_AGAIN = 1000, 1008, 1011, 1013


class _Run:
    """One request on a connection: its stream, what was sent so far, and the task sending it."""

    def __init__(self, ws: WebSocket, stream: RequestStream):
        self.ws, self.stream, self.id = ws, stream, stream.request_id
        self.choices = [JobChoice(index=j, text="", token_ids=[]) for j in range(stream.params.n)]
        self.task: asyncio.Task | None = None

    def done_event(self) -> dict:
        usage = Usage.of(len(self.stream.prompt_ids), sum(len(c.token_ids) for c in self.choices))
        return {"type": "done", "id": self.id, "choices": [c.model_dump() for c in self.choices],
                "usage": usage.model_dump()}

    async def pump(self) -> int | None:
        """Send every delta and the final event; returns a close code when the connection must end."""
        async with self.stream:
            it = self.stream.__aiter__()
            while True:
                try:
                    deltas = await it.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as err:  # the engine failed: tell the client, then close with 1011
                    error = APIError(500, f"the engine failed: {type(err).__name__}: {err}")
                    await self.ws.send_json({"type": "error", "id": self.id, **error.body()})
                    return SERVER_ERROR
                for d in deltas:
                    choice = self.choices[d.index]
                    choice.text += d.text
                    choice.token_ids += d.token_ids
                    choice.finish_reason = d.finish_reason or choice.finish_reason
                    await self.ws.send_json({"type": "delta", "id": self.id, "index": d.index, "text": d.text,
                                             "token_ids": d.token_ids, "finish_reason": d.finish_reason})
        await self.ws.send_json(self.done_event())
        return None

    async def cancel(self) -> None:
        """The client asked to stop: abort, then report what was generated with finish_reason "abort"."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        for c in self.choices:
            c.finish_reason = c.finish_reason or "abort"
        await self.ws.send_json(self.done_event())


async def _error(ws: WebSocket, err: APIError) -> None:
    await ws.send_json({"type": "error", **err.body()})


def _parse(text: str) -> dict:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad_request(f"the message is not valid JSON ({err})") from err
    if not isinstance(message, dict) or message.get("type") not in ("request", "cancel"):
        raise bad_request('each message is a JSON object with "type": "request" or "cancel"', "type")
    return message


async def _start(gen: Generation, ws: WebSocket, message: dict) -> _Run:
    try:
        body = JobRequest.model_validate(message)
    except ValidationError as err:
        text, param = validation_message(err.errors())
        raise bad_request(text, param) from err
    gen.check_model(body.model)
    ids = gen.encode(body.prompts()[0])
    stream = await gen.start(gen.request_id("ws"), ids, gen.params(body, gen.max_tokens_for(body.max_tokens, len(ids))))
    run = _Run(ws, stream)
    try:
        await ws.send_json({"type": "created", "id": run.id})
    except BaseException:
        stream.close()
        raise
    run.task = asyncio.ensure_future(run.pump())
    return run


@router.websocket("/v1/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    gen: Generation = ws.app.state.generation
    await ws.accept()
    if not key_matches(gen.settings.api_key, ws.headers.get("authorization"), ws.query_params.get("api_key")):
        await _error(ws, unauthorized())
        await ws.close(POLICY, "invalid or missing API key")
        return
    reader: asyncio.Future | None = None
    run: _Run | None = None
    try:
        while True:
            if reader is None:
                reader = asyncio.ensure_future(ws.receive_text())
            waits = {reader} if run is None else {reader, run.task}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if run is not None and run.task in done:
                finished, run = run.task, None
                if finished.exception() is not None:  # sending failed: the client is gone
                    log.debug("websocket send failed: %r", finished.exception())
                    return
                code = finished.result()
                if code is not None:
                    await ws.close(code)
                    return
            if reader not in done:
                continue
            text, reader = reader.result(), None  # WebSocketDisconnect: the client left
            try:
                message = _parse(text)
                if message["type"] == "cancel":
                    if run is None:
                        raise bad_request("nothing to cancel: no request is running", "type")
                    await run.cancel()
                    run = None
                elif run is not None:
                    raise bad_request('a request is already running on this connection; send {"type": "cancel"} '
                                      "or wait for its done event", "type")
                else:
                    run = await _start(gen, ws, message)
            except APIError as err:
                await _error(ws, err)
                if err.status in (429, 500):
                    await ws.close(TRY_AGAIN if err.status == 429 else SERVER_ERROR)
                    return
    except WebSocketDisconnect:
        pass
    finally:  # the client left (or we closed): its request is aborted as its stream closes
        for task in (reader, run.task if run is not None else None):
            if task is not None and not task.done():
                task.cancel()
