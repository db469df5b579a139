# Speculative decoding tests (greedy equals the target greedy; sampling keeps the target distribution, chi-square).
"""The statistical tests compare observed counts with the EXACT target probabilities (enumerated from the
target's own sampling distribution), by Pearson's chi-square with cells of expected count < 5 pooled. With
fixed seeds they are deterministic; the right rule must give p > 1e-3 and each deliberately wrong rule
(accept with min(1, q/p); resample from p instead of the residual) p < 1e-6.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from pipeloom.inference import spec_decode
from pipeloom.inference.sampling import Sampler, SamplingParams
from pipeloom.inference.spec_decode import (
    SpecStats,
    rejection_sample,
    sampling_probs,
    speculative_generate,
    target_generate,
)
from pipeloom.inference.spec_proposers import NgramProposer, RecomputeDraftProposer
from pipeloom.models import ModelConfig, Transformer
from torch import nn

WRONG_RULES = {
    "accept min(1, q/p)": ("accept_draft", lambda u, p_x, q_x: u * p_x < q_x),
    "resample from p": ("residual", lambda p, q: p),
}


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value of ``counts`` against ``probs``; cells expecting < 5 pooled."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


class Memo(nn.Module):
    """A model whose forward is cached per token sequence (the statistical tests revisit few contexts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.cache = model, {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        key = tuple(ids[0].tolist())
        if key not in self.cache:
            self.cache[key] = self.model(ids)
        return self.cache[key]


def _model(seed: int, vocab: int, layers: int = 2, sharpen: float = 1.0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=vocab, dim=32, n_layers=layers, n_heads=4, n_kv_heads=2,
                         ffn_hidden=64, max_seq_len=128)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.head.out.weight.mul_(sharpen)  # random init gives near-uniform logits: make them decisive
    return model


# ------------------------------------------------------------------------------ distributions


def test_sampling_probs_is_the_samplers_distribution():
    """Temperature, top-k, top-p, min-p, penalties and min_tokens: the same distribution the Sampler draws
    from (its processed logprobs over the whole 16-token vocabulary)."""
    torch.manual_seed(0)
    V = 16
    params = [SamplingParams(temperature=0.7, top_k=5, logprobs=V), SamplingParams(top_p=0.8, logprobs=V),
              SamplingParams(min_p=0.1, temperature=1.3, logprobs=V),
              SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3, logprobs=V),
              SamplingParams(min_tokens=3, max_tokens=8, stop_token_ids=(4,), logprobs=V)]
    logits = torch.randn(len(params), V) * 3
    prompt, output = [[1, 2, 3]] * 5, [[5, 5, 6]] * 4 + [[7]]
    sampler = Sampler(eos_token_id=2, logprobs_mode="processed")
    out = sampler(logits, params, prompt_ids=prompt, output_ids=output)
    expected = torch.zeros(len(params), V).scatter_(1, out.top_ids, out.top_logprobs.exp())
    probs = sampling_probs(logits, params, prompt_ids=prompt, output_ids=output, sampler=sampler)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    assert probs[4, 2] == 0 and probs[4, 4] == 0, "EOS and stop tokens masked below min_tokens"
    greedy = sampling_probs(logits[:1], [SamplingParams(temperature=0)])
    assert greedy[0, logits[0].argmax()] == 1 and greedy.sum() == 1


# ------------------------------------------------------------------------------ the rule, one step


def _fixed_step(V=6, k=3, B=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)  # target at k+1 positions
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)  # draft
    drafts = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(k)], 1)  # (B, k)
    return p, q, drafts


@pytest.mark.parametrize("proposal", ["draft model", "deterministic"])
def test_rejection_sample_first_token_is_target_distributed(monkeypatch, proposal):
    """Over 20000 rows, the first emitted token follows p_1 exactly; each wrong rule is detected."""
    V, k, B = 6, 3, 20000
    p, q, drafts = _fixed_step(V, k, B)
    if proposal == "deterministic":
        drafts = torch.tensor([2, 0, 5]).expand(B, k)  # prompt lookup: one fixed guess, q one-hot
    draft_probs = None if proposal == "deterministic" else q.expand(B, k, V)

    def first_tokens() -> torch.Tensor:
        out = rejection_sample(drafts, [k] * B, p.expand(B, k + 1, V), draft_probs,
                               shared_generator=torch.Generator().manual_seed(1))
        return torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=V)

    right = chi_square_p(first_tokens(), p[0])
    print(f"\n{proposal}: right rule p = {right:.3g}")
    assert right > 1e-3
    for name, (attr, wrong) in WRONG_RULES.items():
        with monkeypatch.context() as m:
            m.setattr(spec_decode, attr, wrong)
            bad = chi_square_p(first_tokens(), p[0])
        print(f"{proposal}: {name}: p = {bad:.3g}")
        assert bad < 1e-6, f"the wrong rule '{name}' was not detected (p = {bad:.3g})"


