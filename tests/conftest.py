# Shared fixtures: one long-lived pool of gloo ranks per world size, shared by all multi-rank tests.
import pytest

from pipeloom.parallel.spawn import RankPool

_POOLS: dict[int, RankPool] = {}


def rank_pool(world_size: int) -> RankPool:
    """The session's pool of ``world_size`` ranks (started on first use, closed at exit)."""
    if world_size not in _POOLS:
        _POOLS[world_size] = RankPool(world_size)
    return _POOLS[world_size]


@pytest.fixture(scope="session")
def pool2() -> RankPool:
    return rank_pool(2)


@pytest.fixture(scope="session")
def pool4() -> RankPool:
    return rank_pool(4)


def pytest_sessionfinish(session, exitstatus):
    for pool in _POOLS.values():
        pool.close(kill=True)
