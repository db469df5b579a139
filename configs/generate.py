# Typed config of pipeloom-generate (model, prompts, sampling, batching, KV cache) in Hydra's ConfigStore.
"""The schema behind ``configs/generate.yaml``; each section is handed to the library as keyword arguments::

    pipeloom-generate model=llama-tiny prompts='[def f(, import os]' sampling.max_tokens=64 sampling.temperature=0 \
        inference.policy=chunked-prefill inference.token_budget=512 kv.block_size=16 output=out.jsonl
    torchrun --nproc_per_node=4 -m pipeloom.launch.generate model=llama-tiny parallel.pp=2 parallel.tp=2 ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SamplingSection:
    """Per-request sampling (pipeloom.inference.SamplingParams; the same for every prompt)."""

    max_tokens: int = 64  # output tokens at most per sample
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    min_p: float = 0.0  # drop tokens below min_p * p(top token); 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages repeated tokens; 1 = off
    presence_penalty: float = 0.0  # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_tokens: int = 0  # no stop before this many tokens
    n: int = 1  # samples per prompt
    seed: Optional[int] = None  # per-request seed (sample j uses seed + j); None: the engine's shared stream
    stop: List[str] = field(default_factory=list)  # strings that end a sample (not included in its text)
    stop_token_ids: List[int] = field(default_factory=list)  # token ids that end a sample
    ignore_eos: bool = False  # keep generating after the end-of-sequence token
    logprobs: Optional[int] = None  # also record the sampled token's logprob and this many alternatives


@dataclass
class InferenceSection:
    """The engine: batching policy, attention path, weight quantization."""

    policy: str = "chunked-prefill"  # a batching policy (pipeloom.schedules.batching.list_batching())
    token_budget: int = 512  # tokens per iteration, for the policies that take one (chunked-prefill, splitfuse)
    max_num_seqs: Optional[int] = None  # sequences per iteration; None: the policy's default (within the budget)
    attention: str = "auto"  # auto (Triton on a GPU, torch on CPU) | torch | triton
    cuda_graphs: bool = True  # capture the decode step as CUDA graphs (on a GPU)
    prefix_caching: bool = True  # share full KV blocks of equal prefixes
    quantization: str = "none"  # weights: none | int8 (per channel) | int4 (group-wise) | fp8 (e4m3, per row)
    quant_group_size: int = 128  # int4: input columns per scale (32, 64, 128 or 256)
    quant_head: bool = False  # quantize the output head too (default: kept in the model's dtype, as gpt-fast does)
    kv_cache_dtype: str = "auto"  # KV cache: auto (the model's dtype) | fp8 (e4m3 + a scale per token and head)
    speculative: str = "none"  # speculative decoding, verified exactly: none | ngram (prompt lookup) | draft (a model)
    num_speculative_tokens: int = 4  # guesses per decode step and sequence (speculative=ngram|draft)
    draft_model: Optional[str] = None  # speculative=draft: a config name, pipeloom-train run or Hugging Face folder
    verify_attention: str = "tiles"  # verification graphs' attention: tiles (paged-attention kernel) | split (split-K)


@dataclass
class KVSection:
    """The paged KV cache."""

    block_size: int = 16  # tokens per block
    num_blocks: Optional[int] = None  # blocks in the pool; None: as many as gpu_memory_fraction holds
    gpu_memory_fraction: float = 0.9  # share of device memory (on CPU: of a 1 GiB budget) for weights + cache


@dataclass
class ParallelSection:
    """Several ranks under torchrun (pipeloom.inference.parallel.ParallelLLM); pp = tp = 1 is the one-process engine."""

    pp: int = 1  # pipeline stages; torchrun's --nproc_per_node must be pp * tp
    tp: int = 1  # tensor-parallel ranks per stage (divides the heads, key/value heads and MLP width)
    layout: Any = "uniform"  # the stage split: uniform | parameters | time | a list of layers per stage
    microbatches: Optional[int] = None  # microbatches (scheduler lanes) in flight; None: pp
    timeout: float = 120.0  # seconds a rank waits for another before the engine fails, naming the rank


@dataclass
class GenerateConfig:
    """Everything ``pipeloom-generate`` needs."""

    model: str = "gpt-tiny"  # a registered config (random weights), a pipeloom-train run or checkpoint, an HF folder
    prompts: List[Any] = field(default_factory=lambda: ["def "])  # strings, or lists of token ids
    prompt_file: Optional[str] = None  # a text file, one prompt per line (added after `prompts`)
    output: Optional[str] = None  # JSONL path: one line per prompt (prompt, token_ids, text, finish_reason)
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | float64 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # random weights of a named config, and the shared sampling stream
    progress: bool = True  # show a progress bar
    sampling: SamplingSection = field(default_factory=SamplingSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    kv: KVSection = field(default_factory=KVSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)


def register() -> None:
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
