# Iteration cost models for the serving simulator: t = a + b*prefill + c*decodes + d*kv_read, presets, fits, pipelines.
"""How long one engine iteration takes, from its composition.

:class:`CostModel` is the linear model serving papers fit to measurements (Sarathi-Serve, arXiv 2403.02310 §3:
prefill cost grows with the tokens, a decode step is dominated by reading the weights)::

    t = a + b * prefill_tokens + c * decode_seqs + d * kv_tokens_read

Padded tokens (static and dynamic batching) are charged as prefill tokens in an iteration that prefills and
as decode sequences otherwise. :class:`IterationRecord` is what the engine measures per iteration;
:func:`fit_cost_model` fits the four coefficients to a list of them by least squares, so a configuration can
be predicted before it is run. :class:`PipelineCost` splits an iteration over pipeline stages; with ``p``
microbatches in flight the steady cycle is ``max(sum t_j, p * max t_j)`` (:func:`pipeline_cycle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .request import Iteration


@dataclass(frozen=True)
class IterationRecord:
    """One measured iteration: its composition and how long it took (seconds)."""

    num_prefill_tokens: int
    num_decode_seqs: int
    kv_tokens_read: int
    padded_tokens: int
    duration: float

    @classmethod
    def from_iteration(cls, it: Iteration, duration: float) -> "IterationRecord":
        return cls(it.num_prefill_tokens, it.num_decode_tokens, it.kv_tokens_read, it.padded_tokens, duration)

    def features(self) -> tuple[float, float, float, float]:
        """The regressors (1, prefill tokens, decode sequences, KV tokens read), padding charged as above."""
        prefill, decodes = self.num_prefill_tokens, self.num_decode_seqs
        if prefill:
            prefill += self.padded_tokens
        else:
            decodes += self.padded_tokens
        return (1.0, float(prefill), float(decodes), float(self.kv_tokens_read))


@dataclass(frozen=True)
class CostModel:
    """Seconds per iteration: ``a + b*prefill_tokens + c*decode_seqs + d*kv_tokens_read``."""

    a: float  # fixed cost of a forward pass (reading the weights, launches)
    b: float  # per prefill token (compute-bound)
    c: float  # per decode sequence
    d: float = 0.0  # per KV-cache token read by attention
    name: str = "custom"

    def __post_init__(self) -> None:
        for label in "abcd":
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"CostModel: {label} must be a number, got {value!r}")

    def time(self, num_prefill_tokens: int, num_decode_seqs: int, kv_tokens_read: int = 0, padded: int = 0) -> float:
        one, prefill, decodes, kv = IterationRecord(num_prefill_tokens, num_decode_seqs, kv_tokens_read, padded,
                                                    0.0).features()
        return self.a * one + self.b * prefill + self.c * decodes + self.d * kv

    def iteration_time(self, it: Iteration) -> float:
        return self.time(it.num_prefill_tokens, it.num_decode_tokens, it.kv_tokens_read, it.padded_tokens)

    def predict(self, record: IterationRecord) -> float:
        return self.time(record.num_prefill_tokens, record.num_decode_seqs, record.kv_tokens_read,
                         record.padded_tokens)

    def __str__(self) -> str:
        return f"{self.name}: t = {self.a:.4g} + {self.b:.4g}*prefill + {self.c:.4g}*decodes + {self.d:.4g}*kv_read"


# Roofline estimates from public specifications, not measurements (fit your own with fit_cost_model):
# a = weight bytes / HBM bandwidth (+ launch overhead), b = 2 * params FLOPs / (half of the bf16 peak),
# c = a decode token's share of the same compute, d = KV bytes per token / HBM bandwidth.
PRESETS: dict[str, CostModel] = {
    # every iteration takes one second: hand-worked traces read in iterations
    "unit": CostModel(1.0, 0.0, 0.0, 0.0, "unit"),
    # Llama-2-7B bf16 on one A100-80GB (2.0 TB/s, 312 TFLOP/s): 13.5 GB weights, 0.5 MB KV per token
    "llama2-7b-a100": CostModel(7.5e-3, 8.6e-5, 3.0e-5, 2.6e-7, "llama2-7b-a100"),
    # a 1.1B Llama (22 layers, GQA 32/4) bf16 on one H200 (4.8 TB/s, 989 TFLOP/s): 2.2 GB weights, 22 KB KV/token
    "llama-1b-h200": CostModel(6.0e-4, 4.5e-6, 4.5e-6, 4.7e-9, "llama-1b-h200"),
}


def get_cost_model(name: str | CostModel) -> CostModel:
    """A preset by name (a CostModel passes through)."""
    if isinstance(name, CostModel):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown cost model {name!r}; valid choices: {', '.join(PRESETS)}")
    return PRESETS[name]


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float | None]:
    """Gaussian elimination with partial pivoting; a column without a usable pivot gets None (unidentified)."""
    n = len(rhs)
    m = [row[:] + [v] for row, v in zip(matrix, rhs)]
    scale = max((abs(m[i][i]) for i in range(n)), default=1.0) or 1.0
    pivots: list[int | None] = [None] * n
    row = 0
    for col in range(n):
        best = max(range(row, n), key=lambda i: abs(m[i][col]), default=None)
        if best is None or abs(m[best][col]) <= 1e-12 * scale:
            continue
        m[row], m[best] = m[best], m[row]
        for i in range(n):
            if i != row and m[i][col]:
                f = m[i][col] / m[row][col]
                m[i] = [x - f * y for x, y in zip(m[i], m[row])]
        pivots[col] = row
        row += 1
    return [None if p is None else m[p][n] / m[p][c] for c, p in enumerate(pivots)]


def fit_cost_model(records: Sequence[IterationRecord], name: str = "fitted") -> CostModel:
    """Least-squares fit of (a, b, c, d) to measured iterations.

    A coefficient the records cannot identify (its regressor never varies independently, e.g. no iteration
    prefilled) is set to 0; fit with a mix of prefill and decode iterations of several sizes.
    """
    if len(records) < 2:
        raise ValueError(f"fit_cost_model needs at least 2 measured iterations, got {len(records)}")
    rows = [r.features() for r in records]
    y = [r.duration for r in records]
    # scale columns to unit size so the elimination threshold means the same for tokens and seconds
    scales = [max(abs(x[j]) for x in rows) or 1.0 for j in range(4)]
    xs = [[x[j] / scales[j] for j in range(4)] for x in rows]
    normal = [[sum(x[i] * x[j] for x in xs) for j in range(4)] for i in range(4)]
    rhs = [sum(x[i] * t for x, t in zip(xs, y)) for i in range(4)]
    coef = [0.0 if c is None else c / s for c, s in zip(_solve(normal, rhs), scales)]
    return CostModel(coef[0], coef[1], coef[2], coef[3], name)


def fit_error(model: CostModel, records: Sequence[IterationRecord]) -> float:
    """Mean relative error of ``model``'s predictions over ``records``."""
    return sum(abs(model.predict(r) - r.duration) / r.duration for r in records if r.duration) / max(len(records), 1)


