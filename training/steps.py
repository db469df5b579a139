# One training step per layout: LocalStep (pp=1), PipelineStep (the pipeline runtime), and their loss convention.
"""What the loop calls once per optimizer step (:func:`make_stepper` picks one):

* :class:`LocalStep` runs one step on a single pipeline rank (pp=1) by executing the plan's F and B
  actions over the microbatches, timing each into a :class:`~pipeloom.schedules.Timeline`.
* :class:`PipelineStep` runs it through :class:`pipeloom.parallel.runtime.PipelineRuntime` (pp > 1, and
  every weight-versioned plan: PipeDream and PipeDream-2BW update weights during the step).

Loss convention, the same for every layout: the loss of a step is the mean over the valid targets
(``!= -100``) of the whole global batch - every microbatch of every data-parallel replica. Each
microbatch's mean loss is weighted by its count of valid targets over the global count (summed over the
dp group once per step), so the gradients a step leaves in ``.grad`` are this replica's *share* of the
global-batch gradient, and the data-parallel reduction adds the shares
(``allreduce_gradients(..., op="sum")``): one process on the whole batch gets the same gradients, however
unevenly the microbatches and the ignored targets fall. The loss a step returns is the replica's share
likewise (the loop sums it over dp). Weight-versioned plans normalise over each update's group of
microbatches instead (:func:`pipeloom.parallel.versions.update_groups`), summed over dp the same way.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from pipeloom.schedules.ir import Kind
from pipeloom.schedules.timeline import Interval, Timeline

from .grads import GradReducer
from .optim import clip_grad_norm
from .parts import ModelParts

IGNORE_INDEX = -100  # targets that do not count (torch's cross-entropy default)


def valid_counts(targets: list[torch.Tensor]) -> list[int]:
    """The number of targets ``!= -100`` in each microbatch (one host sync for all of them)."""
    return torch.stack([(t != IGNORE_INDEX).sum() for t in targets]).tolist()


def global_count(local: int, dp_group, device) -> float:
    """``local`` summed over the data-parallel group (one all-reduce; identity without a group)."""
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return float(local)
    count = torch.tensor([float(local)], dtype=torch.float64, device=device)
    dist.all_reduce(count, group=dp_group)
    return float(count)


def _zero_loss(outputs) -> torch.Tensor:
    """A zero that keeps the graph (a microbatch whose targets are all ignored: zero gradients, no NaN)."""
    return outputs.sum() * 0.0


class LocalStep:
    """One training step on a single pipeline rank: the plan's F and B actions in plan order.

    Each F runs the whole model on a microbatch; each B back-propagates its mean loss times its valid
    targets over the global batch's (see the module docstring). A plan that splits backward into B and W
    runs the full backward at B; W costs nothing here. ``dp_group``: the data-parallel group (None: one
    replica).
    """

    updates_weights = False  # the loop reduces, clips and steps the optimizer after the step

    def __init__(self, parts: ModelParts, autocast=None, dp_group=None, grads: GradReducer | None = None):
        if parts.plan.pp != 1 or parts.plan.is_versioned:
            raise ValueError(f"LocalStep runs synchronous pp=1 plans; plan {parts.plan.name!r} has pp={parts.plan.pp}"
                             f"{' and weight versions' if parts.plan.is_versioned else ''}: use PipelineStep")
        self.parts = parts
        self.model = parts.modules[0]
        self.autocast = autocast or contextlib.nullcontext
        self.dp_group = dp_group
        self.actions = [a for a in parts.plan.ranks[0] if a.kind.is_compute]
        self.grads = grads or GradReducer(parts, dp_group, self.actions)
        self.last_full_timeline: Timeline | None = None

    def reduce_gradients(self) -> None:
        """Sum this step's gradient shares over the dp group (:class:`~pipeloom.training.grads.GradReducer`)."""
        self.grads.finish()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, Timeline]:
        """inputs, targets (b, T) long: this replica's share of the global-batch mean loss, and the timeline."""
        m = self.parts.plan.microbatches
        xs, ys = torch.tensor_split(inputs, m), torch.tensor_split(targets, m)  # m x (b/m, T), one row apart
        counts = valid_counts(ys)
        total = global_count(sum(counts), self.dp_group, targets.device)
        self.model.zero_grad(set_to_none=True)
        pending: dict[int, torch.Tensor] = {}
        share = None  # summed on the device: one host sync per step (at the end), not one per microbatch
        intervals = []
        for a in self.actions:
            start = time.perf_counter()
            with self.grads.around(a):
                self._run(a, xs, ys, counts, total, pending)
            value = pending.pop(("value", a.microbatch), None) if a.kind is Kind.F else None
            if value is not None:
                share = value if share is None else share + value
            intervals.append(Interval(0, a, start, time.perf_counter()))
        self.last_full_timeline = Timeline(tuple(intervals), pp=1, unit="s")
        return (0.0 if share is None else float(share)), self.last_full_timeline

    def _run(self, a, xs, ys, counts, total, pending) -> None:
        """One F (the microbatch's loss, and its share as ``("value", mb)``, into ``pending``) or B (its backward)."""
        if a.kind is Kind.F:
            with self.autocast():
                logits = self.model(xs[a.microbatch])  # (b/m, T, V) or (b/m, T, V/tp)
                if counts[a.microbatch] == 0:
                    loss, value = _zero_loss(logits), None
                else:
                    mean = self.parts.loss_fn(logits, ys[a.microbatch])
                    loss = mean * (counts[a.microbatch] / total)
                    value = mean.detach().double() * (counts[a.microbatch] / total)
            pending[a.microbatch] = loss
            pending[("value", a.microbatch)] = value
        elif a.kind is Kind.B:
            pending.pop(a.microbatch).backward()

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


