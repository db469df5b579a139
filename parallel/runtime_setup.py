# What the pipeline runtime works out once, when it is built: groups, ranks, links, message orders, parameters.
"""Helpers of :class:`~pipeloom.parallel.runtime.PipelineRuntime` that read the plan, the process groups and
the modules once, so that a step reads nothing but their results."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from pipeloom.schedules.ir import Kind, Plan
from torch import nn

from .p2p import inbound_messages


def pipeline_group(plan: Plan, pp_group, pp_ranks):
    """(group, global ranks by pipeline rank, this process's pipeline rank), checked against the plan."""
    if not dist.is_available() or not dist.is_initialized():
        if plan.pp != 1:
            raise RuntimeError(f"plan {plan.name!r} is for {plan.pp} pipeline ranks but torch.distributed is not "
                               f"initialised; launch {plan.pp} processes (torchrun --nproc_per_node={plan.pp}) "
                               f"and call dist.init_process_group first")
        if pp_ranks not in (None, [0], (0,)):
            raise ValueError(f"pp_ranks={pp_ranks} without torch.distributed; a single process is pp_ranks=[0]")
        return None, [0], 0
    group = pp_group if pp_group is not None else dist.group.WORLD
    members = dist.get_process_group_ranks(group)
    size = len(members)
    if plan.pp != size:
        raise ValueError(f"plan {plan.name!r} is for {plan.pp} pipeline ranks, but the pipeline group has {size} "
                         f"(world size {dist.get_world_size()}); build the plan with pp={size} or launch "
                         f"{plan.pp} ranks per pipeline")
    if pp_ranks is not None and list(pp_ranks) != members:
        raise ValueError(f"pp_ranks={list(pp_ranks)} does not match the pipeline group's members {members} "
                         f"(global ranks ordered by pipeline rank)")
    me = dist.get_rank()
    if me not in members:
        raise ValueError(f"global rank {me} is not a member of the pipeline group {members}")
    return group, members, members.index(me)


def update_average_group(mesh, pp_group, owns_optimizers: bool):
    """The group UPDATE reduces gradients over before stepping: the mesh's dp group when dp > 1."""
    if mesh is not None:
        return mesh.dp_group if mesh.dp > 1 else None
    if owns_optimizers and pp_group is not None and dist.get_world_size(pp_group) < dist.get_world_size():
        raise ValueError(
            f"this runtime steps the optimizer (optimizer_factory/optimizers) on a pipeline group of "
            f"{dist.get_world_size(pp_group)} of the world's {dist.get_world_size()} ranks, but cannot see whether "
            f"the other ranks are data-parallel replicas, whose gradients must be reduced before the step or the "
            f"replicas drift apart. Pass mesh=Mesh.build(dp=..., pp=..., tp=...) (the runtime then reduces over "
            f"its dp group first), or build the runtime without an optimizer and step it yourself after averaging")
    return None


P2P_ENV = "PIPELOOM_P2P"  # the transport of a gloo pipeline's links under links="auto": "gloo" or "shm"
P2P_CHOICES = ("gloo", "shm")


def p2p_transport(links, backend: str, device: torch.device) -> str:
    """What :meth:`~pipeloom.parallel.links.PipelineLinks.groups` is asked for (``"gloo"``, ``"shm"`` or
    ``"auto"``), from the runtime's ``links`` (a mode name; a ``PipelineLinks`` counts as ``"auto"``) and, under
    ``"auto"``, the ``PIPELOOM_P2P`` environment variable. Shared memory carries CPU tensors of a gloo pipeline;
    NCCL pipelines keep their process groups whatever the variable says."""
    env = os.environ.get(P2P_ENV, "")
    if env not in ("", *P2P_CHOICES):
        raise ValueError(f"{P2P_ENV}={env!r}; choose one of {P2P_CHOICES} (or leave it unset: shared memory where "
                         f"every rank of a CPU pipeline is on this host, else gloo)")
    cpu_gloo = backend == "gloo" and device.type == "cpu"
    if links == "shm" and not cpu_gloo:
        raise ValueError(f'links="shm" carries CPU tensors between gloo ranks; this pipeline runs {backend} on '
                         f'{device}: use links="auto"')
    if links == "gloo" and backend != "gloo":
        raise ValueError(f'links="gloo" picks gloo process groups over shared memory, but this pipeline\'s backend '
                         f'is {backend}: use links="auto"')
    if links in ("shm", "gloo"):
        return links
    if links in ("directional", "pipeline") or not cpu_gloo:
        return "gloo"
    return env or "auto"


def link_pairs(plan: Plan, tied_groups) -> set[tuple[int, int]]:
    """The (sender, receiver) pipeline-rank pairs a lowered plan's messages and tied groups use."""
    pairs = {(peer, rank) for rank in range(plan.pp) for peer in inbound_messages(plan, rank)}
    for group in tied_groups:
        holders = sorted({plan.rank_of(s) for s in group})
        pairs.update((a, b) for a in holders for b in holders if a != b)
    return pairs


def forward_orders(plan: Plan, rank: int, ordered: bool) -> dict[int, list[int]]:
    """Per stage boundary s -> s+1 between this rank and another: its microbatches in the order the
    receiver takes them (the sender's SEND_F order when ``ordered``, else the receiver's RECV_F order)."""
    orders = {}
    for s in range(plan.num_stages - 1):
        src, dst = plan.rank_of(s), plan.rank_of(s + 1)
        if src == dst or rank not in (src, dst):
            continue
        if ordered:
            orders[s] = [a.microbatch for a in plan.ranks[src] if a.kind is Kind.SEND_F and a.stage == s]
        else:
            orders[s] = [a.microbatch for a in plan.ranks[dst] if a.kind is Kind.RECV_F and a.stage == s + 1]
    return orders


def signature(inputs, extras: Mapping) -> tuple:
    """A (micro)batch's input signature: what its activations' shapes may follow from (shapes, dtypes)."""
    parts = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(_describe(x) for x in parts), tuple((name, _describe(v)) for name, v in sorted(extras.items()))


def _describe(x):
    if torch.is_tensor(x):
        return tuple(x.shape), x.dtype
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return type(x).__qualname__


def device_of(modules: Mapping[int, nn.Module]) -> torch.device:
    devices = {p.device for m in modules.values() for p in m.parameters()}
    if len(devices) > 1:
        raise ValueError(f"this rank's stages have parameters on several devices {sorted(map(str, devices))}; "
                         f"move each rank's stages to one device")
    return devices.pop() if devices else torch.device("cpu")


def stage_params(modules: Mapping[int, nn.Module]):
    """Per stage: every trainable parameter it uses, and the ones its optimizer owns (shared once)."""
    used, owned, seen = {}, {}, set()
    for s, module in modules.items():
        used[s] = [p for p in module.parameters() if p.requires_grad]
        owned[s] = [p for p in used[s] if id(p) not in seen]
        seen.update(id(p) for p in used[s])
    return used, owned