def pipeline_cycle(stage_times: Sequence[float], microbatches: int) -> float:
    """Steady-state cycle of a pipelined decode loop: ``max(sum t_j, p * max t_j)`` with p microbatches in flight
    (each microbatch needs all stages in turn; the slowest stage serves p microbatches per cycle)."""
    if not stage_times or microbatches < 1:
        raise ValueError(f"pipeline_cycle needs stage times and microbatches >= 1, got {stage_times}, {microbatches}")
    return max(sum(stage_times), microbatches * max(stage_times))


@dataclass(frozen=True)
class PipelineCost:
    """An iteration split over pipeline stages in proportion to ``stage_weights`` (e.g. layers per stage), plus
    ``comm`` seconds per hop; ``microbatches`` iterations are in flight (vLLM's virtual engines)."""

    model: CostModel
    stage_weights: tuple[float, ...] = (1.0, 1.0)
    comm: float = 0.0
    microbatches: int | None = None  # default: one per stage

    def __post_init__(self) -> None:
        if not self.stage_weights or any(w <= 0 for w in self.stage_weights):
            raise ValueError(f"PipelineCost: stage_weights must be positive, got {self.stage_weights}")
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"PipelineCost: microbatches must be >= 1, got {self.microbatches}")

    @classmethod
    def uniform(cls, model: CostModel, stages: int, comm: float = 0.0) -> "PipelineCost":
        return cls(model, (1.0,) * stages, comm)

    @property
    def stages(self) -> int:
        return len(self.stage_weights)

    @property
    def in_flight(self) -> int:
        return self.microbatches or self.stages

    def stage_times(self, it: Iteration) -> list[float]:
        total, weight = self.model.iteration_time(it), sum(self.stage_weights)
        return [total * w / weight for w in self.stage_weights]
