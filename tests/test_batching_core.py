# The batching core: request/iteration data, BlockCounter, the registry, and the Scheduler's queues and limits.
import pytest

from pipeloom.schedules.batching import (
    BatchingError,
    BatchingPolicy,
    BlockCounter,
    Iteration,
    KVCapacity,
    Rejected,
    Request,
    RequestStatus,
    Scheduler,
    get_batching,
    list_batching,
    register_batching,
)


def run_all(sched, limit=1000):
    """Drive ``sched`` to completion (all requests already added); return the iterations as strings."""
    out = []
    t = 0.0
    while sched.has_unfinished():
        it = sched.schedule(t)
        assert not it.is_empty, f"stuck at {t} with waiting={sched.waiting} running={sched.running}"
        out.append(str(it))
        sched.update(it)
        t += 1.0
        assert len(out) < limit
    return out


def test_request_counters_and_validation():
    r = Request("a", prompt_len=5, max_tokens=3)
    assert (r.num_tokens, r.num_uncomputed, r.is_prefilling) == (5, 5, True)
    r.num_computed, r.num_generated = 5, 1
    assert (r.num_tokens, r.num_uncomputed, r.is_prefilling) == (6, 1, False)
    with pytest.raises(ValueError, match="prompt_len must be an integer >= 1, got 0"):
        Request("b", prompt_len=0, max_tokens=1)
    assert Request("c", 1, 1) != Request("c", 1, 1)  # identity semantics


def test_block_counter_all_or_nothing_and_prefix_attachment():
    kv = BlockCounter(4, block_size=4)
    assert isinstance(kv, KVCapacity)
    a, b = Request("a", 10, 2), Request("b", 9, 2)
    assert kv.allocate(a, 10) and kv.num_free_blocks() == 1
    assert not kv.allocate(b, 9) and kv.num_free_blocks() == 1  # nothing taken on failure
    a.num_computed = 10
    assert kv.allocate(a, 1) and kv.num_free_blocks() == 1  # token 10 fits the third block
    kv.free(a)
    assert kv.num_free_blocks() == 4
    shared = BlockCounter(2, block_size=4, prefix=lambda r: 9)
    c = Request("c", 10, 2)
    assert shared.cached_prefix(c) == 8  # whole blocks, fewer than the request's tokens
    c.num_computed = 8
    assert shared.allocate(c, 2) and shared.num_free_blocks() == 1  # cached blocks cost nothing
    shared.free(c)
    assert shared.num_free_blocks() == 2


def test_registry_names_options_and_errors():
    assert list_batching()[:6] == ["static", "dynamic", "continuous", "prefill-first", "chunked-prefill", "splitfuse"]
    assert get_batching("sarathi").name == "chunked-prefill"
    assert repr(get_batching("chunked-prefill", token_budget=1024)) == "chunked-prefill(token_budget=1024)"
    with pytest.raises(BatchingError, match="unknown batching policy 'zz'; valid choices: static, dynamic"):
        get_batching("zz")
    with pytest.raises(BatchingError, match=r"unknown option\(s\) \['budget'\]"):
        get_batching("continuous", budget=3)
    with pytest.raises(BatchingError, match="order must be one of"):
        get_batching("continuous", order="lifo")
    with pytest.raises(BatchingError, match="token_budget=64 is below max_num_seqs=256"):
        get_batching("chunked-prefill", token_budget=64)
    with pytest.raises(BatchingError, match="preferred_batch_sizes"):
        get_batching("dynamic", max_batch_size=4, preferred_batch_sizes=(2, 8))


def test_user_policies_register_by_subclass_and_by_function():
    class Newest(BatchingPolicy):
        name = "test-newest-first"

        def schedule(self, step):
            for r in reversed(step.waiting):
                step.admit(r)
                return

    @register_batching("test-one-chunk")
    def one_chunk(step, size=2):
        for r in step.running:
            step.schedule(r, min(size, r.num_uncomputed))
        if not step.running and step.waiting:
            step.admit(step.waiting[0], limit=size)

    assert "test-newest-first" in list_batching() and "test-one-chunk" in list_batching()
    sched = Scheduler(get_batching("test-one-chunk", size=3), BlockCounter(16, 4))
    sched.add(Request("a", 5, 2))
    assert run_all(sched) == ["it 0  a P0+3", "it 1  a P3+2", "it 2  a D5"]


def test_scheduler_update_finishes_by_length_and_by_engine_reports():
    sched = Scheduler(get_batching("continuous"), BlockCounter(16, 4))
    a, b = Request("a", 4, 3), Request("b", 2, 5)
    sched.add(a)
    sched.add(b)
    it = sched.schedule(0.0)
    assert str(it) == "it 0  a P0+4  b P0+2" and all(s.samples for s in it.slices)
    assert sched.update(it) == [] and a.num_generated == 1 and a.first_scheduled == 0.0
    it = sched.schedule(1.0)
    assert [s.is_decode for s in it.slices] == [True, True]
    assert sched.update(it, finished={"b": "stop"}) == [b] and b.finish_reason == "stop"
    assert b.status is RequestStatus.FINISHED
    it = sched.schedule(2.0)
    done = sched.update(it)
    assert done == [a] and a.finish_reason == "length" and a.num_generated == 3 and a.num_computed == 6
    assert not sched.has_unfinished() and sched.capacity.num_free_blocks() == 16


def test_schedule_before_update_and_duplicate_ids_are_errors():
    sched = Scheduler(get_batching("continuous"), BlockCounter(16, 4))
    sched.add(Request("a", 4, 3))
    with pytest.raises(ValueError, match="'a' is already scheduled"):
        sched.add(Request("a", 4, 3))
    sched.schedule(0.0)
    with pytest.raises(RuntimeError, match="call update"):
        sched.schedule(1.0)


