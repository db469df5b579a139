# Tied parameters across pipeline stages (embedding on the first stage, output head on the last).
"""A parameter shared by layers that land on different stages (GPT's token embedding and output head)
exists once per rank holding one of those stages. :class:`TiedParameters` keeps the copies equal:

* at construction, every copy takes the value of the copy on the lowest pipeline rank;
* at ``SYNC_TIED`` (placed by :func:`pipeloom.schedules.lowering.add_tied_sync` before each tied
  stage's update), each rank sends the sum of its local gradients of the parameter to the other ranks
  of the group and receives theirs; every rank adds the contributions in ascending rank order, so all
  copies get bitwise the same gradient (the gradient the one shared parameter gets in a single process)
  and the same optimizer update.

Point-to-point exchanges inside the pipeline group are used, so no extra process group (a collective
over the whole world to create) is needed. Copies held twice on one rank (ZB-V puts stage 0 and the
last stage on rank 0) are usually the same Parameter object, which autograd already sums.
"""

from __future__ import annotations

import torch
from pipeloom.schedules.ir import Action, Kind

from .p2p import TensorSpec, Transfer


class TiedParameters:
    """The tied groups ``[{stage: parameter name}, ...]`` as seen from one pipeline rank."""

    def __init__(self, groups, plan, rank: int, modules, p2p, tag_base: int):
        self.p2p = p2p
        self.rank = rank
        self.entries = []  # per group: (local distinct params, ranks holding the group, first local stage)
        self.by_stage: dict[int, list[int]] = {}
        for index, group in enumerate(groups):
            bad = sorted(s for s in group if not 0 <= s < plan.num_stages)
            if bad:
                raise ValueError(f"tied group {group} names stages {bad}; the plan has {plan.num_stages} stages")
            local = {}
            for s, name in sorted(group.items()):
                if s in modules:
                    try:
                        param = modules[s].get_parameter(name)
                    except AttributeError:
                        names = [n for n, _ in modules[s].named_parameters()][:8]
                        raise ValueError(f"tied group {group}: stage {s} has no parameter {name!r} (it has "
                                         f"{names}...)") from None
                    local.setdefault(id(param), param)
                    self.by_stage.setdefault(s, []).append(index)
            params = list(local.values())
            if len({tuple(p.shape) for p in params}) > 1:
                raise ValueError(f"tied group {group}: the copies have different shapes "
                                 f"{[tuple(p.shape) for p in params]}")
            ranks = sorted({plan.rank_of(s) for s in group})
            self.entries.append((params, ranks, min(group)))
        self.tag_base = tag_base
        self.done: set[int] = set()

    def begin(self) -> None:
        self.done = set()

    def _exchange(self, index: int, tensor: torch.Tensor, action: Action, tag: int, send_to, receive_from):
        transfers = [Transfer(action, True, r, tag, [tensor]) for r in send_to]
        transfers += [Transfer(action, False, r, tag, specs=[TensorSpec(tuple(tensor.shape), tensor.dtype)])
                      for r in receive_from]
        self.p2p.exchange(transfers)
        return {t.peer: t.tensors[0] for t in transfers if not t.send}

    def make_identical(self) -> None:
        """Copy the lowest rank's value of every tied parameter into every copy."""
        for index, (params, ranks, first_stage) in enumerate(self.entries):
            if not params:
                continue
            source = params[0]
            with torch.no_grad():
                for p in params[1:]:
                    p.copy_(source)
                if len(ranks) > 1:
                    action = Action(first_stage, Kind.SYNC_TIED)
                    tag = self.tag_base + len(self.entries) + index
                    if self.rank == ranks[0]:
                        self._exchange(index, source.detach(), action, tag, ranks[1:], [])
                    else:
                        value = self._exchange(index, source.detach(), action, tag, [], [ranks[0]])[ranks[0]]
                        for p in params:
                            p.copy_(value)
            if len(ranks) > 1:
                self.p2p.drain()

    def sync(self, stage: int) -> None:
        """``SYNC_TIED`` on ``stage``: sum the gradients of its tied groups over their ranks (once per rank)."""
        for index in self.by_stage.get(stage, ()):
            if index in self.done:
                continue
            self.done.add(index)
            params, ranks, _ = self.entries[index]
            grads = [p.grad for p in params if p.grad is not None]
            mine = torch.zeros_like(params[0]) if not grads else sum(grads[1:], grads[0].clone())
            total = mine
            if len(ranks) > 1:
                others = [r for r in ranks if r != self.rank]
                received = self._exchange(index, mine, Action(stage, Kind.SYNC_TIED), self.tag_base + index,
                                          others, others)
                received[self.rank] = mine
                total = received[ranks[0]].clone()
                for r in ranks[1:]:
                    total += received[r]
            for p in params:
                p.grad = total if p is params[0] else total.clone()
