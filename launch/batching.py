# pipeloom-batching: simulate serving under batching policies and compare latencies, one config or a Hydra sweep.
"""Compare inference batching policies without running a model.

    pipeloom-batching                                               # every policy at rate=4 on the mixed trace
    pipeloom-batching policy=chunked-prefill token_budget=512 rate=4 trace=mixed
    pipeloom-batching --multirun policy=prefill-first,chunked-prefill rate=1,2,4

A sweep appends one CSV row per run to ``<sweep dir>/batching.csv``; when it ends it draws ``batching.png``
(P99 TBT, P99 TTFT and throughput against the rate, one line per policy) beside it and prints each policy's
capacity (Sarathi-Serve: the highest rate with P99 TBT <= slo_tbt and median scheduling delay <= slo_delay).
"""

from __future__ import annotations

import csv
import math
import os
import sys

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeloom.configs.batching import register
from pipeloom.schedules.batching import (
    SLO,
    BatchingError,
    PipelineCost,
    batching_class,
    blocks_for,
    find_capacity,
    get_batching,
    get_cost_model,
    list_batching,
    make_trace,
    plot_compositions,
    plot_latency_cdfs,
    simulate_serving,
)

COLUMNS = ["policy", "token_budget", "rate", "throughput", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99", "e2e_p99",
           "goodput"]
TABLE = ["static", "dynamic", "continuous", "prefill-first", "chunked-prefill", "splitfuse"]

register()


