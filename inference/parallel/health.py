# Liveness of a parallel inference engine: a heartbeat per rank on the rendezvous store, and naming who failed.
"""Every rank of the engine keeps a small record on the job's rendezvous store (the ``TCPStore`` that
``init_process_group`` / torchrun already run): a :class:`Heartbeat` thread writes, every ``interval`` seconds,
the action the rank's main loop is in (``2F17``: stage 2's forward of microbatch 17; ``2RECV_F17``: waiting for its
input) and since when. A rank that fails writes why (:meth:`Board.error`) before it closes its links, which makes
its neighbours fail at once instead of waiting for their deadline.

When the driver's wait fails (a deadline passed, or a peer's link closed), :func:`diagnose` reads the board and
names the rank that caused it and its action:

* no heartbeat for more than ``2 * interval + 0.5`` s: the process died or is frozen;
* a heartbeat in one compute action for longer than the timeout: the rank is alive but stalled there;
* otherwise the first error a rank wrote that does not blame another rank.

Idle periods are spent on the store too (:meth:`Board.wait`): the driver sets ``wake/<n>`` before the next
microbatch after the n-th idle period, and a worker waiting for it checks the ``stop`` key between short waits,
so an idle engine neither holds a p2p wait open nor hangs when the driver goes away.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import torch.distributed as dist


_CONSEQUENCES = ("waiting for", "lost the connection", "Connection closed", "timed out", "Timed out", "when the driver")


class RankFailure(RuntimeError):
    """A rank of a parallel engine died, stalled or failed; the message names the rank(s) and the action."""


class Board:
    """This rank's connection to the store under the engine's namespace (one per thread that uses it)."""

    def __init__(self, namespace: str, store=None):
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        self.namespace, self.base = namespace, base
        self.store = dist.PrefixStore(namespace, base.clone())  # a connection of its own: waits block only it

    def clone(self) -> Board:
        """The same board over a new connection (for another thread)."""
        return Board(self.namespace, self.base)

    def set(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def get(self, key: str, default=None):
        if not self.store.check([key]):
            return default
        return json.loads(self.store.get(key))

    def error(self, rank: int, text: str, action: str | None = None, peer: int | None = None) -> None:
        """Why ``rank`` failed: ``text``, the ``action`` it was in, and the ``peer`` it was waiting for (if any)."""
        self.set(f"error/{rank}", {"t": time.time(), "text": text, "action": action, "peer": peer})

    def wait(self, key: str, seconds: float) -> bool:
        """True once ``key`` exists; False after ``seconds`` without it."""
        try:
            self.store.wait([key], timedelta(seconds=seconds))
            return True
        except (RuntimeError, dist.DistError):  # DistStoreError: not set within the wait
            return False

    def statuses(self, world: int) -> dict[int, dict]:
        return {r: s for r in range(world) if (s := self.get(f"beat/{r}")) is not None}

    def errors(self, world: int) -> dict[int, dict]:
        return {r: e for r in range(world) if (e := self.get(f"error/{r}")) is not None}


class Heartbeat:
    """A daemon thread writing ``{"t", "action", "since", "state"}`` for this rank every ``interval`` seconds;
    the main loop calls :meth:`doing` (an attribute write: no store call on the hot path)."""

    def __init__(self, board: Board, rank: int, interval: float):
        self.board, self.rank, self.interval = board.clone(), rank, float(interval)
        self.main = board.clone()  # the main thread's own connection (for its occasional beats)
        self.action, self.state, self.since = "start", "idle", time.time()
        self._last = 0.0
        self._stop = threading.Event()
        self._beat(self.main)
        self._thread = threading.Thread(target=self._run, name=f"pipeloom-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def doing(self, action: str, state: str = "compute") -> None:
        """The main loop enters ``action``; at most once per interval this also writes the record at once (the
        thread may be starved of the CPU when the main loop is busy)."""
        self.action, self.state, self.since = action, state, time.time()
        if self.since - self._last >= self.interval:
            try:
                self._beat(self.main)
            except (RuntimeError, dist.DistError):
                pass

    def _beat(self, board: Board) -> None:
        self._last = time.time()
        board.set(f"beat/{self.rank}", {"t": self._last, "action": self.action, "state": self.state,
                                        "since": self.since})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat(self.board)
            except (RuntimeError, dist.DistError):  # the store is gone (the job is ending): stop quietly
                return

    def stop(self, final: str | None = None) -> None:
        self._stop.set()
        if final is not None:
            self.action, self.state, self.since = final, "stopped", time.time()
            try:
                self._beat(self.main)
            except (RuntimeError, dist.DistError):
                pass


def diagnose(statuses: dict[int, dict], errors: dict[int, dict], world: int, *, now: float, interval: float,
             timeout: float, describe=str, exclude: tuple[int, ...] = ()) -> tuple[list[int], str]:
    """(the ranks to blame, one paragraph naming them and their actions, then every rank's own report)."""
    stale_after = 2 * interval + 0.5
    lines, culprits = [], []
    for r in range(world):
        if r in exclude:
            continue
        s = statuses.get(r)
        if s is None:
            culprits.append(r)
            lines.append(f"{describe(r)} never reported a heartbeat (it did not start, or died at once)")
        elif s["state"] != "stopped" and now - s["t"] > stale_after:
            culprits.append(r)
            waiting = [f"{describe(q)} was waiting for it in {e['action']}" for q, e in sorted(errors.items())
                       if e.get("peer") == r and e.get("action")]
            lines.append(f"{describe(r)} stopped answering: no heartbeat for {now - s['t']:.1f} s (the process died "
                         f"or is frozen); its last recorded action was {s['action']} ({s['state']})"
                         + (f"; {', '.join(waiting)}" if waiting else ""))
        elif s["state"] == "compute" and now - s["since"] > timeout:
            culprits.append(r)
            lines.append(f"{describe(r)} is alive but stalled in {s['action']} for {now - s['since']:.1f} s")
    if not culprits:  # nobody died or hangs: blame the first rank whose own work failed
        own = [(e["t"], r) for r, e in errors.items() if not any(x in e["text"] for x in _CONSEQUENCES)]
        for _, r in sorted(own)[:1]:
            culprits.append(r)
            lines.append(f"{describe(r)} failed: {errors[r]['text']}")
    if not culprits:
        lines.append("no rank could be blamed from the heartbeats")
    reports = "; ".join(f"{describe(r)}: {e['text']}" for r, e in sorted(errors.items()))
    return culprits, "; ".join(lines) + (f". Reports: {reports}" if reports else "")
