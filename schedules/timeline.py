# Timelines: what ran where and when, from the simulator or from a real run, and the bubble metrics.
"""A :class:`Timeline` is a tuple of :class:`Interval` (rank, action, start, end).

The simulator produces one in abstract time units; the runtime records one in seconds. Both give the
same metrics (defined in docs/schedule-facts.md):

* ``bubble_rate`` r - Zero Bubble paper (arXiv 2401.10241 §5.3): ``cost`` is the longest per-rank span
  (first compute start to last compute end on that rank); r = (cost - ideal) / cost.
* ``bubble_time_ratio`` beta - Megatron (arXiv 2104.04473 §2.2.1): (cost - ideal) / ideal.

``ideal`` is the compute time (F, B, W) of the busiest rank: m(F+B+W) when stages are uniform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .ir import Action, Kind


@dataclass(frozen=True)
class Interval:
    """One action on one rank from ``start`` to ``end``."""

    rank: int
    action: Action
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timeline:
    """Intervals of every rank; ``unit`` is ``"step"`` for simulated time or ``"s"`` for measured."""

    intervals: tuple[Interval, ...]
    pp: int
    unit: str = "step"

    def compute(self, rank: int | None = None) -> list[Interval]:
        return [iv for iv in self.intervals if iv.action.kind.is_compute and (rank is None or iv.rank == rank)]

    @property
    def makespan(self) -> float:
        ivs = self.compute()
        return max(iv.end for iv in ivs) - min(iv.start for iv in ivs) if ivs else 0.0

    def span(self, rank: int) -> float:
        ivs = self.compute(rank)
        return max(iv.end for iv in ivs) - min(iv.start for iv in ivs) if ivs else 0.0

    def busy(self, rank: int) -> float:
        return sum(iv.duration for iv in self.compute(rank))

    def busy_by_kind(self, rank: int) -> dict[str, float]:
        out = {"F": 0.0, "B": 0.0, "W": 0.0}
        for iv in self.compute(rank):
            out[iv.action.kind.value] += iv.duration
        return out

    def _cost_ideal(self) -> tuple[float, float]:
        cost = max(self.span(r) for r in range(self.pp))
        ideal = max(self.busy(r) for r in range(self.pp))
        return cost, ideal

    def bubble_rate(self) -> float:
        """Zero Bubble's r = (cost - ideal) / cost, cost = the longest per-rank span."""
        cost, ideal = self._cost_ideal()
        return (cost - ideal) / cost if cost > 0 else 0.0

    def bubble_time_ratio(self) -> float:
        """Megatron's beta = bubble time / ideal time."""
        cost, ideal = self._cost_ideal()
        return (cost - ideal) / ideal if ideal > 0 else 0.0

    def idle(self, rank: int) -> float:
        """Idle time of ``rank`` inside its own span."""
        return self.span(rank) - self.busy(rank)

    def shifted(self) -> "Timeline":
        """The same timeline with the earliest compute start at 0."""
        ivs = self.compute()
        t0 = min((iv.start for iv in ivs), default=0.0)
        return Timeline(
            tuple(Interval(iv.rank, iv.action, iv.start - t0, iv.end - t0) for iv in self.intervals), self.pp, self.unit
        )

    def chrome_trace(self, path: str | None = None) -> dict:
        """Chrome / Perfetto trace JSON (one thread per rank); written to ``path`` when given."""
        scale = 1e6 if self.unit == "s" else 1e3  # microseconds; a simulated step shows as 1 ms
        base = min((iv.start for iv in self.intervals), default=0.0)
        events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "pipeline"}}]
        for rank in range(self.pp):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        for iv in self.intervals:
            events.append(
                {
                    "name": str(iv.action),
                    "cat": iv.action.kind.value,
                    "ph": "X",
                    "pid": 0,
                    "tid": iv.rank,
                    "ts": (iv.start - base) * scale,
                    "dur": iv.duration * scale,
                    "args": {
                        "stage": iv.action.stage,
                        "microbatch": iv.action.microbatch,
                        "version": iv.action.version,
                    },
                }
            )
        trace = {"traceEvents": events, "displayTimeUnit": "ms"}
        if path is not None:
            with open(path, "w") as f:
                json.dump(trace, f)
        return trace

    def to_records(self) -> list[dict]:
        return [{"rank": iv.rank, "action": str(iv.action), "start": iv.start, "end": iv.end} for iv in self.intervals]

    @classmethod
    def from_records(cls, records: list[dict], pp: int, unit: str = "s") -> "Timeline":
        return cls(
            tuple(Interval(r["rank"], Action.parse(r["action"]), r["start"], r["end"]) for r in records), pp, unit
        )

    def stage_costs(self, plan) -> dict[str, tuple[float, ...]]:
        """Mean measured F, B and W duration of each chunk (per-chunk lists for :class:`Costs`).

        A backward of a plan that does not split it is counted as B (its W stays 0).
        """
        sums = {k: [0.0] * plan.num_stages for k in "FBW"}
        counts = {k: [0] * plan.num_stages for k in "FBW"}
        for iv in self.compute():
            k = iv.action.kind.value
            sums[k][iv.action.stage] += iv.duration
            counts[k][iv.action.stage] += 1
        return {k: tuple(s / c if c else 0.0 for s, c in zip(sums[k], counts[k])) for k in "FBW"}


COLOURS = {Kind.F: "#4e79a7", Kind.B: "#59a14f", Kind.W: "#f28e2b"}
