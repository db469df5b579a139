# The engine's sequence: a scheduler Request that also carries its token ids, sampling state and text.
"""One :class:`Sequence` per output sample. A request with ``n > 1`` becomes n sequences (ids ``"<id>"`` for
the first and ``"<id>#<j>"`` for the others) sharing the prompt's cache blocks through the prefix cache; the
engine merges their outputs back into one :class:`RequestOutput` per request.

The scheduler (``pipeloom.schedules.batching.Scheduler``) sees only the Request fields (``prompt_len``,
``max_tokens``, counters, status); the model runner reads ``token_ids``; the sampler reads ``params``,
``generator`` and the prompt/output ids; the detokenizer turns sampled ids into text and decides stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pipeloom.schedules.batching import Request

from .detokenize import IncrementalDetokenizer
from .sampling import SamplingParams


@dataclass(eq=False)
class Sequence(Request):
    """A Request with its tokens (prompt then generated), params, generator and detokenizer."""

    token_ids: list[int] = field(default_factory=list)  # prompt + generated, what the model has seen or will
    params: SamplingParams | None = None
    group_id: str = ""  # the user's request id (all samples of an n > 1 request share it)
    index: int = 0  # sample index within the request
    generator: torch.Generator | None = None  # per-request seeded stream (None: the shared one)
    detokenizer: IncrementalDetokenizer | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per output token: {token id: logprob}
    argmax_only: bool = False  # plain greedy (no penalties, min_tokens, logprobs): sampled by one argmax

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


@dataclass
class CompletionOutput:
    """One sample of a request: its tokens, text, why it ended (None while running), and logprobs if asked."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    logprobs: list[dict[int, float]] | None = None  # per token: {id: logprob} (sampled + top-N)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the engine reports for one request after a step: every sample so far, and the new text since
    the last report (``delta``: per sample index, for streaming)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    delta: dict[int, str] = field(default_factory=dict)
    delta_token_ids: dict[int, list[int]] = field(default_factory=dict)
    queue_time: float | None = None  # seconds from arrival to the first scheduling of sample 0 (None: waiting)
