# Property tests: every policy keeps the batching invariants over random arrival streams and KV capacities.
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeloom.schedules.batching import Trace, TraceItem, blocks_for, simulate_serving

POLICIES = ["static", "dynamic", "continuous", "prefill-first", "chunked-prefill", "splitfuse"]


@st.composite
def serving_case(draw):
    n = draw(st.integers(1, 14))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.5, 7.0]), min_size=n, max_size=n))
    lengths = draw(st.lists(st.tuples(st.integers(1, 48), st.integers(1, 12), st.integers(0, 2)), min_size=n,
                            max_size=n))
    t, items = 0.0, []
    for gap, (p, o, prio) in zip(gaps, lengths):
        t += gap
        items.append(TraceItem(t, p, o, prio))
    block_size = draw(st.sampled_from([1, 4, 16]))
    need = max(blocks_for(it.prompt_len + it.output_len - 1, block_size) for it in items)
    kv_blocks = need + draw(st.integers(0, 3 * need))  # from "one request at a time" to roomy
    policy = draw(st.sampled_from(POLICIES))
    seats = draw(st.integers(1, 6))
    opts = {"max_num_seqs": seats, "preemption": draw(st.sampled_from(["last-arrived", "fewest-computed"])),
            "order": draw(st.sampled_from(["fcfs", "priority"]))}
    if policy in ("chunked-prefill", "splitfuse"):
        opts["token_budget"] = draw(st.integers(seats, 40))
    elif policy == "static":
        opts["batch_size"] = draw(st.integers(1, seats))
    elif policy == "dynamic":
        opts["max_batch_size"] = size = draw(st.integers(1, seats))
        opts["preferred_batch_sizes"] = tuple(draw(st.sets(st.integers(1, size), max_size=2)))
        opts["max_queue_delay"] = draw(st.sampled_from([0.0, 0.3, 2.0]))
    prefix = draw(st.sampled_from([None, "half"]))
    return Trace(tuple(items), "random"), policy, opts, kv_blocks, block_size, prefix


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(serving_case())
def test_every_policy_keeps_the_invariants_and_finishes_every_request(case):
    trace, policy, opts, kv_blocks, block_size, prefix = case
    hit = (lambda r: r.prompt_len // 2) if prefix == "half" and policy not in ("static", "dynamic") else None
    # audit=True checks, every iteration: seat and token limits, free blocks >= 0, each request's tokens
    # contiguous from its admission (0 or its prefix hit) and none twice, preempted ones restarting from
    # scratch, admissions from the queue's head in order (arrival, or priority then arrival), and (for all
    # but prefill-first) no decode left out
    res = simulate_serving(policy, trace, cost="unit", kv_blocks=kv_blocks, block_size=block_size, prefix=hit,
                           options=opts, audit=True, max_iterations=20_000)
    for log, item in zip(res.requests, trace.items):
        assert log.done and len(log.token_times) == item.output_len  # nobody starves, every token comes out
        assert log.token_times == sorted(set(log.token_times))  # at most one token per request per iteration
        assert log.first_scheduled >= log.arrival
    if not any(i.num_preempted for i in res.iterations) and hit is None:
        # without preemption or prefix hits every token is computed exactly once
        computed = sum(i.num_prefill_tokens + i.num_decode_tokens for i in res.iterations)
        assert computed == sum(it.prompt_len + it.output_len - 1 for it in trace.items)
