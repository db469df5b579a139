# The serving simulator: a discrete-event run of a whole trace through a policy, a KV capacity and a cost model.
"""Simulate serving a trace without a model::

    result = simulate_serving("chunked-prefill", make_trace("mixed", 200, rate=4), cost="llama2-7b-a100")
    print(result.metrics().row())        # TTFT, TPOT, ITL/TBT, E2E, throughput, goodput

Events in time order: a request arrives (it is added to a Scheduler), an iteration completes (``update``; every
slice that samples emits a token at that instant), a policy's wakeup (dynamic batching's queue delay). Once
everything of an instant has happened, each idle engine plans its next iteration; it takes the cost model's time.

With a :class:`~pipeloom.schedules.batching.costs.PipelineCost` the engine is a pipeline of stages with
``microbatches`` iterations in flight, as vLLM's pipeline parallelism runs them: one Scheduler per microbatch
slot ("virtual engine", each with its share of the KV blocks, a request going to the one with the fewest
unfinished), and each iteration visits the stages in order, first come first served. Unequal iterations leave
stages idle - the pipeline bubble Sarathi-Serve (arXiv 2403.02310 §3.4) removes with equal-sized chunks.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

from .audit import Auditor
from .capacity import BlockCounter
from .costs import CostModel, IterationRecord, PipelineCost, get_cost_model
from .policy import BatchingPolicy, get_batching
from .request import Rejected, Request
from .scheduler import Scheduler
from .traces import Trace

_ARRIVAL, _COMPLETE, _WAKEUP = 0, 1, 2


@dataclass
class RequestLog:
    """What happened to one request: when each of its tokens came out."""

    id: str
    arrival: float
    prompt_len: int
    output_len: int
    token_times: list[float] = field(default_factory=list)
    first_scheduled: float | None = None
    finished: float | None = None
    rejected: bool = False
    num_preemptions: int = 0

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive tokens (vLLM's inter-token latency; Sarathi-Serve's TBT)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1), as ``vllm bench serve``; None for a single token."""
        n = len(self.token_times)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def scheduling_delay(self) -> float:
        """Arrival to the first time any of its tokens ran (Sarathi-Serve's scheduling delay)."""
        return self.first_scheduled - self.arrival


@dataclass(frozen=True)
class IterationLog:
    """One simulated iteration: its composition and when it ran (start of its first stage to end of its last)."""

    index: int
    engine: int
    start: float
    end: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    padded_tokens: int
    kv_tokens_read: int
    num_preempted: int
    text: str

    @property
    def duration(self) -> float:
        return self.end - self.start

    def record(self, duration: float | None = None) -> IterationRecord:
        d = self.duration if duration is None else duration
        return IterationRecord(self.num_prefill_tokens, self.num_decode_tokens, self.kv_tokens_read,
                               self.padded_tokens, d)


@dataclass
class ServingResult:
    """A simulated serving run: per-request token times, per-iteration logs, per-stage busy time."""

    policy: str
    trace: str
    cost: str
    requests: list[RequestLog]
    iterations: list[IterationLog]
    stage_busy: list[list[tuple[float, float]]]  # per pipeline stage, the (start, end) of each iteration on it

    @property
    def completed(self) -> list[RequestLog]:
        return [r for r in self.requests if r.done]

    @property
    def duration(self) -> float:
        """First arrival to last finish (``vllm bench serve``'s benchmark duration)."""
        done = self.completed
        if not done:
            return 0.0
        return max(r.finished for r in done) - min(r.arrival for r in self.requests)

    @property
    def pipeline_bubble(self) -> float:
        """Idle share of the stages' time while every engine still had work: from the first iteration's start
        to the first time an engine ran out of requests (its last iteration's end). 0 for one stage."""
        if not self.iterations or len(self.stage_busy) < 2:
            return 0.0
        t0 = min(i.start for i in self.iterations)
        last: dict[int, float] = {}
        for i in self.iterations:
            last[i.engine] = max(last.get(i.engine, 0.0), i.end)
        t1 = min(last.values())
        if t1 <= t0:
            return 0.0
        busy = sum(max(0.0, min(e, t1) - max(s, t0)) for stage in self.stage_busy for s, e in stage)
        return 1.0 - busy / (len(self.stage_busy) * (t1 - t0))

    def metrics(self, slo=None):
        from .metrics import serving_metrics

        return serving_metrics(self, slo)

    def grid(self, limit: int | None = None) -> str:
        """The iterations, one line each (``it 3  r0 P0+512  r1 D530``), with their times."""
        rows = self.iterations if limit is None else self.iterations[:limit]
        return "\n".join(f"{i.start:10.4f}  {i.text}" for i in rows)