def test_abort_frees_blocks_at_once_and_skips_the_in_flight_slice():
    kv = BlockCounter(8, 4)
    sched = Scheduler(get_batching("continuous"), kv)
    a, b = Request("a", 8, 4), Request("b", 4, 4)
    sched.add(a)
    sched.add(b)
    it = sched.schedule(0.0)
    assert kv.num_free_blocks() == 5
    assert sched.abort("a") is a and a.finish_reason == "abort" and kv.num_free_blocks() == 7
    assert sched.abort("nope") is None
    assert sched.update(it) == [] and b.num_computed == 4 and a.num_computed == 0
    assert [r.id for r in sched.running] == ["b"]


def test_too_long_requests_and_queue_bound():
    sched = Scheduler(get_batching("continuous"), BlockCounter(2, 4))
    with pytest.raises(BatchingError, match="needs 3 KV blocks of 4 tokens, the cache holds 2"):
        sched.add(Request("long", 8, 2))
    sched = Scheduler(get_batching("prefill-first", max_num_batched_tokens=256, max_num_seqs=8), BlockCounter(99))
    with pytest.raises(BatchingError, match="exceed max_num_batched_tokens=256 .* use chunked-prefill"):
        sched.add(Request("x", 250, 10))
    sched = Scheduler(get_batching("dynamic", max_queue_size=2), BlockCounter(99))
    sched.add(Request("a", 4, 2))
    sched.add(Request("b", 4, 2))
    with pytest.raises(Rejected, match="max_queue_size=2") as err:
        sched.add(Request("c", 4, 2))
    assert err.value.request.id == "c" and "full" in err.value.reason


def test_continuous_joins_whole_prompts_every_iteration():
    sched = Scheduler(get_batching("continuous", max_num_seqs=2), BlockCounter(16, 4))
    for i, (p, m) in enumerate([(5, 3), (6, 2), (3, 2)]):
        sched.add(Request(f"r{i}", p, m))
    # r2 waits for a seat (max_num_seqs=2) and joins with its whole prompt the iteration after r1 leaves
    assert run_all(sched) == [
        "it 0  r0 P0+5  r1 P0+6",
        "it 1  r0 D5  r1 D6",
        "it 2  r0 D6  r2 P0+3",
        "it 3  r2 D3",
    ]


def test_continuous_preempts_the_last_arrived_by_recompute():
    # 5 blocks of 4 tokens: r0 (prompt 7) and r1 (prompt 8) fill 4 blocks, r1's 9th token takes the last; r0's
    # 9th finds none and r1, the last arrival, is preempted. It recomputes its prompt and both generated tokens
    # (10) once r0 has finished and freed its blocks, sampling its third and last token.
    sched = Scheduler(get_batching("continuous"), BlockCounter(5, 4))
    r0, r1 = Request("r0", 7, 4), Request("r1", 8, 3)
    sched.add(r0)
    sched.add(r1)
    lines = run_all(sched)
    assert lines == [
        "it 0  r0 P0+7  r1 P0+8",
        "it 1  r0 D7  r1 D8",
        "it 2  r0 D8  | preempt r1",
        "it 3  r0 D9",
        "it 4  r1 P0+10",
    ]
    assert r1.num_preemptions == 1 and r1.num_generated == 3 and r1.num_computed == 10


def test_fewest_computed_victim_and_priority_order():
    sched = Scheduler(get_batching("continuous", preemption="fewest-computed"), BlockCounter(5, 4))
    r0, r1 = Request("r0", 8, 4), Request("r1", 7, 3)
    sched.add(r0)
    sched.add(r1)
    run_all(sched)
    assert (r0.num_preemptions, r1.num_preemptions) == (0, 1)  # r1 had computed fewer tokens

    sched = Scheduler(get_batching("continuous", order="priority", max_num_seqs=1), BlockCounter(64, 4))
    for name, prio in [("low", 5), ("high", 0), ("mid", 2)]:
        sched.add(Request(name, 4, 1, priority=prio))
    assert [r.id for r in sched.waiting] == ["high", "mid", "low"]
    assert [line.split()[2] for line in run_all(sched)] == ["high", "mid", "low"]


def test_prefix_cache_hit_starts_at_the_cached_tokens():
    kv = BlockCounter(16, 4, prefix=lambda r: 8 if r.id.startswith("sys") else 0)
    sched = Scheduler(get_batching("chunked-prefill", token_budget=4, max_num_seqs=2), kv)
    a = Request("sys-a", 10, 2)
    sched.add(a)
    sched.add(Request("b", 3, 1))
    assert run_all(sched)[:2] == ["it 0  sys-a P8+2  b P0+2", "it 1  sys-a D10  b P2+1"]
    assert a.num_cached == 8


def test_the_batching_package_imports_neither_torch_nor_matplotlib():
    import subprocess
    import sys

    code = "import sys, pipeloom.schedules.batching; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_iteration_counts_and_str():
    a, b = Request("a", 10, 2), Request("b", 3, 2)
    from pipeloom.schedules.batching import Slice

    it = Iteration(3, (Slice(a, 0, 6, False, False), Slice(b, 4, 1, True, True)), (Request("c", 1, 1),), 2)
    assert (it.num_prefill_tokens, it.num_decode_tokens, it.num_tokens, it.num_seqs) == (6, 1, 7, 2)
    assert it.kv_tokens_read == 6 + 5
    assert str(it) == "it 3  a P0+6  b D4  | pad 2  | preempt c"
