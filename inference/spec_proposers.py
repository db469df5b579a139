# Draft proposers for speculative decoding (prompt lookup by n-gram matching; the draft-model interface).
"""A proposer guesses up to k next tokens of each request; ``spec_decode.rejection_sample`` verifies them.

* :class:`NgramProposer` - prompt lookup decoding (Saxena 2023; vLLM's ``ngram`` method): find the last
  n tokens of the context earlier in the context, for n from ``max_n`` down to ``min_n``, and propose the
  tokens that followed the earliest match. No model, deterministic (q is one-hot).
* :class:`DraftModelProposer` - the interface the engine drives for a small draft model that keeps its
  own (paged) KV cache: ``propose_batch`` per step, ``commit`` after verification (the draft's cache keeps
  the accepted prefix; the slots of rejected drafts are released), ``release`` when a request leaves.
  :class:`RecomputeDraftProposer` implements it by full recomputation (no cache): the reference the
  engine's cached draft must match.

Draft tokens are drawn from the request's own distribution (``spec_decode.sampling_probs``: the same
penalties and filters as the target) with the request's generator, and that distribution is returned as
``Proposal.probs`` so that verification can use ``q``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .sampling import Sampler, SamplingParams
from .spec_decode import _race, sampling_probs, target_logits


@dataclass
class Proposal:
    """Up to k guessed tokens; ``probs`` (n, V) the distributions they were drawn from, None if deterministic."""

    token_ids: list[int]
    probs: torch.Tensor | None = None


@dataclass
class DraftRequest:
    """What a proposer sees of one running request."""

    request_id: str
    token_ids: Sequence[int]  # prompt + output so far
    prompt_len: int  # the first prompt_len of token_ids are the prompt
    params: SamplingParams
    generator: torch.Generator | None = None  # the request's own generator (seeded), else the shared one


class Proposer(abc.ABC):
    """Base of every proposer: ``propose_batch`` for the engine, ``propose`` for one request."""

    @abc.abstractmethod
    def propose_batch(self, requests: Sequence[DraftRequest], k: int) -> list[Proposal]:
        """Up to ``k`` draft tokens for each request (fewer, even none, is allowed)."""

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, *, prompt_len: int,
                generator: torch.Generator | None = None, sampler: Sampler | None = None) -> Proposal:
        """One request's proposal (what ``spec_decode.speculative_generate`` calls)."""
        return self.propose_batch([DraftRequest("0", list(context), prompt_len, params, generator)], k)[0]

    def commit(self, request_id: str, num_tokens: int) -> None:
        """After verification: request ``request_id`` now holds ``num_tokens`` tokens (prompt + accepted
        output); a cached draft drops every position beyond them (its rejected drafts' slots)."""
        return None

    def release(self, request_id: str) -> None:
        """The request finished, was aborted or preempted: free whatever the proposer keeps for it."""
        return None


class NgramProposer(Proposer):
    """Prompt lookup: propose what followed the earliest earlier occurrence of the context's last n tokens."""

    def __init__(self, min_n: int = 1, max_n: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes min_n={min_n}, max_n={max_n} must satisfy 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n

    def find(self, context: Sequence[int], k: int) -> list[int]:
        """The proposed tokens (at most k) for ``context``; [] when no n-gram of the sizes recurs.

        One pass over the context finds where the last token recurred earlier (the ends of the 1-gram matches);
        each longer n keeps the ends whose window also matches one token further back, so the search costs one
        comparison of the context plus a few of the (usually few) candidates, not one per n-gram size."""
        ctx = np.asarray(context, dtype=np.int64)
        if k <= 0 or len(ctx) < 2:
            return []
        ends = np.flatnonzero(ctx[:-1] == ctx[-1])  # window ends e <= T - 2 matching the last token
        longest, first = 0, -1  # the longest n that recurs, and its earliest window end
        for n in range(1, min(self.max_n, len(ctx) - 1) + 1):
            if n > 1:
                ends = ends[ends >= n - 1]
                ends = ends[ctx[ends - (n - 1)] == ctx[-n]]
            if not ends.size:  # no n-gram recurs, so no longer one does
                break
            longest, first = n, int(ends[0])
        return ctx[first + 1 : first + 1 + k].tolist() if longest >= self.min_n else []

    def propose_batch(self, requests: Sequence[DraftRequest], k: int) -> list[Proposal]:
        return [Proposal(self.find(r.token_ids, k), None) for r in requests]


class DraftModelProposer(Proposer):
    """A small model that drafts k tokens autoregressively; subclasses decide how it keeps its KV cache.

    The engine's contract, per decode step of the running requests R:

    1. ``proposals = draft.propose_batch(R, k)``: the draft extends each request by up to k tokens, drawn
       from ``sampling_probs`` of its logits under the request's params, with the request's generator;
    2. the target scores ``context + proposal`` (k + 1 positions per request) in one ragged forward and
       ``rejection_sample`` keeps ``a`` drafts plus one token;
    3. ``draft.commit(id, prompt_len + output_len)``: the draft's cache keeps that many positions, releasing
       the slots of its rejected tokens (the target's cache does the same with its block manager);
    4. ``draft.release(id)`` when the request leaves the batch.
    """


class RecomputeDraftProposer(DraftModelProposer):
    """A draft model run by full recomputation of its context for every token (no cache): the reference."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int | None = None):
        self.model = model
        self.sampler = Sampler(eos_token_id=eos_token_id)

    @torch.no_grad()
    def propose_batch(self, requests: Sequence[DraftRequest], k: int) -> list[Proposal]:
        out = []
        for r in requests:
            context = list(r.token_ids)
            prompt, output = context[: r.prompt_len], context[r.prompt_len :]
            tokens, probs = [], []
            for _ in range(k):
                logits = target_logits(self.model, context + tokens, 1)  # (1, V): the next position
                q = sampling_probs(logits, [r.params], prompt_ids=[prompt], output_ids=[output + tokens],
                                   sampler=self.sampler)[0]  # (V,)
                if r.params.greedy:
                    token = int(q.argmax())
                else:
                    e = torch.empty_like(q).exponential_(generator=r.generator)
                    token = int(_race(q, e))
                tokens.append(token)
                probs.append(q)
            out.append(Proposal(tokens, torch.stack(probs) if probs else None))
        return out
