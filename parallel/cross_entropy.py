# Cross-entropy over vocabulary-sharded logits, without ever gathering the full logits (arXiv 1909.08053 §3).
"""``vocab_parallel_cross_entropy(logits_shard, target, group)`` equals ``F.cross_entropy`` over the full
vocabulary - loss and gradient - with ``ignore_index``, ``label_smoothing`` and a vocabulary padded up to a
multiple of tp.

Each rank holds logits for vocabulary ids ``[rank*Vp, (rank+1)*Vp)`` (``Vp = ceil(V/tp)``; ids ``>= V`` are
padding and masked). The computation is split in three, and the two local parts are the fused kernels of
``pipeloom.kernels.cross_entropy`` (Triton on GPU, a chunked torch path elsewhere):

1. local statistics, :func:`~pipeloom.kernels.cross_entropy.cross_entropy_stats` - one pass over this
   rank's (N, Vp) logits: per-row max, sum of ``exp(z - max)``, the target's logit (0 when the target is
   elsewhere) and the sum of logits (for label smoothing). No communication.
2. combine across ranks: one all-reduce (MAX) of the row maxima, one all-reduce (SUM) of the rescaled
   sums, target logits and logit sums packed into one (N, 3) tensor - the numerically stable log-sum-exp
   of an online softmax (arXiv 1805.02867).
3. the local gradient, :func:`~pipeloom.kernels.cross_entropy.cross_entropy_grad`:
   ``softmax - (1-eps)*onehot - eps/V`` on this rank's columns, scaled by the per-row upstream gradient,
   recomputed from the saved logits and lse. No communication in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pipeloom.kernels.cross_entropy import CEStats, cross_entropy_grad, cross_entropy_stats, loss_from_stats


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
        target_or_none = torch.where(keep, target, -1)  # (N,) -1: in no slice, so an ignored row picks nothing
        v_start, v_end = start, start + n_valid
        row_max, sum_exp, target_logit, sum_logits = cross_entropy_stats(logits, target_or_none, v_start, v_end)
        if tp > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            packed = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit, sum_logits], dim=-1)
            dist.all_reduce(packed, group=group)  # (N, 3)
            sum_exp, target_logit, sum_logits = packed.unbind(-1)
        else:
            global_max = row_max
        stats = CEStats(global_max, sum_exp, target_logit, sum_logits)  # over the full vocabulary now
        lse, loss = loss_from_stats(stats, target_or_none, -1, label_smoothing, vocab_size)  # (N,), (N,)

        ctx.save_for_backward(logits, lse, target_or_none, keep)
        ctx.v_start, ctx.v_end, ctx.label_smoothing, ctx.vocab_size = v_start, v_end, label_smoothing, vocab_size
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, target_or_none, keep = ctx.saved_tensors
        row_grad = torch.where(keep, grad_loss.to(lse.dtype), 0.0)  # (N,)
        grad = cross_entropy_grad(logits, target_or_none, lse, row_grad, ctx.v_start, ctx.v_end,
                                  label_smoothing=ctx.label_smoothing, vocab_size=ctx.vocab_size)  # (N, Vp)
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` of the full-vocabulary logits, given only this rank's vocabulary shard.

    logits: (..., Vp) this rank's columns ``[rank*Vp, (rank+1)*Vp)`` of the (zero-)padded vocabulary, the
    output of a ``pad_to_tp`` :class:`~pipeloom.parallel.tensor_parallel.ColumnParallelLinear` head;
    target: (...) global ids in ``[0, vocab_size)`` or ``ignore_index``; group: the tp group (``None``: the
    default group, or one rank when torch.distributed is not initialised); vocab_size: the real vocabulary
    (default ``Vp * tp``: no padding).
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
