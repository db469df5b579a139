# The FastAPI application: every protocol's routes over one Generation, error handlers, and the body-size guard.
"""``build_app(gen, jobs)`` assembles the HTTP side; :class:`~pipeloom.serving.server.Server` runs it with uvicorn
beside the gRPC server. Request bodies are read (at most ``server.max_body_bytes``) before any route sees them:
a larger body is a 413 (read and dropped up to 64 MiB, so the client can read the answer).
"""

from __future__ import annotations

from fastapi import FastAPI

import pipeloom

from . import info_routes, jobs, openai_http, websocket
from .errors import APIError, install_error_handlers
from .generation import Generation

DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this, so the client sees the 413


class BodyLimit:
    """ASGI middleware: buffer the request body up to ``max_bytes`` (413 beyond), then hand it to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.isdigit():
            return await self._reject(scope, receive, send, APIError(400, f"Content-Length {length[:20]!r} is not "
                                                                           "a number", param="Content-Length"))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending everything
                return
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes and (not more or size > DRAIN_LIMIT):
                err = APIError(413, f"the request body has {size} bytes or more; this server takes at most "
                                    f"server.max_body_bytes={self.max_bytes}")
                return await self._reject(scope, receive, send, err)
            if not more:
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then what the connection says next: http.disconnect

        return await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope, receive, send, err: APIError) -> None:
        await err.response()(scope, receive, send)


def build_app(gen: Generation, job_store: jobs.JobStore) -> FastAPI:
    """The HTTP application over ``gen`` (see the module docstrings of each router for the routes)."""
    app = FastAPI(title="pipeloom", version=pipeloom.__version__,
                  description="OpenAI-compatible completions and chat, WebSocket, jobs (polling) and metrics.")
    app.state.generation, app.state.settings, app.state.jobs = gen, gen.settings, job_store
    install_error_handlers(app)
    for module in (openai_http, jobs):
        app.include_router(module.router)
    app.include_router(info_routes.api)
    app.include_router(info_routes.router)
    app.include_router(websocket.router)
    app.add_middleware(BodyLimit, max_bytes=gen.settings.max_body_bytes)
    return app
