# The simulator against the ground truth and closed forms of docs/schedule-facts.md; validation finds planted faults.
import json

import pytest

from pipeloom.schedules import (
    Action,
    Costs,
    Deadlock,
    Kind,
    PlanError,
    add_comm,
    closed_form,
    get_schedule,
    lower,
    plan_from_lists,
    simulate,
    validate,
)

GT = Costs(F=1, B=2, W=0)  # docs/schedule-facts.md ground truth: p=4, m=8, F=1, B=2, no communication
EQUAL = Costs(F=1, B=1, W=1)


def sim(name, costs=GT, pp=4, m=8, **kw):
    return simulate(get_schedule(name, pp=pp, microbatches=m, **kw), costs)


def test_reference_ground_truth_gpipe_and_1f1b():
    gpipe, ofob = sim("gpipe"), sim("1f1b")
    assert gpipe.makespan == ofob.makespan == 33
    assert gpipe.bubble_rate == pytest.approx(3 / 11) and ofob.bubble_rate == pytest.approx(3 / 11)
    assert gpipe.bubble_time_ratio == pytest.approx(0.375) and ofob.bubble_time_ratio == pytest.approx(0.375)
    assert gpipe.peak_activations == (8, 8, 8, 8)
    assert ofob.peak_activations == (4, 3, 2, 1)


def test_reference_ground_truth_interleaved():
    v2, v4 = sim("interleaved-1f1b", vpp=2), sim("interleaved-1f1b", vpp=4)
    assert v2.makespan == pytest.approx(28.5) and v2.bubble_time_ratio == pytest.approx(0.1875)
    assert v4.makespan == pytest.approx(26.25)


def test_reference_ground_truth_zero_bubble():
    assert sim("1f1b", EQUAL).makespan == 33
    assert sim("zb-h1", EQUAL).makespan == 27  # bubble 9 -> 3
    h2 = sim("zb-h2", EQUAL)
    assert h2.bubble_rate == 0 and h2.peak_activations[0] == 2 * 4 - 1
    assert sim("zb-v", EQUAL).bubble_rate == 0
    assert max(sim("zb-h1", EQUAL).peak_activations) == max(sim("1f1b", EQUAL).peak_activations)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 7, 8, 16, 24])
@pytest.mark.parametrize("costs", [GT, Costs(F=1.5, B=2.5, W=0), Costs(F=1, B=1, W=0)])
def test_gpipe_and_1f1b_match_closed_form(p, m, costs):
    for name in ("gpipe", "1f1b"):
        result = sim(name, costs, pp=p, m=m)
        assert result.bubble_time_ratio == pytest.approx((p - 1) / m)
        assert result.bubble_rate == pytest.approx((p - 1) / (m + p - 1))
        assert result.makespan == pytest.approx((m + p - 1) * (costs.F + costs.B))
    assert sim("1f1b", costs, pp=p, m=m).peak_activations == tuple(min(p - s, m) for s in range(p))
    assert sim("gpipe", costs, pp=p, m=m).peak_activations == (m,) * p


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_interleaved_matches_closed_form(p, v, groups):
    m = p * groups
    result = sim("interleaved-1f1b", GT, pp=p, m=m, vpp=v)
    assert result.bubble_time_ratio == pytest.approx((p - 1) / (v * m))
    assert closed_form("interleaved-1f1b", p, m, v, GT)["bubble_time_ratio"] == pytest.approx(result.bubble_time_ratio)
    # Megatron's warm-up: rank r holds (2(p-r-1) + (v-1)p + 1) chunks of 1/v stage at its peak
    expected = [min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) / v for r in range(p)]
    assert list(result.peak_activations) == pytest.approx(expected)


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("m", [2, 5, 8, 16])
@pytest.mark.parametrize("costs", [EQUAL, Costs(F=1, B=2, W=1), Costs(F=2, B=2, W=1), Costs(F=1, B=1, W=0.5)])
def test_zb_h1_bubble_time_closed_form(p, m, costs):
    result = sim("zb-h1", costs, pp=p, m=m)
    if m < p:
        assert closed_form("zb-h1", p, m, costs=costs) is None
        return
    bubble = (p - 1) * (costs.F + costs.B - costs.W)
    assert result.makespan == pytest.approx(m * (costs.F + costs.B + costs.W) + bubble)
    assert closed_form("zb-h1", p, m, costs=costs)["bubble_time_ratio"] == pytest.approx(result.bubble_time_ratio)
    assert max(result.peak_activations) == min(p, m)


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("extra", [0, 1, 5, 9])
def test_zb_h2_and_zb_v_reach_zero_bubble_when_f_b_w_equal(p, extra):
    m = 2 * p - 1 + extra
    h2, zv = sim("zb-h2", EQUAL, pp=p, m=m), sim("zb-v", EQUAL, pp=p, m=m)
    assert h2.bubble_rate == 0 and zv.bubble_rate == 0
    assert h2.peak_activations[0] == 2 * p - 1
    assert max(zv.peak_activations) <= p + 0.5
    assert closed_form("zb-v", p, m, costs=EQUAL)["bubble_rate"] == 0


