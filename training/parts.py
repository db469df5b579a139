# This rank's share of the model: build, shard (tp), split (pp), name every parameter, and run one step.
"""What the training loop holds, whatever the layout:

* :func:`build_parts` builds the dense model identically on every rank (same seed), applies tensor
  parallelism (``apply_tp`` on the whole model, so the pipeline stages cut next hold the sharded
  layers), splits it into the plan's stages and keeps this rank's, applies recomputation, and names
  every local parameter by its name in the plain model (:class:`~pipeloom.training.checkpoint.ParamSpec`):
  checkpoints, gradient clipping and the optimizer are layout-independent through these names.
* :class:`LocalStep` runs one training step on one pipeline rank (pp=1) by executing the plan's F and B
  actions over the microbatches, timing each into a :class:`~pipeloom.schedules.Timeline`.
* :class:`PipelineStep` does the same through :class:`pipeloom.parallel.runtime.PipelineRuntime` (pp>1).

Both leave the averaged-over-microbatches gradients in ``.grad`` and return ``(loss, timeline)``; the
loop then averages over dp, clips, and steps the optimizer.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from pipeloom.models import ModelConfig, Transformer
from pipeloom.schedules import Plan
from pipeloom.schedules.ir import Kind
from pipeloom.schedules.timeline import Interval, Timeline
from torch import nn

from .checkpoint import ParamSpec


@dataclass
class ModelParts:
    """The modules this rank runs (``{stage: module}``; pp=1: ``{0: the model}``) and their parameters."""

    model: Transformer  # the full model object every rank built (only this rank's stages are used)
    modules: dict[int, nn.Module]
    config: ModelConfig
    plan: Plan
    specs: list[ParamSpec] = field(default_factory=list)
    tied: list[dict[int, str]] = field(default_factory=list)  # StageSplit.tied (pp > 1)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(full-model name, parameter)`` of every distinct local parameter."""
        return [(s.name, s.param) for s in self.specs]

    def train(self, mode: bool = True) -> None:
        for m in self.modules.values():
            m.train(mode)

    @property
    def loss_fn(self):
        return self.model.loss  # cross entropy, or the vocab-parallel one after apply_tp


def _stage_to_model_name(name: str, n_layers: int) -> str:
    """``"3.attn.wq.weight"`` (a Stage's layer index) -> ``"blocks.2.attn.wq.weight"``."""
    index, rest = name.split(".", 1)
    i = int(index)
    prefix = "embed" if i == 0 else ("head" if i == n_layers + 1 else f"blocks.{i - 1}")
    return f"{prefix}.{rest}"


def _tp_layout(modules: dict[int, nn.Module]) -> dict[int, tuple[int, int]]:
    """``id(param) -> (shard dim, full size)`` for parameters sharded by pipeloom's tensor-parallel layers."""
    from pipeloom.parallel.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    out: dict[int, tuple[int, int]] = {}
    for module in modules.values():
        for m in module.modules():
            if isinstance(m, ColumnParallelLinear):
                out[id(m.weight)] = (0, m.out_features)
                if m.bias is not None:
                    out[id(m.bias)] = (0, m.out_features)
            elif isinstance(m, RowParallelLinear):
                out[id(m.weight)] = (1, m.in_features)
            elif isinstance(m, VocabParallelEmbedding):
                out[id(m.weight)] = (0, m.num_embeddings)
    return out


def param_specs(modules: dict[int, nn.Module], aliases: dict[str, str], n_layers: int, staged: bool,
                tp_rank: int = 0) -> list[ParamSpec]:
    """Name every distinct local parameter by its full-model name; mark tied second copies and tp replicas."""
    layout = _tp_layout(modules)
    specs, seen = [], set()
    for module in modules.values():
        for local, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = _stage_to_model_name(local, n_layers) if staged else local
            canonical = aliases.get(name, name)
            shard = layout.get(id(p))
            shape = list(p.shape)
            if shard is not None:
                shape[shard[0]] = shard[1]
            primary = canonical == name
            specs.append(ParamSpec(canonical, p, tuple(shape), None if shard is None else shard[0], primary,
                                   counted=primary and (shard is not None or tp_rank == 0)))
    return specs