def test_rejection_sample_greedy_bonus_and_padding():
    V = 5
    p = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]]), V).float()  # (3, 4, V)
    drafts = torch.tensor([[1, 2, 3], [1, 4, 3], [0, 0, -1]])
    out = rejection_sample(drafts, [3, 3, 2], p, None, greedy=[True, True, True])
    assert out.token_ids == [[1, 2, 3, 4], [1, 2], [0, 0, 0]]
    assert out.num_accepted.tolist() == [3, 1, 2]
    with pytest.raises(ValueError, match="num_draft"):
        rejection_sample(drafts, [4, 3, 2], p, None)
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample(drafts, [3, 3, 2], p[:, :3], None)


def test_rejection_sample_is_batch_invariant_per_seeded_request():
    """A seeded request's tokens do not depend on the other rows; greedy rows draw no random numbers."""
    V, k, B = 8, 4, 6
    p, q, drafts = _fixed_step(V, k, B, seed=3)
    p, q = p.expand(B, k + 1, V), q.expand(B, k, V)
    n = [4, 2, 0, 4, 3, 1]
    gens = lambda: [torch.Generator().manual_seed(100 + b) for b in range(B)]  # noqa: E731
    batch = rejection_sample(drafts, n, p, q, generators=gens())
    for b in range(B):
        alone = rejection_sample(drafts[b:b + 1], [n[b]], p[b:b + 1], q[b:b + 1], generators=[gens()[b]])
        assert alone.token_ids[0] == batch.token_ids[b]
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    rejection_sample(drafts[:1], [4], p[:1], q[:1], greedy=[True], generators=[g])
    assert torch.equal(g.get_state(), state)


# ------------------------------------------------------------------------------ whole generations


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_target_greedy(k):
    """Greedy speculative output equals the target's greedy output token for token, with a draft model that
    agrees often (the target plus noise), one that rarely does, and prompt lookup; acceptance reported."""
    target = _model(0, 64, sharpen=20)
    close_draft = _model(0, 64, layers=2, sharpen=20)
    with torch.no_grad():
        for w in close_draft.parameters():
            w.add_(0.1 * w.std() * torch.randn_like(w))
    proposers = {"close draft": RecomputeDraftProposer(close_draft),
                 "other draft": RecomputeDraftProposer(_model(1, 64, layers=1, sharpen=20)),
                 "prompt lookup": NgramProposer(1, 3)}
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = target_generate(target, prompt, params)
    for name, proposer in proposers.items():
        stats = SpecStats()
        assert speculative_generate(target, proposer, prompt, k, params, stats=stats) == expected, name
        print(f"k={k} {name}: {stats}")
        assert stats.emitted >= len(expected) and stats.steps < len(expected) + 1
    stats = SpecStats()
    speculative_generate(target, proposers["close draft"], prompt, k, params, stats=stats)
    assert stats.acceptance_rate > 0.3, "the near-copy draft should be accepted often"


def test_greedy_stops_like_the_target():
    target = _model(0, 32, sharpen=20)
    prompt = [1, 2, 3]
    free = target_generate(target, prompt, SamplingParams(temperature=0, max_tokens=12))
    eos = free[4]
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = target_generate(target, prompt, params, eos_token_id=eos)
    assert expected == free[: free.index(eos) + 1]
    got = speculative_generate(target, RecomputeDraftProposer(target), prompt, 4, params, eos_token_id=eos)
    assert got == expected


@torch.no_grad()
def _exact_sequence_probs(target, prompt, params, length, V) -> torch.Tensor:
    """P(first ``length`` tokens = s) under the target's sampling, for every s in V^length (row-major)."""
    probs = torch.zeros(V**length, dtype=torch.float64)
    for i, seq in enumerate(itertools.product(range(V), repeat=length)):
        total = 1.0
        for t in range(length):
            logits = target(torch.tensor([prompt + list(seq[:t])]))[0, -1:]
            total *= float(sampling_probs(logits, [params], prompt_ids=[prompt], output_ids=[list(seq[:t])])[0, seq[t]])
        probs[i] = total
    return probs


