# Typed config of the pipeloom-batching app (policy, trace, cost model, SLOs), registered in Hydra's ConfigStore.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BatchingConfig:
    """One simulated serving run; with ``policy`` unset the app tabulates every built-in policy."""

    policy: Optional[str] = None  # a registered batching policy; None: every built-in one
    token_budget: int = 512  # tokens per iteration of the policies that take one (chunked-prefill, splitfuse)
    rate: float = 4.0  # mean request arrival rate, requests/s (inf: all at once)
    trace: str = "mixed"  # uniform | mixed | fixed, or a .jsonl file of {arrival, prompt_len, output_len}
    num_requests: int = 200  # requests in a built-in trace
    seed: int = 0  # seed of the arrivals and lengths (one seed: the same trace, time-scaled, at every rate)
    arrival: str = "poisson"  # poisson | gamma | constant
    burstiness: float = 1.0  # gamma shape (1: Poisson; below 1: burstier)
    cost: str = "llama2-7b-a100"  # iteration cost model preset (unit, llama2-7b-a100, llama-1b-h200)
    pp: int = 1  # pipeline stages (uniform); as many iterations in flight
    kv_blocks: int = 4096  # KV-cache blocks
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # requests per iteration at most
    max_num_batched_tokens: Optional[int] = 8192  # tokens per iteration at most, padding included (null: no limit)
    order: str = "fcfs"  # fcfs | priority
    preemption: str = "last-arrived"  # victim when KV runs out: last-arrived | fewest-computed
    options: dict[str, Any] = field(default_factory=dict)  # policy options, e.g. +options.batch_size=16
    slo_ttft: Optional[float] = 2.0  # goodput: TTFT objective, seconds (null: not checked)
    slo_tpot: Optional[float] = 0.1  # goodput: TPOT objective, seconds (null: not checked)
    slo_e2e: Optional[float] = None  # goodput: E2E objective, seconds (null: not checked)
    slo_tbt: float = 0.2  # capacity: P99 time between tokens, seconds (Sarathi-Serve)
    slo_delay: float = 2.0  # capacity: median scheduling delay, seconds (Sarathi-Serve)
    capacity: bool = False  # single run: also search the capacity (multirun: always, per policy)
    capacity_duration: float = 60.0  # seconds of arrivals in each capacity run (requests = rate x duration)
    capacity_max_requests: int = 20000  # the search stops at the rate that would need more requests per run
    csv: Optional[str] = None  # CSV to append rows to; multirun default: <sweep dir>/batching.csv
    picture: Optional[str] = None  # PNG/SVG: tokens per iteration over the 2 s around the first long prompt
    cdf: Optional[str] = None  # PNG/SVG: TTFT / TBT / E2E CDFs of the runs


def register() -> None:
    ConfigStore.instance().store(name="batching_schema", node=BatchingConfig)
