# Block manager invariants: random request streams with aborts through the real Scheduler (hypothesis).
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeloom.inference.block_manager import BlockManager, block_hash
from pipeloom.inference.engine import _make_policy
from pipeloom.schedules.batching import Request, Scheduler, list_batching


@dataclass(eq=False)
class Seq(Request):
    """A scheduler request with token ids, as the engine's Sequence (no model needed here)."""

    token_ids: list = field(default_factory=list)


def _expected_counts(bm: BlockManager) -> list[int]:
    counts = [0] * bm.num_blocks
    for table in bm.tables.values():
        for b in table:
            counts[b] += 1
    return counts


ops = st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort", "stop"]),
                         st.integers(0, 10_000)), min_size=5, max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, policy=st.sampled_from(list_batching()), num_blocks=st.integers(6, 40),
       block_size=st.sampled_from([1, 2, 4]), caching=st.booleans())
def test_random_streams_leak_no_block(ops, policy, num_blocks, block_size, caching):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    sched = Scheduler(_make_policy(policy, token_budget=8, max_num_seqs=None, options={}), bm)  # as the engine
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9]]  # shared heads make prefix hits likely
    n, now, live = 0, 0.0, []
    for op, x in ops:
        now += 0.01
        if op == "add":
            length = 1 + x % 12
            tokens = (prefixes[x % 2] + [x % 7] * length)[: 1 + (x % 13)]
            r = Seq(f"r{n}", prompt_len=len(tokens), max_tokens=1 + x % 5, arrival=now, token_ids=list(tokens))
            n += 1
            try:
                sched.add(r, now)
            except ValueError:  # too long for this pool: refused, nothing held
                continue
            live.append(r)
        elif op in ("step", "stop"):
            it = sched.schedule(now)
            if it.is_empty:
                continue
            for s in it.slices:  # the "model" samples token x for every sampling slice
                assert bm.block_table(s.request.id), "a scheduled request holds no block"
                assert len(bm.block_table(s.request.id)) * block_size >= s.first_token + s.n_tokens
                if s.samples:
                    s.request.token_ids.append(x % 5)
            bm.mark_computed()
            stop = {s.request.id: "stop" for s in it.slices if s.samples and op == "stop"}
            sched.update(it, stop)
        elif op == "abort" and live:
            sched.abort(live[x % len(live)].id)
        assert bm.ref_counts == _expected_counts(bm)
        bm.check()
    for r in live:
        sched.abort(r.id)
    assert not bm.tables
    assert bm.num_free_blocks() == bm.num_total_blocks()
    assert all(c == 0 for c in bm.ref_counts)
    bm.check()


def _seq(rid: str, tokens: list[int], computed: int = 0) -> Seq:
    r = Seq(rid, prompt_len=len(tokens), max_tokens=4, token_ids=list(tokens))
    r.num_computed = computed
    return r


def test_prefix_hits_share_blocks_and_lru_evicts_the_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = _seq("a", [1, 2, 3, 4, 5])
    assert bm.cached_prefix(a) == 0 and bm.allocate(a, 5)  # 3 blocks, the first two full and keyed
    b = _seq("b", [1, 2, 3, 4, 9])
    assert bm.cached_prefix(b) == 4
    b.num_computed = 4
    assert bm.allocate(b, 1)
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert [bm.ref_counts[x] for x in bm.block_table("a")] == [2, 2, 1]
    bm.mark_computed()
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks() == 6 and len(bm.evictable) == 2
    c = _seq("c", [7] * 12)  # needs all 6 blocks: the cached ones are evicted, their keys dropped
    assert bm.allocate(c, 12)
    assert not bm.evictable and bm.cached_prefix(_seq("d", [1, 2, 3, 4, 5])) == 0
    bm.check()


def test_hits_are_verified_against_token_ids():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq("a", [1, 2, 3])
    bm.allocate(a, 3)
    bm.mark_computed()
    key = bm.block_key[bm.block_table("a")[0]]
    bm.block_tokens[bm.block_table("a")[0]] = (5, 6)  # as if another block's tokens collided on the same key
    assert bm.cache[key] == bm.block_table("a")[0]
    assert bm.cached_prefix(_seq("b", [1, 2, 3])) == 0


def test_blocks_keyed_for_a_forward_that_never_ran_are_not_hits():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq("a", [1, 2, 3])
    bm.allocate(a, 3)
    bm.free(a)  # preempted in the step that allocated it: its keys must go
    assert bm.cached_prefix(_seq("b", [1, 2, 3])) == 0
    bm.check()


def test_chained_hash_depends_on_the_parent():
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [0, 0]), [1, 2])
    assert block_hash(7, [1, 2]) == block_hash(7, (1, 2))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="kv.num_blocks=0"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="kv.block_size=-1"):
        BlockManager(8, -1)
