# Shared fixtures: one long-lived pool of gloo ranks per world size, shared by all multi-rank tests; the Triton
# kernel tests' device and their one run in a child under TRITON_INTERPRET=1.
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (``torch.manual_seed``), printed so that a failure can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed {value}")
    return value


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


class _ChildResults:
    """The interpreter child's outcome per file, read from the JUnit XML it writes into ``dir`` once its ``done``
    file exists. The child is this process's (:class:`_InterpreterChild`) or, under pytest-xdist, the controller's:
    one child for all workers."""

    def __init__(self, dir: str):
        self.dir = dir
        self.xml, self.log = os.path.join(dir, "junit.xml"), os.path.join(dir, "out.txt")
        self.done, self.started_at = os.path.join(dir, "done"), os.path.join(dir, "started")

    def output(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return "(the child wrote no output)"

    def _wait(self) -> None:
        try:
            with open(self.started_at) as f:
                deadline = float(f.read()) + CHILD_TIMEOUT
        except (FileNotFoundError, ValueError):
            deadline = time.time() + CHILD_TIMEOUT
        while not os.path.exists(self.done):
            if time.time() > deadline:
                pytest.fail(f"the Triton interpreter child ran past {CHILD_TIMEOUT} s:\n{self.output()[-6000:]}")
            time.sleep(0.2)

    def results(self, test_file: str) -> dict[str, str]:
        """``{test name: "passed" | "failed" | "error" | "skipped"}`` of ``test_file``'s tests in the child."""
        self._wait()
        if not os.path.exists(self.xml):
            pytest.fail(f"the Triton interpreter child wrote no results:\n{self.output()[-6000:]}")
        got = {}
        for case in ElementTree.parse(self.xml).iter("testcase"):
            if os.path.abspath(os.path.join(REPO, case.get("file", ""))) == os.path.abspath(test_file):
                kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
                got[case.get("name")] = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
        return got

    def close(self) -> None:
        pass


class _InterpreterChild(_ChildResults):
    """The one child pytest (TRITON_INTERPRET=1) over the ``test_triton_*`` tests of ``files``, writing into
    ``dir`` (a new temporary directory if None); a thread marks ``done`` when it exits."""

    def __init__(self, files: list[str], dir: str | None = None):
        super().__init__(dir or tempfile.mkdtemp(prefix="pipeloom-triton-child-"))
        self.files = files
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        env.pop("PYTEST_XDIST_WORKER", None)
        cmd = [sys.executable, "-m", "pytest", *files, "-k", "test_triton_", "-q", "-rfEs", "-p", "no:cacheprovider",
               "-p", "no:xdist", f"--junitxml={self.xml}", "-o", "junit_family=xunit1"]
        with open(self.started_at, "w") as f:
            f.write(repr(time.time()))
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._mark_done, daemon=True).start()

    def _mark_done(self) -> None:
        code = self.proc.wait()
        with open(self.done, "w") as f:
            f.write(str(code))

    def _wait(self) -> None:
        super()._wait()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_CHILD: list[_ChildResults] = []
_READER = "test_interpreter_runs_"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, controller side: tell each worker where the one interpreter child writes."""
    if not getattr(node.config, "_pipeloom_triton_child", None):
        node.config._pipeloom_triton_child = tempfile.mkdtemp(prefix="pipeloom-triton-child-")
    node.workerinput["pipeloom_triton_child"] = node.config._pipeloom_triton_child


def pytest_unconfigure(config):
    if getattr(config, "_pipeloom_triton_child", None):
        shutil.rmtree(config._pipeloom_triton_child, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """pytest-xdist, controller side: the first worker's collection names the files; their child starts now."""
    if _CHILD or not _needs_child():
        return
    files = list(dict.fromkeys(str(REPO / i.split("::")[0]) for i in ids if i.split("::")[-1].startswith(_READER)))
    if files:
        _CHILD.append(_InterpreterChild(files, dir=node.config._pipeloom_triton_child))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The files whose ``test_interpreter_runs_*`` test will run: their interpreter child starts at once (under
    pytest-xdist, in the controller), and those tests run last, when the child has (most likely) finished."""
    readers = [item for item in items if item.name.startswith(_READER)
               and "triton_child" in getattr(item, "fixturenames", ())]
    files = list(dict.fromkeys(str(item.path) for item in readers))
    for item in readers:
        item.add_marker(pytest.mark.timeout(CHILD_TIMEOUT + 60))  # it waits for the child
    items[:] = [item for item in items if item not in readers] + readers
    if not files or not _needs_child() or config.option.collectonly:
        return
    shared = getattr(config, "workerinput", {}).get("pipeloom_triton_child")  # a pytest-xdist worker
    _CHILD.append(_ChildResults(shared) if shared else _InterpreterChild(files))


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
