# Each batching policy on hand-worked traces (exact iteration lists and times), and a head-of-line request finishing.
import pytest

from pipeloom.schedules.batching import (
    Auditor,
    BlockCounter,
    Request,
    Scheduler,
    Trace,
    TraceItem,
    get_batching,
    simulate_serving,
)


def trace(*items):
    """(arrival, prompt_len, output_len) triples; ids r0, r1, ... in arrival order."""
    return Trace(tuple(TraceItem(*it) for it in items), "hand")


def lines(result):
    return [i.text for i in result.iterations]


def starts(result):
    return [i.start for i in result.iterations]


# r0 (3-token prompt, 4 outputs) runs alone; a 20-token prompt r1 (1 output) arrives at t=1. Every iteration
# takes 1 s ("unit" cost), so iteration k runs from k to k+1.
ARRIVING_LONG_PROMPT = trace((0.0, 3, 4), (1.0, 20, 1))


def test_continuous_mixes_the_whole_new_prompt_with_the_decodes():
    res = simulate_serving("continuous", ARRIVING_LONG_PROMPT, cost="unit", kv_blocks=64, block_size=4, audit=True)
    assert lines(res) == ["it 0  r0 P0+3", "it 1  r0 D3  r1 P0+20", "it 2  r0 D4", "it 3  r0 D5"]
    assert res.requests[0].token_times == [1.0, 2.0, 3.0, 4.0] and res.requests[1].token_times == [2.0]


def test_prefill_first_stalls_the_decodes_for_an_all_prefill_iteration():
    res = simulate_serving("prefill-first", ARRIVING_LONG_PROMPT, cost="unit", kv_blocks=64, block_size=4, audit=True)
    assert lines(res) == ["it 0  r0 P0+3", "it 1  r1 P0+20", "it 2  r0 D3", "it 3  r0 D4", "it 4  r0 D5"]
    assert res.requests[0].itl == [2.0, 1.0, 1.0]  # r0's second token waited behind r1's prefill


def test_chunked_prefill_decodes_first_then_chunks_the_prompt_to_the_budget():
    res = simulate_serving("chunked-prefill", ARRIVING_LONG_PROMPT, cost="unit", kv_blocks=64, block_size=4,
                           options={"token_budget": 8, "max_num_seqs": 4}, audit=True)
    # budget 8: r0's decode takes 1 token, r1 gets 7, then 7, then the last 6 (which samples its only token)
    assert lines(res) == ["it 0  r0 P0+3", "it 1  r0 D3  r1 P0+7", "it 2  r0 D4  r1 P7+7", "it 3  r0 D5  r1 P14+6"]
    assert res.requests[0].itl == [1.0, 1.0, 1.0] and res.requests[1].token_times == [4.0]


def test_chunked_prefill_continues_unfinished_prefills_before_new_requests():
    res = simulate_serving("chunked-prefill", trace((0.0, 10, 3), (0.0, 5, 2)), cost="unit", kv_blocks=64,
                           block_size=4, options={"token_budget": 8, "max_num_seqs": 4}, audit=True)
    assert lines(res) == ["it 0  r0 P0+8", "it 1  r0 P8+2  r1 P0+5", "it 2  r0 D10  r1 D5", "it 3  r0 D11"]


def test_chunked_prefill_preempts_its_own_chunk_when_kv_runs_out_and_splitfuse_waits_instead():
    # 5 blocks of 4 tokens. chunked-prefill starts r1 (needs 5 blocks in all) with the 2 blocks its first
    # chunk needs; r0's decode then takes a block and r1's second chunk finds too few: r1, the only prefilling
    # request (a chunk never preempts a decode), is preempted and starts over once r0 has finished.
    opts = {"token_budget": 8, "max_num_seqs": 4}
    res = simulate_serving("chunked-prefill", ARRIVING_LONG_PROMPT, cost="unit", kv_blocks=5, block_size=4,
                           options=opts, audit=True)
    assert lines(res) == [
        "it 0  r0 P0+3",
        "it 1  r0 D3  r1 P0+7",
        "it 2  r0 D4  | preempt r1",
        "it 3  r0 D5  r1 P0+7",
        "it 4  r1 P7+8",
        "it 5  r1 P15+5",
    ]
    assert res.requests[1].num_preemptions == 1
    # splitfuse (DeepSpeed-MII) starts a prompt only when all of it fits the free blocks: r1 waits for r0
    res = simulate_serving("splitfuse", ARRIVING_LONG_PROMPT, cost="unit", kv_blocks=5, block_size=4,
                           options=opts, audit=True)
    assert lines(res) == ["it 0  r0 P0+3", "it 1  r0 D3", "it 2  r0 D4", "it 3  r0 D5", "it 4  r1 P0+8",
                          "it 5  r1 P8+8", "it 6  r1 P16+4"]
    assert res.requests[1].num_preemptions == 0


def test_static_pads_prompts_and_finished_members_until_the_longest_is_done():
    res = simulate_serving("static", trace((0.0, 3, 2), (0.0, 5, 3), (0.0, 2, 1)), cost="unit", kv_blocks=64,
                           block_size=4, options={"batch_size": 2}, audit=True)
    assert lines(res) == [
        "it 0  r0 P0+3  r1 P0+5  | pad 2",  # r0's prompt padded to r1's 5 tokens
        "it 1  r0 D3  r1 D5",
        "it 2  r1 D6  | pad 1",  # r0 is done; its seat is padding until r1 is
        "it 3  r2 P0+2",  # nobody joins a closed batch
    ]
    assert [r.token_times for r in res.requests] == [[1.0, 2.0], [1.0, 2.0, 3.0], [4.0]]