def test_comm_latency_is_paid_on_every_cross_rank_edge():
    base, slow = sim("1f1b", GT, pp=4, m=1), sim("1f1b", Costs(F=1, B=2, W=0, comm=0.5), pp=4, m=1)
    assert slow.makespan - base.makespan == pytest.approx(2 * 3 * 0.5)  # 3 forward hops + 3 backward hops
    lowered = simulate(add_comm(get_schedule("1f1b", 4, 1)), Costs(F=1, B=2, W=0, comm=0.5))
    assert lowered.makespan == pytest.approx(slow.makespan)
    # zb-v's turn on rank p-1 is local: one hop fewer each way than a linear 2p-stage pipeline would pay
    v0 = sim("zb-v", Costs(F=1, B=1, W=1), pp=2, m=1)
    v1 = sim("zb-v", Costs(F=1, B=1, W=1, comm=1), pp=2, m=1)
    assert v1.makespan - v0.makespan == pytest.approx(2 * 2)


def test_per_rank_cost_lists_and_per_chunk_lists():
    uneven = Costs(F=[1, 1, 2, 1], B=[2, 2, 4, 2])
    result = simulate(get_schedule("1f1b", 4, 8), uneven)
    assert result.timeline.busy(2) == 8 * 6 and result.timeline.busy(0) == 8 * 3
    # the slowest stage sets the pace: ideal = its compute; bubble is measured against it
    assert result.bubble_rate == pytest.approx((result.timeline.span(0) - 48) / result.timeline.span(0))
    plan = get_schedule("interleaved-1f1b", 2, 4, vpp=2)
    per_chunk = simulate(plan, Costs(F=[0.5, 0.5, 0.5, 0.5], B=[1, 1, 1, 1]))
    assert per_chunk.makespan == simulate(plan, Costs(F=1, B=2)).makespan
    with pytest.raises(ValueError, match="Costs.F has 3 values; the plan needs 2"):
        simulate(plan, Costs(F=[1, 1, 1]))
    with pytest.raises(ValueError, match="Costs.B must be >= 0"):
        Costs(B=-1)


def test_pipedream_weight_versions_follow_reference():
    p, m = 4, 12
    stash = validate(get_schedule("pipedream", pp=p, microbatches=m))
    vsync = validate(get_schedule("pipedream", pp=p, microbatches=m, vertical_sync=True))
    for s in range(p):
        for b in range(m):
            assert stash.weight_version(s, b) == max(0, b - (p - 1 - s))
            assert vsync.weight_version(s, b) == max(0, b - p + 1)
    assert simulate(stash).weight_versions == tuple(p - s for s in range(p))
    assert max(simulate(vsync).weight_versions) <= p + 1


