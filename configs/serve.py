# Typed config of pipeloom-serve (model, engine, KV cache, server limits) in Hydra's ConfigStore.
"""The schema behind ``configs/serve.yaml``. The model, ``inference`` and ``kv`` sections are pipeloom-generate's
(the same engine); ``server`` holds the fields of :class:`pipeloom.serving.ServerSettings`::

    pipeloom-serve model=llama-tiny server.host=127.0.0.1 server.port=8000 server.api_key=KEY \\
        server.grpc_port=50051 inference.policy=chunked-prefill inference.token_budget=512
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from .generate import InferenceSection, KVSection, ParallelSection


@dataclass
class ServerSection:
    """Address, auth and limits (pipeloom.serving.ServerSettings, field for field)."""

    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0: every interface)
    port: int = 8000  # HTTP port (OpenAI API, WebSocket, jobs, metrics); 0: a free port
    grpc_port: Optional[int] = None  # gRPC port; None: no gRPC server; 0: a free port
    api_key: Optional[str] = None  # when set, every request needs `Authorization: Bearer <key>`
    model_name: Optional[str] = None  # the name clients send as `model`; None: the model argument
    max_requests: int = 256  # running + waiting sequences beyond which new requests get 429
    max_queued_tokens: int = 65536  # prompt tokens admitted but not yet prefilled beyond which 429
    max_body_bytes: int = 1048576  # larger request bodies (and WebSocket / gRPC messages): 413
    max_prompts: int = 64  # prompts in one /v1/completions batch
    max_n: int = 16  # samples per request (n); at most 128
    job_ttl: float = 300.0  # seconds a finished job's result stays readable (then 410 Gone)
    job_idle_timeout: float = 120.0  # a running job nobody polled for this long is cancelled
    job_max_wait: float = 30.0  # the longest long poll the server holds
    max_jobs: int = 4096  # jobs kept at once; beyond: 429
    log_level: str = "warning"  # uvicorn's log level: critical | error | warning | info | debug
    chat_template: Optional[str] = None  # a Jinja chat template file; None: the tokenizer's, else a plain one


@dataclass
class ServeConfig:
    """Everything ``pipeloom-serve`` needs."""

    model: str = "gpt-tiny"  # a registered config (random weights), a pipeloom-train run or checkpoint, an HF folder
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | float64 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # random weights of a named config, and the engine's shared sampling stream
    threads: Optional[int] = None  # torch CPU threads of the engine; None: torch's default
    inference: InferenceSection = field(default_factory=InferenceSection)
    kv: KVSection = field(default_factory=KVSection)
    server: ServerSection = field(default_factory=ServerSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)  # torchrun: the server runs on rank 0 only


def register() -> None:
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)