def build_policy(cfg: DictConfig, name: str):
    """The policy ``name`` with the config's common options, token_budget where it takes one, and ``options``."""
    opts = {"max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "order": cfg.order, "preemption": cfg.preemption}
    if "token_budget" in batching_class(name).options:
        opts["token_budget"] = cfg.token_budget
    opts.update(OmegaConf.to_container(cfg.options) if cfg.options else {})
    if isinstance(opts.get("preferred_batch_sizes"), list):
        opts["preferred_batch_sizes"] = tuple(opts["preferred_batch_sizes"])
    return get_batching(name, **opts)


def build_cost(cfg: DictConfig):
    if not isinstance(cfg.pp, int) or cfg.pp < 1:
        raise ValueError(f"pp must be an integer >= 1, got {cfg.pp!r}")
    model = get_cost_model(cfg.cost)
    return PipelineCost.uniform(model, cfg.pp) if cfg.pp > 1 else model


def slo_of(cfg: DictConfig) -> SLO:
    return SLO(ttft=cfg.slo_ttft, tpot=cfg.slo_tpot, e2e=cfg.slo_e2e, tbt=cfg.slo_tbt, delay=cfg.slo_delay)


def simulate(cfg: DictConfig, name: str, rate: float):
    """One simulated run of policy ``name`` at ``rate``."""
    for key in ("kv_blocks", "block_size", "num_requests"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    trace = make_trace(cfg.trace, cfg.num_requests, rate=rate, arrival=cfg.arrival, burstiness=cfg.burstiness,
                       seed=cfg.seed)
    check_kv(cfg, trace)
    return simulate_serving(build_policy(cfg, name), trace, build_cost(cfg), kv_blocks=cfg.kv_blocks,
                            block_size=cfg.block_size)


def check_kv(cfg: DictConfig, trace) -> None:
    """kv_blocks must hold the trace's longest request on each pipeline engine."""
    longest = max(trace.items, key=lambda it: it.prompt_len + it.output_len)
    need = blocks_for(longest.prompt_len + longest.output_len - 1, cfg.block_size)
    if need > cfg.kv_blocks // cfg.pp:
        raise ValueError(
            f"kv_blocks={cfg.kv_blocks} ({cfg.kv_blocks // cfg.pp} per pipeline engine, {cfg.block_size} tokens each) "
            f"cannot hold the trace's longest request ({longest.prompt_len} prompt + {longest.output_len} output "
            f"tokens need {need} blocks); raise kv_blocks"
        )


def evaluate(cfg: DictConfig, name: str) -> dict:
    """Simulate one configuration and return its CSV row (seconds; throughput in output tokens/s)."""
    result = simulate(cfg, name, cfg.rate)
    metrics = result.metrics(slo_of(cfg))
    policy = result.policy.split("(")[0]
    budget = cfg.token_budget if "token_budget" in batching_class(name).options else ""
    row = {"policy": policy, "token_budget": budget, "rate": cfg.rate}
    row.update({k: round(v, 6) for k, v in metrics.row().items()})
    return {**row, "_result": result, "_metrics": metrics}


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table (latencies in ms)."""
    head = ["policy", "budget", "rate", "out tok/s", "TTFT p50", "TTFT p99", "TBT p50", "TBT p99", "E2E p99",
            "goodput", "preempt"]
    ms = lambda x: "-" if math.isnan(x) else f"{1e3 * x:.1f}"
    body = [
        [r["policy"], r["token_budget"] or "-", f"{r['rate']:g}", f"{r['throughput']:.1f}", ms(r["ttft_p50"]),
         ms(r["ttft_p99"]), ms(r["tbt_p50"]), ms(r["tbt_p99"]), ms(r["e2e_p99"]), f"{r['goodput']:.3g}",
         r["_metrics"].preemptions]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def capacity_trace(cfg: DictConfig, rate: float):
    """The trace of one capacity run: ``capacity_duration`` seconds of arrivals at ``rate`` (a replayed file is
    rescaled to the rate instead)."""
    if str(cfg.trace).endswith(".jsonl"):
        return make_trace(cfg.trace, rate=rate)
    n = max(20, math.ceil(rate * cfg.capacity_duration))
    return make_trace(cfg.trace, n, rate=rate, arrival=cfg.arrival, burstiness=cfg.burstiness, seed=cfg.seed)


def capacity_table(cfg: DictConfig, names: list[tuple[str, object]]) -> str:
    """Each (policy, token_budget)'s capacity under the config's SLOs, searched by bisection."""
    slo = slo_of(cfg)
    if not cfg.capacity_duration > 0:
        raise ValueError(f"capacity_duration must be a positive number of seconds, got {cfg.capacity_duration!r}")
    lines = [f"capacity (Sarathi-Serve): highest rate with P99 TBT <= {slo.tbt:g}s and median scheduling delay "
             f"<= {slo.delay:g}s ({cfg.trace}, {cfg.capacity_duration:g} s of arrivals per run, seed {cfg.seed})"]
    head = ["policy", "budget", "capacity req/s", "TBT p99 ms", "delay p50 ms", "runs"]
    body = []
    max_rate = cfg.capacity_max_requests / cfg.capacity_duration
    for name, budget in names:
        sub = cfg.copy()
        if budget != "":
            sub.token_budget = budget

        def evaluate(rate, sub=sub, name=name):
            res = simulate_serving(build_policy(sub, name), capacity_trace(sub, rate), build_cost(sub),
                                   kv_blocks=sub.kv_blocks, block_size=sub.block_size)
            return res.metrics(slo)

        cap = find_capacity(evaluate, slo, max_rate=max_rate)
        m = cap.metrics
        body.append([name, budget if budget != "" else "-", str(cap),
                     "-" if m is None else f"{1e3 * m.itl.p99:.1f}",
                     "-" if m is None else f"{1e3 * m.scheduling_delay.p50:.1f}", cap.evaluations])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    rows = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + body]
    rows.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + rows)


def append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _sweep_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None


def run(cfg: DictConfig) -> list[dict]:
    """The app's work, callable without Hydra's entry point (tests call it with a composed config)."""
    names = TABLE if cfg.policy is None else [cfg.policy]
    if cfg.policy is not None and cfg.policy not in list_batching(include_aliases=True):
        batching_class(cfg.policy)  # raises the error naming the choices
    rows = [evaluate(cfg, name) for name in names]
    result0 = rows[0]["_result"]
    print(f"trace {cfg.trace}: {len(result0.requests)} requests at {cfg.rate:g}/s (seed {cfg.seed}), cost "
          f"{cfg.cost}, pp={cfg.pp}, kv {cfg.kv_blocks}x{cfg.block_size} tokens")
    print(format_table(rows))
    if cfg.capacity and _sweep_dir() is None:
        print(capacity_table(cfg, [(n, r["token_budget"]) for n, r in zip(names, rows)]))
    results = {f"{r['policy']}" + (f" {r['token_budget']}" if r["token_budget"] != "" else ""): r["_result"]
               for r in rows}
    if cfg.picture:
        print(f"picture: {plot_compositions(results, cfg.picture, window='long-prompt')}")
    if cfg.cdf:
        print(f"cdf: {plot_latency_cdfs(results, cfg.cdf)}")
    sweep_dir = _sweep_dir()
    target = cfg.csv or (os.path.join(sweep_dir, "batching.csv") if sweep_dir else None)
    if target:
        for row in rows:
            append_csv(target, row)
    return rows


def plot_sweep(csv_path: str, out_path: str) -> str:
    """P99 TBT, P99 TTFT and throughput against the rate, one line per (policy, token_budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    panels = [("tbt_p99", "P99 time between tokens (s)"), ("ttft_p99", "P99 TTFT (s)"),
              ("throughput", "output tokens/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6))
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = r["policy"] + (f" {r['token_budget']}" if r["token_budget"] else "")
        series.setdefault(label, []).append(r)
    styles = ["-", "--", "-.", ":"]
    for ax, (key, label) in zip(axes, panels):
        for i, (name, points) in enumerate(sorted(series.items())):
            points.sort(key=lambda r: float(r["rate"]))
            ax.plot([float(r["rate"]) for r in points], [float(r[key]) for r in points], marker="os^vD<>"[i % 7],
                    linestyle=styles[i % len(styles)], label=name)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key != "throughput":
            ax.set_yscale("log")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


class SweepSummary(Callback):
    """Hydra callback: collects each job's config; after a multirun, plots the CSV and prints the capacities."""

    def __init__(self) -> None:
        self.jobs: list[DictConfig] = []

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        status = getattr(job_return, "status", None)
        if status is None or getattr(status, "name", "") == "COMPLETED":
            self.jobs.append(config.copy())

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        csv_path = os.path.join(config.hydra.sweep.dir, "batching.csv")
        if not os.path.exists(csv_path):
            return
        png = plot_sweep(csv_path, os.path.join(config.hydra.sweep.dir, "batching.png"))
        print(f"sweep: {csv_path}\nplot:  {png}")
        groups: dict[tuple, tuple[DictConfig, list]] = {}
        skip = ("rate", "policy", "token_budget", "hydra", "csv", "picture", "cdf", "capacity", "num_requests")
        for job in self.jobs:  # one table per configuration that differs in more than policy, budget and rate
            key = tuple(sorted((k, str(v)) for k, v in job.items() if k not in skip))
            first, names = groups.setdefault(key, (job, []))
            for name in TABLE if job.policy is None else [job.policy]:
                budget = job.token_budget if "token_budget" in batching_class(name).options else ""
                if (name, budget) not in names:
                    names.append((name, budget))
        for job, names in groups.values():
            print(capacity_table(job, names))


@hydra.main(config_path="pkg://pipeloom.configs", config_name="batching", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (BatchingError, ValueError) as err:
        print(f"pipeloom-batching: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
