# pipeloom-serve: the OpenAI-compatible HTTP / SSE, WebSocket, jobs and gRPC server over the inference engine.
"""Serve a named config, a pipeloom-train run or a Hugging Face folder::

    pipeloom-serve model=llama-tiny server.host=127.0.0.1 server.port=8000 [server.api_key=KEY]
    pipeloom-serve model=runs/demo-x server.grpc_port=50051 inference.policy=chunked-prefill kv.num_blocks=2048

Prints the address once both servers accept connections, then serves until SIGINT / SIGTERM. Fields:
``configs/serve.py``.
"""

from __future__ import annotations

import asyncio
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from pipeloom.configs.serve import register

register()


def build(cfg: DictConfig):
    """The :class:`pipeloom.serving.Server` for ``cfg`` (a composed ServeConfig), not yet started."""
    import torch

    from pipeloom.inference import LLM
    from pipeloom.serving import ChatTemplate, Server, ServerSettings

    settings = ServerSettings(**OmegaConf.to_container(cfg.server))  # ValueError naming a bad field
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    inf, kv = cfg.inference, cfg.kv
    llm = LLM(model=cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, policy=inf.policy,
              token_budget=inf.token_budget, max_num_seqs=inf.max_num_seqs, block_size=kv.block_size,
              num_blocks=kv.num_blocks, gpu_memory_fraction=kv.gpu_memory_fraction,
              enable_prefix_caching=inf.prefix_caching, attention=inf.attention, cuda_graphs=inf.cuda_graphs)
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
    try:
        server = build(cfg)
        asyncio.run(server.serve(on_ready=announce))
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on, once everything is closed
        print("pipeloom-serve: stopped", flush=True)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"pipeloom-serve: error: {err}", file=sys.__stderr__)
        sys.exit(2)


def main() -> None:
    """Entry point of ``pipeloom-serve`` and ``python -m pipeloom.launch.serve``."""
    _app()


if __name__ == "__main__":
    main()
