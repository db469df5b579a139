# Speculative decoding, exact: the sampling distributions, batched rejection sampling, and the reference loop.
"""A proposer (``spec_proposers``: prompt lookup, or a draft model) guesses k tokens; the target scores all
of them in one forward (k + 1 positions); :func:`rejection_sample` keeps a prefix of the guesses and adds one
token, so that the output is distributed exactly as the target's own sampling (Leviathan et al., arXiv
2211.17192, Algorithm 1 and Theorem 1; Chen et al., arXiv 2302.01318, Algorithm 2):

* draft token ``x_i`` drawn from ``q_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``;
* at the first rejection the token is resampled from ``normalize(max(0, p_i - q_i))`` and the step ends;
* when all are accepted, a bonus token is drawn from ``p_{k+1}``.

A deterministic proposal (prompt lookup) is the case ``q_i = one-hot(x_i)``: accept with probability
``p_i(x_i)``, resample from ``p_i`` with ``x_i`` removed. Greedy requests accept exactly while the draft equals
the target's argmax and then emit the argmax, consuming no random numbers.

``p`` and ``q`` are the distributions the request really samples from: :func:`sampling_probs` applies the
same penalties, min-token masks, temperature, top-k, top-p and min-p as ``inference.sampling.Sampler`` (its
own filter functions), to the target's logits and the draft's alike, each position with its own history
(the accepted output plus the draft tokens before it).

Randomness is per request: a seeded request's draws come from its own generator, a fixed number per step
(one uniform per draft token, one exponential race over the vocabulary), so its tokens do not depend on the
rest of the batch. :func:`speculative_generate` is the plain full-recompute loop that the engine's batched,
paged implementation must match token for token (greedy) and in distribution (sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling import Sampler, SamplingParams, apply_min_p, apply_top_k, apply_top_p


# ------------------------------------------------------------------------------------ distributions


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams], *,
                   prompt_ids: Sequence[Sequence[int]] | None = None,
                   output_ids: Sequence[Sequence[int]] | None = None, sampler: Sampler | None = None) -> torch.Tensor:
    """The distribution (R, V) that ``Sampler`` draws row r of ``logits`` (R, V) from; greedy rows are one-hot
    at the argmax. ``output_ids[r]``: the output before row r's token (drafts included) for penalties and
    ``min_tokens``; ``sampler`` supplies the EOS id for min_tokens masking."""
    if logits.dim() != 2 or logits.size(0) != len(params):
        raise ValueError(f"logits must be (rows, vocab) with one SamplingParams per row; got {tuple(logits.shape)} "
                         f"and {len(params)} params")
    sampler = sampler or Sampler()
    x = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)  # (R, V)
    x = sampler._penalise(x, params, prompt_ids, output_ids)
    sampler._mask_min_tokens(x, params, output_ids)
    probs = torch.empty_like(x)
    greedy = torch.tensor([p.greedy for p in params], device=x.device)
    if greedy.any():
        probs[greedy] = torch.nn.functional.one_hot(x[greedy].argmax(-1), x.size(1)).to(x.dtype)
    if not greedy.all():
        rows = (~greedy).nonzero().squeeze(1)
        probs[rows] = filter_logits(x[rows], [params[i] for i in rows.tolist()]).softmax(dim=-1)
    return probs


def filter_logits(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p, in ``Sampler``'s order with its functions; x (R, V) -> (R, V)."""
    dev = x.device
    x = x / torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev).unsqueeze(1)
    if any(p.top_k > 0 for p in params):
        x = apply_top_k(x, torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev))
    if any(p.top_p < 1.0 for p in params):
        x = apply_top_p(x, torch.tensor([p.top_p for p in params], dtype=x.dtype, device=dev))
    if any(p.min_p > 0.0 for p in params):
        x = apply_min_p(x, torch.tensor([p.min_p for p in params], dtype=x.dtype, device=dev))
    return x


def position_histories(output_ids: Sequence[int], draft_ids: Sequence[int]) -> list[list[int]]:
    """The output history before each of the ``len(draft_ids) + 1`` verified positions."""
    out, draft = list(output_ids), list(draft_ids)
    return [out + draft[:i] for i in range(len(draft) + 1)]


# ------------------------------------------------------------------------------------ the rule


