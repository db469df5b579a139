# The server process: uvicorn (HTTP, SSE, WebSocket) and grpc.aio in one event loop over one AsyncEngine.
"""Run an engine behind every protocol::

    server = Server(LLMEngine(model, tokenizer=tok), ServerSettings(port=8000, grpc_port=50051), model_name="m")
    asyncio.run(server.serve(on_ready=lambda s: print(s.url)))      # until SIGINT / SIGTERM
    server = Server(...).start_in_thread()                           # or in the background (tests, notebooks)
    ...; server.stop()

Both servers share the loop that the :class:`~pipeloom.inference.AsyncEngine` streams on; the model steps
run in the engine's own thread. Port 0 binds a free port; ``url`` and ``grpc_target`` say which.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import uvicorn

from pipeloom.inference import AsyncEngine, LLMEngine

from .app import build_app
from .chat import ChatTemplate
from .generation import Generation
from .jobs import JobStore
from .settings import ServerSettings


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (server.host / server.port): {err}; pick another port "
                      "or 0 for a free one") from err
    sock.set_inheritable(True)
    return sock


class Server:
    """HTTP + gRPC over one engine (see the module docstring)."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings | None = None, *, model_name: str,
                 chat_template: ChatTemplate | None = None):
        self.engine, self.settings = engine, settings or ServerSettings()
        self.model_name, self.chat_template = model_name, chat_template
        self.async_engine: AsyncEngine | None = None
        self.generation: Generation | None = None
        self.port: int | None = None
        self.grpc_port: int | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def grpc_target(self) -> str | None:
        return None if self.grpc_port is None else f"{self.settings.host}:{self.grpc_port}"

    async def serve(self, on_ready=None) -> None:
        """Serve until stopped (SIGINT/SIGTERM in the main thread, or :meth:`stop`); ``on_ready(self)`` once
        both servers accept connections."""
        s = self.settings
        self.async_engine = AsyncEngine(self.engine)
        gen = self.generation = Generation(self.async_engine, s, model_name=self.model_name,
                                           chat_template=self.chat_template)
        jobs = JobStore(gen)
        app = build_app(gen, jobs)
        sock = _bind(s.host, s.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=s.log_level, ws_max_size=s.max_body_bytes, lifespan="off",
                                access_log=s.log_level in ("info", "debug", "trace"), timeout_graceful_shutdown=3)
        self._uvicorn = uvicorn.Server(config)
        grpc_server, janitor = None, asyncio.get_running_loop().create_task(jobs.janitor())
        try:
            if s.grpc_port is not None:
                from .grpc_server import start_grpc_server

                grpc_server, self.grpc_port = await start_grpc_server(gen, s.host, s.grpc_port)
            http = asyncio.get_running_loop().create_task(self._uvicorn.serve(sockets=[sock]))
            while not self._uvicorn.started and not http.done():
                await asyncio.sleep(0.01)
            if self._uvicorn.started and on_ready is not None:
                on_ready(self)
            await http
        finally:
            janitor.cancel()
            await jobs.close()
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            await self.async_engine.close()
            sock.close()

    def start_in_thread(self, timeout: float = 120.0) -> Server:
        """Serve from a background thread; return once ready (or raise what stopped it)."""
        ready = threading.Event()

        def run() -> None:
            try:
                asyncio.run(self.serve(on_ready=lambda _: ready.set()))
            except BaseException as err:  # handed to the caller of start_in_thread / stop
                self._error = err
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="pipeloom-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the server did not become ready within {timeout} s")
        if self._error is not None or not self._thread.is_alive():
            raise RuntimeError(f"the server failed to start: {self._error!r}") from self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to exit and wait for the thread started by :meth:`start_in_thread`."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the server thread did not stop within {timeout} s")
