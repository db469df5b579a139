# What the engine measures per iteration (IterationRecord) and the fitted linear cost model predicting it.
"""Each engine iteration is recorded with its composition and measured duration, the data from which the
serving simulator's per-iteration cost model is fitted::

    t = a + b * prefill_tokens + c * decode_seqs + d * kv_tokens_read

(a fixed launch/step cost, the prompt tokens' matmuls, each decode's weight-bound share, and the attention's
reads of the KV cache). Fitted by non-negative least squares over the records, then used to print predicted
against measured latency, as the training runtime does for bubbles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class IterationRecord:
    """One engine iteration: what ran and how long it took (seconds, model forward + sampling)."""

    index: int
    num_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int  # = decode sequences (one token each)
    kv_tokens_read: int  # context tokens the attention read (each slice up to its last token)
    num_preempted: int
    duration: float
    kv_usage: float = 0.0  # share of KV blocks held after scheduling

    @classmethod
    def from_iteration(cls, iteration, duration: float, kv_usage: float = 0.0) -> IterationRecord:
        return cls(iteration.index, iteration.num_seqs, iteration.num_prefill_tokens, iteration.num_decode_tokens,
                   sum(s.first_token + s.n_tokens for s in iteration.slices), len(iteration.preempted), duration,
                   kv_usage)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LinearCost:
    """``t = a + b*prefill_tokens + c*decode_seqs + d*kv_tokens_read`` (seconds)."""

    a: float
    b: float
    c: float
    d: float

    def predict(self, record: IterationRecord) -> float:
        r = record
        return self.a + self.b * r.num_prefill_tokens + self.c * r.num_decode_tokens + self.d * r.kv_tokens_read

    def __str__(self) -> str:
        return (f"t = {self.a * 1e3:.3f} ms + {self.b * 1e6:.3f} us/prefill token + {self.c * 1e6:.3f} us/decode seq "
                f"+ {self.d * 1e9:.3f} ns/KV token read")


def fit_cost_model(records: list[IterationRecord], iterations: int = 200) -> LinearCost:
    """Non-negative least squares of the four coefficients (projected gradient on the normal equations,
    features scaled to unit norm so one step size fits all)."""
    if not records:
        raise ValueError("fit_cost_model needs at least one IterationRecord")
    x = torch.tensor([[1.0, r.num_prefill_tokens, r.num_decode_tokens, r.kv_tokens_read] for r in records],
                     dtype=torch.float64)  # (M, 4)
    y = torch.tensor([r.duration for r in records], dtype=torch.float64)  # (M,)
    scale = x.norm(dim=0).clamp_min(1e-12)
    xs = x / scale
    gram, rhs = xs.T @ xs, xs.T @ y
    coef = torch.linalg.lstsq(xs, y).solution.clamp_min(0)
    step = 1.0 / torch.linalg.eigvalsh(gram).max().clamp_min(1e-12)
    for _ in range(iterations):  # projected gradient: min |xs c - y|^2 subject to c >= 0
        coef = (coef - step * (gram @ coef - rhs)).clamp_min(0)
    a, b, c, d = (coef / scale).tolist()
    return LinearCost(a, b, c, d)
