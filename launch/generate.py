# pipeloom-generate: offline generation from a named, trained or Hugging Face model through the engine.
"""Generate for a list of prompts and write one JSON line per prompt::

    pipeloom-generate model=llama-tiny prompts='[hello, "def f("]' sampling.max_tokens=64 sampling.temperature=0 \
        inference.policy=chunked-prefill inference.token_budget=512 kv.block_size=16 output=out.jsonl
    pipeloom-generate model=runs/demo-x prompt_file=prompts.txt      # a pipeloom-train run directory
    torchrun --nproc_per_node=4 -m pipeloom.launch.generate model=llama-tiny parallel.pp=2 parallel.tp=2 ...

With ``parallel.pp * parallel.tp > 1`` (under torchrun, one rank each) every rank builds its part of a
:class:`~pipeloom.inference.parallel.ParallelLLM`; the driver (rank 0) writes the same output file and prints.
Each line holds ``prompt``, ``token_ids``, ``text`` and ``finish_reason`` (and ``outputs``, every sample, when
``sampling.n > 1``). Prints the output tokens/s and the measured against the predicted iteration latency
(the batching simulator's cost model fitted on this run's iterations). Fields: ``configs/generate.py``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import hydra
from omegaconf import DictConfig, OmegaConf
from pipeloom.configs.generate import register

register()


def run(cfg: DictConfig) -> list[dict]:
    """Generate for ``cfg`` (a composed GenerateConfig); returns the JSON records it wrote/printed."""
    from pipeloom.inference import SamplingParams

    prompts = OmegaConf.to_container(cfg.prompts)
    if cfg.prompt_file:
        with open(cfg.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("prompts=[] and no prompt_file: give at least one prompt")
    sampling = OmegaConf.to_container(cfg.sampling)
    sampling["stop"], sampling["stop_token_ids"] = tuple(sampling["stop"]), tuple(sampling["stop_token_ids"])
    params = SamplingParams(**sampling)
    llm = build_llm(cfg)
    try:
        results = llm.generate(prompts, params, use_tqdm=cfg.progress)
    finally:
        if hasattr(llm, "shutdown"):
            llm.shutdown()
    if hasattr(llm, "is_driver") and not llm.is_driver:
        return []
    records = []
    for prompt, result in zip(prompts, results):
        first = result.outputs[0]
        record = {"prompt": prompt, "token_ids": first.token_ids, "text": first.text,
                  "finish_reason": first.finish_reason}
        if first.logprobs is not None:
            record["logprobs"] = [{str(k): v for k, v in step.items()} for step in first.logprobs]
        if len(result.outputs) > 1:
            record["outputs"] = [{"index": o.index, "token_ids": o.token_ids, "text": o.text,
                                  "finish_reason": o.finish_reason} for o in result.outputs]
        records.append(record)
    if cfg.output:
        with open(cfg.output, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    else:
        for record in records:
            print(json.dumps({k: record[k] for k in ("prompt", "text", "finish_reason")}))
    stats = llm.last_run
    print(f"generated {stats['output_tokens']} tokens for {len(prompts)} prompts in {stats['seconds']:.2f} s: "
          f"{stats['tokens_per_s']:,.1f} tokens/s ({stats['iterations']} iterations, policy {cfg.inference.policy})"
          + (f"; wrote {cfg.output}" if cfg.output else ""))
    print(llm.engine.latency_report())
    return records


def build_llm(cfg: DictConfig):
    """An :class:`LLM` in one process, or this rank's :class:`ParallelLLM` when ``parallel.pp * parallel.tp > 1``."""
    from pipeloom.inference import LLM

    inf, kv, par = cfg.inference, cfg.kv, cfg.parallel
    options = dict(dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, policy=inf.policy, token_budget=inf.token_budget,
                   max_num_seqs=inf.max_num_seqs, block_size=kv.block_size, num_blocks=kv.num_blocks,
                   gpu_memory_fraction=kv.gpu_memory_fraction, enable_prefix_caching=inf.prefix_caching,
                   attention=inf.attention)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    single = dict(cuda_graphs=inf.cuda_graphs, quantization=inf.quantization, quant_group_size=inf.quant_group_size,
                  quant_head=inf.quant_head, kv_cache_dtype=inf.kv_cache_dtype, speculative=inf.speculative,
                  num_speculative_tokens=inf.num_speculative_tokens, draft_model=inf.draft_model,
                  verify_attention=inf.verify_attention)
    if par.pp * par.tp == 1 and world == 1:
        return LLM(model=cfg.model, **single, **options)
    for key, off in (("quantization", "none"), ("kv_cache_dtype", "auto"), ("speculative", "none")):
        if inf[key] != off:  # the parallel engine's stages run float weights, model-dtype caches, no drafts
            raise ValueError(f"inference.{key}={inf[key]!r} is not supported with parallel.pp={par.pp} x "
                             f"parallel.tp={par.tp}; use inference.{key}={off!r} or one process")
    for name in ("pp", "tp"):
        value = par[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"parallel.{name}={value!r} must be a positive integer")
    if par.pp * par.tp != world:
        raise ValueError(f"parallel.pp={par.pp} x parallel.tp={par.tp} = {par.pp * par.tp} ranks, but WORLD_SIZE="
                         f"{world}; launch with torchrun --nproc_per_node={par.pp * par.tp}")
    from pipeloom.inference.parallel import ParallelLLM

    _init_distributed(cfg.device, par.timeout)
    layout = OmegaConf.to_container(par.layout) if OmegaConf.is_config(par.layout) else par.layout
    return ParallelLLM(cfg.model, pp=par.pp, tp=par.tp, layout=layout, microbatches=par.microbatches,
                       timeout=par.timeout, **options)


def _init_distributed(device: str, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no GPU is visible; use device=cpu (gloo)")
    gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=max(timeout, 60.0)))


@hydra.main(config_path="pkg://pipeloom.configs", config_name="generate", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from pipeloom.inference.parallel import RankFailure
    from pipeloom.launch.report import report_once

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, RankFailure) as err:
        line = f"pipeloom-generate: error: {err}"
        if several:
            report_once(line)  # one line per job, whichever rank exits first
        else:
            print(line, file=sys.__stderr__)
        sys.exit(1 if isinstance(err, RankFailure) else 2)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    """Entry point of ``pipeloom-generate`` and ``python -m pipeloom.launch.generate``."""
    _app()


if __name__ == "__main__":
    main()
