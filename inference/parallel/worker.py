# The loop every non-driver rank of a parallel inference engine runs: receive, pass on, compute, send, sample.
"""A :class:`StageWorker` takes microbatches from its upstream rank in the order the driver dispatched them (the
previous stage of its tensor-parallel rank, or the driver for the first stage's other tp ranks), passes each
description on at once (so the next stage can post its receive while this one computes), runs its stage, and
sends the hidden states on - or, on the sampling rank, samples and sends the tokens back to the driver.

Control messages travel the same way: ``idle`` (wait on the store until the driver wakes the engine), ``end`` (a
``generate`` call is over: return), ``stop`` (shut down), ``timeline`` (publish the measured intervals).

Any failure - a deadline, a peer's closed link, an exception in the forward - is written to the store with this
rank's action, the heartbeat stops, and the links close, so every rank that waits on this one fails at once and
the driver can name who caused it (:mod:`.health`).
"""

from __future__ import annotations

import time

from pipeloom.parallel.measure import ActionClock
from pipeloom.schedules.ir import Action, Kind

from .health import Board, Heartbeat, RankFailure
from .links import Links, Topology
from .stage import Control, Result, SamplingMirror, StageRunner


class Recorder:
    """Measured intervals of this rank's actions (``sF<k>`` forwards, ``sRECV_F<k>`` waits, ``sSEND_F<k>`` posts) for
    the engine's timeline: ``time.perf_counter`` on CPU, CUDA events on GPU (converted when read). At most
    ``limit`` are kept."""

    def __init__(self, device, enabled: bool, limit: int = 200_000):
        self.clock = ActionClock(device) if enabled else None
        self.items: list = []
        self.limit = limit

    @property
    def enabled(self) -> bool:
        return self.clock is not None

    def mark(self):
        return self.clock.mark() if self.clock is not None else None

    def add(self, action: Action, start, end, host: bool = False) -> None:
        if self.clock is not None and len(self.items) < self.limit:
            self.items.append((action, start, end, host))

    def records(self, rank: int) -> list[dict]:
        """``{"rank", "action", "start", "end"}`` per interval, in seconds (``rank`` is the pipeline rank)."""
        if self.clock is None:
            return []
        self.clock.synced = False  # CUDA: synchronise once more, then read every event recorded so far
        out = []
        for action, start, end, host in self.items:
            s, e = self.clock.times(start, end, host)
            out.append({"rank": rank, "action": str(action), "start": s, "end": e})
        return out

    def clear(self) -> None:
        self.items = []


