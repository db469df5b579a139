# What a pipeloom server is allowed to do: address, auth, admission bounds, body limits, job lifetimes.
"""``ServerSettings`` is the one place the server's limits live; every protocol reads the same object, so a
bound checked over HTTP is the same bound over WebSocket and gRPC. ``configs/serve.py``'s ``server``
section has exactly these fields (a test keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

MAX_N = 128  # samples per request, a hard ceiling whatever the settings say


@dataclass(frozen=True)
class ServerSettings:
    """Address, auth and limits of one server (see the field comments)."""

    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0: every interface)
    port: int = 8000  # HTTP port (OpenAI API, WebSocket, jobs, metrics); 0: a free port
    grpc_port: Optional[int] = None  # gRPC port; None: no gRPC server; 0: a free port
    api_key: Optional[str] = None  # when set, every request needs `Authorization: Bearer <key>`
    model_name: Optional[str] = None  # the name clients send as `model`; None: the model argument
    max_requests: int = 256  # running + waiting sequences (n counts n) beyond which new requests get 429
    max_queued_tokens: int = 65536  # prompt tokens admitted but not yet prefilled beyond which 429
    max_body_bytes: int = 1 << 20  # request bodies (and WebSocket / gRPC messages) larger than this: 413
    max_prompts: int = 64  # prompts in one /v1/completions batch
    max_n: int = 16  # samples per request (n); at most 128
    job_ttl: float = 300.0  # seconds a finished job's result stays readable (then 410 Gone)
    job_idle_timeout: float = 120.0  # a running job nobody polled for this long is cancelled
    job_max_wait: float = 30.0  # the longest long poll (GET /v1/jobs/{id}?wait=S) the server holds
    max_jobs: int = 4096  # jobs kept at once (running and finished, before expiry); beyond: 429
    log_level: str = "warning"  # uvicorn's log level: critical | error | warning | info | debug
    chat_template: Optional[str] = None  # a Jinja chat template file; None: the tokenizer's, else a plain one

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"server.{name}={getattr(self, name)!r} {rule}")

        if not isinstance(self.host, str) or not self.host:
            raise bad("host", "must be a host name or address, e.g. 127.0.0.1")
        for name, allow_none in (("port", False), ("grpc_port", True)):
            value = getattr(self, name)
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise bad(name, "must be a port number in [0, 65535] (0: a free port)")
        for name in ("max_requests", "max_queued_tokens", "max_body_bytes", "max_prompts", "max_n", "max_jobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "must be a positive integer")
        if self.max_n > MAX_N:
            raise bad("max_n", f"must be at most {MAX_N}")
        for name in ("job_ttl", "job_idle_timeout", "job_max_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise bad(name, "must be a positive number of seconds")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise bad("api_key", "must be a non-empty string, or None for no auth")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise bad("log_level", "must be one of critical, error, warning, info, debug, trace")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