def accept_draft(u: torch.Tensor, p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """Accept when ``u < p(x) / q(x)``, u ~ U[0, 1): probability min(1, p/q) (arXiv 2211.17192 Alg. 1)."""
    return u * q_x < p_x


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``normalize(max(0, p - q))`` over the last dimension; where it is all zero (p == q), ``p``."""
    r = (p - q).clamp_min(0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def _race(dist: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Exponential race (Gumbel-max): ``argmax(dist / e)``, e ~ Exp(1), picks i with probability dist_i."""
    return (dist / e.clamp_min(torch.finfo(e.dtype).tiny)).argmax(dim=-1)


@dataclass
class SpecResult:
    """One verification step of B requests."""

    token_ids: list[list[int]]  # per request: the accepted draft tokens, then the resampled or bonus token
    num_accepted: torch.Tensor  # (B,) long: draft tokens accepted
    num_draft: torch.Tensor  # (B,) long: draft tokens proposed


def rejection_sample(draft_ids: torch.Tensor, num_draft: torch.Tensor | Sequence[int], target_probs: torch.Tensor,
                     draft_probs: torch.Tensor | None, *, greedy: Sequence[bool] | None = None,
                     generators: Sequence[torch.Generator | None] | None = None,
                     shared_generator: torch.Generator | None = None) -> SpecResult:
    """Verify B requests' drafts at once.

    ``draft_ids`` (B, k) long, row b's first ``num_draft[b]`` entries used (the rest padding); ``target_probs``
    (B, k+1, V): :func:`sampling_probs` of the target at every draft position and the bonus position;
    ``draft_probs`` (B, k, V): the distributions the drafts were drawn from (same filters), or None for
    deterministic proposals (prompt lookup: q one-hot). ``greedy[b]``: row b decodes greedily.
    ``generators[b]``: row b's own generator (seeded requests), else ``shared_generator``.
    """
    B, k = draft_ids.shape
    if target_probs.shape[:2] != (B, k + 1):
        raise ValueError(f"target_probs {tuple(target_probs.shape)} must be (B, k+1, V) = ({B}, {k + 1}, V)")
    if draft_probs is not None and draft_probs.shape != (B, k, target_probs.size(2)):
        raise ValueError(f"draft_probs {tuple(draft_probs.shape)} must be (B, k, V) = ({B}, {k}, "
                         f"{target_probs.size(2)}) or None")
    dev, dtype, V = target_probs.device, target_probs.dtype, target_probs.size(2)
    n = torch.as_tensor(num_draft, dtype=torch.long, device=dev)  # (B,)
    if n.shape != (B,) or bool((n < 0).any()) or bool((n > k).any()):
        raise ValueError(f"num_draft={n.tolist()} must hold B={B} counts in [0, k={k}]")
    greedy_t = torch.tensor(list(greedy) if greedy is not None else [False] * B, dtype=torch.bool, device=dev)
    drafts = draft_ids.to(dev).clamp(0, V - 1)  # padding may be -1
    p_x = target_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, k)
    if draft_probs is None:
        q = torch.nn.functional.one_hot(drafts, V).to(dtype)  # (B, k, V)
    else:
        q = draft_probs.to(device=dev, dtype=dtype)
    q_x = q.gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, k)

    u, e = _draws(B, k, V, n, greedy_t.tolist(), dtype, dev, generators, shared_generator)  # (B, k), (B, V)
    valid = torch.arange(k, device=dev).unsqueeze(0) < n.unsqueeze(1)  # (B, k)
    target_argmax = target_probs.argmax(dim=2)  # (B, k+1)
    ok = torch.where(greedy_t.unsqueeze(1), drafts == target_argmax[:, :k], accept_draft(u, p_x, q_x)) & valid
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (B,): length of the accepted prefix
    rows = torch.arange(B, device=dev)
    p_next = target_probs[rows, accepted]  # (B, V): at the first rejection, or the bonus position
    dist = p_next
    if k:
        q_next = q[rows, accepted.clamp(max=k - 1)]  # (B, V)
        dist = torch.where((accepted < n).unsqueeze(1), residual(p_next, q_next), p_next)
    extra = torch.where(greedy_t, target_argmax[rows, accepted], _race(dist, e))  # (B,)
    tokens = [drafts[b, : int(accepted[b])].tolist() + [int(extra[b])] for b in range(B)]
    return SpecResult(tokens, accepted, n)


