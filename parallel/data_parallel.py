# Data parallelism over the dp group: bucketed gradient all-reduce (optionally overlapped) and ZeRO-1.
"""Gradient averaging across data-parallel replicas, and optimizer-state sharding.

:func:`allreduce_gradients` - after backward, average (or sum) every gradient over the dp group, packed into
buckets of about ``bucket_mb`` MiB (one all-reduce per bucket instead of one per tensor, as DDP does;
arXiv 2006.15704 §3.2).

:class:`GradSync` - the same with overlap: gradient-accumulation hooks
(``register_post_accumulate_grad_hook``) launch a bucket's asynchronous all-reduce as soon as its last
gradient is ready, while backward continues; :meth:`GradSync.finish` waits and writes back. Buckets are
filled in reverse parameter order (about the backward order) and always LAUNCHED in bucket order, so every
rank issues the same collectives in the same order even if hooks fire in a different order. For pipeline
schedules with several microbatches, wrap all but the last microbatch's backward in
:meth:`GradSync.no_sync` (gradients accumulate locally; the last backward launches the buckets).

:func:`zero1_optimizer` - ZeRO stage 1 (arXiv 1910.02054 §5.1): each dp rank keeps the optimizer state of
1/dp of the parameters, steps those, and broadcasts them. We use torch's
``torch.distributed.optim.ZeroRedundancyOptimizer`` rather than DeepSpeed: it ships with torch (no extra
dependency, no CUDA extension build), takes the dp process group explicitly, wraps any torch optimizer,
works on gloo/CPU (so the same code is tested here), and leaves the training loop, gradient sync and
pipeline runtime to us - DeepSpeed's ZeRO comes inside its engine, which wants to own the model, the
optimizer, the gradient all-reduce and (for pipelines) the schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

REDUCE_OPS = ("mean", "sum")  # how replicas' gradients combine: averaged, or added (shares of a global mean)


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive runs of ``params`` of one dtype, each about ``bucket_bytes`` (at least one tensor)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def _unique_trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:  # a tied weight is one parameter
            seen.add(id(p))
            out.append(p)
    return out


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"op={op!r}; choose one of {REDUCE_OPS}")


def allreduce_gradients(params: Iterable[nn.Parameter], group=None, bucket_mb: float = 25.0, op: str = "mean") -> int:
    """Reduce ``p.grad`` over ``group`` (the dp group; None = world) in flat buckets; returns the bucket count.

    ``op="mean"`` averages (each replica's gradient is the mean over its own batch); ``op="sum"`` adds
    (each replica's gradient is already its share of the global-batch mean, as pipeloom's training steps
    leave it: see :mod:`pipeloom.training.steps`). A parameter without a gradient on this rank contributes
    zeros (and gets the result), so every rank issues the same collectives.
    """
    _check_op(op)
    params = _unique_trainable(params)
    n = dist.get_world_size(group)
    buckets = _buckets(params, int(bucket_mb * 2**20))
    if n == 1:
        return len(buckets)
    for bucket in buckets:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        dist.all_reduce(flat, group=group)
        if op == "mean":
            flat /= n
        _write_back(bucket, flat)
    return len(buckets)


def _write_back(bucket: list[nn.Parameter], flat: torch.Tensor) -> None:
    for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
        if p.grad is None:
            p.grad = g.view_as(p).clone()
        else:
            p.grad.copy_(g.view_as(p))


class GradSync:
    """Overlapped, bucketed gradient averaging over the dp group.

    ``sync = GradSync(model.parameters(), dp_group)``; then per step: ``loss.backward()`` (buckets launch
    during backward), ``sync.finish()`` (wait, average, write ``.grad``), ``optimizer.step()``.
    Use ``with sync.no_sync(): ...backward()`` for all but the last microbatch of a step. ``op``: "mean"
    or "sum", as in :func:`allreduce_gradients`.
    """

    def __init__(self, params: Iterable[nn.Parameter], group=None, bucket_mb: float = 25.0, op: str = "mean"):
        _check_op(op)
        self.group, self.op = group, op
        self.world = dist.get_world_size(group)
        params = _unique_trainable(params)
        self.buckets = _buckets(list(reversed(params)), int(bucket_mb * 2**20))  # backward order, roughly
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._sync = True
        self._reset()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _reset(self) -> None:
        self._ready = [set() for _ in self.buckets]
        self._next = 0  # next bucket to launch (launch order is bucket order on every rank)
        self._inflight: list[tuple[int, torch.Tensor, object]] = []

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside accumulates gradients locally without communication."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync:
            return
        i = self._bucket_of[id(p)]
        self._ready[i].add(id(p))
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        work = dist.all_reduce(flat, group=self.group, async_op=True) if self.world > 1 else None
        self._inflight.append((i, flat, work))

    @property
    def launched_during_backward(self) -> int:
        """Buckets already launched (before :meth:`finish`): how much communication overlapped backward."""
        return self._next

    def finish(self) -> None:
        """Launch buckets whose gradients never all arrived (unused parameters), wait for all, average, write back."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for i, flat, work in self._inflight:
            if work is not None:
                work.wait()
            if self.op == "mean":
                flat /= self.world
            _write_back(self.buckets[i], flat)
        self._reset()

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def zero1_optimizer(params: Iterable[nn.Parameter], optimizer_class: type[torch.optim.Optimizer], group=None,
                    **defaults) -> torch.optim.Optimizer:
    """ZeRO-1: ``optimizer_class(**defaults)`` whose state is sharded over the dp ``group`` (arXiv 1910.02054).

    Gradients must already be averaged over the dp group (:class:`GradSync` / :func:`allreduce_gradients`);
    ``step()`` updates this rank's shard and broadcasts it, so all replicas end with equal parameters.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(_unique_trainable(params), optimizer_class=optimizer_class,
                                   process_group=group, **defaults)
