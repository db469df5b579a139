# Shared fixtures: one long-lived pool of gloo ranks per world size, shared by all multi-rank tests; the Triton
# kernel tests' device and their run in a child under TRITON_INTERPRET=1.
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeloom import features
from pipeloom.kernels import interpreted
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


# ----- Triton kernel tests: a file's ``test_triton_*`` tests run on a GPU or under the interpreter; without either
# they are skipped here and the file's ``test_interpreter_runs_*`` test runs them in a child pytest with
# TRITON_INTERPRET=1, so ``make test`` checks the kernels on a CPU-only machine.

REPO = Path(__file__).resolve().parents[1]


def _triton_device(child_test: str) -> torch.device:
    """CUDA, or the CPU under the interpreter; else skip (``child_test`` runs these tests in a child)."""
    if not features.has("triton"):
        pytest.skip("triton is not installed (pip install triton)")
    if interpreted():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip(f"no GPU and no TRITON_INTERPRET=1: run by {child_test} in a child")


def _run_triton_tests_in_interpreter(test_file: str, what: str) -> None:
    """Run ``test_file``'s ``test_triton_*`` tests in a child pytest under TRITON_INTERPRET=1: all must pass,
    none skipped. Skips where they run in this process already (a GPU, or the interpreter set)."""
    if not features.has("triton"):
        pytest.skip("triton is not installed")
    if interpreted() or torch.cuda.is_available():
        pytest.skip("the test_triton_* tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-k", "test_triton_", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, f"{what} Triton tests failed under the interpreter:\n{done.stdout[-6000:]}"
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, done.stdout[-3000:]


@pytest.fixture(scope="session")
def triton_child() -> SimpleNamespace:
    """``device(child_test)`` and ``run(test_file, what)``: see the two functions above."""
    return SimpleNamespace(device=_triton_device, run=_run_triton_tests_in_interpreter)
