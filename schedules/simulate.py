# The timed simulator: costs in, a timeline with bubble rates and peak memory out.
"""Simulate a plan: every rank runs its actions in plan order, each as soon as its inputs exist.

Costs (:class:`Costs`) are per full stage; a chunk of a rank holding ``v`` chunks costs 1/v of it; a
backward that has no separate W costs B+W; ``comm`` is a latency on every cross-rank F->F and B->B
edge. Communication actions take no time (their latency is the edge's), and so do UPDATE, RELEASE and
SYNC_TIED.

Both bubble metrics (Megatron's beta, arXiv 2104.04473 §2.2.1; Zero Bubble's r, arXiv 2401.10241 §5.3;
defined in docs/schedule-facts.md) are reported, computed from the :class:`Timeline` so a
measured run gets the very same numbers (see :mod:`pipeloom.schedules.timeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .ir import Action, Kind, Plan, PlanError
from .timeline import Interval, Timeline

Number = float | int


@dataclass(frozen=True)
class Costs:
    """Durations per full stage: scalars, or one value per rank (``pp`` long).

    A list as long as the plan's number of chunks (``pp * vpp``) gives each chunk's own duration
    instead (what the runtime measures); a list ``pp`` long is divided by the chunks on each rank.
    """

    F: Number | Sequence[Number] = 1.0
    B: Number | Sequence[Number] = 2.0
    W: Number | Sequence[Number] = 0.0
    comm: Number = 0.0

    def __post_init__(self) -> None:
        for name in ("F", "B", "W"):
            value = getattr(self, name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v < 0 for v in values):
                raise ValueError(f"Costs.{name} must be >= 0, got {value}")
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.comm < 0:
            raise ValueError(f"Costs.comm must be >= 0, got {self.comm}")

    def chunk(self, name: str, plan: Plan, stage: int) -> float:
        """Duration of ``name`` (F, B or W) for chunk ``stage`` of ``plan``."""
        value = getattr(self, name)
        rank = plan.rank_of(stage)
        if not isinstance(value, tuple):
            return value / len(plan.stages_of(rank))
        if len(value) == plan.num_stages and plan.num_stages != plan.pp:
            return value[stage]
        if len(value) != plan.pp:
            raise ValueError(
                f"Costs.{name} has {len(value)} values; the plan needs {plan.pp} (one per rank) "
                f"or {plan.num_stages} (one per chunk)"
            )
        return value[rank] / len(plan.stages_of(rank))

    @property
    def uniform(self) -> bool:
        return not any(isinstance(getattr(self, n), tuple) for n in ("F", "B", "W"))


def durations(plan: Plan, costs: Costs) -> Callable[[Action], float]:
    """The duration function the simulator uses for ``plan`` under ``costs``."""

    def duration(a: Action) -> float:
        if a.kind is Kind.F:
            return costs.chunk("F", plan, a.stage)
        if a.kind is Kind.B:
            full = 0.0 if plan.splits_backward(a.stage, a.microbatch) else costs.chunk("W", plan, a.stage)
            return costs.chunk("B", plan, a.stage) + full
        if a.kind is Kind.W:
            return costs.chunk("W", plan, a.stage)
        return 0.0

    return duration


class Deadlock(PlanError):
    """No rank can make progress; ``blocked`` maps rank -> (step, action, the action it waits for)."""

    def __init__(self, message: str, blocked: dict):
        super().__init__(message)
        self.blocked = blocked


def dependencies(plan: Plan, a: Action) -> list[tuple[Action, bool]]:
    """The actions ``a`` waits for, each with whether the edge crosses ranks (and so pays ``comm``).

    In a plan with communication, a cross-rank input arrives through the RECV placed before the
    consumer, and a RECV waits for its matching SEND. A pipelined-inference plan (meta ``lane_after``, see
    :mod:`pipeloom.schedules.inference`) also makes the first stage's forward of a microbatch wait for the
    last stage's forward of the previous microbatch of its decode lane (its sampled tokens).
    """
    s, mb, last = a.stage, a.microbatch, plan.num_stages - 1
    comm = plan.has_comm
    here = plan.rank_of(s)
    if a.kind is Kind.F:
        if s == 0:
            before = lane_after(plan).get(mb)
            return [] if before is None else [(Action(last, Kind.F, before), plan.rank_of(last) != here)]
        if comm and plan.rank_of(s - 1) != here:
            return [(Action(s, Kind.RECV_F, mb), False)]
        return [(Action(s - 1, Kind.F, mb), plan.rank_of(s - 1) != here)]
    if a.kind is Kind.B:
        deps = [(Action(s, Kind.F, mb), False)]
        if s < last:
            if comm and plan.rank_of(s + 1) != here:
                deps.append((Action(s, Kind.RECV_B, mb), False))
            else:
                deps.append((Action(s + 1, Kind.B, mb), plan.rank_of(s + 1) != here))
        return deps
    if a.kind is Kind.W:
        return [(Action(s, Kind.B, mb), False)]
    if a.kind is Kind.SEND_F:
        return [(Action(s, Kind.F, mb), False)]
    if a.kind is Kind.SEND_B:
        return [(Action(s, Kind.B, mb), False)]
    if a.kind is Kind.RECV_F:
        return [(Action(s - 1, Kind.SEND_F, mb), True)]
    if a.kind is Kind.RECV_B:
        return [(Action(s + 1, Kind.SEND_B, mb), True)]
    return []


def lane_after(plan: Plan) -> dict[int, int]:
    """``{microbatch k: microbatch j}``: k's first stage waits for j's last stage (meta ``lane_after``; cached)."""
    cached = plan.__dict__.get("_lane_after_cache")
    if cached is None:
        cached = {int(k): int(j) for k, j in plan.info.get("lane_after", ())}
        object.__setattr__(plan, "_lane_after_cache", cached)
    return cached


def execute(plan: Plan, duration: Callable[[Action], float], comm: float = 0.0) -> Timeline:
    """Run ``plan`` in time: each action starts when its rank is free and its inputs have arrived.

    Raises :class:`Deadlock` (with the grid and the stuck cells) when no rank can move.
    """
    end: dict[Action, float] = {}
    clock = [0.0] * plan.pp
    step = [0] * plan.pp
    intervals: list[Interval] = []
    keys = {}

    def key(a: Action) -> Action:  # versions do not change identity for dependencies
        k = keys.get(a)
        if k is None:
            k = keys[a] = (
                Action(a.stage, a.kind, a.microbatch) if a.version is not None and a.microbatch is not None else a
            )
        return k

    remaining = sum(len(r) for r in plan.ranks)
    while remaining:
        progressed = False
        for rank, actions in enumerate(plan.ranks):
            while step[rank] < len(actions):
                a = actions[step[rank]]
                ready = clock[rank]
                for dep, crosses in dependencies(plan, a):
                    t = end.get(dep)
                    if t is None:
                        break
                    ready = max(ready, t + (comm if crosses else 0.0))
                else:
                    finish = ready + duration(a)
                    end[key(a)] = finish
                    intervals.append(Interval(rank, a, ready, finish))
                    clock[rank] = finish
                    step[rank] += 1
                    remaining -= 1
                    progressed = True
                    continue
                break
        if not progressed:
            raise _deadlock(plan, step, end)
    return Timeline(intervals=tuple(intervals), pp=plan.pp)


def _deadlock(plan: Plan, step: list[int], end: dict) -> Deadlock:
    blocked = {}
    lines = []
    for rank, actions in enumerate(plan.ranks):
        if step[rank] >= len(actions):
            continue
        a = actions[step[rank]]
        waits = [dep for dep, _ in dependencies(plan, a) if dep not in end]
        blocked[rank] = (step[rank], a, waits[0] if waits else None)
        where = ""
        if waits:
            try:
                r, st = _find_unversioned(plan, waits[0])
                where = f" (rank {r} step {st})"
            except PlanError:
                where = " (absent from the plan)"
        lines.append(f"  rank {rank} step {step[rank]}: {a} waits for {waits[0] if waits else '?'}{where}")
    first = min(blocked)
    message = (
        f"plan {plan.name!r} deadlocks: no rank can move.\n"
        + "\n".join(lines)
        + "\n"
        + plan.grid(mark=(first, blocked[first][0]))
    )
    return Deadlock(message, blocked)


def _find_unversioned(plan: Plan, target: Action) -> tuple[int, int]:
    """(rank, step) of the action matching ``target`` in stage, kind and microbatch, whatever its version."""
    for rank, actions in enumerate(plan.ranks):
        for st, a in enumerate(actions):
            if (a.stage, a.kind, a.microbatch) == (target.stage, target.kind, target.microbatch):
                return rank, st
    raise PlanError(f"{target} is not in the plan")


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` found: the timeline and the numbers a schedule is judged by."""

    plan: Plan
    costs: Costs
    timeline: Timeline
    makespan: float
    bubble_rate: float
    bubble_time_ratio: float
    peak_activations: tuple[float, ...]
    weight_versions: tuple[int, ...] | None

    def render(self, path: str, title: str | None = None) -> str:
        """Draw the classic pipeline figure (PNG or SVG by the file suffix); returns the path."""
        from .render import render_timeline

        return render_timeline(self.timeline, path, title=title or _title(self))

    def ascii(self, width: int = 100) -> str:
        from .render import ascii_timeline

        return ascii_timeline(self.timeline, width=width)

    def chrome_trace(self, path: str | None = None) -> dict:
        return self.timeline.chrome_trace(path)

    def summary(self) -> str:
        return (
            f"{self.plan.name}: pp={self.plan.pp} vpp={self.plan.vpp} m={self.plan.microbatches} "
            f"makespan={self.makespan:g} bubble_rate={self.bubble_rate:.4f} "
            f"bubble_time_ratio={self.bubble_time_ratio:.4f} peak_activations={list(self.peak_activations)}"
        )


