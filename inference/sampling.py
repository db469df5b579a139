# Sampling: the per-request SamplingParams (vLLM-shaped, validated) and a batched, batch-invariant Sampler.
"""``Sampler`` turns one iteration's logits (N, V) into N tokens, one per sampling row, each row with its own
:class:`SamplingParams`. Per row, in this order (Hugging Face ``generate``'s order):

1. repetition penalty over prompt + output tokens (CTRL, arXiv 1909.05858 §4.1: a seen token's logit is
   divided by the penalty when positive, multiplied when negative), then OpenAI's presence / frequency
   penalties over output tokens only (``logit -= frequency * count + presence * (count > 0)``);
2. while fewer than ``min_tokens`` tokens are out, EOS (unless ``ignore_eos``) and ``stop_token_ids`` are
   masked to -inf;
3. temperature 0 (below 1e-5): greedy, exactly the argmax of the penalised logits. Otherwise divide by
   the temperature, then top-k (ties with the k-th logit kept), top-p / nucleus (Holtzman et al., arXiv
   1904.09751 §3.1: the smallest set of tokens whose probability reaches p), min-p (Nguyen et al., arXiv
   2407.01082: drop tokens whose probability is below ``min_p`` times the top token's), and draw.

The draw is an exponential race (equivalently, the Gumbel-max trick): ``argmax(p_i / q_i)`` with
``q_i ~ Exp(1)`` picks token i with probability ``p_i``. Each row's ``q`` comes from that row's generator
(``SamplingParams.generator()``, seeded) and its probabilities from that row's logits alone, so a seeded
request gets the same tokens whatever else is in the batch; rows without a seed share the Sampler's
generator. Everything else is vectorised over rows.

Logprobs follow vLLM's default (``logprobs_mode="raw_logprobs"``): log-softmax of the model's raw logits,
before penalties, temperature and filters. ``Sampler(logprobs_mode="processed")`` reports them from the
distribution actually sampled (after penalties, temperature and filters; greedy rows: after penalties).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20  # top-N logprobs per token, as OpenAI's API allows


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; the defaults are vLLM's (greedy needs ``temperature=0``)."""

    n: int = 1  # independent samples of the prompt
    max_tokens: int = 16  # output tokens at most (finish "length")
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    top_p: float = 1.0  # nucleus: keep the smallest set with probability >= top_p; 1 = off
    min_p: float = 0.0  # drop tokens below min_p * p(top token); 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or output; 1 = off
    presence_penalty: float = 0.0  # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # own generator: same tokens whatever else is in the batch
    stop: tuple[str, ...] = ()  # strings that end the output (not included unless include_stop_str_in_output)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the output (not emitted as text)
    ignore_eos: bool = False  # EOS does not end the output
    logprobs: int | None = None  # return the sampled token's logprob and the top-N (0..20) alternatives
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        for name in ("n", "max_tokens", "min_tokens", "top_k"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number")
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be at least 0"),
            ("min_tokens", self.min_tokens <= self.max_tokens, f"must not exceed max_tokens={self.max_tokens}"),
            ("temperature", self.temperature >= 0, "must be at least 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
            ("top_k", self.top_k >= -1, "must be -1 or 0 (off) or a positive number of tokens"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1] (0 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be greater than 0 (1 = off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2] (OpenAI's range)"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2] (OpenAI's range)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {rule}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs={self.logprobs!r} must be None or an integer in [0, {MAX_LOGPROBS}]")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop={self.stop!r} must hold non-empty strings; {s!r} is not one")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must hold token ids >= 0; {t!r} is not one")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing changing the logits before the argmax: no repetition, presence or frequency penalty
        and no ``min_tokens`` (whose masking of EOS and stop tokens would). Such a row's token is the logits' argmax."""
        return (self.greedy and self.repetition_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and self.min_tokens == 0)

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Checks that need the model: every stop token id inside the vocabulary. Returns ``self``."""
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if t >= vocab_size:
                    raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: {t} is outside the vocabulary "
                                     f"[0, {vocab_size}); use ids below {vocab_size}")
        return self

    def child(self, index: int) -> SamplingParams:
        """The params of sample ``index`` of an ``n > 1`` request: n=1, and seed + index when seeded (vLLM)."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A fresh generator seeded with ``seed`` on ``device`` (None without a seed): keep one per request."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class SamplerOutput:
    """One iteration's draws. ``logprobs``/``ranks``/``top_*`` are None unless some row asked for logprobs;
    rows that asked for fewer than K alternatives use the first ``params.logprobs`` columns of ``top_*``."""

    token_ids: torch.Tensor  # (N,) int64
    logprobs: torch.Tensor | None = None  # (N,) float32 (float64 logits: float64), the sampled tokens' logprobs
    ranks: torch.Tensor | None = None  # (N,) int64, the sampled tokens' ranks (1 = most likely)
    top_ids: torch.Tensor | None = None  # (N, K) int64, K = the largest ``logprobs`` asked
    top_logprobs: torch.Tensor | None = None  # (N, K), as logprobs


# ---- the filters, vectorised over rows; each matches its Hugging Face logits processor ----

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (arXiv 1909.05858 §4.1) on ``seen`` (N, V) bool tokens: logit / penalty if > 0 else * penalty."""
    p = penalty.unsqueeze(1)  # (N, 1)
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: ``logit -= frequency * count + presence * (count > 0)``; counts (N, V) of output tokens."""
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties with the k-th kept); k <= 0 or >= V leaves a row alone."""
    vocab = logits.size(-1)
    off = (top_k <= 0) | (top_k >= vocab)  # (N,)
    k = torch.where(off, torch.ones_like(top_k), top_k)
    k_max = int(k.max())
    kth = logits.topk(k_max, dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # (N, 1)
    kth = kth.masked_fill(off.unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter (arXiv 1904.09751 §3.1), as HF's TopPLogitsWarper: drop the least likely tokens whose
    cumulative probability stays within ``1 - top_p``; the most likely token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # (N, V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p).unsqueeze(1)
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p (arXiv 2407.01082 §3): drop tokens with probability below ``min_p`` times the top token's."""
    probs = logits.softmax(dim=-1)  # (N, V)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _occurrences(histories: Sequence[Sequence[int]], rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for every token of ``histories[r]``, r in ``rows``: two flat (M,) tensors."""
    seqs = [histories[r].tolist() if isinstance(histories[r], torch.Tensor) else histories[r] for r in rows]
    row_idx = torch.tensor(list(itertools.chain.from_iterable([r] * len(s) for r, s in zip(rows, seqs))),
                           dtype=torch.long)
    tokens = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    return row_idx.to(device), tokens.to(device)


class Sampler:
    """Batched sampling over rows of logits, each row with its own :class:`SamplingParams` (no nn.Module).

    ``eos_token_id``: masked while a row is below ``min_tokens`` (unless ``ignore_eos``). ``generator``: the
    shared generator of rows without a seed (None: torch's default generator on the logits' device).
    ``logprobs_mode``: "raw" (vLLM's default; the model's distribution) or "processed" (the one sampled).
    """

    def __init__(self, *, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 logprobs_mode: str = "raw"):
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode={logprobs_mode!r} must be 'raw' or 'processed'")
        self.eos_token_id = eos_token_id
        self.generator = generator
        self.logprobs_mode = logprobs_mode

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams], *,
                 prompt_ids: Sequence[Sequence[int]] | None = None, output_ids: Sequence[Sequence[int]] | None = None,
                 generators: Sequence[torch.Generator | None] | None = None) -> SamplerOutput:
        """Sample one token per row of ``logits`` (N, V).

        ``prompt_ids[i]`` / ``output_ids[i]``: row i's prompt and output tokens so far (lists or 1-D tensors;
        needed for penalties and ``min_tokens``; None = empty). ``generators[i]``: row i's own generator
        (``params[i].generator(device)``, kept by the caller across iterations), None for the shared one.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be (rows, vocab), got shape {tuple(logits.shape)}")
        n, vocab = logits.shape
        for name, seq in (("params", params), ("prompt_ids", prompt_ids), ("output_ids", output_ids),
                          ("generators", generators)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} rows of logits; pass one per row")
        device = logits.device
        x = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)  # (N, V); float64 stays
        x = self._penalise(x, params, prompt_ids, output_ids)
        self._mask_min_tokens(x, params, output_ids)

        greedy = [p.greedy for p in params]
        processed = x
        if all(greedy):
            token_ids = x.argmax(dim=-1)
        elif not any(greedy):
            token_ids, processed = self._draw(x, params, generators or [None] * n)
        else:
            token_ids = torch.empty(n, dtype=torch.long, device=device)
            rand = [i for i in range(n) if not greedy[i]]
            rand_t = torch.tensor(rand, dtype=torch.long, device=device)
            greedy_t = torch.tensor([i for i in range(n) if greedy[i]], dtype=torch.long, device=device)
            gens = [generators[i] if generators is not None else None for i in rand]
            tokens_r, filtered = self._draw(x[rand_t], [params[i] for i in rand], gens)
            token_ids[greedy_t] = x[greedy_t].argmax(dim=-1)
            token_ids[rand_t] = tokens_r
            if self.logprobs_mode == "processed":
                processed = x.index_copy(0, rand_t, filtered)
        out = SamplerOutput(token_ids=token_ids)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            source = logits.to(x.dtype) if self.logprobs_mode == "raw" else processed
            lp = source.log_softmax(dim=-1)  # (N, V)
            out.logprobs = lp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            out.ranks = (lp > out.logprobs.unsqueeze(1)).sum(dim=-1) + 1
            k = min(max(wanted), vocab)
            if k > 0:
                out.top_logprobs, out.top_ids = lp.topk(k, dim=-1)
        return out

    def _penalise(self, x, params, prompt_ids, output_ids) -> torch.Tensor:
        """Repetition penalty over prompt + output, then presence/frequency over output, on rows that ask."""
        n, vocab = x.shape
        device = x.device
        rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rep:
            seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
            for histories in (prompt_ids, output_ids):
                if histories is not None:
                    seen[_occurrences(histories, rep, device)] = True
            penalty = torch.tensor([p.repetition_penalty for p in params], dtype=x.dtype, device=device)
            x = apply_repetition_penalty(x, seen, penalty)
        pf = [i for i, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        if pf and output_ids is not None:
            counts = torch.zeros(n, vocab, dtype=x.dtype, device=device)
            rows, tokens = _occurrences(output_ids, pf, device)
            counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=x.dtype), accumulate=True)
            presence = torch.tensor([p.presence_penalty for p in params], dtype=x.dtype, device=device)
            frequency = torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype, device=device)
            x = apply_presence_frequency(x, counts, presence, frequency)
        return x

    def _mask_min_tokens(self, x, params, output_ids) -> None:
        """Rows with fewer than ``min_tokens`` outputs cannot end: EOS and their stop token ids get -inf."""
        rows, cols = [], []
        for i, p in enumerate(params):
            done = len(output_ids[i]) if output_ids is not None else 0
            if done < p.min_tokens:
                stops = set(p.stop_token_ids)
                if self.eos_token_id is not None and not p.ignore_eos:
                    stops.add(self.eos_token_id)
                stops = [t for t in stops if t < x.size(1)]
                rows += [i] * len(stops)
                cols += stops
        if rows:
            x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")

    def _draw(self, x, params, generators) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, top-k, top-p, min-p, then the exponential race; returns tokens (R,), filtered logits (R, V)."""
        device = x.device
        temperature = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=device)
        x = x / temperature.unsqueeze(1)
        if any(p.top_k > 0 for p in params):
            x = apply_top_k(x, torch.tensor([p.top_k for p in params], dtype=torch.long, device=device))
        if any(p.top_p < 1.0 for p in params):
            x = apply_top_p(x, torch.tensor([p.top_p for p in params], dtype=x.dtype, device=device))
        if any(p.min_p > 0.0 for p in params):
            x = apply_min_p(x, torch.tensor([p.min_p for p in params], dtype=x.dtype, device=device))
        probs = x.softmax(dim=-1)  # (R, V)
        q = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            q.exponential_(generator=self.generator)
        elif shared:
            draws = torch.empty(len(shared), probs.size(1), dtype=probs.dtype, device=device)
            draws.exponential_(generator=self.generator)
            q[torch.tensor(shared, dtype=torch.long, device=device)] = draws
        for i, g in enumerate(generators):
            if g is not None:
                if g.device.type != device.type:
                    raise ValueError(f"row {i}'s generator is on {g.device} but the logits are on {device}; "
                                     "create it with params.generator(logits.device)")
                q[i].exponential_(generator=g)  # this row's own stream: batch invariant
        q.clamp_min_(torch.finfo(q.dtype).tiny)  # an exact 0 would make 0/0 = nan for a filtered token
        return (probs / q).argmax(dim=-1), x
