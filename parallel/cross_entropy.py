# Cross-entropy over vocabulary-sharded logits, without ever gathering the full logits (arXiv 1909.08053 §3).
"""``vocab_parallel_cross_entropy(logits_shard, target, group)`` equals ``F.cross_entropy`` over the full
vocabulary - loss and gradient - with ``ignore_index``, ``label_smoothing`` and a vocabulary padded up to a
multiple of tp.

Each rank holds logits for vocabulary ids ``[rank*Vp, (rank+1)*Vp)`` (``Vp = ceil(V/tp)``; ids ``>= V`` are
padding and masked). The computation is split in three so a fused kernel can replace the local part:

1. :func:`local_logit_stats` - one pass over this rank's (N, Vp) logits: per-row max, sum of
   ``exp(z - max)``, the target's logit (0 when the target is elsewhere) and the sum of logits (for label
   smoothing). Pure torch, no communication: the piece a Triton kernel replaces.
2. combine across ranks: one all-reduce (MAX) of the row maxima, one all-reduce (SUM) of the rescaled
   sums, target logits and logit sums packed into one (N, 3) tensor - the numerically stable log-sum-exp
   of an online softmax.
3. :func:`local_logit_grad` - the gradient is local: ``softmax - (1-eps)*onehot - eps/V`` on this rank's
   columns, scaled by the per-row upstream gradient. No communication in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def local_logit_stats(logits: torch.Tensor, target_local: torch.Tensor, n_valid: int):
    """Per-row statistics of one vocabulary shard.

    logits: (N, Vp) this rank's logits; target_local: (N,) the target's column in this shard, or -1 when the
    target lives on another rank (or is ignored); n_valid: columns ``< n_valid`` are real vocabulary ids,
    the rest padding.

    Returns ``(row_max, sum_exp, target_logit, sum_logits)``, each (N,) in the compute dtype
    (float32, or float64 for float64 logits): ``sum_exp = sum_j exp(z_j - row_max)`` over valid columns
    (``row_max = -inf`` and ``sum_exp = 0`` for a shard of padding only).
    """
    z = logits if logits.dtype == torch.float64 else logits.float()  # (N, Vp)
    if n_valid < z.shape[-1]:
        z = z[:, :n_valid]  # (N, n_valid): padding columns never enter the softmax
    if n_valid == 0:
        zeros = z.new_zeros(z.shape[0])
        return torch.full_like(zeros, float("-inf")), zeros, zeros, zeros
    row_max = z.max(dim=-1).values  # (N,)
    sum_exp = torch.exp(z - row_max.unsqueeze(-1)).sum(dim=-1)  # (N,)
    here = target_local >= 0
    target_logit = torch.where(here, z.gather(-1, target_local.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    return row_max, sum_exp, target_logit, z.sum(dim=-1)


def local_logit_grad(logits: torch.Tensor, lse: torch.Tensor, target_local: torch.Tensor, n_valid: int,
                     row_grad: torch.Tensor, label_smoothing: float, vocab_size: int) -> torch.Tensor:
    """d loss / d logits for this shard: ``row_grad * (softmax - (1-eps)*onehot(target) - eps/V)``.

    logits: (N, Vp); lse: (N,) the global log-sum-exp; target_local: (N,) as in :func:`local_logit_stats`;
    row_grad: (N,) upstream gradient per row (0 for ignored rows). Padding columns get 0.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()  # (N, Vp)
    grad = torch.exp(z - lse.unsqueeze(-1))  # (N, Vp) softmax over the full vocabulary
    if n_valid < z.shape[-1]:
        grad[:, n_valid:] = 0.0
    if label_smoothing:
        grad[:, :n_valid] -= label_smoothing / vocab_size
    rows = torch.nonzero(target_local >= 0).squeeze(-1)
    grad[rows, target_local[rows]] -= 1.0 - label_smoothing
    return (grad * row_grad.unsqueeze(-1)).to(logits.dtype)


def _rank_and_size(group) -> tuple[int, int]:
    """(rank, size) in ``group``; None is the default group, or a single rank without torch.distributed."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _VocabParallelCE(torch.autograd.Function):
    """Per-row loss (N,) from sharded logits (N, Vp); ignored rows give 0."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing):
        rank, tp = _rank_and_size(group)
        vp = logits.shape[-1]
        if vp * tp < vocab_size:
            raise ValueError(f"logits shard width {vp} x tp={tp} < vocab_size={vocab_size}; "
                             "each rank must hold ceil(vocab_size / tp) columns")
        start = rank * vp
        n_valid = max(0, min(vp, vocab_size - start))
        keep = target != ignore_index  # (N,)
        local = target - start
        here = keep & (local >= 0) & (local < n_valid)
        target_local = torch.where(here, local, -1)  # (N,)

        row_max, sum_exp, target_logit, sum_logits = local_logit_stats(logits, target_local, n_valid)
        if tp > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            packed = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit, sum_logits], dim=-1)
            dist.all_reduce(packed, group=group)  # (N, 3)
            sum_exp, target_logit, sum_logits = packed.unbind(-1)
        else:
            global_max = row_max
        lse = global_max + torch.log(sum_exp)  # (N,) log sum_j exp z_j over the full vocabulary
        loss = (1.0 - label_smoothing) * (lse - target_logit)
        if label_smoothing:
            loss = loss + label_smoothing * (lse - sum_logits / vocab_size)  # -mean_j log p_j
        loss = torch.where(keep, loss, 0.0)

        ctx.save_for_backward(logits, lse, target_local, keep)
        ctx.n_valid, ctx.label_smoothing, ctx.vocab_size = n_valid, label_smoothing, vocab_size
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, target_local, keep = ctx.saved_tensors
        row_grad = torch.where(keep, grad_loss.to(lse.dtype), 0.0)
        grad = local_logit_grad(logits, lse, target_local, ctx.n_valid, row_grad, ctx.label_smoothing,
                                ctx.vocab_size)
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` of the full-vocabulary logits, given only this rank's vocabulary shard.

    logits: (..., Vp) this rank's columns ``[rank*Vp, (rank+1)*Vp)`` of the (zero-)padded vocabulary, the
    output of a ``pad_to_tp`` :class:`~pipeloom.parallel.tensor_parallel.ColumnParallelLinear` head;
    target: (...) global ids in ``[0, vocab_size)`` or ``ignore_index``; group: the tp group (``None``: the
    default group, or a single rank when torch.distributed is not initialised); vocab_size: the real vocabulary (default ``Vp * tp``: no padding).
    reduction: "mean" (over non-ignored targets, as torch), "sum" or "none" (shape of ``target``).
    Every rank of the group returns the same loss. The gradient needs no communication.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    tp = _rank_and_size(group)[1]
    vocab_size = logits.shape[-1] * tp if vocab_size is None else vocab_size
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must be logits shape {tuple(logits.shape)} "
                         "without the last (vocabulary) dimension")
    loss = _VocabParallelCE.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), group, vocab_size,
                                  ignore_index, float(label_smoothing))  # (N,)
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()
