# Arrival traces for the serving simulator: Poisson/gamma arrivals at a rate, built-in length mixes, JSONL replay.
"""A :class:`Trace` is a list of (arrival time, prompt length, output length), printable and serialisable.

Arrivals follow ``vllm bench serve``: a Poisson process at ``rate`` requests/s, or a gamma process with shape
``burstiness`` (1 is Poisson, below 1 burstier) and the same mean rate; ``rate=inf`` sends everything at 0.
Gaps are drawn at rate 1 and divided by ``rate``, so one seed gives the same trace, time-scaled, at every rate
(a capacity search then compares like with like).

Built-in length mixes (``make_trace(name, ...)``):

- ``uniform``: prompt and output lengths uniform in 100..1024 (nano-vllm's benchmark).
- ``mixed``: long and short requests: a share ``long_fraction`` (0.2) of long prompts (1024..4096 tokens, short
  answers 16..128) among chat-like ones (prompts 16..256, answers 64..256) - the workload where a long prefill
  stalls everyone's decodes (Sarathi-Serve, arXiv 2403.02310 §3.3).
- ``fixed``: every request ``prompt_len`` / ``output_len`` (closed forms).

``Trace.from_jsonl(path)`` replays a file of ``{"arrival": s, "prompt_len": n, "output_len": m}`` lines (and an
optional ``"priority"``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Iterable

from .request import Request


@dataclass(frozen=True)
class TraceItem:
    arrival: float  # seconds from the trace's start
    prompt_len: int
    output_len: int
    priority: int = 0  # lower is served first under order="priority"


@dataclass(frozen=True)
class Trace:
    """Requests of a serving run in arrival order."""

    items: tuple[TraceItem, ...]
    name: str = "trace"

    def __post_init__(self) -> None:
        for i, it in enumerate(self.items):
            if it.prompt_len < 1 or it.output_len < 1 or it.arrival < 0:
                raise ValueError(f"trace {self.name!r} item {i}: {it} needs lengths >= 1 and arrival >= 0")
        object.__setattr__(self, "items", tuple(sorted(self.items, key=lambda it: it.arrival)))

    def __len__(self) -> int:
        return len(self.items)

    def requests(self) -> list[Request]:
        """Fresh Request objects (ids r0, r1, ... in arrival order)."""
        return [Request(f"r{i}", it.prompt_len, it.output_len, arrival=it.arrival, priority=it.priority)
                for i, it in enumerate(self.items)]

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests per second over the arrival span; inf when all arrive at once)."""
        span = self.items[-1].arrival - self.items[0].arrival if self.items else 0.0
        return (len(self.items) - 1) / span if span > 0 else math.inf

    def at_rate(self, rate: float) -> "Trace":
        """The same requests with arrival times scaled to mean ``rate`` requests/s."""
        check_rate(rate)
        if math.isinf(rate) or math.isinf(self.rate):
            items = [TraceItem(0.0, it.prompt_len, it.output_len, it.priority) for it in self.items]
        else:
            start, k = self.items[0].arrival, self.rate / rate
            items = [TraceItem((it.arrival - start) * k, it.prompt_len, it.output_len, it.priority)
                     for it in self.items]
        return Trace(tuple(items), self.name)

    def to_jsonl(self, path: str) -> str:
        with open(path, "w") as f:
            for it in self.items:
                row = {"arrival": it.arrival, "prompt_len": it.prompt_len, "output_len": it.output_len}
                f.write(json.dumps({**row, "priority": it.priority} if it.priority else row))
                f.write("\n")
        return path

    @classmethod
    def from_jsonl(cls, path: str) -> "Trace":
        items = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    items.append(TraceItem(float(row["arrival"]), int(row["prompt_len"]), int(row["output_len"]),
                                           int(row.get("priority", 0))))
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{path}:{n}: expected {{\"arrival\": s, \"prompt_len\": n, \"output_len\": m}}, "
                        f"got {line.strip()[:80]!r} ({err!r})"
                    ) from err
        if not items:
            raise ValueError(f"{path}: the trace holds no requests")
        return cls(tuple(items), name=path)

    def summary(self) -> str:
        p = [it.prompt_len for it in self.items]
        o = [it.output_len for it in self.items]
        return (
            f"{self.name}: {len(self)} requests at {self.rate:.3g}/s, prompt {min(p)}..{max(p)} "
            f"(mean {sum(p) / len(p):.0f}), output {min(o)}..{max(o)} (mean {sum(o) / len(o):.0f})"
        )


def check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"rate must be a positive number of requests/s (or inf), got {rate!r}")
    return rate


def arrival_times(n: int, rate: float, process: str = "poisson", burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` arrival times at mean ``rate``: "poisson", "gamma" (shape ``burstiness``) or "constant" gaps."""
    check_rate(rate)
    if process not in ("poisson", "gamma", "constant"):
        raise ValueError(f"arrival process must be poisson, gamma or constant, got {process!r}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness!r}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t / rate)
        if process == "poisson":
            t += rng.expovariate(1.0)
        elif process == "gamma":
            t += rng.gammavariate(burstiness, 1.0 / burstiness)
        else:
            t += 1.0
    return times


def _lengths(name: str, n: int, rng: random.Random, opts: dict) -> Iterable[tuple[int, int]]:
    if name == "uniform":
        lo, hi = opts.pop("prompt_range", (100, 1024))
        olo, ohi = opts.pop("output_range", (100, 1024))
        return [(rng.randint(lo, hi), rng.randint(olo, ohi)) for _ in range(n)]
    if name == "mixed":
        frac = opts.pop("long_fraction", 0.2)
        long_p, long_o = opts.pop("long_prompt", (1024, 4096)), opts.pop("long_output", (16, 128))
        short_p, short_o = opts.pop("short_prompt", (16, 256)), opts.pop("short_output", (64, 256))
        out = []
        for _ in range(n):
            p, o = (long_p, long_o) if rng.random() < frac else (short_p, short_o)
            out.append((rng.randint(*p), rng.randint(*o)))
        return out
    if name == "fixed":
        p, o = opts.pop("prompt_len", 128), opts.pop("output_len", 128)
        return [(p, o)] * n
    raise ValueError(f"unknown trace {name!r}; valid choices: {', '.join(TRACES)}, or a .jsonl file to replay")


TRACES = ("uniform", "mixed", "fixed")


def make_trace(
    name: str,
    num_requests: int = 200,
    rate: float = 1.0,
    arrival: str = "poisson",
    burstiness: float = 1.0,
    seed: int = 0,
    **lengths,
) -> Trace:
    """A built-in trace by name (see the module doc), or a replayed ``.jsonl`` file rescaled to ``rate`` if given.

    Length options: ``prompt_range``/``output_range`` (uniform), ``long_fraction``, ``long_prompt``,
    ``long_output``, ``short_prompt``, ``short_output`` (mixed; each a (low, high) pair), ``prompt_len``,
    ``output_len`` (fixed).
    """
    if str(name).endswith(".jsonl"):
        trace = Trace.from_jsonl(name)
        return trace if rate is None else trace.at_rate(rate)
    if not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests must be an integer >= 1, got {num_requests!r}")
    rng = random.Random(f"{seed}-lengths")
    opts = dict(lengths)
    pairs = _lengths(name, num_requests, rng, opts)
    if opts:
        raise ValueError(f"trace {name!r}: unknown option(s) {sorted(opts)}")
    times = arrival_times(num_requests, rate, arrival, burstiness, seed)
    return Trace(tuple(TraceItem(t, p, o) for t, (p, o) in zip(times, pairs)), name=name)
