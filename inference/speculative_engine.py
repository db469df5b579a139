# Speculative decoding inside continuous batching: drafts verified in the iteration's one ragged forward.
"""``SpeculativeEngine`` is an :class:`~pipeloom.inference.engine.LLMEngine` whose decode slices carry guesses.

Per iteration (the batching policy schedules exactly what it would without speculation):

1. every decode slice of a request without logprobs asks the proposer (prompt lookup by default,
   :class:`~pipeloom.inference.spec_proposers.NgramProposer`; or a draft model, whose distributions ``q`` the
   acceptance rule then uses) for up to ``k`` tokens that follow its context,
   never more than its ``max_tokens`` leave; the cache slots for them are taken from the block manager with a
   request that carries no token ids (nothing is keyed for the prefix cache, the tokens are guesses); a request
   the pool cannot extend gets no drafts;
2. the slice becomes ``1 + d`` tokens (its last token, then the drafts) and the whole iteration - prefill
   chunks, plain decodes and extended decodes - runs as ONE ragged forward through the model runner, with the
   logits of every extended slice's positions (on a GPU, an iteration whose slices bring at most ``1 + k``
   tokens each replays a verification CUDA graph: :class:`~pipeloom.inference.decode_graphs.VerifyGraphs`);
3. :func:`~pipeloom.inference.spec_decode.rejection_sample` keeps a prefix of each request's drafts and adds
   one token (the resampled first rejection or the bonus token), so the output is distributed exactly as the
   target's own sampling (Leviathan et al., arXiv 2211.17192); greedy requests get exactly the target's greedy
   tokens (plain greedy ones by one argmax read, without building distributions). Rows without drafts are
   sampled by the engine's own sampler, as without speculation;
4. the tokens go through the detokenizer one at a time (a stop token or string ends the request there); the
   block table is truncated to the tokens whose keys and values are now valid (the rejected drafts' slots are
   released; blocks crossing the boundary go back to the pool) and the full blocks are keyed for the prefix
   cache; the scheduler's counters advance by the tokens accepted beyond the one it planned.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pipeloom.schedules.batching import IterationRecord
from pipeloom.schedules.batching.request import Iteration, Slice

from .engine import LLMEngine
from .spec_decode import SpecStats, position_histories, rejection_sample, sampling_probs
from .spec_proposers import DraftRequest, NgramProposer, Proposer

SPECULATIVE_METHODS = ("none", "ngram", "draft")


class _KeylessRequest:
    """What the block manager sees when it allocates draft slots: the request's id and counter, no tokens."""

    def __init__(self, request):
        self.id, self.num_computed = request.id, request.num_computed