def _title(result: SimResult) -> str:
    return f"{result.plan.name}  pp={result.plan.pp} m={result.plan.microbatches}  bubble rate {result.bubble_rate:.3f}"


def simulate(plan: Plan, costs: Costs | None = None) -> SimResult:
    """Simulate ``plan`` under ``costs`` (default F=1, B=2, W=0, no communication latency)."""
    costs = costs or Costs()
    timeline = execute(plan, durations(plan, costs), comm=costs.comm)
    return SimResult(
        plan=plan,
        costs=costs,
        timeline=timeline,
        makespan=timeline.makespan,
        bubble_rate=timeline.bubble_rate(),
        bubble_time_ratio=timeline.bubble_time_ratio(),
        peak_activations=peak_activations(plan),
        weight_versions=peak_weight_versions(plan) if plan.is_versioned else None,
    )


def peak_activations(plan: Plan) -> tuple[float, ...]:
    """Per rank, the most forward results held at once, in full-stage-microbatch units.

    A chunk's activations count 1/v of a full stage on a rank holding v chunks; they are held from the
    forward until that microbatch's last backward action on the chunk (W when split, else B).
    Forward-only plans hold each activation only while its forward runs.
    """
    peaks = []
    for rank, actions in enumerate(plan.ranks):
        unit = 1.0 / len(plan.stages_of(rank))
        held = peak = 0.0
        for a in actions:
            if a.kind is Kind.F:
                held += unit
                peak = max(peak, held)
                if plan.is_forward_only:
                    held -= unit
            elif (a.kind is Kind.W) or (a.kind is Kind.B and not plan.splits_backward(a.stage, a.microbatch)):
                held -= unit
        peaks.append(round(peak, 9))
    return tuple(peaks)


def peak_weight_versions(plan: Plan) -> tuple[int, ...]:
    """Per rank, the most weight versions held at once (summed over its stages), by UPDATE/RELEASE."""
    from .validate import walk_versions

    return tuple(
        max((sum(len(v) for v in live.values()) for live in walk_versions(plan, rank)), default=1)
        for rank in range(plan.pp)
    )