def test_dynamic_waits_max_queue_delay_then_sends_the_largest_preferred_size():
    # preferred sizes (2, 4), delay 0.5 s: at 0.5 three requests wait, the largest preferred size <= 3 is 2;
    # r2 goes alone once its delay has passed and the batch is done; r3 does not join r2's running batch.
    res = simulate_serving(
        "dynamic", trace((0.0, 2, 2), (0.2, 2, 2), (0.3, 2, 2), (3.0, 2, 2)), cost="unit", kv_blocks=64,
        block_size=4, options={"max_batch_size": 4, "preferred_batch_sizes": (2, 4), "max_queue_delay": 0.5},
        audit=True,
    )
    assert lines(res) == ["it 0  r0 P0+2  r1 P0+2", "it 1  r0 D2  r1 D2", "it 2  r2 P0+2", "it 3  r2 D2",
                          "it 4  r3 P0+2", "it 5  r3 D2"]
    assert starts(res) == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    assert res.requests[2].scheduling_delay == pytest.approx(2.2)


def test_dynamic_sends_a_full_preferred_batch_at_once_and_rejects_beyond_the_queue_bound():
    res = simulate_serving("dynamic", trace(*[(0.0, 2, 1)] * 3), cost="unit", kv_blocks=64, block_size=4,
                           options={"max_batch_size": 2, "max_queue_delay": 10.0}, audit=True)
    # r0 waits (1 < 2), r1 fills the batch: sent at once; r2 then waits its whole 10 s delay alone
    assert lines(res) == ["it 0  r0 P0+2  r1 P0+2", "it 1  r2 P0+2"]
    assert starts(res) == [0.0, 10.0]
    res = simulate_serving("dynamic", trace((0.0, 2, 1), *[(0.1, 2, 1)] * 3), cost="unit", kv_blocks=64,
                           block_size=4, options={"max_batch_size": 4, "max_queue_size": 2})
    assert [r.rejected for r in res.requests] == [False, False, False, True]  # r0 runs, r1 r2 wait, r3 rejected
    assert res.metrics().rejected == 1 and res.metrics().completed == 3


def test_dynamic_next_wakeup_is_the_oldest_requests_deadline():
    sched = Scheduler(get_batching("dynamic", max_batch_size=4, max_queue_delay=0.25), BlockCounter(64, 4))
    sched.add(Request("a", 2, 1, arrival=1.0))
    assert sched.schedule(1.1).is_empty and sched.next_wakeup(1.1) == 1.25
    assert str(sched.schedule(1.25)) == "it 0  a P0+2" and sched.next_wakeup(1.25) is None


@pytest.mark.parametrize("policy", ["continuous", "prefill-first", "chunked-prefill", "splitfuse", "static", "dynamic"])
@pytest.mark.parametrize("victim", ["last-arrived", "fewest-computed"])
def test_a_head_of_line_request_finishes_under_a_stream_of_short_ones(policy, victim):
    # The KV cache holds 64 blocks of 16 tokens. Short requests stream in every 50 ms for 10 s; at 2 s a
    # request arrives that needs 60 of the 64 blocks. FCFS admission blocks everything behind it until it
    # fits, so it runs and finishes, and nobody who arrived after it starts before it.
    items = [(0.05 * k, 32, 64) for k in range(200)] + [(2.0, 900, 50)]
    opts = {"max_num_seqs": 16, "preemption": victim}
    if policy in ("chunked-prefill", "splitfuse"):
        opts["token_budget"] = 256
    res = simulate_serving(policy, trace(*items), cost="llama2-7b-a100", kv_blocks=64, block_size=16,
                           options=opts, audit=True)
    head = next(r for r in res.requests if r.prompt_len == 900)
    assert head.done and len(head.token_times) == 50
    later = [r for r in res.requests if r.arrival > head.arrival]
    assert all(r.first_scheduled >= head.first_scheduled for r in later)
    assert head.finished < max(r.arrival for r in res.requests)  # served while the stream still runs


def test_auditor_catches_a_policy_that_stalls_decodes_or_overtakes():
    class Overtaking(type(get_batching("continuous"))):
        name = "test-overtaking"

        def schedule(self, step):
            for r in reversed(step.waiting):  # the newest first: overtakes the queue's head
                step.admit(r)
                return

    sched = Auditor(Scheduler(get_batching("test-overtaking"), BlockCounter(64, 4)))
    sched.add(Request("a", 2, 3))
    sched.add(Request("b", 2, 3))
    with pytest.raises(AssertionError, match=r"admitted \['b'\], the queue's head was \['a'\]"):
        sched.schedule(0.0)
    sched = Auditor(Scheduler(get_batching("test-overtaking"), BlockCounter(64, 4)))
    sched.add(Request("a", 2, 3))
    sched.update(sched.schedule(0.0))
    sched.add(Request("b", 2, 3))
    with pytest.raises(AssertionError, match="decoding a stalled"):
        sched.schedule(1.0)