@pytest.mark.parametrize("k", [4, 5, 8])
def test_2bw_versions_and_double_buffering(k):
    p, m = 4, 4 * k
    plan = validate(get_schedule("pipedream-2bw", pp=p, microbatches=m, update_every=k))
    for s in range(p):
        for b in range(m):
            # arXiv 2006.09503 §3.1: max(floor((k-1)/m) - 1, 0) for 1-based k, m microbatches per version
            assert plan.weight_version(s, b) == max(b // k - 1, 0)
    assert simulate(plan).weight_versions == (2,) * p
    updates = [a for a in plan.ranks[0] if a.kind is Kind.UPDATE]
    assert [u.version for u in updates] == list(range(1, m // k + 1))


def test_2bw_reference_example():
    plan = get_schedule("pipedream-2bw", pp=4, microbatches=16, update_every=4)
    versions = [plan.weight_version(0, k - 1) for k in range(1, 17)]  # 1-based microbatches as in the 2BW paper
    assert versions == [0] * 8 + [1] * 4 + [2] * 4


def test_planted_bad_plans_are_rejected_with_the_cell_marked():
    plan = plan_from_lists([["0F0", "0B0", "0F1", "0B1"], ["1F0", "1B1", "1F1", "1B0"]])
    with pytest.raises(PlanError, match=r"1B1 runs before 1F1 on the same stage \(rank 1, step 1\)") as err:
        validate(plan)
    assert "[1B1]" in str(err.value)
    missing = plan_from_lists([["0F0", "0B0", "0F1"], ["1F0", "1B0", "1F1", "1B1"]], microbatches=2)
    with pytest.raises(PlanError, match=r"0B1 missing"):
        validate(missing)
    wrong_rank = plan_from_lists([["0F0", "1F0", "0B0"], ["1B0"]], microbatches=1)
    with pytest.raises(PlanError, match="1F0 is on rank 0, but stage 1 lives on rank 1"):
        validate(wrong_rank)
    twice = plan_from_lists([["0F0", "0F0", "0B0"], ["1F0", "1B0"]], microbatches=1)
    with pytest.raises(PlanError, match="0F0 appears twice"):
        validate(twice)


def test_planted_deadlock_is_found_and_explained():
    # rank 0 waits for 1B0 before it runs 0F1; rank 1 insists on 1F1 (needing 0F1) before 1B0: a cycle
    plan = plan_from_lists([["0F0", "0B0", "0F1", "0B1"], ["1F1", "1F0", "1B0", "1B1"]])
    with pytest.raises(Deadlock) as err:
        validate(plan)
    text = str(err.value)
    assert "rank 0 step 1: 0B0 waits for 1B0 (rank 1 step 2)" in text
    assert "rank 1 step 0: 1F1 waits for 0F1 (rank 0 step 2)" in text
    assert "[0B0]" in text
    assert set(err.value.blocked) == {0, 1}


def test_lowered_plan_faults_are_found():
    good = lower(get_schedule("1f1b", 2, 2))
    validate(good)
    no_send = good.replace(ranks=[[a for a in good.ranks[0] if str(a) != "0SEND_F1"], good.ranks[1]])
    with pytest.raises(PlanError, match="the transfer 0SEND_F1 is missing"):
        validate(no_send)
    # a receive moved after its consumer
    r1 = list(good.ranks[1])
    i, j = r1.index(Action.parse("1RECV_F1")), r1.index(Action.parse("1F1"))
    r1[i], r1[j] = r1[j], r1[i]
    with pytest.raises(PlanError, match="1RECV_F1 receives after its consumer 1F1"):
        validate(good.replace(ranks=[good.ranks[0], r1]))


def test_version_faults_are_found():
    plan = get_schedule("pipedream", pp=2, microbatches=4)
    ranks = [list(r) for r in plan.ranks]
    i = next(i for i, a in enumerate(ranks[0]) if a.kind is Kind.B and a.microbatch == 2)
    ranks[0][i] = ranks[0][i].with_version(0)  # its forward used version 1
    with pytest.raises(PlanError, match="0B2@0 uses version 0 but 0F2@1 used 1"):
        validate(plan.replace(ranks=ranks))
    ranks = [[a for a in r if a.kind is not Kind.RELEASE] for r in plan.ranks]
    with pytest.raises(PlanError, match="not held by stage 0"):  # a stashed version dropped too early
        validate(plan.replace(ranks=ranks))
    vs = get_schedule("pipedream", pp=2, microbatches=4, vertical_sync=True)
    ranks = [list(r) for r in vs.ranks]
    ranks[1] = [a.with_version(1) if a.kind.is_compute and a.microbatch == 3 else a for a in ranks[1]]
    with pytest.raises(PlanError, match="every stage uses one version per microbatch"):
        validate(vs.replace(ranks=ranks))


def test_pictures_ascii_and_chrome_trace(tmp_path):
    result = sim("zb-h1", EQUAL, pp=4, m=8)
    png = result.render(str(tmp_path / "zb.png"))
    svg = result.render(str(tmp_path / "zb.svg"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in open(svg, "rb").read(400)
    art = result.ascii(width=60)
    rows = art.splitlines()
    assert len(rows) == 4 and rows[0].startswith("rank 0") and "F0" in rows[0] and "W" in rows[3]
    assert rows[3].split("|")[1].startswith("...")  # rank 3 waits three forwards before its first
    trace = result.chrome_trace(str(tmp_path / "trace.json"))
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == 4 * 8 * 3
    assert json.load(open(tmp_path / "trace.json"))["traceEvents"][0]["ph"] == "M"
    assert {e["tid"] for e in events} == {0, 1, 2, 3}
