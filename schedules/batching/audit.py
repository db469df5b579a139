# Checks a Scheduler's iterations against the batching invariants while it runs (tests and the simulator use it).
"""The invariants every policy keeps, checked iteration by iteration.

- limits: at most ``max_num_seqs`` slices and ``max_num_batched_tokens`` (or the token budget) tokens, padding
  included; free KV blocks never negative;
- exactly once: each request's slices cover its tokens contiguously from where its latest admission started (0,
  or its prefix-cache hit), none twice; a preempted request restarts from scratch;
- in order (``fcfs=True``): the requests admitted in an iteration are the head of the waiting queue, in order
  (arrival order under FCFS, (priority, arrival) under priority): nobody overtakes;
- stall-free (``stall_free=True``): every request that was decoding when the iteration was planned and was not
  preempted decodes in it (Sarathi-Serve: no decode waits behind a prompt);
- completion: a request finished for "length" has sampled exactly ``max_tokens`` tokens.

A broken invariant raises :class:`BatchingViolation` naming the iteration (printed) and what broke.
"""

from __future__ import annotations

from collections.abc import Mapping

from .request import Iteration, Request, RequestStatus
from .scheduler import Scheduler


class BatchingViolation(AssertionError):
    """An iteration broke a batching invariant."""


class Auditor:
    """Wraps a Scheduler: ``schedule`` and ``update`` go through it and are checked."""

    def __init__(self, scheduler: Scheduler, fcfs: bool | None = None, stall_free: bool | None = None) -> None:
        policy = scheduler.policy
        self.scheduler = scheduler
        self.fcfs = True if fcfs is None else fcfs  # queue order: arrival (fcfs) or (priority, arrival)
        self.stall_free = getattr(policy, "stall_free", False) if stall_free is None else stall_free
        self.position: dict[Request, int] = {}  # next token each running request must compute
        self.tokens_scheduled: dict[Request, int] = {}  # over the request's whole life, recomputation included
        self.iterations = 0

    def _fail(self, it: Iteration, what: str) -> None:
        raise BatchingViolation(f"{self.scheduler.policy!r}: {what}\n  {it}")

    def schedule(self, now: float) -> Iteration:
        sched, policy = self.scheduler, self.scheduler.policy
        waiting_before = list(sched.waiting)
        decoding = [r for r in sched.running if not r.is_prefilling]
        it = sched.schedule(now)
        if it.num_seqs > policy.max_num_seqs:
            self._fail(it, f"{it.num_seqs} sequences > max_num_seqs={policy.max_num_seqs}")
        if it.num_tokens + it.padded_tokens > policy.token_limit:
            self._fail(it, f"{it.num_tokens}+{it.padded_tokens} padded tokens > the limit {policy.token_limit}")
        if sched.capacity.num_free_blocks() < 0:
            self._fail(it, f"free KV blocks went negative ({sched.capacity.num_free_blocks()})")
        if len(sched.running) > policy.max_num_seqs:
            self._fail(it, f"{len(sched.running)} running requests > max_num_seqs={policy.max_num_seqs}")
        for r in it.preempted:
            self.position.pop(r, None)
            if r.status is not RequestStatus.WAITING or r.num_computed:
                self._fail(it, f"preempted {r.id} is {r.status.value} with {r.num_computed} computed")
        admitted = []
        seen = set()
        for s in it.slices:
            r = s.request
            if r in seen:
                self._fail(it, f"{r.id} appears twice")
            seen.add(r)
            start = self.position.get(r)
            if start is None:  # admitted in this iteration: from scratch or from its prefix-cache hit
                admitted.append(r)
                start = r.num_cached
            if s.first_token != start:
                self._fail(it, f"{r.id} starts at token {s.first_token}, expected {start}")
            if not 1 <= s.n_tokens <= r.num_tokens - s.first_token:
                self._fail(it, f"{r.id} computes {s.n_tokens} tokens from {s.first_token} of {r.num_tokens}")
            if s.samples != (s.end == r.num_tokens):
                self._fail(it, f"{r.id}: samples={s.samples} but the slice ends at {s.end} of {r.num_tokens}")
            self.position[r] = s.end
            self.tokens_scheduled[r] = self.tokens_scheduled.get(r, 0) + s.n_tokens
        if self.fcfs and admitted:
            head = [r for r in waiting_before if r not in it.preempted][: len(admitted)]
            if head != admitted:
                self._fail(it, f"admitted {[r.id for r in admitted]}, the queue's head was {[r.id for r in head]}")
        if self.stall_free:
            for r in decoding:
                if r not in seen and r not in it.preempted and r.status is RequestStatus.RUNNING:
                    self._fail(it, f"decoding {r.id} stalled (no slice, not preempted)")
        self.iterations += 1
        return it

    def update(self, it: Iteration, finished: Mapping[str, str] | None = None) -> list[Request]:
        done = self.scheduler.update(it, finished)
        for r in done:
            self.position.pop(r, None)
            if r.finish_reason == "length":
                if r.num_generated != r.max_tokens or r.num_computed != r.prompt_len + r.max_tokens - 1:
                    raise BatchingViolation(
                        f"{r.id} finished with {r.num_generated}/{r.max_tokens} generated, {r.num_computed} computed"
                    )
        return done

    def __getattr__(self, name):  # the rest of the Scheduler's interface passes through
        return getattr(self.scheduler, name)
