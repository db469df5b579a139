# A draft model with its own paged KV cache: each step feeds the draft only the tokens it has not seen yet.
""":class:`CachedDraftProposer` drives a small draft model for speculative decoding the way the engine drives
the target: a :class:`~pipeloom.inference.model_runner.ModelRunner` over a paged KV cache of the draft's own, one
ragged forward per drafted position for all running requests.

Per step and request, the first forward feeds the context the draft's cache does not hold yet (after a verified
step: the accepted drafts the draft has not fed and the target's own token, usually one to k + 1 tokens), and
each further forward feeds the previous draft token; k forwards give k drafts. The cache keeps, per request, the
token ids it holds (``fed``). Before proposing, that record is compared with the request's context: the
positions after their first difference (a rejected draft; the target's resampled token) are dropped and their
blocks freed. So the cache is right whatever the caller does between steps; :meth:`commit` frees the slots of
rejected drafts early, as the engine's contract asks, and :meth:`release` frees a request's blocks.

The forwards that feed one token per request (all but a step's first) replay the runner's CUDA decode graphs on a
GPU, as the engine's decode steps do, and a step's first forward, which feeds one or two tokens once the prompt is
in (the target's token, after the last draft when every draft was accepted), replays a verification graph of two
rows per request. Plain greedy requests (``SamplingParams.plain_greedy``) take the logits' argmax and return no
distributions (greedy verification ignores them); when every request is one and the graphs are in use, the k
forwards chain on the device (each argmax feeds the next graph's token ids there) and the drafts are read once at
the end; otherwise one device read per forward serves all of them.

Drafts are drawn exactly as :class:`~pipeloom.inference.spec_proposers.RecomputeDraftProposer` draws them (the
request's own sampling distribution and generator; its logits from a cached forward instead of a full one), so the
two propose the same tokens for greedy and for seeded requests. A request for which the cache has no free block
gets no drafts this step (allowed by the proposer contract) and the target decodes it alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pipeloom.schedules.batching.request import Iteration, Slice

from .sampling import Sampler
from .spec_decode import _race, sampling_probs
from .spec_proposers import DraftModelProposer, DraftRequest, Proposal


class _Fed:
    """What the runner's decode graphs read of a request: its id and its token ids up to the one fed now."""

    def __init__(self, request_id: str, fed: list[int], feed: list[int]):
        self.id, self.token_ids = request_id, fed + feed


