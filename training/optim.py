# Optimizer pieces of the training loop: AdamW groups, warmup + cosine learning rate, global-norm clipping.
"""* :func:`build_optimizer` - AdamW (fused kernel where available) with weight decay on matrices only,
  optionally ZeRO-1 sharded over the dp group.
* :func:`lr_at` - linear warmup then cosine decay to ``min_lr`` (arXiv 1608.03983; GPT-3's recipe,
  arXiv 2005.14165 App. B).
* :func:`clip_grad_norm` - the global gradient norm over every rank holding a different part of the
  model (tensor shards and pipeline stages), counting replicated and tied parameters once, then scaling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup to ``lr``, cosine to ``min_lr``, then flat."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(decay_steps, 1)
    if progress >= 1.0:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def fused_available(params: list[nn.Parameter]) -> bool:
    """torch's fused AdamW kernel exists for CUDA and (since torch 2.4) CPU tensors."""
    return bool(params) and all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, beta1: float = 0.9,
                    beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1, fused: bool | None = None,
                    zero_group=None, **_unused) -> torch.optim.Optimizer:
    """AdamW over ``named_params`` (unique, trainable): decay on >= 2-D weights, none on norms and biases.

    ``fused=None`` picks the fused kernel where available. Parameter groups are ``[decay, no_decay]``
    (their order and contents depend only on names, so a resumed optimizer maps state one to one).
    ``zero_group``: the data-parallel group to shard the AdamW state over (ZeRO stage 1, arXiv 1910.02054
    §5.1, through torch's ``ZeroRedundancyOptimizer``: each replica keeps the moments of about 1/dp of the
    parameters, steps those and broadcasts them). The gradients must be summed over the group first, as
    the training loop does. Checkpoints store the same entries either way (:mod:`.checkpoint`).
    """
    seen, decay, no_decay = set(), [], []
    for _, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    params = decay + no_decay
    if fused is None:
        fused = fused_available(params)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if zero_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=zero_group, lr=lr,
                                       betas=(beta1, beta2), eps=eps, fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, fused=fused or None)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: a ZeRO-1 optimizer's inner one (over the parameters
    this rank owns), else ``optimizer`` itself."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm_sq(params: list[tuple[nn.Parameter, bool]]) -> torch.Tensor:
    """Sum of squared gradient entries over ``(param, counted)`` pairs where ``counted`` (float64 scalar).

    On the parameters' device (NCCL reduces device tensors only).
    """
    device = params[0][0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p, counted in params:
        if counted and p.grad is not None:
            total = total + p.grad.detach().double().pow(2).sum()
    return total


def clip_grad_norm(params: list[tuple[nn.Parameter, bool]], max_norm: float, groups: Iterable = ()) -> float:
    """Clip gradients to the global norm ``max_norm``; returns the norm before clipping.

    ``params``: this rank's ``(param, counted)`` pairs; ``counted`` is False for copies whose gradient
    another rank already counts (a tensor-replicated norm weight on tp ranks > 0, the second copy of a
    tied embedding). The squared sums are added over ``groups`` (the tp and pp process groups), so every
    rank gets the same norm. ``max_norm <= 0`` only measures.
    """
    sq = grad_norm_sq(params)
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p, _ in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
