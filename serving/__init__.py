# pipeloom.serving: OpenAI-compatible HTTP + SSE, WebSocket, polling jobs, gRPC and metrics over the AsyncEngine.
"""A thin room over :class:`pipeloom.inference.AsyncEngine` (the engine never imports it)::

    from pipeloom.serving import Server, ServerSettings
    Server(engine, ServerSettings(port=8000, grpc_port=50051), model_name="llama-tiny").start_in_thread()

``pipeloom-serve model=... server.port=8000`` does the same from the command line. One module per concern:
``schemas`` / ``responses`` (pydantic bodies), ``openai_http`` (completions, chat, SSE), ``websocket``,
``jobs`` (polling and long polling), ``grpc_server`` (+ ``grpc_protos``, code generated from
``proto/pipeloom_serving.proto``), ``info_routes`` (models, tokenize, health, metrics), ``generation`` (the
path every protocol shares), ``admission``, ``auth``, ``metrics``, ``chat`` (templates), ``server``.
"""

from pipeloom import features

features.require("fastapi", "pipeloom.serving")

from .chat import ChatTemplate  # noqa: E402
from .generation import Generation  # noqa: E402
from .server import Server  # noqa: E402
from .settings import ServerSettings  # noqa: E402

__all__ = ["ChatTemplate", "Generation", "Server", "ServerSettings"]
