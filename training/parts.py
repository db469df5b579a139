# This rank's share of the model: build, shard (tp), split (pp), compile, and name every parameter.
"""What the training loop holds, whatever the layout:

* :func:`build_parts` builds the model on the meta device, splits it into the plan's stages, allocates
  and initialises (or loads) only the layers of this rank's stages - number for number the dense model's
  (:mod:`pipeloom.training.build`) - applies tensor parallelism (``apply_tp`` on the whole model: the
  other stages' layers become meta shards), recomputation and compilation, and names every local
  parameter by its name in the plain model (:class:`~pipeloom.training.checkpoint.ParamSpec`):
  checkpoints, gradient clipping and the optimizer are layout-independent through these names.

One training step over these parts is :mod:`pipeloom.training.steps` (``LocalStep``, ``PipelineStep``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pipeloom.models import ModelConfig, Transformer
from pipeloom.models.transformer import Head
from pipeloom.schedules import Plan
from pipeloom.schedules.ir import Kind
from torch import nn

from .build import StateSource
from .checkpoint import ParamSpec


@dataclass
class ModelParts:
    """The modules this rank runs (``{stage: module}``; pp=1: ``{0: the model}``) and their parameters."""

    model: Transformer  # the model object; only this rank's stages' layers are off the meta device
    modules: dict[int, nn.Module]
    config: ModelConfig
    plan: Plan
    specs: list[ParamSpec] = field(default_factory=list)
    tied: list[dict[int, str]] = field(default_factory=list)  # StageSplit.tied (pp > 1)
    step_context: Callable = contextlib.nullcontext  # entered around every training step (see compile_blocks)
    float8: object = None  # training.float8.Float8Report when the linears were converted to float8

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
                init_state: StateSource | None = None, compile: bool | str = False, float8: str = "off",
                float8_min_dim: int | None = None, float8_head: bool = False,
                float8_fast_accum: bool = False) -> ModelParts:
    """Build this rank's part of the model (see the module docstring).

    Per-stage: the model is built on the meta device and split into the plan's stages there; only the
    pipeline layers of this rank's stages are allocated on ``device`` and initialised exactly as the
    dense model built after ``torch.manual_seed(seed)`` (:func:`~pipeloom.training.build.fill_layers`), so
    a run is reproducible whatever the layout, and a pp=4 rank allocates about a quarter of the parameters.
    ``init_state``: the initial weights instead of the init - a state dict of the plain model, or a
    function from this rank's parameter names to their tensors (``functools.partial(read_hf_tensors,
    folder, config)`` reads only those from a Hugging Face folder). The layers are split on their dense
    shapes (before tensor parallelism), so a layout method gives the same stages whatever tp.
    ``compile``: :func:`compile_blocks` this rank's transformer blocks (True: Inductor; a string names
    another ``torch.compile`` backend). ``float8``: ``"tensorwise"`` or ``"rowwise"`` converts this rank's
    large enough linears to torchao's float8 training layers after tensor parallelism, before compiling
    (:func:`~pipeloom.training.float8.apply_float8`; ``float8_min_dim`` its size threshold; the report is
    ``ModelParts.float8``); ``float8_head`` converts the output head too (subject to the same size rule),
    and with ``compile`` the head is then compiled as well, so that the casts of its logits-sized gradient
    fuse; ``float8_fast_accum`` gives the backward GEMMs fast accumulation. Leaves the default generator
    where the dense build leaves it (seeded with ``seed``, then one draw), whatever the layout.
    """
    from pipeloom.parallel.apply import RecomputePolicy, apply_recompute, apply_tp

    from .build import fill_layers, forked_rng

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    aliases = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(p), name)
    tied: list[dict[int, str]] = []
    if plan.pp == 1 and plan.num_stages == 1:
        modules: dict[int, nn.Module] = {0: model}
        staged, layers = False, range(config.n_layers + 2)
    else:
        from pipeloom.parallel.stage import split_stages

        stage_split = split_stages(model, plan.num_stages, method=split)  # on the meta model: no memory
        rank = mesh.pp_rank if mesh is not None else 0
        modules = stage_split.for_rank(plan, rank)
        tied = stage_split.tied
        staged, layers = True, [i for module in modules.values() for i in module.layer_ids]
    fill_layers(model, layers, device, init_state)
    tp = mesh.tp if mesh is not None else 1
    if tp > 1:
        with forked_rng(device):  # the layers' constructors draw before the dense weights are copied in
            apply_tp(model, mesh, sequence_parallel=sequence_parallel)  # other stages' layers: meta shards
    report = None
    if float8 != "off":
        from .float8 import DEFAULT_SKIP, apply_float8

        report = apply_float8(modules, float8, min_dim=float8_min_dim, skip=() if float8_head else DEFAULT_SKIP,
                              fast_accum=float8_fast_accum,
                              name_of=(lambda fqn: _stage_to_model_name(fqn, config.n_layers)) if staged else str)
    if recompute != "none":
        for module in modules.values():
            apply_recompute(module, RecomputePolicy(recompute))
    step_context = contextlib.nullcontext
    if compile:
        backend = "inductor" if compile is True else compile
        compile_blocks(modules.values(), backend=backend)
        if report is not None and any(name.startswith("head.") for name in report.converted):
            for head in (m for module in modules.values() for m in module.modules() if isinstance(m, Head)):
                head.compile(backend=backend)  # a float8 head: its casts of (tokens, vocab) gradients fuse
        if any(a.kind is Kind.W for actions in plan.ranks for a in actions):
            step_context = no_donated_buffers
    specs = param_specs(modules, aliases, config.n_layers, staged, tp_rank=mesh.tp_rank if mesh is not None else 0)
    return ModelParts(model=model, modules=modules, config=config, plan=plan, specs=specs, tied=tied,
                      step_context=step_context, float8=report)


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
