# Load generator for a running pipeloom server: Poisson arrivals, vLLM-bench metrics, and the simulator's prediction.
"""Send ``--num-prompts`` streamed completions at ``--rate`` requests/s (Poisson arrivals, as ``vllm bench serve``)
to a pipeloom server on this machine, then print what the clients measured beside what pipeloom's batching
simulator predicts for the same trace::

    pipeloom-serve model=llama-tiny server.port=8000 &
    python bench/serve_load.py --url http://127.0.0.1:8000 --num-prompts 200 --rate 8 --input-len 128 --output-len 64

Requests are random token ids (``--input-len`` / ``--output-len``, each uniform within ``--range-ratio`` of it,
as vLLM's random dataset) with ``ignore_eos``, so every request generates exactly its output length. Metrics as
``vllm bench serve`` defines them (pipeloom.schedules.batching.metrics computes both columns): TTFT (send to first
token), TPOT ((E2E - TTFT) / (output tokens - 1)), ITL (gaps between a request's tokens), E2E, request and
output-token throughput over the run, goodput (requests/s meeting every ``--goodput`` SLO).

The prediction: the server's engine fits its iteration cost model ``t = a + b*prefill + c*decodes + d*kv_read`` to
the iterations of this run (``GET /engine/stats?since=N``); the simulator then serves the same arrivals and
lengths with the server's batching policy, options and KV pool. The gap between the columns is what the cost
model and the scheduler replay leave out (HTTP, detokenization, the event loop). ``--rates 2,4,8`` sweeps rates
and reports capacity (the highest rate whose P99 ITL meets ``--slo-itl``), measured and predicted.

Bounded: at most ``--num-prompts`` requests per rate and ``--max-time`` seconds (requests still running then
are cancelled and counted failed); loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from urllib.parse import urlparse

import httpx

from pipeloom.schedules.batching import (SLO, CostModel, RequestLog, ServingResult, Trace, TraceItem, arrival_times,
                                         get_batching, simulate_serving)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def lengths(n: int, mean: int, ratio: float, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int, t0: float,
                      log: RequestLog, outcome: dict) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            outcome["status"] = r.status_code
            log.rejected = r.status_code == 429
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter() - t0
            chunk = json.loads(line[6:])
            if "error" in chunk:
                outcome["status"] = "error"
                return
            for choice in chunk["choices"]:
                log.token_times += [now] * len(choice.get("token_ids") or [])
            if chunk.get("usage"):
                outcome["completion_tokens"] = chunk["usage"]["completion_tokens"]
    log.finished = log.token_times[-1] if log.token_times else None
    log.first_scheduled = log.token_times[0] if log.token_times else None  # an upper bound: the first token
    outcome["status"] = 200


async def measure(url: str, rate: float, prompts: list[list[int]], outputs: list[int], seed: int, max_time: float,
                  headers: dict, model: str) -> tuple[list[RequestLog], list[dict], float]:
    """Send the requests at Poisson times; (logs, outcomes, seconds)."""
    times = arrival_times(len(prompts), rate, "poisson", seed=seed)
    logs = [RequestLog(f"r{i}", times[i], len(p), o) for i, (p, o) in enumerate(zip(prompts, outputs))]
    outcomes = [{"status": None} for _ in prompts]
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=max_time) as client:
        t0 = time.perf_counter()

        async def send(i: int) -> None:
            await asyncio.sleep(max(0.0, times[i] - (time.perf_counter() - t0)))
            logs[i].arrival = time.perf_counter() - t0  # the actual send time
            try:
                await one_request(client, model, prompts[i], outputs[i], t0, logs[i], outcomes[i])
            except httpx.HTTPError as err:
                outcomes[i]["status"] = f"{type(err).__name__}"

        tasks = [asyncio.ensure_future(send(i)) for i in range(len(prompts))]
        done, pending = await asyncio.wait(tasks, timeout=max_time)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        elapsed = time.perf_counter() - t0
    for log, outcome in zip(logs, outcomes):
        if outcome["status"] != 200:
            log.finished = None  # failed or cut off: not completed
    return logs, outcomes, elapsed


def predicted(stats: dict, logs: list[RequestLog], slo: SLO):
    """The simulator's metrics for the same arrivals and lengths under the server's policy and fitted costs."""
    cost = stats["cost_model"]
    if cost is None:
        return None, None
    model = CostModel(cost["a"], cost["b"], cost["c"], cost["d"], "fitted")
    sent = [log for log in logs if not log.rejected]
    trace = Trace(tuple(TraceItem(log.arrival, log.prompt_len, log.output_len) for log in sent), name="measured")
    policy = get_batching(stats["policy"], **stats["policy_options"])
    result = simulate_serving(policy, trace, cost=model, kv_blocks=stats["num_blocks"], block_size=stats["block_size"])
    return result.metrics(slo), model


def table(measured, simulated) -> str:
    rows = [("completed", "completed", "{:.0f}"), ("request throughput (req/s)", "request_throughput", "{:.3f}"),
            ("output throughput (tok/s)", "output_throughput", "{:.1f}"), ("goodput (req/s)", "goodput", "{:.3f}")]
    dists = [("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e")]
    lines = ["| metric | measured | simulator |", "|---|---|---|"]
    for label, attr, fmt in rows:
        sim = fmt.format(getattr(simulated, attr)) if simulated else "n/a"
        lines.append(f"| {label} | {fmt.format(getattr(measured, attr))} | {sim} |")
    for label, attr in dists:
        for q in ("mean", "p50", "p90", "p99"):
            ms = [getattr(getattr(m, attr), q) * 1e3 if m else None for m in (measured, simulated)]
            sim = f"{ms[1]:.2f}" if ms[1] is not None else "n/a"
            lines.append(f"| {label} {q} (ms) | {ms[0]:.2f} | {sim} |")
    return "\n".join(lines)


def run(url: str, num_prompts: int = 100, rate: float = 4.0, input_len: int = 32, output_len: int = 32,
        range_ratio: float = 0.0, seed: int = 0, max_time: float = 300.0, api_key: str | None = None,
        slo: SLO | None = None, allow_remote: bool = False) -> dict:
    """One measured run at ``rate``; returns {"measured", "simulated", "cost_model", "failed", "rejected", ...}."""
    host = urlparse(url).hostname
    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"--url {url}: this load generator only targets this machine ({', '.join(LOOPBACK)})")
    if not (num_prompts >= 1 and max_time > 0 and (rate > 0 or math.isinf(rate))):
        raise ValueError("need --num-prompts >= 1, --max-time > 0 and --rate > 0")
    slo = slo or SLO()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    before = httpx.get(f"{url}/engine/stats", headers=headers, timeout=30).raise_for_status().json()
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    rng = random.Random(seed)
    ins, outs = lengths(num_prompts, input_len, range_ratio, rng), lengths(num_prompts, output_len, range_ratio, rng)
    if max(i + o for i, o in zip(ins, outs)) > before["max_model_len"]:
        raise ValueError(f"input + output lengths reach {max(i + o for i, o in zip(ins, outs))} tokens, beyond the "
                         f"model's context ({before['max_model_len']}); lower --input-len / --output-len")
    prompts = [[rng.randrange(before["vocab_size"]) for _ in range(n)] for n in ins]
    logs, outcomes, elapsed = asyncio.run(measure(url, rate, prompts, outs, seed, max_time, headers, model))
    stats = httpx.get(f"{url}/engine/stats", params={"since": before["iterations"]}, headers=headers,
                      timeout=30).json()
    measured = ServingResult("server", "measured", "measured", logs, [], []).metrics(slo)
    simulated, cost = predicted(stats, logs, slo)
    short = [o for o, log in zip(outcomes, logs) if o["status"] == 200 and len(log.token_times) != log.output_len]
    return {"rate": rate, "measured": measured, "simulated": simulated, "cost_model": cost, "elapsed": elapsed,
            "failed": sum(o["status"] not in (200, 429) for o in outcomes),
            "rejected": sum(o["status"] == 429 for o in outcomes), "short": len(short), "policy": stats["policy"],
            "iterations": stats["fitted_iterations"],
            "fit_error": None if stats["cost_model"] is None else stats["cost_model"]["fit_error"]}


def report(result: dict) -> str:
    cost = result["cost_model"]
    head = (f"rate {result['rate']} req/s, policy {result['policy']}: {result['measured'].completed} completed, "
            f"{result['rejected']} rejected (429), {result['failed']} failed, in {result['elapsed']:.1f} s; "
            f"{result['iterations']} engine iterations")
    fit = (f"cost model fitted on this run: {cost} (mean relative error per iteration {result['fit_error']:.1%})"
           if cost else "cost model: too few iterations to fit")
    return "\n".join([head, fit, table(result["measured"], result["simulated"])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--rate", type=float, default=4.0, help="requests/s (inf: all at once)")
    p.add_argument("--rates", default=None, help="comma-separated rates to sweep (capacity search)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-time", type=float, default=300.0, help="seconds per rate at most")
    p.add_argument("--api-key", default=None)
    p.add_argument("--slo-ttft", type=float, default=None, help="goodput: TTFT objective (s)")
    p.add_argument("--slo-tpot", type=float, default=None, help="goodput: TPOT objective (s)")
    p.add_argument("--slo-e2e", type=float, default=None, help="goodput: E2E objective (s)")
    p.add_argument("--slo-itl", type=float, default=0.2, help="capacity: P99 ITL objective (s)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    slo = SLO(ttft=a.slo_ttft, tpot=a.slo_tpot, e2e=a.slo_e2e, tbt=a.slo_itl)
    rates = [float(r) for r in a.rates.split(",")] if a.rates else [a.rate]
    rows = []
    for rate in rates:
        try:
            result = run(a.url, a.num_prompts, rate, a.input_len, a.output_len, a.range_ratio, a.seed, a.max_time,
                         a.api_key, slo)
        except ValueError as err:
            print(f"serve_load: error: {err}", file=sys.stderr)
            return 2
        print(report(result), flush=True)
        rows.append(result)
    if len(rows) > 1:
        ok = lambda m: m is not None and m.completed and m.itl.p99 <= slo.tbt
        best = lambda key: max((r["rate"] for r in rows if ok(r[key])), default=0.0)
        print(f"capacity (highest swept rate with P99 ITL <= {slo.tbt * 1e3:.0f} ms): measured {best('measured')} "
              f"req/s, simulator {best('simulated')} req/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{**{k: v for k, v in r.items() if k not in ("measured", "simulated", "cost_model")},
                        "measured": r["measured"].row(),
                        "simulated": r["simulated"].row() if r["simulated"] else None} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
