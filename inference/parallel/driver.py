# The driver of a parallel inference engine: lanes of schedulers, microbatches in flight, tokens back, failures named.
"""``PipelineEngine`` is an :class:`~pipeloom.inference.engine.LLMEngine` whose model is a ``pp x tp`` pipeline.
It runs on the driver rank (global rank 0: the first stage's tensor-parallel rank 0) and keeps everything the
one-process engine keeps - requests, the block manager, the batching policy, detokenizers, outputs - so
``LLM``'s loop, ``AsyncEngine`` and a server use it unchanged. Only ``step`` differs:

* ``p`` *lanes* (``microbatches``, default ``pp``): one :class:`~pipeloom.schedules.batching.Scheduler` each over
  the one block pool, as vLLM's virtual engines and Sarathi-Serve (arXiv 2403.02310 §4.3) run pipelines; a request
  joins the lane with the fewest unfinished requests. Each iteration of a lane is a *microbatch* under that lane's
  token budget (uniform chunks with ``chunked-prefill``).
* ``step`` dispatches the next iteration of every lane that has none in flight - the driver builds it, sends its
  description down the pipeline, runs the first stage, sends the hidden states on - then waits for the oldest
  microbatch's tokens from the sampling rank and applies them. So up to ``p`` microbatches are in flight and a
  request's next decode enters the first stage as soon as its previous token has left the last stage.
* Blocks are shared safely across lanes because every stage runs the microbatches in dispatch order: a block
  freed (or found in the prefix cache) by a later microbatch is written by every earlier one first.

A failed wait (a deadline, a closed link) or any error of the pipeline fails the engine: the driver names the
rank that died or stalled and its action (:func:`~.health.diagnose`), every later call raises the same
:class:`~.health.RankFailure`, and ``healthy`` is False.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from pipeloom.schedules.batching import Iteration, RequestStatus, Scheduler
from pipeloom.schedules.ir import Action, Kind
from pipeloom.schedules.timeline import Timeline

from ..block_manager import BlockManager
from ..engine import LLMEngine, _make_policy
from ..model_runner import host_batch
from ..overlap import Overlap
from .health import Board, Heartbeat, RankFailure, diagnose
from .links import LinkError, Links, Topology
from .stage import Control, Result, Run, SamplingMirror, StageRunner, needs_history
from .worker import Recorder


class LaneSchedulers:
    """``lanes`` Schedulers over one KV capacity; reads like one Scheduler for what looks at all requests."""

    def __init__(self, policy, capacity, lanes: int):
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"parallel.microbatches={lanes!r} must be a positive integer (microbatches in flight)")
        self.policy, self.capacity = policy, capacity
        self.lanes = [Scheduler(policy.fresh(), capacity) for _ in range(lanes)]
        self._last_group: tuple[str | None, int] = (None, 0)

    @property
    def waiting(self):
        return tuple(r for lane in self.lanes for r in lane.waiting)

    @property
    def running(self):
        return tuple(r for lane in self.lanes for r in lane.running)

    def add(self, request, now: float | None = None) -> None:
        """Queue ``request`` on the lane with the fewest unfinished requests (the samples of one request together)."""
        group = getattr(request, "group_id", "") or request.id
        if self._last_group[0] == group:
            lane = self._last_group[1]
        else:
            lane = min(range(len(self.lanes)),
                       key=lambda i: (len(self.lanes[i].waiting) + len(self.lanes[i].running), i))
        self.lanes[lane].add(request, now)
        self._last_group = (group, lane)

    def abort(self, request_id: str):
        for lane in self.lanes:
            request = lane.abort(request_id)
            if request is not None:
                return request
        return None

    def get(self, request_id: str):
        return next((r for lane in self.lanes if (r := lane.get(request_id)) is not None), None)

    def has_unfinished(self) -> bool:
        return any(lane.has_unfinished() for lane in self.lanes)

    def next_wakeup(self, now: float) -> float | None:
        times = [t for lane in self.lanes if (t := lane.next_wakeup(now)) is not None]
        return min(times) if times else None


@dataclass
class _InFlight:
    k: int
    lane: int
    iteration: Iteration
    start: float


class PipelineEngine(LLMEngine):
    """The driver's engine of a parallel model (see the module docstring); built by
    :class:`~pipeloom.inference.parallel.ParallelLLM`, not directly."""

    def __init__(self, *, topology: Topology, runner: StageRunner, links: Links, board: Board, heartbeat: Heartbeat,
                 mirror: SamplingMirror | None, recorder: Recorder, config, tokenizer=None, eos_token_id=None,
                 policy: str = "chunked-prefill", token_budget: int | None = None, max_num_seqs: int | None = None,
                 policy_options: dict | None = None, block_size: int = 16, num_blocks: int,
                 enable_prefix_caching: bool = True, microbatches: int | None = None, timeout: float = 120.0,
                 interval: float = 0.5):
        # what LLMEngine's own methods read (add_request, abort, _output, latency_report, stats, ...)
        self.model, self.config = runner.model, config
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id
        self.device, self.dtype = runner.device, runner.dtype
        self.policy = _make_policy(policy, token_budget, max_num_seqs, policy_options or {})
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = LaneSchedulers(self.policy, self.block_manager, microbatches or topology.pp)
        self.runner = runner
        self.sampler = mirror.sampler if mirror is not None else None
        self.records = []
        self.num_preemptions = 0
        self.groups = {}
        self.overlap, self._overlap, self._needs_tokens = False, Overlap(self), set()  # microbatches overlap instead
        self._lock = threading.RLock()
        self._t0 = time.perf_counter()
        self.max_model_len = config.max_seq_len
        self.idle = False
        # the pipeline
        self.topology, self.links, self.board, self.heartbeat = topology, links, board, heartbeat
        self.mirror, self.recorder, self.timeout, self.interval = mirror, recorder, timeout, interval
        self.lanes_of: list[int] = []  # lane of every microbatch dispatched (the plan's lanes)
        self.failure: str | None = None
        self.stop_error: str | None = None  # what went wrong while stopping, if anything
        self._flight: deque[_InFlight] = deque()
        self._local: dict[int, tuple[list, list]] = {}  # pp == 1: the driver samples its own microbatches
        self._known: set[str] = set()  # sequences whose params the sampling rank has
        self._release: list[str] = []  # sequences it may forget, sent with the next microbatch
        self._idle_round, self._idle_sent = 0, bool(topology.downstream)  # the workers start idle
        self._timeline_round, self._timeline_from = 0, 0

    @property
    def healthy(self) -> bool:
        return self.failure is None

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    # ------------------------------------------------------------------ the loop

    def step(self, finished_only: bool = False) -> list:
        """Dispatch every free lane's next iteration, then apply the oldest microbatch's tokens and return the
        outputs of the requests it advanced (see the module docstring)."""
        with self._lock:
            if self.failure is not None:
                raise RankFailure(self.failure)
            try:
                self._fill()
                if not self._flight:
                    self.idle = True
                    self._go_idle()
                    return []
                self.idle = False
                entry, tokens, logprobs = self._take()
            except Exception as error:  # any failure of the pipeline fails the engine, naming who caused it
                raise self._fail(error) from error
            lane = self.scheduler.lanes[entry.lane]
            outputs = self.apply(lane, entry.iteration, tokens, logprobs, time.perf_counter() - entry.start,
                                 finished_only)
            for sl in entry.iteration.slices:
                if sl.request.status is RequestStatus.FINISHED and sl.request.id in self._known:
                    self._known.discard(sl.request.id)
                    self._release.append(sl.request.id)
            return outputs

    def abort(self, request_id: str):
        with self._lock:
            group = self.groups.get(request_id)
            out = super().abort(request_id)
            for seq in group.seqs if group is not None else ():
                if seq.id in self._known:
                    self._known.discard(seq.id)
                    self._release.append(seq.id)
            return out

    def _fill(self) -> None:
        busy = {e.lane for e in self._flight}
        for lane, sched in enumerate(self.scheduler.lanes):
            if lane not in busy:
                mark, start = self.recorder.mark(), time.perf_counter()
                iteration = sched.schedule(self.now())
                if not iteration.is_empty:
                    self._dispatch(lane, iteration, mark, start)

    def _dispatch(self, lane: int, iteration: Iteration, mark, start: float) -> None:
        """Send microbatch ``k`` down the pipeline and run the first stage on it; its forward in the timeline
        covers the driver's work for it from scheduling on (rank 0 can do nothing else meanwhile)."""
        t = self.topology
        if self._idle_sent:
            self._wake()
        k = len(self.lanes_of)
        host = host_batch(iteration, self.block_manager)
        self.block_manager.mark_computed()  # every later microbatch runs after this one on every stage
        release, self._release = self._release, []
        run = Run(k, lane, host, self._spec(iteration), release)
        self.lanes_of.append(lane)
        forward = Action(0, Kind.F, k)
        self.heartbeat.doing(str(forward), "compute")
        if t.downstream:
            raw = self.links.encode(run)
            for dst in t.downstream:
                self.links.send_raw(dst, raw)
        out = self.runner.run_stage(host)
        if t.is_last:  # one stage (tensor parallel only): the driver samples
            self._local[k] = self.mirror.sample(out, run.spec, release)
        self.recorder.add(forward, mark, self.recorder.mark())
        if not t.is_last:
            posted = time.perf_counter()
            self.links.send_tensor(t.rank_of(1, 0), out)
            self.recorder.add(Action(0, Kind.SEND_F, k), posted, posted, host=True)
        self._flight.append(_InFlight(k, lane, iteration, start))

    def _spec(self, iteration: Iteration) -> list:
        spec = []
        for sl in iteration.slices:
            if sl.samples:
                seq = sl.request
                params = None if seq.id in self._known else seq.params
                self._known.add(seq.id)
                history = (list(seq.prompt_ids), list(seq.output_ids)) if needs_history(seq.params) else None
                spec.append((seq.id, params, history))
        return spec

    def _take(self) -> tuple[_InFlight, list, list]:
        entry = self._flight.popleft()
        if self.topology.is_last:
            tokens, logprobs = self._local.pop(entry.k)
            return entry, tokens, logprobs
        self.heartbeat.doing(f"waiting for the tokens of microbatch {entry.k}", "recv")
        result, _ = self.links.recv(self.topology.sampler_rank,
                                    f"waiting for the tokens of microbatch {entry.k} (lane {entry.lane})")
        if not isinstance(result, Result) or result.k != entry.k:
            raise RuntimeError(f"the sampling rank answered {result!r} while the driver waited for microbatch "
                               f"{entry.k}; the ranks disagree on the dispatch order")
        return entry, result.tokens, result.logprobs

    # ------------------------------------------------------------------ idle periods and control messages

    def _go_idle(self) -> None:
        """Nothing in flight and nothing to run: the workers wait on the store, not on a p2p deadline."""
        if not self._idle_sent and self.topology.downstream:
            self._control("idle", self._idle_round)
            self._idle_sent = True
        self.heartbeat.doing("idle", "idle")

    def _wake(self) -> None:
        self.board.set(f"wake/{self._idle_round}", 1)
        self._idle_round += 1
        self._idle_sent = False

    def _control(self, kind: str, n: int = 0) -> None:
        raw = self.links.encode(Control(kind, n))
        for dst in self.topology.downstream:
            self.links.send_raw(dst, raw)

    def end(self) -> None:
        """A ``generate`` call is over: the workers return from it (and wait on the store until the next one)."""
        with self._lock:
            if self.failure is not None or self._flight:
                return
            if self._idle_sent:
                self._wake()
            self._control("end", self._idle_round)
            self._idle_sent = True

    def stop(self) -> None:
        """Shut the workers down (the engine cannot run afterwards)."""
        with self._lock:
            if self.failure is not None:
                return
            try:
                while self._flight:  # let what is in flight land first
                    self._take()
                if self._idle_sent:
                    self._wake()
                self._control("stop")
                self.links.drain("stop")
            except (LinkError, RuntimeError) as error:  # a rank went first (torchrun stops them all at once)
                self.stop_error = str(error)
            finally:
                self.failure = "the engine was stopped"
                self.heartbeat.stop("stopped")
                self.links.close()

    def timeline(self) -> tuple[Timeline, list[int]]:
        """The measured intervals of every stage since the previous call (microbatches renumbered from 0) and the
        lane of each microbatch; needs ``record_timeline`` and nothing in flight."""
        with self._lock:
            if self._flight:
                raise RuntimeError("timeline() needs the pipeline drained: step until nothing is in flight")
            t, n = self.topology, self._timeline_round
            self._timeline_round += 1
            if self._idle_sent:
                self._wake()
            self._control("timeline", n)
            self._idle_sent = False
            self._go_idle()
            records = self.recorder.records(0)
            self.recorder.clear()
            for stage in range(1, t.pp):
                key = f"timeline/{n}/{t.rank_of(stage, 0)}"
                if not self.board.wait(key, self.timeout):
                    raise self._fail(RuntimeError(f"{t.describe(t.rank_of(stage, 0))} did not publish its timeline "
                                                  f"within {self.timeout:g} s"))
                records += self.board.get(key)
            k0, self._timeline_from = self._timeline_from, len(self.lanes_of)
            for r in records:
                a = Action.parse(r["action"])
                r["action"] = str(Action(a.stage, a.kind, a.microbatch - k0))
            return Timeline.from_records(records, pp=t.pp, unit="s"), self.lanes_of[k0:]

    # ------------------------------------------------------------------ failures

    def _fail(self, error: BaseException) -> RankFailure:
        t = self.topology
        own = f"{t.describe(t.rank)} (the driver) failed in {self.heartbeat.action}: {error}"
        try:
            self.board.error(t.rank, own if not isinstance(error, LinkError) else str(error),
                             action=self.heartbeat.action, peer=getattr(error, "peer", None))
            self.board.set("stop", own)
            self.board.set(f"wake/{self._idle_round}", 1)  # idle workers wake, read the stop, and fail
            deadline = time.time() + 2 * self.interval + 2.0  # a dead rank's heartbeat goes stale meanwhile
            while True:
                culprits, text = diagnose(self.board.statuses(t.pp * t.tp), self.board.errors(t.pp * t.tp),
                                          t.pp * t.tp, now=time.time(), interval=self.interval,
                                          timeout=self.timeout / 2, describe=t.describe, exclude=(t.rank,))
                if culprits or time.time() > deadline:
                    break
                time.sleep(self.interval / 2)
        except (RuntimeError, OSError) as store_error:  # the store is gone too
            text = f"{own} (the store could not be read: {store_error})"
        self.failure = f"parallel engine failed: {text}"
        self.heartbeat.stop("failed")
        self.links.close()
        self._flight.clear()
        for request_id in list(self.groups):
            LLMEngine.abort(self, request_id)
        return RankFailure(self.failure)
