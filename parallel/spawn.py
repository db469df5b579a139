# The one way pipeloom starts several ranks in one machine: tests, benchmarks and examples use it.
"""Start ``world_size`` CPU processes joined in a gloo process group and run functions on all of them.

Two entry points:

* :func:`run_ranks` - start fresh processes, run one function on every rank, return each rank's result.
* :class:`RankPool` - keep the processes (and their process group) alive and run many functions on
  them; spawning costs seconds, so test suites share one pool per world size.

Functions are sent by *file path and qualified name*, not by pickled module name, so a function defined
in a test file (imported by pytest under any module name) or in a script runs unchanged on the ranks.
Arguments and results must be picklable. A rank that raises makes the call raise with that rank's
traceback; a call that outlives ``timeout`` kills the pool and raises :class:`RankTimeout` naming the
ranks that did not answer, instead of hanging.
"""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable


class RankTimeout(TimeoutError):
    """A multi-rank call did not finish in time; names the ranks that were still running."""


class RankError(RuntimeError):
    """A rank raised; carries the rank's formatted traceback."""


class RankDied:
    """The result of a rank that died during a ``RankPool.run(..., expect_deaths=True)`` call."""

    def __init__(self, rank: int, exitcode: int | None):
        self.rank, self.exitcode = rank, exitcode

    def __repr__(self) -> str:
        return f"RankDied(rank={self.rank}, exitcode={self.exitcode})"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(path: str, qualname: str) -> Callable:
    """Import the file at ``path`` (once per process) and return the object named ``qualname``."""
    name = "_pipeloom_remote_" + str(abs(hash(path)))
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _address(fn: Callable) -> tuple[str, str]:
    if "<locals>" in fn.__qualname__:
        raise ValueError(f"{fn.__qualname__} is a local function; ranks can only run module-level functions")
    return os.path.abspath(inspect.getfile(fn)), fn.__qualname__


def _process_groups() -> set:
    """Every process group this rank holds, the default one included (torch keeps no public list of them)."""
    import torch.distributed.distributed_c10d as c10d

    return set(c10d._world.pg_map)


def _destroy_groups_since(before: set) -> int:
    """Destroy the groups created since ``before`` was taken; how many. Each idle gloo group keeps a few threads
    polling (50 idle groups cost a rank about 8% of a core), and pooled ranks outlive the jobs that made them."""
    import torch.distributed as dist

    stale = _process_groups() - before - {dist.group.WORLD}  # a job may have re-initialised the default group
    for group in stale:
        try:
            dist.destroy_process_group(group)
        except (RuntimeError, ValueError) as error:  # already torn down by its owner: nothing is lost, say so
            print(f"pipeloom.parallel.spawn: rank {dist.get_rank()}: could not destroy a group a job left: {error}",
                  file=sys.stderr)
    return len(stale)