class StageUpdate:
    """The optimizer step of one stage inside a weight-versioned step (PipeDream, 2BW).

    The runtime calls :meth:`step` at each ``UPDATE``: the stage's gradients are summed over ``dp_group``
    (they are shares of the update group's global mean; leave it None where the runtime, given a mesh with
    dp > 1, has summed them already, as :func:`make_stepper` does), sequence-parallel norm gradients added
    over tp, the norm of this stage's gradient clipped (over tp only: the stages update at different
    moments, and a pipeline-wide norm would need the synchronisation these schedules remove), and the
    optimizer stepped.
    """

    def __init__(self, optimizer, parts: ModelParts, *, dp_group=None, tp_group=None, grad_clip: float = 0.0,
                 sequence_parallel: bool = False):
        self.optimizer, self.parts = optimizer, parts
        self.dp_group, self.tp_group, self.grad_clip = dp_group, tp_group, grad_clip
        self.sequence_parallel = sequence_parallel
        self.norms: list[float] = []  # the norm before clipping of every update since the step began

    def step(self) -> None:
        from pipeloom.parallel.data_parallel import allreduce_gradients

        if self.dp_group is not None:
            allreduce_gradients([s.param for s in self.parts.specs], self.dp_group, op="sum")
        if self.sequence_parallel and self.tp_group is not None:
            from pipeloom.parallel.tensor_parallel import sync_sequence_parallel_grads

            for module in self.parts.modules.values():
                sync_sequence_parallel_grads(module, self.tp_group)
        self.norms.append(clip_grad_norm([(s.param, s.counted) for s in self.parts.specs], self.grad_clip,
                                         groups=(self.tp_group,)))
        self.optimizer.step()