def build_parts(config: ModelConfig, plan: Plan, *, mesh=None, seed: int = 0, device: str | torch.device = "cpu",
                sequence_parallel: bool = False, recompute: str = "none", split: str = "uniform",
                init_state: dict[str, torch.Tensor] | None = None, compile: bool | str = False) -> ModelParts:
    """Build the model and keep this rank's part of it (see the module docstring).

    ``init_state``: a state dict of the plain model (e.g. an imported Hugging Face checkpoint) loaded
    before sharding. Every rank must call this with the same arguments (the dense init uses ``seed``).
    ``compile``: :func:`compile_blocks` this rank's transformer blocks (True: Inductor; a string names
    another ``torch.compile`` backend).
    """
    from pipeloom.parallel.apply import RecomputePolicy, apply_recompute, apply_tp

    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config)
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    aliases = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(p), name)
    tp = mesh.tp if mesh is not None else 1
    if tp > 1:
        apply_tp(model, mesh, sequence_parallel=sequence_parallel)
    tied: list[dict[int, str]] = []
    if plan.pp == 1 and plan.num_stages == 1:
        modules: dict[int, nn.Module] = {0: model}
        staged = False
    else:
        from pipeloom.parallel.stage import split_stages

        stage_split = split_stages(model, plan.num_stages, method=split)
        rank = mesh.pp_rank if mesh is not None else 0
        modules = stage_split.for_rank(plan, rank)
        tied = stage_split.tied
        staged = True
    if recompute != "none":
        for module in modules.values():
            apply_recompute(module, RecomputePolicy(recompute))
    if compile:
        split_backward = any(a.kind is Kind.W for actions in plan.ranks for a in actions)
        compile_blocks(modules.values(), backend="inductor" if compile is True else compile,
                       split_backward=split_backward)
    specs = param_specs(modules, aliases, config.n_layers, staged, tp_rank=mesh.tp_rank if mesh is not None else 0)
    return ModelParts(model=model, modules=modules, config=config, plan=plan, specs=specs, tied=tied)


