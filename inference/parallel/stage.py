# One rank's stage of a parallel inference engine: its layers and KV caches, its forward, the sampler's mirror.
"""What every rank of a ``pp x tp`` engine runs, and the messages that travel between them.

* :func:`build_stage` cuts the (tensor-parallel) model into ``pp`` stages with
  :func:`~pipeloom.parallel.split_stages` - any layout method: ``uniform``, ``parameters``, ``time`` (profiled once,
  on the driver, over the dense model), or explicit layer counts - and keeps this rank's.
* :class:`StageRunner` is a :class:`~pipeloom.inference.model_runner.ModelRunner` over one stage: the KV caches of
  its own attention layers (its tensor-parallel share of the key/value heads), all indexed by the driver's block
  tables, and a forward from a :class:`~pipeloom.inference.model_runner.HostBatch` (token ids on the first stage,
  hidden states on the others) to hidden states, or to the sampled rows' logits on the last stage.
* :class:`SamplingMirror` lives on the rank that samples (the last stage's tensor-parallel rank 0): the driver
  sends each sequence's :class:`~pipeloom.inference.sampling.SamplingParams` with its first sampled row (and its
  token history when penalties or ``min_tokens`` need it), the mirror keeps the sequence's own seeded generator,
  and :func:`~pipeloom.inference.engine.sample_rows` draws exactly as the one-process engine does. Only the tokens
  (and asked-for logprobs) go back to the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pipeloom.models.kv import paged_context
from pipeloom.models.transformer import Embedding, Head
from pipeloom.parallel.stage import Stage, split_stages
from torch import nn

from ..engine import sample_rows
from ..model_runner import HostBatch, ModelRunner
from ..sampling import Sampler

# ---------------------------------------------------------------------------------------------- messages


@dataclass
class Run:
    """Microbatch ``k`` (one iteration of lane ``lane``): its batch, and for the sampling rank one entry per sampled
    row ``(sequence id, params the first time else None, (prompt ids, output ids) or None)`` and the sequences it
    may forget."""

    k: int
    lane: int
    host: HostBatch
    spec: list = field(default_factory=list)
    release: list = field(default_factory=list)


@dataclass
class Control:
    """``idle`` (the driver has nothing in flight; wait on the store for ``wake/<n>``), ``end`` (a generate call
    ended), ``stop`` (shut down), ``timeline`` (write your measured intervals to the store as round ``n``)."""

    kind: str
    n: int = 0


@dataclass
class Result:
    """The sampled tokens of microbatch ``k`` (one per sampled row) and their logprobs where asked."""

    k: int
    tokens: list
    logprobs: list


# ---------------------------------------------------------------------------------------------- the stage


def build_stage(model: nn.Module, pp: int, stage_index: int, layout="uniform", *, profile_on_this_rank=False,
                broadcast=None) -> tuple[Stage, tuple[int, ...]]:
    """(this rank's :class:`Stage`, the layout) of ``model`` split into ``pp`` stages.

    ``layout="time"`` profiles every layer's forward + backward where ``profile_on_this_rank`` (the driver, on the
    dense model) and ``broadcast(layout or None) -> layout`` hands the result to every rank (ranks must agree on
    the cut). Call it before :func:`~pipeloom.parallel.apply.apply_tp` in that case; the other methods cut the
    sharded model the same way on every rank.
    """
    if isinstance(layout, str) and layout == "time":
        counts = None
        if profile_on_this_rank:
            sample = torch.randint(0, model.config.vocab_size, (1, min(64, model.config.max_seq_len)),
                                   device=next(model.parameters()).device)
            counts = list(split_stages(model, pp, "time", sample_input=sample).layout)
        layout = broadcast(counts) if broadcast is not None else counts
    split = split_stages(model, pp, layout)
    return split[stage_index], split.layout


class _StageView(nn.Module):
    """What :class:`ModelRunner` reads of a model (``config``, ``blocks``, parameters), for one stage."""

    def __init__(self, stage: Stage, config):
        super().__init__()
        self.stage, self.config = stage, config
        self.blocks = [layer for layer in stage.children() if hasattr(layer, "attn")]


class StageRunner(ModelRunner):
    """A :class:`ModelRunner` over one pipeline stage (eager: no CUDA graphs)."""

    def __init__(self, stage: Stage, config, num_blocks: int, block_size: int, backend: str = "auto"):
        super().__init__(_StageView(stage, config), num_blocks, block_size, backend=backend, cuda_graphs=False)
        self.layers = list(stage.children())
        self.first = isinstance(self.layers[0], Embedding)
        self.last = isinstance(self.layers[-1], Head)
        self.index = stage.index

    @torch.inference_mode()
    def run_stage(self, host: HostBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (1, N, D) after this stage, or on the last stage the logits (R, V) of the sampled rows
        (float32, float64 for a float64 model). ``hidden``: the previous stage's output (None on the first)."""
        ids, batch, rows = self.tensors(host)
        x = ids if self.first else hidden  # (1, N) ids or (1, N, D)
        if x is None:
            raise ValueError(f"stage {self.index} holds no embedding and needs the previous stage's hidden states")
        with paged_context(batch):
            for layer in self.layers:
                x = layer(x[0, rows]) if isinstance(layer, Head) else layer(x)  # the head on the R sampled rows
        if self.last and x.dtype != torch.float64:
            return x.float()
        return x


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class _Row:
    params: object
    generator: torch.Generator | None
    prompt_ids: list = field(default_factory=list)
    output_ids: list = field(default_factory=list)


class SamplingMirror:
    """The sampling rank's copy of what each sequence samples with: its params and its own seeded generator,
    kept across iterations (and preemptions) until the driver releases it; a shared generator (``seed``) for
    sequences without a seed, as the one-process engine has."""

    def __init__(self, *, eos_token_id: int | None, seed: int, device: torch.device):
        self.device = device
        self.sampler = Sampler(eos_token_id=eos_token_id, generator=torch.Generator(device=device).manual_seed(seed))
        self.rows: dict[str, _Row] = {}

    def sample(self, logits: torch.Tensor, spec: list, release: list) -> tuple[list[int], list]:
        for seq_id in release:  # before the spec: a released id may come back as a new sequence
            self.rows.pop(seq_id, None)
        rows = []
        for seq_id, params, history in spec:
            row = self.rows.get(seq_id)
            if row is None or params is not None:
                if params is None:
                    raise RuntimeError(f"the sampling rank has no sampling params for sequence {seq_id!r}: the "
                                       "driver must send them with its first sampled row")
                row = self.rows[seq_id] = _Row(params, params.generator(self.device))
            if history is not None:
                row.prompt_ids, row.output_ids = history
            rows.append(row)
        return sample_rows(self.sampler, logits, rows)


def needs_history(params) -> bool:
    """Whether sampling ``params`` reads the token history (penalties, min_tokens)."""
    return bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
                or params.min_tokens)