class PipelineStep:
    """One training step through the pipeline runtime.

    Synchronous plans: the optimizer stays outside (UPDATE leaves the gradients in ``.grad``, so the loop
    can sum them over dp and clip the global norm across pp and tp first). Weight-versioned plans: pass
    ``update`` (a :class:`StageUpdate`), which the runtime runs at every UPDATE of this rank's stage.
    """

    def __init__(self, parts: ModelParts, mesh, autocast=None, timeout: float = 300.0, dp_group=None,
                 update: StageUpdate | None = None, grads: GradReducer | None = None):
        from pipeloom.parallel.runtime import PipelineRuntime

        self.parts, self.mesh = parts, mesh
        self.autocast = autocast or contextlib.nullcontext
        self.update = update
        self.updates_weights = parts.plan.is_versioned
        if self.updates_weights and update is None:
            raise ValueError(f"plan {parts.plan.name!r} updates weights during the step: pass update=StageUpdate(...)")
        optimizers = {s: update for s in parts.modules} if self.updates_weights else None
        rank = mesh.pp_rank if mesh is not None else 0
        self.grads = grads or GradReducer(parts, dp_group, parts.plan.ranks[rank])
        # The mesh owns the link groups (shared with the evaluation runtime). With an update inside and dp > 1
        # the runtime sums the replicas' shares over the mesh's dp group before each UPDATE calls it.
        self.runtime = PipelineRuntime(parts.plan, parts.modules, parts.loss_fn, tied=parts.tied, timeout=timeout,
                                       optimizers=optimizers, weight_group=dp_group, mesh=mesh,
                                       around_action=self.grads.around)
        self._eval = None
        self.timeout = timeout
        self.last_full_timeline: Timeline | None = None

    def reduce_gradients(self) -> None:
        """Sum this step's gradient shares over the dp group (:class:`~pipeloom.training.grads.GradReducer`)."""
        self.grads.finish()

    @property
    def grad_norm(self) -> float:
        """Weight-versioned plans: the largest gradient norm (before clipping) of this rank's last step's updates."""
        return max(self.update.norms) if self.update is not None and self.update.norms else 0.0

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, Timeline]:
        """This replica's share of the global-batch mean loss (on every pp rank) and this rank's timeline."""
        if self.update is not None:
            self.update.norms = []
        with self.parts.step_context(), self.autocast():
            result = self.runtime.step(inputs, targets)
        return result.loss, result.timeline

    def held_versions(self) -> dict[int, list[int]]:
        """Per local stage, the weight versions it holds now (between steps: one, the live parameters)."""
        return {s: v.held() for s, v in self.runtime.versions.items()}

    def timeline(self) -> Timeline:
        """The last step's timeline of every pipeline rank (collective over the pp group)."""
        self.last_full_timeline = self.runtime.gather_timeline()
        return self.last_full_timeline

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Mean loss of a batch through the training plan's forwards only (same stage placement, live weights)."""
        from pipeloom.parallel.runtime import PipelineRuntime

        if self._eval is None:
            plan = self.parts.plan
            forwards = plan.replace(ranks=[[a.with_version(None) for a in r if a.kind is Kind.F] for r in plan.ranks],
                                    name=f"{plan.name}-forward")
            self._eval = PipelineRuntime(forwards, self.parts.modules, self.parts.loss_fn, tied=self.parts.tied,
                                         timeout=self.timeout, mesh=self.mesh)  # the mesh's link groups, shared
        with self.autocast():
            return self._eval.step(inputs, targets).loss


def make_stepper(parts: ModelParts, mesh=None, autocast=None, *, optimizer=None, grad_clip: float = 0.0,
                 sequence_parallel: bool = False, timeout: float = 300.0, dp_overlap: bool = False,
                 bucket_mb: float = 25.0):
    """The step for this layout and plan: LocalStep (synchronous, pp=1) or PipelineStep (pp > 1, or a
    weight-versioned plan, which needs ``optimizer``, ``grad_clip`` and ``sequence_parallel`` here since
    it steps the optimizer itself). ``dp_overlap``: the synchronous steps launch the data-parallel
    gradient all-reduce during backward (:class:`~pipeloom.training.grads.GradReducer`), in buckets of
    ``bucket_mb`` MiB; the loop calls ``stepper.reduce_gradients()`` after the step either way."""
    dp_group = mesh.dp_group if mesh is not None and mesh.dp > 1 else None
    plan = parts.plan
    if not plan.is_versioned:
        rank = mesh.pp_rank if mesh is not None else 0
        grads = GradReducer(parts, dp_group, plan.ranks[rank], overlap=dp_overlap, bucket_mb=bucket_mb)
        if plan.pp == 1:
            return LocalStep(parts, autocast, dp_group=dp_group, grads=grads)
        return PipelineStep(parts, mesh, autocast, timeout=timeout, dp_group=dp_group, grads=grads)
    if dp_overlap:
        raise ValueError(f"plan {plan.name!r} updates weights inside the step, where StageUpdate reduces each "
                         "update's gradients itself: dp_overlap applies to synchronous plans")
    if optimizer is None:
        raise ValueError(f"plan {plan.name!r} updates weights during the step: pass the optimizer")
    if len(parts.modules) != 1:
        raise ValueError(f"plan {plan.name!r} places {len(parts.modules)} stages on one rank; weight-versioned "
                         "training steps one optimizer per rank, so it needs one stage per rank")
    tp_group = mesh.tp_group if mesh is not None and mesh.tp > 1 else None
    # No dp_group: given the mesh, the runtime sums the shares over dp before each UPDATE calls the update.
    update = StageUpdate(optimizer, parts, tp_group=tp_group, grad_clip=grad_clip,
                         sequence_parallel=sequence_parallel)
    return PipelineStep(parts, mesh, autocast, timeout=timeout, dp_group=dp_group, update=update)
