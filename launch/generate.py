# pipeloom-generate: offline generation from a named, trained or Hugging Face model through the engine.
"""Generate for a list of prompts and write one JSON line per prompt::

    pipeloom-generate model=llama-tiny prompts='[hello, "def f("]' sampling.max_tokens=64 sampling.temperature=0 \
        inference.policy=chunked-prefill inference.token_budget=512 kv.block_size=16 output=out.jsonl
    pipeloom-generate model=runs/demo-x prompt_file=prompts.txt      # a pipeloom-train run directory

Each line holds ``prompt``, ``token_ids``, ``text`` and ``finish_reason`` (and ``outputs``, every sample, when
``sampling.n > 1``). Prints the output tokens/s and the measured against the predicted iteration latency
(the batching simulator's cost model fitted on this run's iterations). Fields: ``configs/generate.py``.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from pipeloom.configs.generate import register

register()


def run(cfg: DictConfig) -> list[dict]:
    """Generate for ``cfg`` (a composed GenerateConfig); returns the JSON records it wrote/printed."""
    from pipeloom.inference import LLM, SamplingParams

    prompts = OmegaConf.to_container(cfg.prompts)
    if cfg.prompt_file:
        with open(cfg.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("prompts=[] and no prompt_file: give at least one prompt")
    sampling = OmegaConf.to_container(cfg.sampling)
    sampling["stop"], sampling["stop_token_ids"] = tuple(sampling["stop"]), tuple(sampling["stop_token_ids"])
    params = SamplingParams(**sampling)
    inf, kv = cfg.inference, cfg.kv
    llm = LLM(model=cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, policy=inf.policy,
              token_budget=inf.token_budget, max_num_seqs=inf.max_num_seqs, block_size=kv.block_size,
              num_blocks=kv.num_blocks, gpu_memory_fraction=kv.gpu_memory_fraction,
              enable_prefix_caching=inf.prefix_caching, attention=inf.attention, cuda_graphs=inf.cuda_graphs)
    results = llm.generate(prompts, params, use_tqdm=cfg.progress)
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
          f"{stats['tokens_per_s']:,.1f} tokens/s ({stats['iterations']} iterations, policy {inf.policy})"
          + (f"; wrote {cfg.output}" if cfg.output else ""))
    print(llm.engine.latency_report())
    return records


@hydra.main(config_path="pkg://pipeloom.configs", config_name="generate", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"pipeloom-generate: error: {err}", file=sys.__stderr__)
        sys.exit(2)


def main() -> None:
    """Entry point of ``pipeloom-generate`` and ``python -m pipeloom.launch.generate``."""
    _app()


if __name__ == "__main__":
    main()
