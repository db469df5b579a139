# Pipelined inference as forward-only plans with decode lanes: closed forms, serialisation, one bubble metric for
# the serving simulator and the plan simulator, and the predicted prefill-first / chunked-prefill bubble ratio.
import math

import pytest

from pipeloom.schedules import Plan, validate
from pipeloom.schedules.batching import PipelineCost, get_cost_model, make_trace, simulate_serving
from pipeloom.schedules.inference import (
    inference_plan,
    pipeline_bubble,
    plan_lanes,
    simulate_inference,
    timeline_of_serving,
)


def test_lanes_become_edges_from_the_last_stage_to_the_first():
    plan = inference_plan(3, [0, 1, 0, 2, 1])
    assert plan.is_forward_only and plan.grid().splitlines()[1].split()[2:] == ["0F0", "0F1", "0F2", "0F3", "0F4"]
    assert dict(plan.info["lane_after"]) == {2: 0, 4: 1}
    assert plan_lanes(plan) == (0, 1, 0, 2, 1)
    validate(plan)
    with pytest.raises(ValueError, match="lanes"):
        inference_plan(2, [0, -1])


@pytest.mark.parametrize("p,m", [(2, 5), (4, 8)])
def test_one_lane_runs_one_microbatch_at_a_time(p, m):
    """A single lane: microbatch k+1 enters after k left the last stage: makespan m*p, bubble rate from the span."""
    sim = simulate_inference(inference_plan(p, [0] * m), 1.0)
    assert sim.makespan == m * p
    span = (m - 1) * p + 1  # rank 0: first start 0, last end (m-1)p + 1
    assert sim.bubble_rate == pytest.approx((span - m) / span)


@pytest.mark.parametrize("p,m", [(2, 6), (4, 12)])
def test_p_lanes_fill_p_stages(p, m):
    """p lanes round robin, uniform stages: the lane edge is never the bottleneck - fill, drain, no inner bubble;
    with a communication latency c on every cross-rank edge, the lanes wait for it: each lane's cycle is p + p c."""
    sim = simulate_inference(inference_plan(p, [k % p for k in range(m)]), 1.0)
    assert sim.makespan == m + p - 1 and sim.bubble_rate == 0.0
    c = 0.25  # microbatch k enters stage 0 at (k // p)(p + p c) + k % p; the last one then crosses p - 1 hops
    slow = simulate_inference(inference_plan(p, [k % p for k in range(m)]), 1.0, comm=c)
    last_start = (m // p - 1) * (p + p * c) + p - 1
    assert slow.makespan == pytest.approx(last_start + (p - 1) * (1 + c) + 1)


def test_the_recurrence_is_the_general_simulator():
    """simulate_inference's O(stages x microbatches) recurrence gives execute()'s timeline, interval for interval."""
    import random

    rng = random.Random(0)
    lanes = [rng.randrange(3) for _ in range(30)]
    durations = {(s, k): rng.uniform(0.1, 3.0) for s in range(4) for k in range(30)}
    plan = inference_plan(4, lanes)
    fast, general = (simulate_inference(plan, durations, comm=0.2, general=g) for g in (False, True))
    key = lambda iv: (iv.rank, iv.action.microbatch)  # noqa: E731
    for a, b in zip(sorted(fast.timeline.intervals, key=key), sorted(general.timeline.intervals, key=key)):
        assert a.action == b.action and a.start == pytest.approx(b.start) and a.end == pytest.approx(b.end)


def test_plans_survive_json_and_keep_their_lane_edges():
    plan = inference_plan(2, [0, 1, 1, 0])
    again = Plan.from_json(plan.to_json())
    durations = {(s, k): 1.0 + k for s in range(2) for k in range(4)}
    assert simulate_inference(again, durations).makespan == simulate_inference(plan, durations).makespan


@pytest.mark.parametrize("policy,options", [("prefill-first", {}), ("chunked-prefill", {"token_budget": 512})])
def test_serving_simulator_and_plan_share_one_bubble_metric(policy, options):
    trace = make_trace("mixed", 40, rate=math.inf)
    result = simulate_serving(policy, trace, cost=PipelineCost.uniform(get_cost_model("llama2-7b-a100"), 3),
                              options=options)
    timeline, lanes = timeline_of_serving(result)
    assert pipeline_bubble(timeline, lanes) == pytest.approx(result.pipeline_bubble, abs=1e-12)
    # the simulated run, replayed as a plan with its own stage times, is the same schedule
    plan = inference_plan(3, list(lanes))
    durations = {(iv.action.stage, iv.action.microbatch): iv.duration for iv in timeline.compute()}
    replay = simulate_inference(plan, durations)
    assert replay.makespan == pytest.approx(timeline.makespan, rel=1e-9)


def test_chunked_prefill_shrinks_the_predicted_pipeline_bubble():
    """Offline mixed long/short trace, 4 stages with 4 microbatches in flight: uniform 256-token chunks leave a
    fraction of prefill-first's bubble (Sarathi, arXiv 2308.16369, reports up to 6.29x fewer bubbles)."""
    trace = make_trace("mixed", 150, rate=math.inf)
    cost = PipelineCost.uniform(get_cost_model("llama2-7b-a100"), 4)
    bubbles = {policy: simulate_serving(policy, trace, cost=cost, options=opts, kv_blocks=16384).pipeline_bubble
               for policy, opts in (("prefill-first", {}), ("chunked-prefill", {"token_budget": 256}))}
    assert bubbles["prefill-first"] / bubbles["chunked-prefill"] > 2.0, bubbles
