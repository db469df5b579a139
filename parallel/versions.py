# Weight versions of a stage under PipeDream-style plans (stash, vertical sync, 2BW) and update groups.
"""What ``UPDATE@v`` and ``RELEASE@v`` mean at run time (semantics of :mod:`pipeloom.schedules.lowering`,
docs/schedule-facts.md).

Every stage starts a step at version 0, the module's current parameters. ``UPDATE@v`` runs the optimizer
on the live parameters (the newest version, v-1) with the gradients accumulated since the previous
update, creating v. Version v-1 must survive the update only if the plan releases it later
(``RELEASE@(v-1)``): then it is *stashed*. A stashed version is snapshotted when it is created (a detached
copy of the parameters), and forwards and backwards that use it run through ``torch.func.functional_call``
on the snapshot, so the optimizer can change the live parameters in place without touching a graph that
still needs the old values. Versions that are never stashed use the live parameters directly and cost
nothing. Memory: one snapshot per live stashed version (PipeDream's p-s versions per stage, plus the live
copy). Gradients computed against a snapshot are added to the live parameters' ``.grad``.

Weight stashing: arXiv 1806.03377 §3.4. Vertical sync: the same paper, §3.4. 2BW: arXiv 2006.09503 §3.1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pipeloom.schedules.ir import Kind, Plan
from torch import nn


class StageVersions:
    """The weight versions one stage holds during a step of a versioned plan."""

    def __init__(self, stage: int, module: nn.Module, actions: Sequence):
        self.stage = stage
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.live = dict(module.named_parameters())
        self.stashed = {a.version for a in actions if a.kind is Kind.RELEASE and a.stage == stage}
        self.newest = 0
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def begin(self) -> None:
        """Start a step: version 0 is the live parameters (snapshotted if the plan stashes it)."""
        self.newest = 0
        self.snapshots = {}
        if 0 in self.stashed:
            self._snapshot(0)

    def _snapshot(self, version: int) -> None:
        with torch.no_grad():
            self.snapshots[version] = {n: p.detach().clone().requires_grad_(p.requires_grad)
                                       for n, p in self.live.items()}

    def tensors(self, version: int | None) -> dict[str, torch.Tensor] | None:
        """Parameter tensors of ``version`` for ``functional_call``; None means the live module."""
        if version is None:
            return None
        if version in self.snapshots:
            return self.snapshots[version]
        if version == self.newest:
            return None
        raise RuntimeError(f"stage {self.stage} has no weight version {version} (newest {self.newest}, stashed "
                           f"{sorted(self.snapshots)}): the plan uses a version it did not keep")

    def update(self, version: int | None, step: Callable[[], None]) -> None:
        """``UPDATE@version``: run ``step`` (the optimizer) on the live parameters, creating ``version``."""
        if version is not None and version != self.newest + 1:
            raise RuntimeError(f"stage {self.stage}: UPDATE@{version} after version {self.newest}; versions must "
                               f"increase by one")
        step()
        self.newest = self.newest + 1 if version is None else version
        if self.newest in self.stashed:
            self._snapshot(self.newest)

    def release(self, version: int) -> None:
        """``RELEASE@version``: drop a stashed snapshot after its last use."""
        if self.snapshots.pop(version, None) is None:
            raise RuntimeError(f"stage {self.stage}: RELEASE@{version} of a version that is not stashed "
                               f"(stashed: {sorted(self.snapshots)})")

    def held(self) -> list[int]:
        """The versions this stage holds now: the stashed snapshots and the live (newest) parameters."""
        return sorted(set(self.snapshots) | {self.newest})

    def end(self) -> None:
        """End a step: forget the snapshot of the newest version (the live parameters are it)."""
        self.snapshots.pop(self.newest, None)
        if self.snapshots:
            raise RuntimeError(f"stage {self.stage}: versions {sorted(self.snapshots)} were stashed but never "
                               f"released by the plan")


def last_backward_kind(plan: Plan, stage: int, microbatch: int) -> Kind:
    """The action that finishes a microbatch's gradient on a stage: W when the backward is split, else B."""
    return Kind.W if plan.splits_backward(stage, microbatch) else Kind.B


def update_groups(plan: Plan) -> list[tuple[int, ...]]:
    """The microbatches whose gradients each UPDATE applies, in update order (the last group may have none).

    Loss normalisation follows from it: a microbatch's loss is divided by the weight (valid targets) of
    its whole group, so every update applies the gradient of its group's mean loss. One group for
    synchronous plans (the full-batch mean); one microbatch per group for PipeDream; ``update_every``
    microbatches for 2BW. All stages must agree, since a gradient flows through every stage.
    """
    if plan.is_forward_only:
        return [tuple(range(plan.microbatches))]
    per_stage: dict[int, list[tuple[int, ...]]] = {}
    for rank, actions in enumerate(plan.ranks):
        current: dict[int, list[int]] = {s: [] for s in plan.stages_of(rank)}
        groups: dict[int, list[tuple[int, ...]]] = {s: [] for s in plan.stages_of(rank)}
        for a in actions:
            if a.kind in (Kind.B, Kind.W) and a.kind is last_backward_kind(plan, a.stage, a.microbatch):
                current[a.stage].append(a.microbatch)
            elif a.kind is Kind.UPDATE:
                groups[a.stage].append(tuple(sorted(current[a.stage])))
                current[a.stage] = []
        for s, stage_groups in groups.items():
            if current[s]:
                stage_groups.append(tuple(sorted(current[s])))
            per_stage[s] = stage_groups
    reference = per_stage[0]
    for s, groups in sorted(per_stage.items()):
        if groups != reference:
            raise ValueError(f"plan {plan.name!r}: stage {s} updates after microbatch groups {groups}, stage 0 "
                             f"after {reference}; the runtime needs every stage to update on the same groups "
                             f"(the loss of a microbatch is normalised over its group)")
    return reference
