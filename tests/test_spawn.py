# The spawn helper: results by rank, errors carry the rank's traceback, dead and stuck ranks are named.
import os
import time

import pytest
import torch
import torch.distributed as dist

from pipeloom.parallel.spawn import RankError, RankPool, RankTimeout


def _allreduce_rank(scale):
    t = torch.tensor([float(dist.get_rank() + 1)]) * scale
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_one():
    if dist.get_rank() == 1:
        raise ValueError("planted failure")
    return dist.get_rank()


def _sleep_on_zero():
    if dist.get_rank() == 0:
        time.sleep(30)
    return dist.get_rank()


def _error_on_zero_then_one_dies():
    if dist.get_rank() == 0:
        raise ValueError("reported first")
    time.sleep(1.0)
    os._exit(3)


def test_pool_runs_collectives_and_returns_by_rank(pool2):
    assert pool2.run(_allreduce_rank, 2.0) == [(0, 6.0), (1, 6.0)]
    assert pool2.run(_allreduce_rank, 1.0) == [(0, 3.0), (1, 3.0)]  # the same processes, reused


def _make_groups(n):
    """``n`` new groups over the world, each used once; the number of groups and threads this rank now holds."""
    for group in [dist.new_group(list(range(dist.get_world_size()))) for _ in range(n)]:
        dist.all_reduce(torch.ones(1), group=group)
    return _held()


def _held():
    import torch.distributed.distributed_c10d as c10d

    return len(c10d._world.pg_map), len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_a_call_leaves_no_process_groups_behind(pool2):
    """Idle gloo groups keep threads polling: a pooled rank holding the groups of every past test burns CPU for the
    rest of the suite. The groups a call creates are destroyed once every rank has returned."""
    groups, threads = pool2.run(_held)[0]
    after = pool2.run(_make_groups, 20)[0]
    assert after[0] == groups + 20 and after[1] > threads + 20, (groups, threads, after)  # gloo: threads per group
    deadline = time.monotonic() + 30
    while (now := pool2.run(_held)[0])[0] != groups and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now[0] == groups and now[1] <= threads + 2, (groups, threads, now)  # the default group is kept
    assert pool2.run(_allreduce_rank, 1.0) == [(0, 3.0), (1, 3.0)]


def _reinit_world(path):
    """Tear the default group down and start another (what a job testing re-initialisation does), plus a group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    dist.all_reduce(torch.ones(1), group=dist.new_group(list(range(world))))
    return _held()[0]


def test_the_cleanup_keeps_a_default_group_a_call_started(pool2, tmp_path):
    assert pool2.run(_reinit_world, str(tmp_path / "store")) == [2, 2]  # the new world and its subgroup
    assert pool2.run(_held)[0][0] == 1  # the subgroup went, the new world stayed
    assert pool2.run(_allreduce_rank, 1.0) == [(0, 3.0), (1, 3.0)]


def test_rank_error_names_rank_and_pool_recovers():
    pool = RankPool(2)
    try:
        with pytest.raises(RankError, match=r"(?s)rank\(s\) \[1\].*planted failure"):
            pool.run(_fail_on_one, timeout=60)
        assert pool.run(_allreduce_rank, 1.0) == [(0, 3.0), (1, 3.0)]
    finally:
        pool.close(kill=True)


def test_timeout_names_stuck_rank():
    pool = RankPool(2)
    try:
        with pytest.raises(RankTimeout, match=r"rank\(s\) \[0\]"):
            pool.run(_sleep_on_zero, timeout=3)
    finally:
        pool.close(kill=True)


def test_rank_error_names_a_rank_that_died_after_another_reported():
    """Rank 0's error reaches the parent first; rank 1's death a moment later must still be named."""
    pool = RankPool(2)
    try:
        with pytest.raises(RankError, match=r"rank\(s\) \[1\] died without reporting \(exit codes \[3\]\)"):
            pool.run(_error_on_zero_then_one_dies, timeout=60)
    finally:
        pool.close(kill=True)