def _draws(B, k, V, n, greedy, dtype, dev, generators, shared) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sampling row: ``n[b]`` uniforms and one Exp(1) vector of V, from the row's own generator when it has
    one (greedy rows with their own generator draw nothing)."""
    u = torch.zeros(B, k, dtype=dtype, device=dev)
    e = torch.ones(B, V, dtype=dtype, device=dev)
    gens = list(generators) if generators is not None else [None] * B
    if len(gens) != B:
        raise ValueError(f"generators has {len(gens)} entries for {B} requests; pass one per request (or None)")
    shared_rows = [b for b in range(B) if gens[b] is None and not greedy[b]]
    if shared_rows:  # the shared stream, vectorised
        rows = torch.tensor(shared_rows, dtype=torch.long, device=dev)
        u[rows] = torch.rand(len(rows), k, dtype=dtype, device=dev, generator=shared)
        e[rows] = torch.empty(len(rows), V, dtype=dtype, device=dev).exponential_(generator=shared)
    for b in range(B):
        if gens[b] is not None and not greedy[b]:
            if int(n[b]):
                u[b, : int(n[b])] = torch.rand(int(n[b]), dtype=dtype, device=dev, generator=gens[b])
            e[b].exponential_(generator=gens[b])
    return u, e


# ------------------------------------------------------------------------------------ the reference loop


@dataclass
class SpecStats:
    """Acceptance statistics over a generation (or a benchmark)."""

    steps: int = 0  # verification forwards of the target
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens emitted (accepted + one per step, before truncation)

    def add(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += accepted + 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed ones (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per target forward (1.0 = no gain over plain decoding)."""
        return self.emitted / self.steps if self.steps else 0.0

    def __str__(self) -> str:
        return (f"{self.steps} target steps, {self.proposed} proposed, {self.accepted} accepted "
                f"(acceptance {self.acceptance_rate:.3f}), {self.tokens_per_step:.2f} tokens per step")


@torch.no_grad()
def target_logits(model: torch.nn.Module, context: Sequence[int], positions: int) -> torch.Tensor:
    """Full-recompute forward of ``context`` (T tokens): the logits (positions, V) of its last ``positions``
    positions, which predict tokens T - positions + 1 .. T (for a draft of n: the n drafts and the bonus)."""
    if positions < 1:
        raise ValueError(f"positions={positions} must be at least 1 (the next token's)")
    ids = torch.tensor([list(context)], dtype=torch.long, device=next(model.parameters()).device)  # (1, T)
    return model(ids)[0, -positions:]  # (positions, V)


@torch.no_grad()
def speculative_generate(target: torch.nn.Module, proposer, prompt: Sequence[int], k: int, params: SamplingParams,
                         *, generator: torch.Generator | None = None, eos_token_id: int | None = None,
                         stats: SpecStats | None = None) -> list[int]:
    """Generate up to ``params.max_tokens`` tokens from ``target`` by speculative decoding (reference loop).

    Each step: ``proposer.propose(context, k, params, ...)`` (a ``spec_proposers`` proposer), one
    full-recompute forward of the target over the context plus the draft, :func:`rejection_sample`. Stops at
    ``max_tokens``, at ``eos_token_id`` (unless ``ignore_eos``) or a ``stop_token_ids`` token, once
    ``min_tokens`` are out. The engine's batched, paged version must give the same tokens for greedy params
    and the same distribution when sampling. ``generator``: default ``params.generator()``.
    """
    if k < 0:
        raise ValueError(f"k={k} draft tokens must be >= 0")
    prompt, out = list(prompt), []
    gen = generator if generator is not None else params.generator()
    sampler = Sampler(eos_token_id=eos_token_id)
    stops = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        stops.add(eos_token_id)
    while len(out) < params.max_tokens:
        budget = min(k, params.max_tokens - len(out) - 1)
        proposal = proposer.propose(prompt + out, budget, params, prompt_len=len(prompt), generator=gen,
                                    sampler=sampler)
        draft = list(proposal.token_ids)
        n = len(draft)
        logits = target_logits(target, prompt + out + draft, n + 1)  # (n+1, V)
        p = sampling_probs(logits, [params] * (n + 1), prompt_ids=[prompt] * (n + 1),
                           output_ids=position_histories(out, draft), sampler=sampler)
        draft_t = torch.tensor([draft], dtype=torch.long, device=p.device).reshape(1, n)
        q = None if proposal.probs is None else proposal.probs.unsqueeze(0)
        step = rejection_sample(draft_t, [n], p.unsqueeze(0), q, greedy=[params.greedy], generators=[gen],
                                shared_generator=gen)
        if stats is not None:
            stats.add(n, int(step.num_accepted[0]))
        for token in step.token_ids[0]:
            out.append(token)
            if (token in stops and len(out) >= params.min_tokens) or len(out) >= params.max_tokens:
                return out
    return out


@torch.no_grad()
def target_generate(target: torch.nn.Module, prompt: Sequence[int], params: SamplingParams, *,
                    generator: torch.Generator | None = None, eos_token_id: int | None = None) -> list[int]:
    """Plain autoregressive sampling from :func:`sampling_probs` of ``target`` (the distribution to match)."""
    return speculative_generate(target, _NoDraft(), prompt, 0, params, generator=generator,
                                eos_token_id=eos_token_id)


class _NoDraft:
    """Proposes nothing: speculative_generate with k = 0 is plain decoding."""

    def propose(self, context, k, params, **_):
        from .spec_proposers import Proposal

        return Proposal([], None)
