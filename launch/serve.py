# pipeloom-serve: the OpenAI-compatible HTTP / SSE, WebSocket, jobs and gRPC server over the inference engine.
"""Serve a named config, a pipeloom-train run or a Hugging Face folder::

    pipeloom-serve model=llama-tiny server.host=127.0.0.1 server.port=8000 [server.api_key=KEY]
    pipeloom-serve model=runs/demo-x server.grpc_port=50051 inference.policy=chunked-prefill kv.num_blocks=2048

Prints the address once both servers accept connections, then serves until SIGINT / SIGTERM. Fields:
``configs/serve.py``. A pipeline- and tensor-parallel engine under torchrun (the HTTP and gRPC front-ends run on the
driver, rank 0; the other ranks serve its microbatches until it stops)::

    torchrun --nproc_per_node=4 -m pipeloom.launch.serve model=llama-tiny parallel.pp=2 parallel.tp=2 server.port=8000
"""

from __future__ import annotations

import asyncio
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from pipeloom.configs.serve import register

register()


def build(cfg: DictConfig, llm=None):
    """The :class:`pipeloom.serving.Server` for ``cfg`` (a composed ServeConfig), not yet started, over ``llm`` (an
    ``LLM`` or the driver's ``ParallelLLM``; None: built here)."""
    import torch

    from pipeloom.launch.generate import build_llm
    from pipeloom.serving import ChatTemplate, Server, ServerSettings

    settings = ServerSettings(**OmegaConf.to_container(cfg.server))  # ValueError naming a bad field
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    llm = build_llm(cfg) if llm is None else llm  # the same model, engine and parallel keys as pipeloom-generate
    template = ChatTemplate.for_model(cfg.model, settings.chat_template)
    return Server(llm.engine, settings, model_name=settings.model_name or cfg.model, chat_template=template)


def announce(server) -> None:
    engine = server.engine
    grpc = f"; gRPC at {server.grpc_target}" if server.grpc_target else ""
    print(f"pipeloom-serve: serving {server.model_name} at {server.url} (OpenAI API /v1, WebSocket /v1/ws, jobs "
          f"/v1/jobs, metrics /metrics){grpc}; policy {engine.policy.name}, {engine.block_manager.num_blocks} KV "
          f"blocks of {engine.block_manager.block_size} tokens", flush=True)


@hydra.main(config_path="pkg://pipeloom.configs", config_name="serve", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from pipeloom.launch.generate import build_llm
    from pipeloom.launch.report import report_once
    from pipeloom.serving import ServerSettings

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    llm = None
    try:
        ServerSettings(**OmegaConf.to_container(cfg.server))  # bad server values are named before anything loads
        llm = build_llm(cfg)
        if getattr(llm, "is_driver", True):
            asyncio.run(build(cfg, llm).serve(on_ready=announce))
        else:
            llm.serve_workers()  # until the driver's server stops
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on, once everything is closed
        print("pipeloom-serve: stopped", flush=True)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        if several:
            report_once(f"pipeloom-serve: error: {err}")  # one line per job, whichever rank exits first
        else:
            print(f"pipeloom-serve: error: {err}", file=sys.__stderr__)
        sys.exit(2)
    finally:
        if llm is not None and hasattr(llm, "shutdown"):
            llm.shutdown()  # the driver stops the other ranks
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    """Entry point of ``pipeloom-serve`` and ``python -m pipeloom.launch.serve``."""
    _app()


if __name__ == "__main__":
    main()