def simulate_serving(
    policy: str | BatchingPolicy,
    trace: Trace,
    cost: str | CostModel | PipelineCost = "llama2-7b-a100",
    kv_blocks: int = 4096,
    block_size: int = 16,
    prefix: Callable[[Request], int] | None = None,
    options: dict | None = None,
    audit: bool = False,
    max_iterations: int = 2_000_000,
) -> ServingResult:
    """Serve ``trace`` with ``policy`` (a name with ``options``, or an instance, copied per engine).

    ``kv_blocks`` of ``block_size`` tokens hold the KV cache (split evenly over a pipeline's virtual engines);
    ``prefix`` optionally models prefix-cache hits (see BlockCounter). ``audit`` checks every iteration against
    the batching invariants (slower). A run that stops with unfinished requests raises RuntimeError.
    """
    template = get_batching(policy, **(options or {})) if isinstance(policy, str) else policy
    pipe = cost if isinstance(cost, PipelineCost) else PipelineCost(get_cost_model(cost), (1.0,))
    engines_n = pipe.in_flight
    if kv_blocks // engines_n < 1:
        raise ValueError(f"kv_blocks={kv_blocks} cannot be split over {engines_n} pipeline microbatches")
    engines = []
    for _ in range(engines_n):
        sched = Scheduler(template.fresh(), BlockCounter(kv_blocks // engines_n, block_size, prefix))
        engines.append(Auditor(sched) if audit else sched)
    busy = [False] * engines_n
    stage_free = [0.0] * pipe.stages
    stage_busy: list[list[tuple[float, float]]] = [[] for _ in range(pipe.stages)]
    requests = trace.requests()
    logs = {r: RequestLog(r.id, r.arrival, r.prompt_len, r.max_tokens) for r in requests}
    iterations: list[IterationLog] = []
    events: list = []
    seq = itertools.count()
    for r in requests:
        heapq.heappush(events, (r.arrival, _ARRIVAL, next(seq), r))
    pending_wakeup = [None] * engines_n

    def start(e: int, now: float) -> None:
        sched = engines[e]
        it = sched.schedule(now)
        if it.is_empty:
            wake = sched.next_wakeup(now)
            if wake is not None and pending_wakeup[e] != wake:
                pending_wakeup[e] = wake
                heapq.heappush(events, (wake, _WAKEUP, next(seq), e))
            return
        busy[e] = True
        t, first = now, None
        for j, st in enumerate(pipe.stage_times(it)):
            begin = max(t, stage_free[j])
            first = begin if first is None else first
            t = begin + st
            stage_free[j] = t
            stage_busy[j].append((begin, t))
            if j < pipe.stages - 1:
                t += pipe.comm
        iterations.append(IterationLog(it.index, e, first, t, it.num_prefill_tokens, it.num_decode_tokens,
                                       it.num_seqs, it.padded_tokens, it.kv_tokens_read, len(it.preempted), str(it)))
        if len(iterations) > max_iterations:
            raise RuntimeError(f"simulation passed max_iterations={max_iterations}; is a request starving?")
        heapq.heappush(events, (t, _COMPLETE, next(seq), (e, it)))

    while events:
        now = events[0][0]
        while events and events[0][0] == now:  # everything that happens at this instant, then plan
            _, kind, _, payload = heapq.heappop(events)
            if kind == _ARRIVAL:
                e = min(range(engines_n), key=lambda k: (len(engines[k].waiting) + len(engines[k].running), k))
                try:
                    engines[e].add(payload, now)
                except Rejected:
                    logs[payload].rejected = True
            elif kind == _COMPLETE:
                e, it = payload
                for s in it.slices:
                    if s.samples:
                        logs[s.request].token_times.append(now)
                for r in engines[e].update(it):
                    log = logs[r]
                    log.finished, log.first_scheduled, log.num_preemptions = now, r.first_scheduled, r.num_preemptions
                busy[e] = False
            elif pending_wakeup[payload] == now:
                pending_wakeup[payload] = None
        for e in range(engines_n):
            if not busy[e]:
                start(e, now)
    stuck = [r.id for r in requests if not logs[r].done and not logs[r].rejected]
    if stuck:
        raise RuntimeError(f"{template!r} left {len(stuck)} requests unfinished (first: {stuck[:5]})")
    name = getattr(pipe.model, "name", "custom")
    return ServingResult(repr(template), trace.name, name, [logs[r] for r in requests], iterations, stage_busy)