class CachedDraftProposer(DraftModelProposer):
    """A draft model (a pipeloom ``Transformer``) proposing from its own paged KV cache of ``num_blocks`` blocks
    (default: room for 8 sequences of the draft's ``max_seq_len``). ``cuda_graphs``: its one-token forwards replay
    decode graphs (on a GPU; "emulate" replays them uncaptured, for tests) of ``graph_batch_sizes``."""

    def __init__(self, model: torch.nn.Module, *, num_blocks: int | None = None, block_size: int = 16,
                 eos_token_id: int | None = None, backend: str = "auto", cuda_graphs: bool | str = True,
                 graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)):
        from .model_runner import ModelRunner

        per_seq = -(-model.config.max_seq_len // block_size)
        num_blocks = 8 * per_seq if num_blocks is None else num_blocks
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the draft's cache needs at least one block")
        self.model = model
        self.runner = ModelRunner(model, num_blocks, block_size, backend=backend, cuda_graphs=cuda_graphs,
                                  graph_batch_sizes=graph_batch_sizes, verify_tokens=2)
        self.block_size = block_size
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack of free block ids
        self.blocks: dict[str, list[int]] = {}  # request -> its blocks, in order
        self.fed: dict[str, list[int]] = {}  # request -> the token ids whose keys and values the cache holds
        self.sampler = Sampler(eos_token_id=eos_token_id)
        self.starved = 0  # request-steps that got no drafts for want of a free block

    # ------------------------------------------------------------------ cache bookkeeping

    def _keep(self, request_id: str, n: int) -> None:
        """Keep the first ``n`` cached positions of ``request_id``; free the blocks past them."""
        fed = self.fed.get(request_id)
        if fed is None or len(fed) <= n:
            return
        del fed[n:]
        blocks = self.blocks[request_id]
        need = -(-n // self.block_size)
        self.free.extend(reversed(blocks[need:]))
        del blocks[need:]

    def _reserve(self, request_id: str, length: int) -> bool:
        """Blocks for ``length`` positions of ``request_id``; False (nothing taken) when the pool lacks them."""
        blocks = self.blocks.setdefault(request_id, [])
        need = -(-length // self.block_size) - len(blocks)
        if need > len(self.free):
            return False
        blocks.extend(self.free.pop() for _ in range(max(need, 0)))
        return True

    def commit(self, request_id: str, num_tokens: int) -> None:
        """The request holds ``num_tokens`` verified tokens: the last of them (the target's) was never fed here,
        and the draft fed at its position (if any) was rejected, so at most ``num_tokens - 1`` positions stay."""
        self._keep(request_id, max(num_tokens - 1, 0))

    def release(self, request_id: str) -> None:
        self._keep(request_id, 0)
        self.blocks.pop(request_id, None)
        self.fed.pop(request_id, None)
        self.runner.forget(request_id)

    # ------------------------------------------------------------------ proposing

    def _forward(self, ids: list[str], feeds: list[list[int]]) -> torch.Tensor:
        """One ragged forward of the draft: ``feeds[s]`` appended to request ``ids[s]``'s cached tokens; the
        logits (S, V) of each request's last fed token. It runs through the runner's own entries, this cache being
        their block manager: one token each replays a decode graph (:meth:`ModelRunner.run`), up to two a
        verification graph, more an eager ragged forward (:meth:`ModelRunner.run_rows`)."""
        lens = [len(f) for f in feeds]
        iteration = Iteration(0, tuple(Slice(_Fed(i, self.fed[i], f), len(self.fed[i]), n, True, n == 1)
                                       for i, f, n in zip(ids, feeds, lens)))
        if all(n == 1 for n in lens):
            logits = self.runner.run(iteration, self)
        else:
            logits = self.runner.run_rows(iteration, self, np.cumsum(lens) - 1)
        for i, f in zip(ids, feeds):
            self.fed[i].extend(f)
        return logits

    @property
    def tables(self) -> dict[str, list[int]]:
        """Request id -> its blocks: what the runner's host block tables read of a block manager."""
        return self.blocks

    @torch.no_grad()
    def propose_batch(self, requests: Sequence[DraftRequest], k: int) -> list[Proposal]:
        contexts = {r.request_id: list(r.token_ids) for r in requests}
        live = []  # the requests drafted this step
        for r in requests:
            context = contexts[r.request_id]
            fed = self.fed.setdefault(r.request_id, [])
            n = min(len(fed), len(context) - 1)  # the newest token is always fed again: its logits draft
            if fed[:n] != context[:n]:
                n = next(j for j, (a, b) in enumerate(zip(fed, context)) if a != b)
            self._keep(r.request_id, n)
            if self._reserve(r.request_id, len(context) + k - 1):
                live.append(r)
            else:
                self.starved += 1
        tokens = {r.request_id: [] for r in requests}
        probs = {r.request_id: [] for r in requests}
        runner = self.runner
        if (live and all(r.params.plain_greedy for r in live) and runner.use_graphs
                and len(live) <= runner.graph_sizes[-1]):
            self._draft_on_device(live, contexts, tokens, k)
            live = []
        for step in range(k if live else 0):
            ids = [r.request_id for r in live]
            feeds = [contexts[i][len(self.fed[i]):] if step == 0 else tokens[i][-1:] for i in ids]
            logits = self._forward(ids, feeds)  # (S, V)
            argmax = [s for s, r in enumerate(live) if r.params.plain_greedy]
            best = dict(zip(argmax, logits[argmax].argmax(dim=-1).tolist())) if argmax else {}
            for s, r in enumerate(live):
                i = r.request_id
                if s in best:
                    tokens[i].append(best[s])
                    continue
                prompt, output = contexts[i][: r.prompt_len], contexts[i][r.prompt_len :]
                q = sampling_probs(logits[s : s + 1], [r.params], prompt_ids=[prompt],
                                   output_ids=[output + tokens[i]], sampler=self.sampler)[0]  # (V,)
                if r.params.greedy:
                    token = int(q.argmax())
                else:
                    e = torch.empty_like(q).exponential_(generator=r.generator)
                    token = int(_race(q, e))
                tokens[i].append(token)
                probs[i].append(q)
        return [Proposal(tokens[r.request_id], torch.stack(probs[r.request_id]) if probs[r.request_id] else None)
                for r in requests]

    def _draft_on_device(self, live: list[DraftRequest], contexts: dict[str, list[int]], tokens: dict[str, list[int]],
                         k: int) -> None:
        """k greedy drafts of plain greedy requests with ONE device read: each forward's argmax stays on the device
        and feeds the next decode graph's token ids there (the runner's pending tokens, as the engine's overlapped
        steps do); the cache's record of fed tokens holds placeholders until the drafts are read at the end."""
        ids = [r.request_id for r in live]
        row_of = {i: s for s, i in enumerate(ids)}
        best = self._forward(ids, [contexts[i][len(self.fed[i]):] for i in ids]).argmax(dim=-1)  # (S,) device
        drafted = [best]
        for _ in range(k - 1):
            slices = tuple(Slice(_Fed(i, self.fed[i], []), len(self.fed[i]), 1, True, True) for i in ids)
            logits = self.runner.run(Iteration(0, slices), self, pending=(best, row_of))  # (S, V)
            for i in ids:
                self.fed[i].append(-1)  # the draft just fed: its value is on the device
            best = logits.argmax(dim=-1)
            drafted.append(best)
        values = torch.stack(drafted, dim=1).tolist()  # (S, k): the one read
        for i, row in zip(ids, values):
            tokens[i].extend(row)
            if k > 1:
                self.fed[i][-(k - 1):] = row[: k - 1]
