# Pipelined inference as plans: forward-only plans with decode lanes, their simulation, and the bubble metrics.
"""A pipeline-parallel inference engine keeps up to ``p`` microbatches in flight (Sarathi-Serve, arXiv 2403.02310
§4.3; vLLM's virtual engines): microbatch ``k`` is one iteration of *lane* (virtual engine) ``lanes[k]``, every
stage runs the microbatches in the order the driver dispatched them, and a lane's next iteration can only enter
the first stage once its previous one has left the last stage (its sampled tokens are the next decode inputs).

That is a forward-only plan (``get_schedule("forward-only", pp, M)``: rank s runs ``sF0, sF1, ...``) plus one
edge per microbatch, kept in the plan's meta as ``lane_after`` (``{k: j}``: k's first stage waits for j's last
stage), which :func:`pipeloom.schedules.simulate.dependencies` honours. So the simulator predicts an inference run
exactly as it predicts a training step: feed it the measured duration of every (stage, microbatch) and a
communication latency, and compare the predicted timeline with the measured one (:func:`inference_report`).

Two bubble metrics, computed the same way on measured, plan-simulated and serving-simulated timelines:

* ``bubble_rate``: Zero Bubble's r (arXiv 2401.10241 §5.3), as for training (:class:`Timeline`);
* :func:`pipeline_bubble`: the serving simulator's (:attr:`ServingResult.pipeline_bubble`): the idle share of
  all stages' time from the first forward until the first lane has no more work.

:func:`timeline_of_serving` turns a simulated serving run (:func:`simulate_serving` with a ``PipelineCost``)
into such a timeline and its lanes, so the serving simulator's prediction and a measured engine run are
compared on one definition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .builtin import ForwardOnly
from .ir import Action, Kind, Plan
from .simulate import Costs, SimResult, execute, lane_after, peak_activations
from .timeline import Interval, Timeline

PLAN_NAME = "pipelined-inference"


def inference_plan(pp: int, lanes: Sequence[int], name: str = PLAN_NAME) -> Plan:
    """The forward-only plan of ``len(lanes)`` microbatches dispatched in order; ``lanes[k]`` is the lane (virtual
    engine) of microbatch k, whose first stage waits for the lane's previous microbatch's last stage."""
    if not lanes:
        raise ValueError("inference_plan needs at least one microbatch (lanes=[])")
    if any(not isinstance(v, int) or v < 0 for v in lanes):
        raise ValueError(f"lanes={list(lanes)[:8]}...: every lane must be an integer >= 0")
    previous: dict[int, int] = {}
    after = []
    for k, lane in enumerate(lanes):
        if lane in previous:
            after.append((k, previous[lane]))
        previous[lane] = k
    plan = ForwardOnly(pp, len(lanes)).plan()
    return plan.replace(name=name, meta={"lane_after": tuple(after), "lanes": tuple(lanes)})


def plan_lanes(plan: Plan) -> tuple[int, ...]:
    """The lane of every microbatch of an :func:`inference_plan` (all 0 for a plain forward-only plan)."""
    lanes = plan.info.get("lanes")
    return tuple(int(v) for v in lanes) if lanes is not None else (0,) * plan.microbatches


def simulate_inference(plan: Plan, durations: Mapping[tuple[int, int], float] | float, comm: float = 0.0,
                       general: bool = False) -> SimResult:
    """Simulate ``plan`` with each (stage, microbatch) forward lasting ``durations[(stage, mb)]`` (or one number for
    all) and ``comm`` seconds on every cross-rank edge, the lane edges included.

    An :func:`inference_plan` (one stage per rank, microbatches in order) is simulated by its recurrence,
    ``start(s, k) = max(end(s, k-1), end(s-1, k) + comm, [s = 0] end(last, after(k)) + comm)``, in O(stages x
    microbatches); ``general=True`` (or any other plan) runs :func:`~pipeloom.schedules.simulate.execute`, which
    gives the same timeline (a test checks it)."""
    if isinstance(durations, (int, float)):
        def duration(a: Action) -> float:
            return float(durations) if a.kind is Kind.F else 0.0
    else:
        def duration(a: Action) -> float:
            return float(durations.get((a.stage, a.microbatch), 0.0)) if a.kind is Kind.F else 0.0
    linear = plan.stage_to_rank == tuple(range(plan.pp)) and all(
        [a for a in actions] == [Action(s, Kind.F, k) for k in range(plan.microbatches)]
        for s, actions in enumerate(plan.ranks))
    timeline = _recurrence(plan, duration, comm) if linear and not general else execute(plan, duration, comm=comm)
    peaks = (1.0,) * plan.pp if linear else peak_activations(plan)
    return SimResult(plan=plan, costs=Costs(F=0.0, B=0.0, comm=comm), timeline=timeline, makespan=timeline.makespan,
                     bubble_rate=timeline.bubble_rate(), bubble_time_ratio=timeline.bubble_time_ratio(),
                     peak_activations=peaks, weight_versions=None)


def _recurrence(plan: Plan, duration, comm: float) -> Timeline:
    after, last = lane_after(plan), plan.pp - 1
    end = [[0.0] * plan.microbatches for _ in range(plan.pp)]
    intervals = []
    for k in range(plan.microbatches):
        for s in range(plan.pp):
            ready = end[s][k - 1] if k else 0.0
            if s:
                ready = max(ready, end[s - 1][k] + comm)
            elif k in after:
                ready = max(ready, end[last][after[k]] + (comm if last else 0.0))
            a = Action(s, Kind.F, k)
            end[s][k] = ready + duration(a)
            intervals.append(Interval(s, a, ready, end[s][k]))
    return Timeline(tuple(intervals), pp=plan.pp)


def forward_durations(timeline: Timeline) -> dict[tuple[int, int], float]:
    """``{(stage, microbatch): seconds}`` of every forward in ``timeline``."""
    return {(iv.action.stage, iv.action.microbatch): iv.duration for iv in timeline.compute()
            if iv.action.kind is Kind.F}


def pipeline_bubble(timeline: Timeline, lanes: Sequence[int]) -> float:
    """The serving simulator's pipeline bubble on ``timeline``: 1 - busy / (stages x window), the window running from
    the first forward's start to the end of the earliest lane's last microbatch on the last stage (while every lane
    still had work). 0 for one stage."""
    compute = [iv for iv in timeline.compute() if iv.action.kind is Kind.F]
    if not compute or timeline.pp < 2:
        return 0.0
    last_stage = max(iv.action.stage for iv in compute)
    t0 = min(iv.start for iv in compute)
    lane_end: dict[int, float] = {}
    for iv in compute:
        if iv.action.stage == last_stage:
            lane = lanes[iv.action.microbatch]
            lane_end[lane] = max(lane_end.get(lane, iv.end), iv.end)
    t1 = min(lane_end.values())
    if t1 <= t0:
        return 0.0
    busy = sum(max(0.0, min(iv.end, t1) - max(iv.start, t0)) for iv in compute)
    return 1.0 - busy / (timeline.pp * (t1 - t0))


def timeline_of_serving(result) -> tuple[Timeline, tuple[int, ...]]:
    """(timeline, lanes) of a simulated pipelined serving run (``simulate_serving`` with a ``PipelineCost``): stage j's
    i-th busy interval is the forward of the i-th iteration, numbered in dispatch order."""
    lanes = tuple(it.engine for it in result.iterations)  # in the order the simulator started them
    intervals = []
    for stage, busy in enumerate(result.stage_busy):
        for k, (start, end) in enumerate(busy):
            intervals.append(Interval(stage, Action(stage, Kind.F, k), start, end))
    return Timeline(tuple(intervals), pp=len(result.stage_busy), unit="s"), lanes


def inference_report(plan: Plan, timeline: Timeline, comm: float = 0.0) -> dict:
    """Measured against predicted: ``timeline`` (a measured run of ``plan``) next to the plan simulated with the
    measured forward durations and ``comm``. Both bubble metrics, both makespans, and the predicted timeline."""
    sim = simulate_inference(plan, forward_durations(timeline), comm)
    lanes = plan_lanes(plan)
    return {"measured_bubble_rate": timeline.bubble_rate(), "predicted_bubble_rate": sim.bubble_rate,
            "measured_pipeline_bubble": pipeline_bubble(timeline, lanes),
            "predicted_pipeline_bubble": pipeline_bubble(sim.timeline, lanes),
            "measured_makespan": timeline.makespan, "predicted_makespan": sim.makespan, "comm": comm,
            "microbatches": plan.microbatches, "predicted": sim}


__all__ = ["PLAN_NAME", "forward_durations", "inference_plan", "inference_report", "lane_after", "pipeline_bubble",
           "plan_lanes", "simulate_inference", "timeline_of_serving"]
