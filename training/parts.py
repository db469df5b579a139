# This rank's share of the model: build, shard (tp), split (pp), compile, and name every parameter.
"""What the training loop holds, whatever the layout:

* :func:`build_parts` builds the dense model identically on every rank (same seed), applies tensor
  parallelism (``apply_tp`` on the whole model, so the pipeline stages cut next hold the sharded
  layers), splits it into the plan's stages and keeps this rank's, applies recomputation, and names
  every local parameter by its name in the plain model (:class:`~pipeloom.training.checkpoint.ParamSpec`):
  checkpoints, gradient clipping and the optimizer are layout-independent through these names.

One training step over these parts is :mod:`pipeloom.training.steps` (``LocalStep``, ``PipelineStep``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pipeloom.models import ModelConfig, Transformer
from pipeloom.schedules import Plan
from pipeloom.schedules.ir import Kind
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
    step_context: Callable = contextlib.nullcontext  # entered around every training step (see compile_blocks)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(full-model name, parameter)`` of every distinct local parameter."""
        return [(s.name, s.param) for s in self.specs]

    def train(self, mode: bool = True) -> None:
        for m in self.modules.values():
            m.train(mode)

    def rng_streams(self) -> dict:
        """This rank's tensor-parallel dropout streams by name (what a checkpoint saves and restores)."""
        from pipeloom.parallel.rng import find_streams

        return find_streams(self.modules.values())

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
                                   counted=primary and (shard is not None or tp_rank == 0), local_name=name))
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
    step_context = contextlib.nullcontext
    if compile:
        compile_blocks(modules.values(), backend="inductor" if compile is True else compile)
        if any(a.kind is Kind.W for actions in plan.ranks for a in actions):
            step_context = no_donated_buffers
    specs = param_specs(modules, aliases, config.n_layers, staged, tp_rank=mesh.tp_rank if mesh is not None else 0)
    return ModelParts(model=model, modules=modules, config=config, plan=plan, specs=specs, tied=tied,
                      step_context=step_context)


def no_donated_buffers():
    """A context in which AOTAutograd donates no saved buffers to compiled backwards, restored on exit.

    A zero-bubble plan's B keeps the graph for its W (``retain_graph=True``), which a compiled backward
    that reuses its saved tensors' memory forbids (``torch._functorch.config.donated_buffer``). The flag
    is read where the graphs compile (lazily, in the first forward and backward) and checked when a
    backward runs, so :class:`~pipeloom.training.steps.PipelineStep` runs every step inside this context
    (``ModelParts.step_context``) rather than flipping it for the whole process.
    """
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)


def compile_blocks(modules, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer :class:`~pipeloom.models.layers.Block` in ``modules``, in place.

    Per block, as torchtitan does: the stage split, tensor parallelism and recomputation keep working on
    the modules they changed, parameter names and checkpoints do not change (``nn.Module.compile``), and
    the blocks share one compiled graph (Dynamo treats module parameters as inputs). Inside the graph the
    fused Triton kernels step aside and Inductor fuses the norms and activations itself; the embedding,
    final norm, head and loss stay eager (the fused cross-entropy runs there). Returns the block count.
    Changes no process-wide setting: a plan that splits backward runs its steps in :func:`no_donated_buffers`.
    """
    from pipeloom.models.layers import Block

    blocks = [m for module in modules for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
