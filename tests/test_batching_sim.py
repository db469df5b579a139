# The serving simulator: closed forms, the pipeline cycle, cost-model fits, traces, metrics, capacity, pictures.
import json
import math
import random

import numpy as np
import pytest

from pipeloom.schedules.batching import (
    SLO,
    CostModel,
    IterationRecord,
    PipelineCost,
    ServingMetrics,
    Trace,
    TraceItem,
    arrival_times,
    find_capacity,
    fit_cost_model,
    fit_error,
    get_cost_model,
    make_trace,
    percentile,
    pipeline_cycle,
    plot_composition,
    plot_latency_cdfs,
    simulate_serving,
)


def test_static_batching_of_equal_requests_matches_the_closed_form():
    # N=6 requests of P=100 prompt and L=5 output tokens, batches of B=3, all at t=0. A batch is one prefill
    # (a + b*B*P) and L-1 decodes (a + c*B); batches run back to back.
    a, b, c = 0.01, 1e-4, 1e-3
    cost = CostModel(a, b, c, 0.0)
    res = simulate_serving("static", make_trace("fixed", 6, rate=math.inf, prompt_len=100, output_len=5),
                           cost=cost, options={"batch_size": 3})
    t_prefill, t_decode = a + b * 3 * 100, a + c * 3
    batch = t_prefill + 4 * t_decode
    m = res.metrics()
    assert res.duration == pytest.approx(2 * batch)
    assert sorted(r.ttft for r in res.requests) == pytest.approx([t_prefill] * 3 + [batch + t_prefill] * 3)
    assert m.tpot.p50 == pytest.approx(t_decode) and m.itl.max == pytest.approx(t_decode)
    assert m.output_throughput == pytest.approx(30 / (2 * batch))
    assert m.e2e.max == pytest.approx(2 * batch)


@pytest.mark.parametrize(
    "weights, p, cycle",
    [
        ((1, 1, 1, 1), 4, 1.0),  # uniform stages: the cycle is one full pass, no bubble
        ((1, 2, 1, 1), 4, 1.6),  # slowest stage 0.4 serves 4 microbatches: p * max
        ((1, 2, 1, 1), 2, 1.0),  # 2 in flight cannot fill it: sum of the stages
        ((1, 2, 1, 1), 3, 1.2),
        ((3, 1), 1, 1.0),  # one microbatch: no overlap at all
    ],
)
def test_the_simulated_pipeline_reproduces_the_cycle_formula(weights, p, cycle):
    # every iteration costs 1 s in all, split over the stages by weight; p engines keep p microbatches in flight
    pipe = PipelineCost(CostModel(1.0, 0.0, 0.0, 0.0), tuple(float(w) for w in weights), microbatches=p)
    stages = [w / sum(weights) for w in weights]
    assert pipeline_cycle(stages, p) == pytest.approx(cycle)
    res = simulate_serving("continuous", make_trace("fixed", 4 * p, rate=math.inf, prompt_len=4, output_len=40),
                           cost=pipe, kv_blocks=4096)
    ends = [i.end for i in res.iterations if i.engine == 0]
    gaps = [b - a for a, b in zip(ends[5:], ends[6:30])]  # steady state: one iteration per engine per cycle
    assert gaps == pytest.approx([cycle] * len(gaps))
    expected_bubble = 1 - sum(stages) * p / (len(stages) * cycle)
    assert res.pipeline_bubble == pytest.approx(expected_bubble, abs=0.02)


def test_chunked_prefill_gives_a_lower_p99_tbt_than_prefill_first_at_equal_throughput():
    # Sarathi-Serve's result: on long and short requests a whole long prefill stalls every running decode
    # under prefill-first, while chunks of 512 tokens bound the gap between tokens.
    trace = make_trace("mixed", 150, rate=8.0, seed=1)
    first = simulate_serving("prefill-first", trace).metrics()
    chunked = simulate_serving("chunked-prefill", trace, options={"token_budget": 512}).metrics()
    assert chunked.output_throughput == pytest.approx(first.output_throughput, rel=0.01)
    assert chunked.itl.p99 < 0.5 * first.itl.p99
    assert chunked.itl.max < 0.1 and first.itl.max > 0.3  # the stall is a whole long prefill