class StageWorker:
    """The serving loop of one non-driver rank (see the module docstring)."""

    def __init__(self, topology: Topology, runner: StageRunner, links: Links, board: Board, heartbeat: Heartbeat,
                 mirror: SamplingMirror | None, *, hidden_dim: int, dtype, recorder: Recorder, poll: float,
                 interval: float):
        self.topology, self.runner, self.links, self.board, self.heartbeat = topology, runner, links, board, heartbeat
        self.mirror, self.hidden_dim, self.dtype, self.recorder = mirror, hidden_dim, dtype, recorder
        self.poll, self.interval = poll, interval
        self.k_next = 0  # microbatches are numbered in dispatch order; every stage sees all of them
        self.failure: str | None = None
        self._resume: int | None = 0  # idle round to wait out on the store first (the engine starts idle)

    def serve(self, until: tuple[str, ...] = ("end", "stop")) -> str:
        """Run microbatches until a control message of a kind in ``until`` arrives; return that kind. Raises
        :class:`RankFailure` (after reporting it) when anything fails."""
        if self.failure is not None:
            raise RankFailure(self.failure)
        try:
            while True:
                kind = self._one()
                if kind in until:
                    return kind
        except Exception as error:  # every failure is reported on the board and ends this rank's part
            self.fail(error)
            raise RankFailure(self.failure) from error
        except BaseException as stop:  # KeyboardInterrupt / SystemExit mid-message: close, so peers do not wait
            self.fail(stop)
            raise

    def fail(self, error: BaseException) -> None:
        t = self.topology
        self.failure = f"{t.describe(t.rank)} failed in {self.heartbeat.action}: {error}"
        try:
            self.board.error(t.rank, str(error) if "global rank" in str(error) else self.failure,
                             action=self.heartbeat.action, peer=getattr(error, "peer", None))
        except (RuntimeError, OSError):  # the store went away with the driver: nothing left to tell
            pass
        self.heartbeat.stop("failed")
        self.links.close()

    # ------------------------------------------------------------------ one message

    def _one(self) -> str:
        if self._resume is not None:  # after an ``end`` (and at the start) the driver wakes us through the store
            n, self._resume = self._resume, None
            self._idle(n)
        t, k = self.topology, self.k_next
        stage = t.stage
        receive = Action(stage, Kind.RECV_F, k)
        self.heartbeat.doing(str(receive), "recv")
        waited = time.perf_counter()
        msg, raw = self.links.recv(t.upstream, f"{receive} (the input of microbatch {k})")
        for dst in t.downstream:  # pass the description on first: the next rank posts its receive meanwhile
            self.links.send_raw(dst, raw)
        if isinstance(msg, Control):
            if msg.kind == "idle":
                self._idle(msg.n)
            elif msg.kind == "end":
                self._resume = msg.n
            elif msg.kind == "timeline":
                self.board.set(f"timeline/{msg.n}/{t.rank}", self.recorder.records(stage))
                self.recorder.clear()
            return msg.kind
        if msg.k != k:
            raise RuntimeError(f"{t.describe(t.rank)} expected microbatch {k} but received {msg.k}: the ranks "
                               "disagree on the dispatch order")
        hidden = None
        if not t.is_first:
            n = len(msg.host.ids)
            hidden = self.links.recv_tensor(t.upstream, (1, n, self.hidden_dim), self.dtype, f"{receive}")
        self.recorder.add(receive, waited, time.perf_counter(), host=True)
        forward = Action(stage, Kind.F, k)
        self.heartbeat.doing(str(forward), "compute")
        start = self.recorder.mark()
        out = self.runner.run_stage(msg.host, hidden)
        tokens = logprobs = None
        if self.mirror is not None:
            tokens, logprobs = self.mirror.sample(out, msg.spec, msg.release)
        self.recorder.add(forward, start, self.recorder.mark())
        if not t.is_last:
            send = Action(stage, Kind.SEND_F, k)
            self.heartbeat.doing(str(send), "send")
            posted = time.perf_counter()
            self.links.send_tensor(t.downstream[0], out)
            self.recorder.add(send, posted, posted, host=True)
        elif self.mirror is not None:
            self.links.send(t.driver, Result(k, tokens, logprobs))
        self.k_next = k + 1
        return "run"

    def _idle(self, n: int) -> None:
        """Wait on the store until the driver sets ``wake/<n>`` (it does so on failure too); between waits of
        ``poll`` seconds, fail if the driver stopped answering."""
        t = self.topology
        self.heartbeat.doing(f"idle (waiting for wake/{n})", "idle")
        while True:
            woke = self.board.wait(f"wake/{n}", self.poll)
            stop = self.board.get("stop")
            if stop is not None:
                raise RankFailure(f"{t.describe(t.rank)} was idle when the driver failed: {stop}")
            if woke:
                return
            beat = self.board.get(f"beat/{t.driver}")
            if beat is not None and beat["state"] != "stopped" and time.time() - beat["t"] > 2 * self.interval + 0.5:
                raise RankFailure(f"{t.describe(t.rank)} was idle, waiting for the driver, but the driver "
                                  f"({t.describe(t.driver)}) stopped answering: no heartbeat for "
                                  f"{time.time() - beat['t']:.1f} s (last action {beat['action']})")
