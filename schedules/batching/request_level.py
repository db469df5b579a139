# Request-level batching policies: static (fixed padded batches) and dynamic (NVIDIA Triton's dynamic batcher).
"""A batch is closed once and runs to completion of its longest member; nobody joins until it is done.

- ``static``: up to ``batch_size`` waiting requests form a batch whenever the previous one is done (the
  baseline Orca, OSDI'22 §2, criticises). Prompts are padded to the longest; a member that finished early
  keeps its seat as padding until the longest is done.
- ``dynamic``: NVIDIA Triton's dynamic batcher (``dynamic_batching { preferred_batch_size,
  max_queue_delay_microseconds, default_queue_policy { max_queue_size } }``): a batch is sent at once when the
  queue reaches the largest preferred size (or ``max_batch_size``), else when the oldest request has waited
  ``max_queue_delay`` seconds, then with the largest preferred size that is queued, or everything up to
  ``max_batch_size``. Beyond ``max_queue_size`` waiting requests, ``add`` raises Rejected.

Padded tokens are counted in ``Iteration.padded_tokens`` (the cost model charges them; the engine computes
nothing for them). KV blocks for every member's whole length (prompt + max_tokens) must be free when the batch
closes, as FasterTransformer-style engines allocate for the maximum, so a closed batch never preempts.
"""

from __future__ import annotations

from typing import ClassVar

from .capacity import blocks_for
from .policy import BatchingError, BatchingPolicy, check_int
from .request import Request, RequestStatus
from .scheduler import Scheduler, Step


class ClosedBatch(BatchingPolicy):
    """Shared machinery: form a batch from the queue's head, then decode it with padding to completion."""

    stall_free = True  # every live member decodes in every iteration of its batch

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._batch: list[Request] = []

    def batch_running(self) -> bool:
        return any(r.status is RequestStatus.RUNNING for r in self._batch)

    def schedule(self, step: Step) -> None:
        if self.batch_running():
            live = [r for r in self._batch if r.status is RequestStatus.RUNNING]
            for r in live:
                step.schedule(r, r.num_uncomputed, victims=lambda v: v in self._batch)
            step.pad(len(self._batch) - len(live))
            return
        self._batch = []
        size = self.batch_size_now(step.scheduler, step.now)
        if size:
            self.close(step, list(step.waiting[:size]))

    def batch_size_now(self, scheduler: Scheduler, now: float) -> int:
        """How many queued requests to batch now (0: wait)."""
        raise NotImplementedError

    def close(self, step: Step, head: list[Request]) -> None:
        """Admit the longest prefix of ``head`` whose padded prompts fit the token budget and whose whole
        lengths fit the free KV blocks; pad the prompts to the longest."""
        members: list[Request] = []
        blocks = 0
        bs = step.capacity.block_size
        for r in head:
            longest = max([m.num_tokens for m in members] + [r.num_tokens])
            blocks += blocks_for(r.prompt_len + r.max_tokens - 1, bs)
            if longest * (len(members) + 1) > step.tokens_left or blocks > step.capacity.num_free_blocks():
                break
            members.append(r)
        for r in members:
            if not step.admit(r, prefix_cache=False):
                raise RuntimeError(f"{self.name}: could not admit {r.id} although its blocks were free")
        if members:
            longest = max(r.num_tokens for r in members)
            step.pad(longest * len(members) - sum(r.num_tokens for r in members))
        self._batch = members

    def check_request(self, request: Request, capacity) -> None:
        super().check_request(request, capacity)
        if request.prompt_len + request.max_tokens - 1 > self.token_limit:
            raise BatchingError(
                f"request {request.id!r}: prompt_len={request.prompt_len} + max_tokens={request.max_tokens} - 1 "
                f"exceeds max_num_batched_tokens={self.max_num_batched_tokens}; raise it"
            )


class Static(ClosedBatch):
    """Fixed batches of up to ``batch_size`` requests, padded, each run to completion of its longest."""

    name = "static"
    options: ClassVar[dict[str, object]] = {"batch_size": 8}

    def check(self) -> None:
        size = check_int(self.name, "batch_size", self.opts["batch_size"])
        if size > self.max_num_seqs:
            raise BatchingError(f"{self.name}: batch_size={size} exceeds max_num_seqs={self.max_num_seqs}")

    def batch_size_now(self, scheduler: Scheduler, now: float) -> int:
        return min(self.opts["batch_size"], len(scheduler.waiting))


class Dynamic(ClosedBatch):
    """NVIDIA Triton's request-level dynamic batcher."""

    name = "dynamic"
    aliases = ("triton",)
    options: ClassVar[dict[str, object]] = {
        "max_batch_size": 8,
        "preferred_batch_sizes": (),  # e.g. (4, 8); empty: max_batch_size is the one preferred size
        "max_queue_delay": 0.0,  # seconds the oldest request may wait for a fuller batch
        "max_queue_size": None,  # waiting requests beyond this are rejected; None: unbounded
    }

    def check(self) -> None:
        size = check_int(self.name, "max_batch_size", self.opts["max_batch_size"])
        if size > self.max_num_seqs:
            raise BatchingError(f"{self.name}: max_batch_size={size} exceeds max_num_seqs={self.max_num_seqs}")
        preferred = self.opts["preferred_batch_sizes"]
        if isinstance(preferred, int):
            preferred = (preferred,)
        preferred = tuple(preferred or ())
        for p in preferred:
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= size:
                raise BatchingError(
                    f"{self.name}: preferred_batch_sizes must hold integers in 1..max_batch_size={size}, got {p!r}"
                )
        self.preferred = tuple(sorted(set(preferred))) or (size,)
        delay = self.opts["max_queue_delay"]
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise BatchingError(f"{self.name}: max_queue_delay must be a number of seconds >= 0, got {delay!r}")
        self.max_queue_size = check_int(self.name, "max_queue_size", self.opts["max_queue_size"], allow_none=True)

    def batch_size_now(self, scheduler: Scheduler, now: float) -> int:
        queued = len(scheduler.waiting)
        if not queued:
            return 0
        if queued >= self.preferred[-1]:
            return self.preferred[-1]
        if now < self._deadline(scheduler):
            return 0
        fitting = [p for p in self.preferred if p <= queued]
        return fitting[-1] if fitting else min(queued, self.opts["max_batch_size"])

    def _deadline(self, scheduler: Scheduler) -> float:
        oldest = min(scheduler.enqueued_at(r) for r in scheduler.waiting)
        return oldest + self.opts["max_queue_delay"]

    def next_wakeup(self, scheduler: Scheduler, now: float) -> float | None:
        if self.batch_running() or not scheduler.waiting:
            return None
        deadline = self._deadline(scheduler)
        return deadline if deadline > now else None