def test_the_simulator_predicts_a_smaller_pipeline_bubble_for_chunked_prefill():
    trace = make_trace("mixed", 200, rate=math.inf, seed=0)
    pipe = PipelineCost.uniform(get_cost_model("llama2-7b-a100"), 4)
    first = simulate_serving("prefill-first", trace, cost=pipe)
    chunked = simulate_serving("chunked-prefill", trace, cost=pipe)
    assert chunked.pipeline_bubble < 0.75 * first.pipeline_bubble
    assert simulate_serving("prefill-first", trace).pipeline_bubble == 0.0  # one stage has no bubble


def test_fit_cost_model_recovers_the_coefficients_from_measured_iterations():
    truth = CostModel(0.008, 9e-5, 3e-5, 2.5e-7)
    res = simulate_serving("chunked-prefill", make_trace("mixed", 60, rate=6.0, seed=3), cost=truth)
    records = [i.record() for i in res.iterations]
    fitted = fit_cost_model(records)
    for key in "abcd":
        assert getattr(fitted, key) == pytest.approx(getattr(truth, key), rel=1e-6)
    rng = random.Random(0)  # 3% multiplicative noise: still close, and the predictions within a few percent
    noisy = [IterationRecord(r.num_prefill_tokens, r.num_decode_seqs, r.kv_tokens_read, r.padded_tokens,
                             r.duration * (1 + rng.uniform(-0.03, 0.03))) for r in records]
    fitted = fit_cost_model(noisy)
    assert fitted.a == pytest.approx(truth.a, rel=0.1) and fitted.b == pytest.approx(truth.b, rel=0.05)
    assert fit_error(fitted, records) < 0.03
    # nothing varies the KV reads independently: that coefficient cannot be identified and is left at 0
    flat = [IterationRecord(p, 0, 0, 0, 0.01 + 1e-4 * p) for p in (10, 50, 200, 400)]
    only = fit_cost_model(flat)
    assert (only.a, only.b, only.c, only.d) == pytest.approx((0.01, 1e-4, 0.0, 0.0))
    with pytest.raises(ValueError, match="at least 2 measured iterations"):
        fit_cost_model(flat[:1])


def test_cost_model_charges_padding_as_prefill_or_decode():
    m = CostModel(1.0, 0.1, 0.01, 0.001)
    assert m.time(10, 0, 0, padded=5) == pytest.approx(1 + 0.1 * 15)
    assert m.time(0, 3, 100, padded=2) == pytest.approx(1 + 0.01 * 5 + 0.1)
    with pytest.raises(ValueError, match="unknown cost model 'x'; valid choices: unit, llama2-7b-a100"):
        get_cost_model("x")