def _worker(rank: int, world_size: int, port: int, backend: str, inbox, outbox, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    outbox.put((0, rank, True, "ready"))  # call id 0: the pool's start-up handshake
    groups = _process_groups()  # the default group: what a job leaves beyond it is destroyed after the job
    while True:
        job = inbox.get()
        if job is None:
            break
        if job == _CLEANUP:  # every rank has reported the last job, so no peer still uses its groups
            _destroy_groups_since(groups)
            continue
        call_id, path, qualname, args, kwargs = job
        try:
            result = _resolve(path, qualname)(*args, **kwargs)
            outbox.put((call_id, rank, True, result))
        except BaseException:  # noqa: BLE001 - every failure is reported to the parent, never swallowed
            outbox.put((call_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


_CLEANUP = "cleanup"  # the message that follows a job every rank finished: destroy the groups it made


# Modules every rank imports before it can run anything: a fork server imports them once and forks each rank
# from there, so starting a rank costs a fork instead of a fresh interpreter importing torch (~3 s of CPU each).
PRELOAD = ("torch", "torch.distributed", "torch._dynamo")


def _context():
    """The multiprocessing context ranks start in: a fork server with :data:`PRELOAD` imported where the platform
    has one (Linux, macOS), else spawn. Never plain fork: the parent may hold threads and process groups."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


class RankPool:
    """``world_size`` long-lived processes in one gloo group; ``pool.run(fn, *args)`` runs ``fn`` on all.

    ``fn`` must be a module-level function. Each rank calls ``fn(*args, **kwargs)`` with the default
    process group initialised (``RANK``/``WORLD_SIZE`` set); the result is the list of return values by
    rank. After any failure or timeout the processes are killed and the next ``run`` starts new ones.
    Once every rank has returned, the process groups the call created are destroyed (idle gloo groups keep
    threads polling), so a call must not leave groups for a later call to use.
    """

    def __init__(self, world_size: int, backend: str = "gloo", env: dict | None = None, startup_timeout: float = 300.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self._procs: list = []
        self._calls = 0

    def _start(self) -> None:
        ctx = _context()
        port = free_port()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                daemon=True,
                args=(r, self.world_size, port, self.backend, self._inboxes[r], self._outbox, self.env),
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        # Wait for every rank to join the group, so a call's timeout measures the call, not the start-up.
        ready: set[int] = set()
        deadline = time.monotonic() + self.startup_timeout
        while len(ready) < self.world_size:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - ready)
                self.close(kill=True)
                raise RankError(
                    f"rank(s) {missing} did not start within {self.startup_timeout:.0f}s"
                    + (f" (rank(s) {dead} exited)" if dead else "")
                )
            try:
                _, rank, _, _ = self._outbox.get(timeout=0.2)
                ready.add(rank)
            except queue.Empty:
                continue

    def run(self, fn: Callable, *args: Any, timeout: float = 120.0, expect_deaths: bool = False,
            **kwargs: Any) -> list[Any]:
        """``fn(*args, **kwargs)`` on every rank; the results by rank. ``expect_deaths`` (fault-injection tests): a
        rank that dies does not end the call - its entry is a :class:`RankDied` and the others are awaited - and the
        pool restarts at its next call."""
        if not self._procs:
            self._start()
        path, qualname = _address(fn)
        self._calls += 1
        call_id = self._calls
        for inbox in self._inboxes:
            inbox.put((call_id, path, qualname, args, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        dead: list[int] = []
        exitcodes: list = []
        while len(results) + len(errors) < self.world_size:
            if errors:
                # The other ranks may wait forever on the failed one: give them a moment, then kill.
                deadline = min(deadline, time.monotonic() + 5.0)
            silent = sorted(set(range(self.world_size)) - set(results) - set(errors))
            dead = [r for r in silent if not self._procs[r].is_alive()]
            if expect_deaths and dead and time.monotonic() <= deadline:
                for r in dead:  # a death the caller caused: record it, keep waiting for the others
                    results[r] = RankDied(r, self._procs[r].exitcode)
                continue
            if dead or time.monotonic() > deadline:
                exitcodes = [self._procs[r].exitcode for r in dead]  # before close() forgets the processes
                self.close(kill=True)
                if errors:
                    break
                if dead:
                    raise RankError(
                        f"{fn.__qualname__}: rank(s) {dead} died without reporting (exit codes "
                        f"{exitcodes}); a script that starts ranks must do so under "
                        f"`if __name__ == '__main__':`, since each spawned rank re-imports the main module"
                    )
                raise RankTimeout(f"{fn.__qualname__}: rank(s) {silent} still running after {timeout:.0f}s")
            try:
                cid, rank, ok, value = self._outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if cid == call_id:
                (results if ok else errors)[rank] = value
        if errors:
            self.close(kill=True)
            first = min(errors)
            # A rank that died is named too, whether its death or another rank's error reached us first.
            died = f"; rank(s) {dead} died without reporting (exit codes {exitcodes})" if dead else ""
            raise RankError(f"{fn.__qualname__} failed on rank(s) {sorted(errors)}{died}; rank {first}:\n"
                            f"{errors[first]}")
        if any(isinstance(v, RankDied) for v in results.values()):
            self.close(kill=True)  # a rank is gone: the next call starts a fresh pool
        else:
            for inbox in self._inboxes:  # all ranks are done: the groups the job made can go
                inbox.put(_CLEANUP)
        return [results[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        if not self._procs:
            return
        if not kill:
            for inbox in self._inboxes:
                inbox.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_ranks(
    fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo", **kwargs: Any
) -> list[Any]:
    """Start ``world_size`` fresh processes, run ``fn(*args, **kwargs)`` on each, return results by rank."""
    pool = RankPool(world_size, backend=backend)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    finally:
        pool.close()
