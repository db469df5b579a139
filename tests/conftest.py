# Shared fixtures: one long-lived pool of gloo ranks per world size, shared by all multi-rank tests; the Triton
# kernel tests' device and their one run in a child under TRITON_INTERPRET=1.
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree
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
    for child in _CHILD:
        child.close()


# ----- Triton kernel tests: a file's ``test_triton_*`` tests run on a GPU or under the interpreter; without either
# they are skipped here and the file's ``test_interpreter_runs_*`` test checks them in a child pytest with
# TRITON_INTERPRET=1, so ``make test`` checks the kernels on a CPU-only machine. One child runs the
# ``test_triton_*`` tests of every collected file, started as soon as collection ends: it interprets on one core
# while this process runs the other tests, and each file's ``test_interpreter_runs_*`` test reads its own results.

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 1200  # seconds for all files together: about 2.5 minutes of one core on an idle 2-core machine


def _triton_device(child_test: str) -> torch.device:
    """CUDA, or the CPU under the interpreter; else skip (``child_test`` runs these tests in a child)."""
    if not features.has("triton"):
        pytest.skip("triton is not installed (pip install triton)")
    if interpreted():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip(f"no GPU and no TRITON_INTERPRET=1: run by {child_test} in a child")


def _needs_child() -> bool:
    return features.has("triton") and not interpreted() and not torch.cuda.is_available()


class _InterpreterChild:
    """The one child pytest (TRITON_INTERPRET=1) over the ``test_triton_*`` tests of ``files``; its outcome per
    file, read from the child's JUnit XML."""

    def __init__(self, files: list[str]):
        self.files = files
        self.dir = tempfile.mkdtemp(prefix="pipeloom-triton-child-")
        self.xml, self.log = os.path.join(self.dir, "junit.xml"), os.path.join(self.dir, "out.txt")
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", *files, "-k", "test_triton_", "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={self.xml}", "-o", "junit_family=xunit1"]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        self.started = time.monotonic()

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def results(self, test_file: str) -> dict[str, str]:
        """``{test name: "passed" | "failed" | "error" | "skipped"}`` of ``test_file``'s tests in the child."""
        try:
            self.proc.wait(timeout=max(1.0, CHILD_TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the Triton interpreter child ran past {CHILD_TIMEOUT} s:\n{self.output()[-6000:]}")
        if not os.path.exists(self.xml):
            pytest.fail(f"the Triton interpreter child wrote no results:\n{self.output()[-6000:]}")
        got = {}
        for case in ElementTree.parse(self.xml).iter("testcase"):
            if os.path.abspath(os.path.join(REPO, case.get("file", ""))) == os.path.abspath(test_file):
                kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
                got[case.get("name")] = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_CHILD: list[_InterpreterChild] = []


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The files whose ``test_interpreter_runs_*`` test will run: their interpreter child starts at once, and those
    tests run last, when the child has (most likely) finished."""
    readers = [item for item in items if item.name.startswith("test_interpreter_runs_")
               and "triton_child" in getattr(item, "fixturenames", ())]
    files = list(dict.fromkeys(str(item.path) for item in readers))
    for item in readers:
        item.add_marker(pytest.mark.timeout(CHILD_TIMEOUT + 60))  # it waits for the child
    items[:] = [item for item in items if item not in readers] + readers
    if files and _needs_child() and not config.option.collectonly:
        _CHILD.append(_InterpreterChild(files))


def _run_triton_tests_in_interpreter(test_file: str, what: str) -> None:
    """``test_file``'s ``test_triton_*`` tests under TRITON_INTERPRET=1 in the child: all must pass, none skipped.
    Skips where they run in this process already (a GPU, or the interpreter set)."""
    if not features.has("triton"):
        pytest.skip("triton is not installed")
    if not _needs_child():
        pytest.skip("the test_triton_* tests run in this process")
    assert _CHILD, "no interpreter child was started for this file"
    child = _CHILD[0]
    got = child.results(test_file)
    bad = {name: kind for name, kind in got.items() if kind != "passed"}
    assert got and not bad, (f"{what} Triton tests under the interpreter: {len(got)} ran, not passed: {bad}\n"
                             f"{child.output()[-6000:]}")


@pytest.fixture(scope="session")
def triton_child() -> SimpleNamespace:
    """``device(child_test)`` and ``run(test_file, what)``: see the two functions above."""
    return SimpleNamespace(device=_triton_device, run=_run_triton_tests_in_interpreter)
