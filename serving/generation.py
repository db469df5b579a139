# What every protocol shares: tokenize, check, admit, start a request in the AsyncEngine, stream deltas, abort on exit.
"""``Generation`` is the one path from a protocol handler to the engine::

    stream = await gen.start(gen.request_id("cmpl"), prompt_ids, params)   # 400 / 429 / 500 raised here
    async with stream:                                                      # leaving early aborts it
        async for deltas in stream:                                         # ChoiceDelta per changed choice
            ...
    stream.final                                                            # the last RequestOutput

Errors come before anything is streamed (so HTTP can still answer with a status). Leaving the ``async with``
before the request finished (client disconnect, cancel, an exception) aborts it in the engine from a task of
its own, so the abort happens even when the handler itself is being cancelled: the request's KV blocks are
freed at once, or right after the step in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from pipeloom.inference import AsyncEngine, RequestOutput, SamplingParams

from .admission import Admission, Ticket
from .chat import ChatTemplate
from .errors import APIError, bad_request
from .metrics import Metrics, RequestTimer
from .settings import ServerSettings


@dataclass
class ChoiceDelta:
    """What one choice (sample) gained in one engine output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)  # one {token id: logprob} per new token
    finish_reason: str | None = None  # set on the delta that ends the choice
    stop_reason: str | int | None = None


def _param_of(message: str) -> str | None:
    """The field an engine ValueError names (``temperature=-1 must ...`` -> temperature)."""
    if message.startswith("Input length") or message.startswith("prompt"):
        return "prompt"
    match = re.match(r"(\w+)=", message)
    return match.group(1) if match else None


async def _close_quietly(iterator) -> None:
    """Finalize an async generator; one still running (its consumer is being cancelled) finishes by itself."""
    with contextlib.suppress(RuntimeError):
        await iterator.aclose()


class RequestStream:
    """One admitted request's outputs as lists of :class:`ChoiceDelta`; use as ``async with`` (see module)."""

    def __init__(self, gen: Generation, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 source: AsyncIterator[RequestOutput], ticket: Ticket, timer: RequestTimer):
        self.gen, self.request_id, self.prompt_ids, self.params = gen, request_id, prompt_ids, params
        self.source, self.ticket, self.timer = source, ticket, timer
        self.final: RequestOutput | None = None
        self.finished = self.closed = False
        self._sent_tokens = [0] * params.n
        self._sent_text = [0] * params.n
        self._ended = [False] * params.n
        self._iterator: AsyncIterator | None = None

    def __aiter__(self) -> AsyncIterator[list[ChoiceDelta]]:
        self._iterator = self._iterate()
        return self._iterator

    async def _iterate(self) -> AsyncIterator[list[ChoiceDelta]]:
        async for out in self.source:
            deltas = self._deltas(out)
            new_tokens = sum(len(d.token_ids) for d in deltas)
            if new_tokens:
                self.ticket.first_token()
            self.timer.output(new_tokens, out.queue_time)
            if out.finished:
                self.final, self.finished = out, True
                self.ticket.release()
                self.timer.finish([o.finish_reason or "abort" for o in out.outputs], len(self.prompt_ids))
            yield deltas
            if out.finished:
                return

    def _deltas(self, out: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for o in out.outputs:
            j = o.index
            tokens, text = o.token_ids[self._sent_tokens[j]:], o.text[self._sent_text[j]:]
            ends = o.finish_reason is not None and not self._ended[j]
            if not tokens and not text and not ends:
                continue
            logprobs = list(o.logprobs[self._sent_tokens[j]:]) if o.logprobs is not None else []
            self._sent_tokens[j] += len(tokens)
            self._sent_text[j] += len(text)
            self._ended[j] = self._ended[j] or ends
            deltas.append(ChoiceDelta(j, text, list(tokens), logprobs, o.finish_reason if ends else None,
                                      o.stop_reason if ends else None))
        return deltas

    def close(self) -> None:
        """Give back the admission ticket and, if unfinished, abort in the engine (idempotent, never awaits)."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self.ticket.release()
            self.timer.finish(["abort"], len(self.prompt_ids))
            self.gen.abort_soon(self.request_id)
        for it in (self._iterator, self.source):
            if it is not None:
                self.gen.spawn(_close_quietly(it))

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    async def collect(self) -> RequestOutput:
        """Run to the end; the final output (every choice's text, tokens, logprobs, finish reason)."""
        async with self:
            async for _ in self:
                pass
        return self.final


class Generation:
    """The shared path to one :class:`AsyncEngine` (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, *, model_name: str,
                 chat_template: ChatTemplate | None = None):
        self.engine, self.llm, self.settings = engine, engine.engine, settings
        self.model_name = model_name
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.max_model_len
        self.chat_template = chat_template or ChatTemplate()
        self.admission = Admission(settings.max_requests, settings.max_queued_tokens)
        self.metrics = Metrics(self.llm, model_name)
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")

    @property
    def dead(self) -> str | None:
        """Why the engine is dead (a step raised; its state is unknown), or None while it is healthy."""
        if self.engine.errors:
            err = self.engine.errors[0]
            return f"{type(err).__name__}: {err}"
        return None

    def check_alive(self) -> None:
        if self.dead:
            raise APIError(500, f"the engine is dead ({self.dead}); restart the server")

    # ------------------------------------------------------------------ text

    def encode(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        """Token ids of a prompt given as text or as ids (ids are checked against the vocabulary later)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this model has no tokenizer: send the prompt as a list of token ids", param)
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer, so token ids cannot be turned into text", "tokens")
        vocab = self.llm.config.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise bad_request(f"token id {t} is outside the vocabulary [0, {vocab})", "tokens")
        return self.tokenizer.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        """One token as text (logprobs); ``token_id:N`` without a tokenizer."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def render_chat(self, messages: list, add_generation_prompt: bool = True) -> str:
        return self.chat_template.render([{"role": m.role, "content": m.text()} for m in messages],
                                         add_generation_prompt)

    # ------------------------------------------------------------------ requests

    @staticmethod
    def request_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def max_tokens_for(self, requested: int | None, prompt_len: int) -> int:
        """``requested`` or, when None, the rest of the context (the engine stops at the context length)."""
        return max(1, self.max_model_len - prompt_len + 1) if requested is None else requested

    async def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Admit and queue a request; 400 (bad input), 429 (overloaded) or 500 (dead engine) before anything runs."""
        self.check_alive()
        try:
            ticket = self.admission.admit(params.n, len(prompt_ids))
        except APIError as err:
            if err.status == 429:
                self.metrics.rejected.labels(self.model_name).inc()
            raise
        try:
            source = await self.engine.add_request(request_id, prompt_ids, params)
        except ValueError as err:
            ticket.release()
            raise bad_request(str(err), _param_of(str(err))) from err
        return RequestStream(self, request_id, prompt_ids, params, source, ticket, self.metrics.timer())

    def params(self, fields, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
        """SamplingParams from a request's sampling fields; a bad combination is a 400 naming the field."""
        if fields.n > self.settings.max_n:
            raise bad_request(f"n={fields.n} is more than this server's server.max_n={self.settings.max_n}", "n")
        try:
            return fields.sampling_params(max_tokens, logprobs)
        except ValueError as err:
            raise bad_request(str(err), _param_of(str(err))) from err

    def abort_soon(self, request_id: str) -> None:
        """Abort in a task of its own: it runs even when the caller is being cancelled."""
        self.spawn(self.engine.abort(request_id))

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
