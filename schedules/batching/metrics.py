# Serving metrics as `vllm bench serve` defines them, goodput under SLOs, and Sarathi-Serve's capacity by search.
"""From a :class:`~pipeloom.schedules.batching.simulator.ServingResult` (or any list of request logs):

- TTFT: arrival to the first token; TPOT: (E2E - TTFT) / (output tokens - 1), requests of one token left out;
  ITL: every gap between consecutive tokens of a request, pooled over requests (Sarathi-Serve's TBT);
  E2E: arrival to the last token. Percentiles interpolate linearly, as numpy's default.
- Throughput: completed requests and output tokens per second of the run (first arrival to last finish).
- Goodput: requests per second that met every SLO given (``SLO(ttft=, tpot=, e2e=)``), as vLLM's ``--goodput``.
- Capacity (Sarathi-Serve, arXiv 2403.02310 §5): the highest request rate whose P99 TBT stays within
  ``SLO.tbt`` (0.2 s by default; the paper's strict and relaxed SLOs are multiples of a decode iteration) and
  whose median scheduling delay stays within ``SLO.delay`` (2 s), found by a doubling-then-bisection search.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Dist:
    """A latency distribution's summary (seconds)."""

    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Dist":
        if not values:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(sum(values) / len(values), percentile(values, 50), percentile(values, 90),
                   percentile(values, 99), max(values))


@dataclass(frozen=True)
class SLO:
    """Latency objectives: per-request ones for goodput (None: not checked), and the capacity pair."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    tbt: float = 0.2  # capacity: P99 time between tokens
    delay: float = 2.0  # capacity: median scheduling delay

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"SLO {key} must be a positive number of seconds, got {value!r}")

    def met_by(self, log) -> bool:
        tpot = log.tpot or 0.0
        return (
            (self.ttft is None or log.ttft <= self.ttft)
            and (self.tpot is None or tpot <= self.tpot)
            and (self.e2e is None or log.e2e <= self.e2e)
        )


@dataclass(frozen=True)
class ServingMetrics:
    completed: int
    rejected: int
    duration: float
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # prompt + output tokens/s
    goodput: float  # requests/s meeting every per-request SLO
    ttft: Dist
    tpot: Dist
    itl: Dist
    e2e: Dist
    scheduling_delay: Dist
    preemptions: int

    def row(self) -> dict[str, float]:
        """The sweep's columns (seconds, per second)."""
        return {
            "throughput": self.output_throughput,
            "ttft_p50": self.ttft.p50,
            "ttft_p99": self.ttft.p99,
            "tbt_p50": self.itl.p50,
            "tbt_p99": self.itl.p99,
            "e2e_p99": self.e2e.p99,
            "goodput": self.goodput,
        }

    def meets(self, slo: SLO) -> bool:
        """Sarathi-Serve's capacity test: P99 TBT and median scheduling delay within the SLO, nothing rejected."""
        tbt = self.itl.p99 if not math.isnan(self.itl.p99) else 0.0
        return self.rejected == 0 and tbt <= slo.tbt and self.scheduling_delay.p50 <= slo.delay

    def summary(self) -> str:
        ms = lambda x: f"{1e3 * x:.1f}"
        return (
            f"{self.completed} done ({self.rejected} rejected) in {self.duration:.2f}s: "
            f"{self.request_throughput:.3g} req/s, {self.output_throughput:.4g} out tok/s, goodput "
            f"{self.goodput:.3g} req/s | TTFT p50/p99 {ms(self.ttft.p50)}/{ms(self.ttft.p99)} ms | TPOT p50 "
            f"{ms(self.tpot.p50)} ms | TBT p50/p99 {ms(self.itl.p50)}/{ms(self.itl.p99)} ms | E2E p99 "
            f"{ms(self.e2e.p99)} ms | delay p50 {ms(self.scheduling_delay.p50)} ms | {self.preemptions} preemptions"
        )


def serving_metrics(result, slo: SLO | None = None) -> ServingMetrics:
    """The metrics of a ServingResult (its ``requests`` logs and ``duration``)."""
    slo = slo or SLO()
    done = [r for r in result.requests if r.done]
    duration = result.duration
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    out_tokens = sum(len(r.token_times) for r in done)
    return ServingMetrics(
        completed=len(done),
        rejected=sum(r.rejected for r in result.requests),
        duration=duration,
        request_throughput=per_s(len(done)),
        output_throughput=per_s(out_tokens),
        total_token_throughput=per_s(out_tokens + sum(r.prompt_len for r in done)),
        goodput=per_s(sum(slo.met_by(r) for r in done)),
        ttft=Dist.of([r.ttft for r in done]),
        tpot=Dist.of([r.tpot for r in done if r.tpot is not None]),
        itl=Dist.of([gap for r in done for gap in r.itl]),
        e2e=Dist.of([r.e2e for r in done]),
        scheduling_delay=Dist.of([r.scheduling_delay for r in done]),
        preemptions=sum(r.num_preemptions for r in done),
    )


@dataclass(frozen=True)
class Capacity:
    rate: float  # the highest rate found that meets the SLO (0.0: not even the lowest tried)
    metrics: ServingMetrics | None  # at that rate
    evaluations: int
    at_limit: bool = False  # the SLO still held at max_rate: the capacity is at least ``rate``

    def __str__(self) -> str:
        return (">= " if self.at_limit else "") + f"{self.rate:.3g}"


def find_capacity(
    evaluate: Callable[[float], ServingMetrics],
    slo: SLO | None = None,
    start: float = 1.0,
    rel_tol: float = 0.02,
    min_rate: float = 1e-3,
    max_rate: float = 1e5,
) -> Capacity:
    """The highest rate ``r`` with ``evaluate(r).meets(slo)`` (Sarathi-Serve's capacity), by search.

    Doubles (or halves) from ``start`` to bracket the boundary, then bisects until the bracket is within
    ``rel_tol``. Assumes meeting the SLO is monotone in the rate (use one seed for every rate). The delay SLO
    detects overload only if the run is long against it: give each rate a trace of a fixed duration (requests
    = rate x seconds), as Sarathi-Serve's long traces, not a fixed number of requests.
    """
    slo = slo or SLO()
    count = 0

    def ok(rate: float) -> ServingMetrics | None:
        nonlocal count
        count += 1
        m = evaluate(rate)
        return m if m.meets(slo) else None

    good, good_m = None, None
    rate = start
    m = ok(rate)
    if m is not None:
        good, good_m, bad = rate, m, None
        while bad is None and rate < max_rate:
            rate = min(2 * rate, max_rate)
            m = ok(rate)
            if m is None:
                bad = rate
            else:
                good, good_m = rate, m
        if bad is None:
            return Capacity(good, good_m, count, at_limit=True)
    else:
        bad = rate
        while good is None:
            rate /= 2
            if rate < min_rate:
                return Capacity(0.0, None, count)
            m = ok(rate)
            if m is None:
                bad = rate
            else:
                good, good_m = rate, m
    while (bad - good) > rel_tol * good:
        mid = (good + bad) / 2
        m = ok(mid)
        if m is None:
            bad = mid
        else:
            good, good_m = mid, m
    return Capacity(good, good_m, count)
