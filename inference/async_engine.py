# AsyncEngine: asyncio front of LLMEngine; per-request output streams, aborts, the model step in a thread.
"""What a server puts behind HTTP::

    engine = AsyncEngine(LLMEngine(model, tokenizer=tok))
    async for out in engine.add_request("r1", "def f(", SamplingParams(max_tokens=32)):
        print(out.delta[0], end="")          # text new since the last output, never half a character
    await engine.abort("r2")                  # ends r2's stream; its KV blocks are freed at once

Tokenization and validation run on the caller's event loop (bad input raises ValueError at ``add_request``,
nothing queued); the model steps run in one background thread (``run_in_executor``), so the event loop keeps
accepting, tokenizing and streaming while the GPU computes. New requests and aborts that arrive during a
step are applied by the engine thread before the next one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor

from .engine import LLMEngine
from .sampling import SamplingParams
from .sequence import RequestOutput


class AsyncEngine:
    """Asyncio wrapper of an :class:`LLMEngine` (see the module docstring)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: list = []  # validated groups waiting for the engine thread
        self._pending_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeloom-engine")
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.errors: list[BaseException] = []

    async def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None, *,
                          priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; returns the async stream of its outputs (the last one ``finished``)."""
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r} is already streaming; request ids must be unique")
        group = self.engine.make_group(request_id, prompt, params, priority=priority)  # ValueError: nothing queued
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        with self._pending_lock:
            self._pending.append(group)
        self._start()
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:  # the consumer went away (client disconnect): stop generating for it
            if self._streams.pop(request_id, None) is not None:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """End a request: its blocks are freed now (or right after the step in flight) and its stream ends."""
        with self._pending_lock:
            queued = [g for g in self._pending if g.request_id == request_id]
            self._pending = [g for g in self._pending if g.request_id != request_id]
        if queued:
            out = None
        elif self.engine._lock.acquire(blocking=False):
            try:
                out = self.engine.abort(request_id)
            finally:
                self.engine._lock.release()
        else:  # a step is running: the engine thread applies it before the next step
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self._executor, self.engine.abort, request_id)
        queue = self._streams.pop(request_id, None)
        if queue is not None and out is not None:
            queue.put_nowait(out)

    # ------------------------------------------------------------------ the background loop

    def _start(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _step(self) -> list[RequestOutput]:
        """On the engine thread: queue what arrived, then one engine step."""
        with self.engine._lock:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            for group in pending:
                self.engine.enqueue(group)
            return self.engine.step()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._pending_lock:
                busy = bool(self._pending)
            if not busy and not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self._step)
            except Exception as err:  # a failed step fails every open stream, with the error
                self.errors.append(err)
                for rid, queue in list(self._streams.items()):
                    queue.put_nowait(err)
                    self.engine.abort(rid)
                self._streams.clear()
                continue
            for out in outputs:
                queue = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            if self.engine.idle:  # nothing runnable: wait for the policy's wakeup or a new request
                wake = self.engine.scheduler.next_wakeup(self.engine.now())
                self._wake.clear()
                timeout = None if wake is None else max(0.0, wake - self.engine.now())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # let the event loop stream and accept between steps

    async def close(self) -> None:
        """Stop the background loop and the engine thread."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