class SpeculativeEngine(LLMEngine):
    """An LLMEngine that verifies ``num_speculative_tokens`` proposed tokens per decode (module docstring).

    ``proposer``: a :class:`~pipeloom.inference.spec_proposers.Proposer` (default: prompt lookup with n-grams of
    ``ngram_min`` to ``ngram_max`` tokens). ``verify_attention``: how the verification graphs attend, "tiles" or
    "split" (:meth:`~pipeloom.inference.model_runner.ModelRunner.verify_forward`). Other keyword arguments are the
    LLMEngine's. ``spec_stats`` counts proposed and accepted tokens.
    """

    def __init__(self, model: torch.nn.Module, *, num_speculative_tokens: int = 4, proposer: Proposer | None = None,
                 ngram_min: int = 1, ngram_max: int = 3, verify_attention: str = "tiles", **engine_options):
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"inference.num_speculative_tokens={num_speculative_tokens!r} must be an integer >= 1")
        self.verify_tokens = 1 + num_speculative_tokens  # the runner graphs verification steps of this size
        self.verify_attention = verify_attention
        # no overlapped steps: which drafts are proposed and kept depends on every token's value
        super().__init__(model, **{**engine_options, "overlap": False})
        self.k = num_speculative_tokens
        self.proposer = proposer if proposer is not None else NgramProposer(ngram_min, ngram_max)
        self.spec_stats = SpecStats()
        self._draft_probs: dict[int, torch.Tensor] = {}  # slice index -> the draft model's q (d, V), this step

    # ------------------------------------------------------------------ the loop

    def step(self, finished_only: bool = False):
        """One iteration with drafts verified (see the module docstring); outputs as ``LLMEngine.step``."""
        with self._lock:
            iteration = self.scheduler.schedule(self.now())
            self.idle = iteration.is_empty
            if iteration.is_empty:
                return []
            start = time.perf_counter()
            drafts = self._propose(iteration)  # slice index -> draft tokens (slots allocated)
            drafted = {iteration.slices[i].request.id for i in drafts}
            rows = [sl.request for sl in iteration.slices if sl.samples]
            if drafts:
                ran, emitted, logprobs = self._verify(iteration, drafts)
            else:
                ran = iteration
                new_tokens, logprobs = self._sample(self.runner.run(iteration, self.block_manager), rows)
                emitted = [[t] for t in new_tokens]
            duration = time.perf_counter() - start
            ended, deltas, extra = {}, {}, {}
            for seq, tokens, lp in zip(rows, emitted, logprobs):
                detok = seq.detokenizer
                taken = len(detok.token_ids)
                if finished_only:
                    for token in tokens:
                        detok.push(token)
                        if detok.finished:
                            break
                else:
                    text = detok.add(tokens)
                taken = len(detok.token_ids) - taken  # tokens kept (a stop ends the list there)
                seq.token_ids.extend(tokens[:taken])
                if lp is not None:
                    seq.logprobs.append(lp)
                if not finished_only:
                    deltas.setdefault(seq.group_id, {})[seq.index] = (text, tokens[taken - 1])
                if seq.id in drafted:  # an extended decode: keys/values valid up to the last kept token
                    valid = seq.num_computed + taken
                    self.block_manager.truncate(seq, valid)
                    self.block_manager.key_computed(seq, valid)
                    extra[seq.id] = taken - 1
                if detok.finished:
                    ended[seq.id] = detok.finish_reason
                elif seq.num_generated + taken >= seq.max_tokens:
                    ended[seq.id] = "length"
            self.block_manager.mark_computed()
            done = self.scheduler.update(iteration, ended)
            for seq in rows:
                if seq.id in drafted:  # a cached draft keeps the accepted prefix (spec_proposers' contract)
                    self.proposer.commit(seq.id, len(seq.token_ids))
            for seq in list(done) + list(iteration.preempted):
                self.proposer.release(seq.id)
            for seq in rows:  # the scheduler advanced one token; the accepted drafts are the rest
                if seq.id in extra and not seq.is_finished:
                    seq.num_computed += extra[seq.id]
                    seq.num_generated += extra[seq.id]
            self.records.append(IterationRecord.from_iteration(ran, duration))
            self.num_preemptions += len(iteration.preempted)
            return self._report(done, deltas, finished_only)

    def _report(self, done, deltas, finished_only: bool):
        """Finish the ended sequences and build the outputs (as ``LLMEngine.step`` does)."""
        for seq in done:
            self.runner.forget(seq.id)
            self._needs_tokens.discard(seq.id)
            if finished_only:
                seq.detokenizer.finish(seq.finish_reason)
                deltas.setdefault(seq.group_id, {})[seq.index] = (seq.detokenizer.text, seq.token_ids[-1])
            elif not seq.detokenizer.finished:
                text = seq.detokenizer.finish(seq.finish_reason)
                old = deltas.setdefault(seq.group_id, {}).get(seq.index, ("", None))
                deltas[seq.group_id][seq.index] = (old[0] + text, old[1])
            self.groups[seq.group_id].finish[seq.index] = seq.finish_reason
        outputs = []
        for group_id, group_deltas in deltas.items():
            group = self.groups[group_id]
            if finished_only and not group.finished:
                continue
            outputs.append(self._output(group, group_deltas))
            if group.finished:
                del self.groups[group_id]
        return outputs

    # ------------------------------------------------------------------ drafts

    def _propose(self, iteration) -> dict[int, list[int]]:
        """Drafts for the iteration's decode slices, their cache slots allocated; {slice index: tokens}. A draft
        model's distributions (``Proposal.probs``) are kept in ``self._draft_probs`` for the acceptance rule."""
        wanted, requests = [], []
        for i, sl in enumerate(iteration.slices):
            seq = sl.request
            budget = min(self.k, seq.max_tokens - seq.num_generated - 1)
            if sl.is_decode and budget > 0 and seq.params.logprobs is None:
                wanted.append((i, budget))
                requests.append(DraftRequest(seq.id, seq.token_ids, seq.prompt_len, seq.params, seq.generator))
        if not wanted:
            return {}
        proposals = self.proposer.propose_batch(requests, self.k)
        drafts, self._draft_probs = {}, {}
        for (i, budget), proposal in zip(wanted, proposals):
            draft = list(proposal.token_ids)[:budget]
            seq = iteration.slices[i].request
            if draft and self.block_manager.allocate(_KeylessRequest(seq), 1 + len(draft)):
                drafts[i] = draft
                if proposal.probs is not None:
                    self._draft_probs[i] = proposal.probs[: len(draft)]  # (d, V)
        return drafts

    # ------------------------------------------------------------------ verification

    @torch.inference_mode()
    def _verify(self, iteration, drafts: dict[int, list[int]]):
        """(the iteration that ran, tokens per sampled row, logprobs per sampled row) with the drafts scored in
        one ragged forward."""
        slices, starts, at = [], [], 0
        for i, sl in enumerate(iteration.slices):
            d = len(drafts.get(i, ()))
            if d:
                sl.request.token_ids.extend(drafts[i])  # the runner reads the tokens it runs from here
            slices.append(Slice(sl.request, sl.first_token, sl.n_tokens + d, sl.samples, sl.is_decode and not d))
            starts.append(at)
            at += sl.n_tokens + d
        ran = Iteration(iteration.index, tuple(slices), iteration.preempted, iteration.padded_tokens)
        try:
            row_ids = []
            for i, sl in enumerate(slices):
                if sl.samples:
                    first = starts[i] + (sl.n_tokens - 1 - len(drafts.get(i, ())))
                    row_ids.extend(range(first, starts[i] + sl.n_tokens))
            logits = self.runner.run_rows(ran, self.block_manager, np.array(row_ids, dtype=np.int64))  # (R', V)
        finally:
            for i, draft in drafts.items():
                del iteration.slices[i].request.token_ids[-len(draft):]
        plain, spec, at = [], [], 0  # (sampled row, logits row) / (sampled row, slice index, first logits row)
        row = 0
        for i, sl in enumerate(iteration.slices):
            if not sl.samples:
                continue
            if i in drafts:
                spec.append((row, i, at))
                at += len(drafts[i]) + 1
            else:
                plain.append((row, at))
                at += 1
            row += 1
        seqs = [sl.request for sl in iteration.slices if sl.samples]
        emitted: list[list[int]] = [[] for _ in seqs]
        logprobs: list[dict | None] = [None] * len(seqs)
        if plain:
            tokens, lps = self._sample(logits[[r for _, r in plain]], [seqs[s] for s, _ in plain])
            for (s, _), token, lp in zip(plain, tokens, lps):
                emitted[s], logprobs[s] = [token], lp
        if spec:
            for (s, _, _), tokens in zip(spec, self._accept(logits, spec, drafts, seqs)):
                emitted[s] = tokens
        return ran, emitted, logprobs

    def _accept(self, logits: torch.Tensor, spec, drafts, seqs) -> list[list[int]]:
        """rejection_sample over the extended rows: per row the accepted drafts and one more token."""
        if all(seqs[s].params.plain_greedy for s, _, _ in spec):
            return self._accept_greedy(logits, spec, drafts)
        k = max(len(drafts[i]) for _, i, _ in spec)
        V = logits.size(1)
        target = torch.zeros(len(spec), k + 1, V, dtype=logits.dtype, device=logits.device)  # (B, k+1, V)
        draft_ids = torch.full((len(spec), k), -1, dtype=torch.long, device=logits.device)  # (B, k)
        q = None  # deterministic proposals (prompt lookup); a draft model's distributions otherwise
        if self._draft_probs:
            q = torch.full((len(spec), k, V), 1.0 / V, dtype=logits.dtype, device=logits.device)  # (B, k, V)
        counts = []
        for b, (s, i, first) in enumerate(spec):
            seq, draft = seqs[s], drafts[i]
            n = len(draft)
            target[b, : n + 1] = sampling_probs(
                logits[first : first + n + 1], [seq.params] * (n + 1), prompt_ids=[seq.prompt_ids] * (n + 1),
                output_ids=position_histories(seq.output_ids, draft), sampler=self.sampler)
            draft_ids[b, :n] = torch.tensor(draft, dtype=torch.long)
            if q is not None and i in self._draft_probs:  # a plain greedy row's draft comes without q (unused)
                q[b, :n] = self._draft_probs[i].to(q)
            counts.append(n)
        result = rejection_sample(draft_ids, counts, target, q, greedy=[seqs[s].params.greedy for s, _, _ in spec],
                                  generators=[seqs[s].generator for s, _, _ in spec],
                                  shared_generator=self.sampler.generator)
        for n, a in zip(counts, result.num_accepted.tolist()):
            self.spec_stats.add(n, a)
        return result.token_ids

    def _accept_greedy(self, logits: torch.Tensor, spec, drafts) -> list[list[int]]:
        """What ``rejection_sample`` gives greedy rows without penalties (their target distribution is one-hot at
        the logits' argmax: a draft is kept while it equals the argmax at its position, then the argmax at the
        first mismatch or the bonus position follows), with ONE device read and no per-row kernels."""
        best = logits.argmax(dim=-1).tolist()  # (R',): the first maximum, as the one-hot distributions take it
        out = []
        for _, i, first in spec:
            draft = drafts[i]
            a = 0
            while a < len(draft) and draft[a] == best[first + a]:
                a += 1
            self.spec_stats.add(len(draft), a)
            out.append(draft[:a] + [best[first + a]])
        return out


__all__ = ["SPECULATIVE_METHODS", "SpeculativeEngine"]