def test_sampled_speculative_output_has_the_target_distribution(monkeypatch):
    """3 tokens over a 4-token vocabulary (64 cells; top-k 3 and temperature 1), 1500 seeded draws with a
    draft model (the target with noise: accepted about 80% of the time): indistinguishable from the target's
    own distribution (measured p = 0.28). 500 draws with either wrong rule are not (p = 2e-74 and 2e-14)."""
    V, length, k = 4, 3, 3
    target_model, draft_model = _model(0, V, sharpen=8), _model(0, V, sharpen=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for w in draft_model.parameters():
            w.add_(0.5 * w.std() * torch.randn_like(w))
    target, proposer = Memo(target_model), RecomputeDraftProposer(Memo(draft_model))
    prompt = [0, 1, 2, 1, 0]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=length)
    expected = _exact_sequence_probs(target, prompt, params, length, V)

    def counts(draws: int, stats=None) -> torch.Tensor:
        c = torch.zeros(V**length, dtype=torch.long)
        for i in range(draws):
            out = speculative_generate(target, proposer, prompt, k, params,
                                       generator=torch.Generator().manual_seed(i), stats=stats)
            c[sum(t * V ** (length - 1 - j) for j, t in enumerate(out))] += 1
        return c

    stats = SpecStats()
    right = chi_square_p(counts(1500, stats), expected)
    print(f"\nright rule: p = {right:.3g}; {stats}")
    assert right > 1e-3
    assert 0.3 < stats.acceptance_rate < 0.95, "draft and target should agree often, but not always"
    for name, (attr, wrong) in WRONG_RULES.items():
        with monkeypatch.context() as m:
            m.setattr(spec_decode, attr, wrong)
            bad = chi_square_p(counts(500), expected)
        print(f"{name}: p = {bad:.3g}")
        assert bad < 1e-6, f"the wrong rule '{name}' was not detected (p = {bad:.3g})"


# ------------------------------------------------------------------------------ prompt lookup


@pytest.mark.parametrize("context,min_n,max_n,k,expected", [
    ([1, 2, 3, 4, 1, 2], 1, 3, 3, [3, 4, 1]),  # [4,1,2] never recurs; [1,2] does, at 0
    ([2, 3, 5, 1, 2, 3, 9, 0, 1, 2, 3], 1, 3, 3, [9, 0, 1]),  # the longest n-gram wins: [1,2,3] at 3
    ([2, 3, 5, 1, 2, 3, 9, 0, 1, 2, 3], 1, 2, 3, [5, 1, 2]),  # n <= 2: [2,3], earliest match at 0
    ([5, 6, 7, 5, 6, 8, 5, 6], 2, 2, 2, [7, 5]),  # earliest of several matches
    ([7, 8, 7], 1, 3, 5, [8, 7]),  # fewer than k tokens follow the match
    ([1, 2, 3, 1], 2, 3, 3, []),  # no bigram recurs and unigrams are not allowed
    ([1, 2, 3, 1], 1, 3, 3, [2, 3, 1]),
    ([4, 4, 4, 4], 1, 2, 3, [4, 4]),  # overlapping windows
    ([9], 1, 3, 3, []),
])
def test_prompt_lookup_proposals(context, min_n, max_n, k, expected):
    assert NgramProposer(min_n, max_n).find(context, k) == expected


def test_prompt_lookup_equals_the_definition_on_random_contexts():
    """``find`` (one pass for the last token's earlier occurrences, then filters per longer n) against the definition
    written out: for n from max_n down, the earliest earlier window equal to the last n tokens - 3,000 random
    contexts over small vocabularies, where windows overlap and repeat."""
    def definition(ctx, min_n, max_n, k):
        for n in range(min(max_n, len(ctx) - 1), min_n - 1, -1):
            for j in range(len(ctx) - n):  # windows ctx[j:j+n] that end before the last token
                if ctx[j : j + n] == ctx[-n:]:
                    return ctx[j + n : j + n + k] if k > 0 else []
        return []

    g = torch.Generator().manual_seed(11)
    for _ in range(3000):
        vocab, length, min_n, k = (int(torch.randint(lo, hi, (), generator=g))
                                   for lo, hi in ((2, 7), (1, 40), (1, 4), (0, 9)))
        max_n = min_n + int(torch.randint(0, 5, (), generator=g))
        ctx = torch.randint(0, vocab, (length,), generator=g).tolist()
        assert NgramProposer(min_n, max_n).find(ctx, k) == definition(ctx, min_n, max_n, k), (ctx, min_n, max_n, k)


class Bigram(nn.Module):
    """A target whose next token is a fixed function of the current one: logits (1, T, V) from a table."""

    def __init__(self, successor: dict[int, int], vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(vocab, vocab))
            for a, b in successor.items():
                self.table.weight[a, b] = 10.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


def test_prompt_lookup_acceptance_on_repetitive_text():
    """A target that continues a cycle accepts every prompt-lookup proposal on a prompt holding the cycle:
    k + 1 tokens per target step; the output equals plain greedy decoding."""
    cycle = [3, 7, 1, 9, 4]
    target = Bigram({a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}, 16)
    prompt, k = [5, 2] + cycle * 2, 4
    params = SamplingParams(temperature=0, max_tokens=21)
    stats = SpecStats()
    out = speculative_generate(target, NgramProposer(1, 3), prompt, k, params, stats=stats)
    assert out == target_generate(target, prompt, params)
    print(f"\nprompt lookup on a cyclic target: {stats}")
    assert stats.acceptance_rate == 1.0 and stats.steps == 21 // (k + 1) + 1
    assert stats.tokens_per_step > k
    with pytest.raises(ValueError, match="min_n=0"):
        NgramProposer(0, 2)
