# Overlapped engine steps: schedule and launch iteration i+1 on the host while the GPU still runs iteration i.
"""An iteration's host work (scheduling, batch inputs, launching the graph) otherwise waits for the previous
iteration's tokens. When no running sequence needs a token's VALUE to decide anything (plain greedy: no stop
strings, stop ids or EOS, penalties, min_tokens or logprobs), the scheduler's next decision depends only on
counts: a sequence ends by length. Then, as vLLM's async scheduling does, step ``i + 1``

1. updates the scheduler for iteration ``i`` without its tokens (``Scheduler.update(it, {})``),
2. schedules and launches iteration ``i + 1``: the input id of a sequence whose last token was sampled by
   iteration ``i`` is copied on the device from ``i``'s sampled ids (:meth:`ModelRunner.run`'s ``pending``),
   and its argmax goes to pinned host memory asynchronously,
3. only then waits for iteration ``i``'s tokens, appends them and builds the outputs of what finished.

So the host prepares ``i + 1`` while the device computes ``i``; the tokens and outputs are those of the
sequential engine (tests compare them). Prefix-cache keys of a block that a not-yet-known token completes
are computed one step later, when the token is on the host (``BlockManager`` keys only known tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class InFlight:
    """An iteration launched and not yet received."""

    iteration: object
    rows: list  # the sequences that sample, in row order
    tokens: torch.Tensor  # (R,) int64 on the device: the argmax of each row
    host: torch.Tensor  # (R,) int64, pinned on CUDA: where the tokens are copied
    event: torch.cuda.Event | None  # recorded after the copy (None on CPU: the copy was synchronous)
    row_of: dict[str, int]  # sequence id -> row
    start: float


class Overlap:
    """The engine's overlapped stepping (see the module docstring); ``flight`` is the iteration in flight."""

    def __init__(self, engine):
        self.engine = engine
        self.flight: InFlight | None = None
        self._last = None  # when the previous iteration's tokens arrived
        self.overlapped = 0  # iterations launched while the previous one was still in flight

    def step(self) -> list:
        """Update for the iteration in flight, launch the next one, then receive the one in flight."""
        engine = self.engine
        prev, self.flight = self.flight, None
        done = engine.scheduler.update(prev.iteration, {}) if prev is not None else []
        iteration = engine.scheduler.schedule(engine.now())
        if not iteration.is_empty:
            self.flight = self._launch(iteration, prev)
        engine.idle = iteration.is_empty and prev is None
        return self._receive(prev, done) if prev is not None else []

    def land(self) -> list:
        """Finish the iteration in flight without launching another (before a sequential step)."""
        prev, self.flight = self.flight, None
        if prev is None:
            return []
        return self._receive(prev, self.engine.scheduler.update(prev.iteration, {}))

    def _launch(self, iteration, prev: InFlight | None) -> InFlight:
        engine = self.engine
        start = time.perf_counter()
        pending = None if prev is None else (prev.tokens, prev.row_of)
        self.overlapped += prev is not None
        logits = engine.runner.run(iteration, engine.block_manager, pending)  # (R, V)
        engine.block_manager.mark_computed()
        rows = [sl.request for sl in iteration.slices if sl.samples]
        tokens = logits.argmax(dim=-1)  # (R,)
        cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return InFlight(iteration, rows, tokens, host, event, {s.id: i for i, s in enumerate(rows)}, start)

    def _receive(self, prev: InFlight, done: list) -> list:
        if prev.event is not None:
            prev.event.synchronize()
        now = time.perf_counter()
        duration = now - max(prev.start, self._last or prev.start)  # this iteration's share of the device time
        self._last = now
        tokens = prev.host.tolist()
        return self.engine.apply(self.engine.scheduler, prev.iteration, tokens, [None] * len(tokens), duration,
                                 finished_only=True, done=done, rows=prev.rows)
