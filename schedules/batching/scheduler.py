# The Scheduler: waiting/running queues, KV allocation with preemption by recompute, and one Step per iteration.
"""The object the engine (and the serving simulator) drives::

    sched = Scheduler(get_batching("chunked-prefill"), BlockCounter(num_blocks=1024))
    sched.add(Request("r0", prompt_len=600, max_tokens=20))
    while sched.has_unfinished():
        it = sched.schedule(now)            # an Iteration: slices (request, first_token, n_tokens)
        ...run it...
        sched.update(it)                    # advance the counters; finished requests come back

The policy fills each iteration through a :class:`Step`, which keeps the limits for it: seats
(``max_num_seqs``), the token budget, and KV blocks. When a running request cannot get blocks, a victim is
preempted by recompute (vLLM's scheduler; Orca OSDI'22 reserves instead): its blocks are freed, it returns to
the front of the waiting queue with ``num_computed = 0`` and later recomputes its prompt and the tokens it had
generated in its next prefill. Waiting requests are admitted only in iterations that preempted nothing (vLLM v1),
and only in queue order: a head that does not fit blocks the ones behind it (FCFS, no overtaking).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from typing import Callable

from .capacity import KVCapacity, blocks_for
from .policy import BatchingPolicy
from .request import Iteration, Rejected, Request, RequestStatus, Slice


class Step:
    """One iteration under construction, handed to ``policy.schedule``."""

    def __init__(self, scheduler: "Scheduler", now: float) -> None:
        self.scheduler = scheduler
        self.now = now
        self.tokens_left = scheduler.policy.token_limit  # float: math.inf without a limit
        self.preempted: list[Request] = []
        self.padded_tokens = 0
        self._slices: dict[Request, int] = {}  # request -> tokens, in scheduling order
        self.running_at_start: tuple[Request, ...] = tuple(scheduler.running)

    # -- what a policy reads -------------------------------------------------------------------------------
    @property
    def waiting(self) -> Sequence[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> Sequence[Request]:
        return self.scheduler.running

    @property
    def capacity(self) -> KVCapacity:
        return self.scheduler.capacity

    @property
    def seats_left(self) -> int:
        """Slices this iteration may still add."""
        return self.scheduler.policy.max_num_seqs - len(self._slices)

    def scheduled(self, request: Request) -> int:
        """Tokens of ``request`` already in this iteration (0 if none)."""
        return self._slices.get(request, 0)

    def fits(self, request: Request, n_tokens: int, start: int | None = None) -> bool:
        """Whether the free KV blocks would hold ``n_tokens`` more of ``request`` (from ``start``; default its
        computed tokens), without allocating."""
        start = request.num_computed if start is None else start
        bs = self.capacity.block_size
        return blocks_for(start + n_tokens, bs) - blocks_for(start, bs) <= self.capacity.num_free_blocks()

    # -- what a policy does --------------------------------------------------------------------------------
    def schedule(self, request: Request, n_tokens: int, victims: Callable[[Request], bool] | None = None) -> bool:
        """Run ``n_tokens`` of a RUNNING request this iteration, allocating its KV blocks.

        When blocks run out, victims are preempted (the policy's ``preemption`` choice among running requests
        for which ``victims`` is true; default any) until the allocation succeeds; if the victim chosen is
        ``request`` itself it is preempted and False is returned. With no victim left, False.
        """
        if request.status is not RequestStatus.RUNNING or request in self._slices:
            raise RuntimeError(f"{self.scheduler.policy.name}: cannot schedule {request!r} (not running, or twice)")
        if not (1 <= n_tokens <= request.num_uncomputed and n_tokens <= self.tokens_left
                and len(self._slices) < self.scheduler.policy.max_num_seqs):
            self._check_room(request, n_tokens)  # raises, naming what was exceeded
        while not self.capacity.allocate(request, n_tokens):
            candidates = [r for r in self.scheduler.running if victims is None or victims(r) or r is request]
            victim = self.scheduler.pick_victim(candidates)
            if victim is None:
                return False
            self.preempt(victim)
            if victim is request:
                return False
        self._slices[request] = n_tokens
        self.tokens_left -= n_tokens
        return True

    def admit(self, request: Request, limit: int | None = None, prefix_cache: bool = True) -> int:
        """Move the waiting ``request`` to running with its first chunk; return the tokens scheduled (0: no).

        After a prefix-cache lookup it starts at the cached tokens. ``limit`` None schedules the whole rest
        (prompt + regenerated tokens) or nothing; an int schedules ``min(rest, limit)``. Admission never
        preempts: it needs a free seat, the tokens within the budget, and the blocks free.
        """
        if request.status is not RequestStatus.WAITING:
            raise RuntimeError(f"{self.scheduler.policy.name}: cannot admit {request!r} (not waiting)")
        if self.seats_left < 1 or len(self.scheduler.running) >= self.scheduler.policy.max_num_seqs:
            return 0
        cached = self.capacity.cached_prefix(request) if prefix_cache else 0
        if not 0 <= cached < request.num_tokens:
            raise RuntimeError(
                f"{type(self.capacity).__name__}.cached_prefix({request.id!r}) returned {cached}; it must be in "
                f"[0, num_tokens={request.num_tokens}) so that the last token is computed and sampled from"
            )
        rest = request.num_tokens - cached
        n = rest if limit is None else min(rest, limit)
        if n < 1 or n > self.tokens_left:
            return 0
        request.num_computed = cached
        if not self.capacity.allocate(request, n):
            request.num_computed = 0
            return 0
        request.num_cached = cached
        self.scheduler._start(request)
        self._slices[request] = n
        self.tokens_left -= n
        return n

    def pad(self, n_tokens: int) -> None:
        """Count ``n_tokens`` padding tokens in this iteration (static/dynamic batching)."""
        if n_tokens > self.tokens_left:
            raise RuntimeError(f"{self.scheduler.policy.name}: padding {n_tokens} exceeds the token budget")
        self.padded_tokens += n_tokens
        self.tokens_left -= n_tokens

    def preempt(self, victim: Request) -> None:
        """Preempt a running request by recompute (frees its blocks; back to the waiting queue's front)."""
        n = self._slices.pop(victim, 0)
        self.tokens_left += n
        self.scheduler._preempt(victim)
        self.preempted.append(victim)

    def _check_room(self, request: Request, n_tokens: int) -> None:
        if not 1 <= n_tokens <= request.num_uncomputed:
            raise RuntimeError(
                f"{self.scheduler.policy.name}: {request.id} has {request.num_uncomputed} tokens to compute, "
                f"asked for {n_tokens}"
            )
        if n_tokens > self.tokens_left or self.seats_left < 1:
            raise RuntimeError(
                f"{self.scheduler.policy.name}: scheduling {n_tokens} tokens of {request.id} exceeds the "
                f"iteration's limits ({self.tokens_left} tokens, {self.seats_left} seats left)"
            )

    def build(self, index: int) -> Iteration:
        slices = []
        for r, n in self._slices.items():
            samples = r.num_computed + n == r.num_tokens
            slices.append(Slice(r, r.num_computed, n, samples, n == 1 and samples and r.num_generated >= 1))
        return Iteration(index, tuple(slices), tuple(self.preempted), self.padded_tokens)


class Scheduler:
    """Holds the queues and the KV capacity; asks ``policy`` to fill each iteration."""

    def __init__(self, policy: BatchingPolicy, capacity: KVCapacity) -> None:
        if not isinstance(policy, BatchingPolicy):
            raise TypeError(f"Scheduler needs a BatchingPolicy (get_batching(name)), got {policy!r}")
        self.policy = policy
        self.capacity = capacity
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self._seq: dict[Request, int] = {}
        self._enqueued: dict[Request, float] = {}
        self._counter = itertools.count()
        self._index = 0
        self._in_flight: Iteration | None = None

    # -- queues --------------------------------------------------------------------------------------------
    @property
    def waiting(self) -> Sequence[Request]:
        return tuple(self._waiting)

    @property
    def running(self) -> Sequence[Request]:
        return tuple(self._running)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def enqueued_at(self, request: Request) -> float:
        """When ``request`` joined the waiting queue (``add``'s ``now``, else its arrival)."""
        return self._enqueued[request]

    def _key(self, r: Request):
        return (r.priority, r.arrival, self._seq[r]) if self.policy.order == "priority" else (self._seq[r],)

    def _insert_waiting(self, request: Request, front: bool = False) -> None:
        if self.policy.order == "fcfs":
            self._waiting.insert(0, request) if front else self._waiting.append(request)
        else:  # priority: kept sorted by (priority, arrival, order added), as vLLM v1's priority queue
            keys = [self._key(r) for r in self._waiting]
            self._waiting.insert(bisect.bisect(keys, self._key(request)), request)

    def add(self, request: Request, now: float | None = None) -> None:
        """Queue ``request`` (status WAITING). Raises Rejected beyond the policy's queue bound."""
        if request.id in self._by_id:
            raise ValueError(f"a request with id {request.id!r} is already scheduled; ids must be unique")
        if request.status is not RequestStatus.WAITING or request.num_computed:
            raise ValueError(f"request {request.id!r} is {request.status.value}; add a fresh request")
        self.policy.check_request(request, self.capacity)
        bound = self.policy.max_queue_size
        if bound is not None and len(self._waiting) >= bound:
            raise Rejected(request, f"the waiting queue is full (max_queue_size={bound})")
        self._by_id[request.id] = request
        self._seq[request] = next(self._counter)
        self._enqueued[request] = request.arrival if now is None else now
        self._insert_waiting(request)

    def abort(self, request_id: str) -> Request | None:
        """End a request now (frees its blocks; finish_reason "abort"); None if no such unfinished request."""
        request = self._by_id.get(request_id)
        if request is None:
            return None
        self._finish(request, "abort")
        return request

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def pick_victim(self, candidates: Sequence[Request]) -> Request | None:
        """The request to preempt among ``candidates`` under the policy's ``preemption`` and ``order``."""
        if not candidates:
            return None
        prio = self.policy.order == "priority"
        if self.policy.preemption == "last-arrived":  # vLLM v1: running.pop(), or max (priority, arrival)
            return max(candidates, key=lambda r: ((r.priority,) if prio else ()) + (r.arrival, self._seq[r]))
        return min(  # fewest computed tokens lose least work; ties: the later arrival
            candidates, key=lambda r: ((-r.priority,) if prio else ()) + (r.num_computed, -r.arrival, -self._seq[r])
        )

    # -- the iteration loop --------------------------------------------------------------------------------
    def schedule(self, now: float) -> Iteration:
        """The next iteration (possibly empty: nothing runnable now). update() must follow a non-empty one."""
        if self._in_flight is not None:
            raise RuntimeError(
                f"schedule() called while iteration {self._in_flight.index} is in flight; call update() first"
            )
        step = Step(self, now)
        self.policy.schedule(step)
        preempted = list(step.preempted)
        while not step._slices and step.preempted and self.has_unfinished():  # preemptions changed the state
            step = Step(self, now)
            self.policy.schedule(step)
            preempted += step.preempted
        step.preempted = preempted
        iteration = step.build(self._index)
        self._check(iteration)
        if not iteration.is_empty:
            self._index += 1
            self._in_flight = iteration
            for s in iteration.slices:
                if s.request.first_scheduled is None:
                    s.request.first_scheduled = now
        return iteration

    def _check(self, it: Iteration) -> None:
        """The limits hold for any policy, built-in or not."""
        p = self.policy
        if it.num_seqs > p.max_num_seqs or it.num_tokens + it.padded_tokens > p.token_limit:
            raise RuntimeError(
                f"{p.name} broke its limits in iteration {it}: {it.num_seqs} seqs, {it.num_tokens} tokens"
            )

    def update(self, iteration: Iteration, finished: Mapping[str, str] | None = None) -> list[Request]:
        """Apply a finished iteration: advance the counters; return the requests that finished.

        ``finished`` maps request ids the engine ended (EOS, a stop string: "stop") to their reasons.
        """
        if iteration is not self._in_flight:
            if iteration.is_empty:
                return []
            raise RuntimeError(f"update() got iteration {iteration.index}, which is not the one in flight")
        self._in_flight = None
        done: list[Request] = []
        for s in iteration.slices:
            r = s.request
            if r.status is not RequestStatus.RUNNING:  # aborted while in flight
                continue
            if s.first_token != r.num_computed:
                raise RuntimeError(f"{r.id}: slice starts at {s.first_token}, request has {r.num_computed} computed")
            r.num_computed += s.n_tokens
            if s.samples:
                r.num_generated += 1
                if r.num_generated >= r.max_tokens:
                    self._finish(r, "length")
                    done.append(r)
        for request_id, reason in (finished or {}).items():
            r = self._by_id.get(request_id)
            if r is not None:
                self._finish(r, reason)
                done.append(r)
        return done

    def next_wakeup(self, now: float) -> float | None:
        """When an empty schedule() may change without a new request or update (dynamic's queue delay)."""
        return self.policy.next_wakeup(self, now)

    # -- state changes (through Step and update) ----------------------------------------------------------
    def _start(self, request: Request) -> None:
        self._waiting.remove(request)
        self._running.append(request)
        request.status = RequestStatus.RUNNING

    def _preempt(self, request: Request) -> None:
        self.capacity.free(request)
        self._running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_computed = 0
        request.num_cached = 0
        request.num_preemptions += 1
        self._insert_waiting(request, front=True)

    def _finish(self, request: Request, reason: str) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.capacity.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._by_id[request.id], self._seq[request], self._enqueued[request]
