# Requests and iteration plans as data: Request, RequestStatus, Slice, Iteration, Rejected.
"""The values a batching policy reads and writes.

A :class:`Request` is one generation job: a prompt of ``prompt_len`` tokens and at most ``max_tokens``
output tokens. Its progress is two counters: ``num_computed`` (tokens whose KV is in the cache) and
``num_generated`` (output tokens sampled). An :class:`Iteration` is one forward pass of the engine: a list of
:class:`Slice` s, each ``(request, first_token, n_tokens)`` - a prefill chunk or one decode token. Printed, an
iteration reads like a row of ``plan.grid()``::

    it 3  r0 P0+512  r1 D530  r2 D88  | preempt r5

``r0 P0+512`` is a prefill chunk of r0 computing tokens 0..511; ``r1 D530`` a decode computing token 530 (and
sampling the next one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RequestStatus(enum.Enum):
    """Where a request is. A preempted request goes back to WAITING (and recomputes from scratch)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request. Identity semantics (``eq=False``); the Scheduler owns the mutable state."""

    id: str
    prompt_len: int  # >= 1
    max_tokens: int  # >= 1, output tokens to generate at most
    arrival: float = 0.0  # seconds (simulated or wall clock, the caller's choice)
    priority: int = 0  # lower value is served first under order="priority" (vLLM convention)
    num_computed: int = 0  # tokens (prompt + generated) whose KV is in the cache
    num_generated: int = 0  # output tokens sampled so far
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached: int = 0  # prompt tokens found in the prefix cache at its latest admission
    first_scheduled: float | None = None  # first time any of its tokens ran (scheduling delay)
    finish_reason: str | None = None  # "length" (max_tokens), or what the engine reported ("stop", "abort")

    def __post_init__(self) -> None:
        for label, value in (("prompt_len", self.prompt_len), ("max_tokens", self.max_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"request {self.id!r}: {label} must be an integer >= 1, got {value!r}")

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: the prompt and every generated token."""
        return self.prompt_len + self.num_generated

    @property
    def num_uncomputed(self) -> int:
        """Tokens that must run before the next sample (1 for a decode; a whole prompt before the first)."""
        return self.prompt_len + self.num_generated - self.num_computed  # num_tokens - num_computed, inlined

    @property
    def is_prefilling(self) -> bool:
        """True until the prompt (and, after a preemption, the regenerated tokens) has been computed."""
        # num_uncomputed > 1 or nothing generated yet; inlined: policies ask this of every running request
        return self.num_generated == 0 or self.prompt_len + self.num_generated - self.num_computed > 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.id!r}, prompt_len={self.prompt_len}, max_tokens={self.max_tokens}, "
            f"arrival={self.arrival:g}, computed={self.num_computed}, generated={self.num_generated}, "
            f"{self.status.value})"
        )


@dataclass(frozen=True)
class Slice:
    """One request's share of one iteration: tokens ``[first_token, first_token + n_tokens)``."""

    request: Request
    first_token: int  # == request.num_computed when the iteration was planned
    n_tokens: int  # a prefill chunk (>= 1) or 1 for a decode
    samples: bool  # the slice reaches request.num_tokens: the engine samples one token from its last position
    is_decode: bool  # one token of a request that has generated >= 1 token, and it samples

    @property
    def end(self) -> int:
        return self.first_token + self.n_tokens

    def __str__(self) -> str:
        if self.is_decode:
            return f"{self.request.id} D{self.first_token}"
        return f"{self.request.id} P{self.first_token}+{self.n_tokens}"


@dataclass(frozen=True)
class Iteration:
    """One forward pass: which requests run and how many of their tokens (a plan, not a result)."""

    index: int
    slices: tuple[Slice, ...]
    preempted: tuple[Request, ...] = ()
    padded_tokens: int = 0  # tokens static/dynamic batching pads (cost, not computed by the engine)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.n_tokens for s in self.slices if not s.is_decode)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.slices if s.is_decode)

    @property
    def num_tokens(self) -> int:
        return sum(s.n_tokens for s in self.slices)

    @property
    def num_seqs(self) -> int:
        return len(self.slices)

    @property
    def kv_tokens_read(self) -> int:
        """Context tokens the attention reads: each slice reads its request's KV up to its last token."""
        return sum(s.end for s in self.slices)

    @property
    def is_empty(self) -> bool:
        return not self.slices

    def __str__(self) -> str:
        parts = [f"it {self.index}"] + [str(s) for s in self.slices]
        text = "  ".join(parts)
        if self.padded_tokens:
            text += f"  | pad {self.padded_tokens}"
        if self.preempted:
            text += "  | preempt " + " ".join(r.id for r in self.preempted)
        return text


class Rejected(Exception):
    """``Scheduler.add`` refused a request beyond a queue bound (dynamic batching's ``max_queue_size``)."""

    def __init__(self, request: Request, reason: str) -> None:
        super().__init__(f"request {request.id!r} rejected: {reason}")
        self.request = request
        self.reason = reason