def test_traces_arrivals_rates_and_jsonl_replay(tmp_path):
    gaps = np.diff(arrival_times(4000, rate=5.0, seed=1))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05) and gaps.std() / gaps.mean() == pytest.approx(1, rel=0.1)
    bursty = np.diff(arrival_times(4000, rate=5.0, process="gamma", burstiness=0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.2, rel=0.1) and bursty.std() / bursty.mean() == pytest.approx(2, rel=0.15)
    t1, t2 = make_trace("mixed", 50, rate=2.0, seed=7), make_trace("mixed", 50, rate=4.0, seed=7)
    assert [it.arrival / 2 for it in t1.items] == pytest.approx([it.arrival for it in t2.items])  # time-scaled
    assert [it.prompt_len for it in t1.items] == [it.prompt_len for it in t2.items]
    assert [it.arrival for it in t1.at_rate(4.0).items] == pytest.approx([it.arrival for it in t2.at_rate(4.0).items])
    assert t1.at_rate(4.0).rate == pytest.approx(4.0)
    long = [it for it in make_trace("mixed", 1000, seed=0).items if it.prompt_len >= 1024]
    assert 150 < len(long) < 250  # long_fraction 0.2
    path = t1.to_jsonl(str(tmp_path / "t.jsonl"))
    assert Trace.from_jsonl(path).items == t1.items
    assert make_trace(path, rate=4.0).items == t1.at_rate(4.0).items
    (tmp_path / "bad.jsonl").write_text(json.dumps({"arrival": 0, "prompt_len": 3, "output_len": 1}) + "\n{\"t\": 1}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        Trace.from_jsonl(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="unknown trace 'zz'; valid choices: uniform, mixed, fixed"):
        make_trace("zz")
    with pytest.raises(ValueError, match="rate must be a positive number"):
        make_trace("mixed", rate=0)


def test_metrics_follow_vllm_bench_serve_definitions():
    # two requests with hand-set token times: TTFT, TPOT = (E2E - TTFT)/(n - 1), ITL pooled over requests
    trace = Trace((TraceItem(0.0, 4, 3), TraceItem(0.5, 4, 1)), "hand")
    res = simulate_serving("continuous", trace, cost="unit")
    a, b = res.requests
    assert a.token_times == [1.0, 2.0, 3.0] and b.token_times == [2.0]  # b joins a's second iteration
    m = res.metrics(SLO(ttft=1.2))
    assert (a.ttft, a.tpot, a.e2e, b.ttft, b.tpot, b.e2e) == (1.0, 1.0, 3.0, 1.5, None, 1.5)
    assert m.ttft.p50 == 1.25 and m.tpot.mean == 1.0 and m.itl.mean == 1.0 and m.e2e.max == 3.0
    assert m.duration == 3.0 and m.request_throughput == pytest.approx(2 / 3)
    assert m.output_throughput == pytest.approx(4 / 3) and m.goodput == pytest.approx(1 / 3)  # b's TTFT > 1.2
    assert m.scheduling_delay.max == 0.5  # b waited for the running iteration to end
    values = [random.Random(4).random() for _ in range(97)]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_capacity_is_the_highest_rate_meeting_the_slo():
    def fake(rate):  # P99 TBT grows with the rate and crosses 0.2 s at 7.3 req/s
        d = ServingMetrics.__dataclass_fields__
        base = {k: 0.0 for k in d if k not in ("ttft", "tpot", "itl", "e2e", "scheduling_delay")}
        from pipeloom.schedules.batching import Dist

        dist = lambda x: Dist(x, x, x, x, x)
        return ServingMetrics(**base, ttft=dist(0.1), tpot=dist(0.01), itl=dist(0.2 * rate / 7.3), e2e=dist(1.0),
                              scheduling_delay=dist(0.0))

    cap = find_capacity(fake, SLO(tbt=0.2))
    assert cap.rate == pytest.approx(7.3, rel=0.02) and cap.rate <= 7.3
    # a real search: chunked-prefill sustains more load than prefill-first under a strict 100 ms TBT SLO
    trace = make_trace("mixed", 100, rate=1.0, seed=1)
    caps = {}
    for policy in ("prefill-first", "chunked-prefill"):
        evaluate = lambda r, policy=policy: simulate_serving(policy, trace.at_rate(r)).metrics()
        caps[policy] = find_capacity(evaluate, SLO(tbt=0.1, delay=2.0), start=4.0, rel_tol=0.05)
    assert caps["chunked-prefill"].rate > 1.5 * caps["prefill-first"].rate
    assert caps["chunked-prefill"].metrics.itl.p99 <= 0.1


def test_pictures_are_written(tmp_path):
    trace = make_trace("mixed", 30, rate=4.0, seed=2)
    runs = {p: simulate_serving(p, trace) for p in ("prefill-first", "chunked-prefill")}
    png = plot_composition(runs["chunked-prefill"], str(tmp_path / "c.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"
    cdf = plot_latency_cdfs(runs, str(tmp_path / "cdf.svg"))
    assert "<svg" in open(cdf).read(400)