def compile_blocks(modules, backend: str = "inductor", split_backward: bool = False) -> int:
    """``torch.compile`` every transformer :class:`~pipeloom.models.layers.Block` in ``modules``, in place.

    Per block, as torchtitan does: the stage split, tensor parallelism and recomputation keep working on
    the modules they changed, parameter names and checkpoints do not change (``nn.Module.compile``), and
    the blocks share one compiled graph (Dynamo treats module parameters as inputs). Inside the graph the
    fused Triton kernels step aside and Inductor fuses the norms and activations itself; the embedding,
    final norm, head and loss stay eager (the fused cross-entropy runs there). Returns the block count.

    ``split_backward`` (a zero-bubble plan: B keeps the graph for W): AOTAutograd's donated buffers, which
    let a compiled backward reuse its saved tensors' memory and so forbid ``retain_graph=True``, are
    turned off for the process (``torch._functorch.config.donated_buffer``).
    """
    from pipeloom.models.layers import Block

    if split_backward:
        torch._functorch.config.donated_buffer = False
    blocks = [m for module in modules for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


class LocalStep:
    """One training step on a single pipeline rank: the plan's F and B actions in plan order.

    Each F runs the whole model on a microbatch and keeps its loss; each B back-propagates
    ``loss / m`` (gradients accumulate to the microbatch mean). A plan that splits backward into B and
    W runs the full backward at B; W costs nothing here.
    """

    def __init__(self, parts: ModelParts, autocast=None):
        if parts.plan.pp != 1:
            raise ValueError(f"LocalStep runs pp=1 plans; plan {parts.plan.name!r} has pp={parts.plan.pp}")
        self.parts = parts
        self.model = parts.modules[0]
        self.autocast = autocast or contextlib.nullcontext
        self.actions = [a for a in parts.plan.ranks[0] if a.kind.is_compute]
        self.last_full_timeline: Timeline | None = None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, Timeline]:
        """inputs, targets (b, T) long: the mean loss over this rank's rows, and the measured timeline."""
        m = self.parts.plan.microbatches
        xs, ys = torch.tensor_split(inputs, m), torch.tensor_split(targets, m)  # m x (b/m, T)
        self.model.zero_grad(set_to_none=True)
        pending: dict[int, torch.Tensor] = {}
        total = None  # summed on the device: one host sync per step (at the end), not one per microbatch
        intervals = []
        for a in self.actions:
            start = time.perf_counter()
            if a.kind is Kind.F:
                with self.autocast():
                    logits = self.model(xs[a.microbatch])  # (b/m, T, V) or (b/m, T, V/tp)
                    loss = self.parts.loss_fn(logits, ys[a.microbatch])
                pending[a.microbatch] = loss
                total = loss.detach().double() if total is None else total + loss.detach().double()
            elif a.kind is Kind.B:
                (pending.pop(a.microbatch) / m).backward()
            intervals.append(Interval(0, a, start, time.perf_counter()))
        self.last_full_timeline = Timeline(tuple(intervals), pp=1, unit="s")
        return float(total) / m, self.last_full_timeline

    def timeline(self) -> Timeline:
        """The last step's measured timeline (one rank: nothing to gather)."""
        return self.last_full_timeline

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Mean loss of a batch (b, T), run in the plan's microbatches."""
        total, rows = 0.0, 0
        for x, y in zip(torch.tensor_split(inputs, self.parts.plan.microbatches),
                        torch.tensor_split(targets, self.parts.plan.microbatches)):
            if len(x):
                with self.autocast():
                    total += float(self.parts.loss_fn(self.model(x), y)) * len(x)
                rows += len(x)
        return total / rows


class PipelineStep:
    """One training step through the pipeline runtime (pp > 1); the optimizer stays outside it."""

    def __init__(self, parts: ModelParts, mesh, autocast=None, timeout: float = 300.0):
        from pipeloom.parallel.runtime import PipelineRuntime

        self.parts, self.mesh = parts, mesh
        self.autocast = autocast or contextlib.nullcontext
        # No optimizer here: UPDATE leaves the gradients in .grad, so the loop can average them over dp and
        # clip the global norm across pp and tp before its own optimizer step.
        self.runtime = PipelineRuntime(parts.plan, parts.modules, parts.loss_fn, tied=parts.tied, mesh=mesh,
                                       timeout=timeout)
        self._eval = None
        self.timeout = timeout
        self.last_full_timeline: Timeline | None = None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, Timeline]:
        """The full-batch mean loss (on every pp rank) and this rank's measured timeline."""
        with self.autocast():
            result = self.runtime.step(inputs, targets)
        return result.loss, result.timeline

    def timeline(self) -> Timeline:
        """The last step's timeline of every pipeline rank (collective over the pp group)."""
        self.last_full_timeline = self.runtime.gather_timeline()
        return self.last_full_timeline

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Mean loss of a batch through the training plan's forwards only (same stage placement)."""
        from pipeloom.parallel.runtime import PipelineRuntime

        if self._eval is None:
            plan = self.parts.plan
            forwards = plan.replace(ranks=[[a for a in r if a.kind is Kind.F] for r in plan.ranks],
                                    name=f"{plan.name}-forward")
            self._eval = PipelineRuntime(forwards, self.parts.modules, self.parts.loss_fn, tied=self.parts.tied,
                                         mesh=self.mesh, timeout=self.timeout)  # the mesh's link groups, shared
        with self.autocast():
            return self._eval.step(inputs, targets).loss
