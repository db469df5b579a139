# Fused LM head + cross-entropy: token chunks, so the (N, V) logits never exist at once.
"""``cross_entropy(hidden @ weight.T, target)`` computed over chunks of tokens.

For each chunk of C rows: logits (C, V) = hidden_c @ weight.T (in the hidden dtype), per-row statistics and
loss (``cross_entropy_stats``: Triton kernel or torch), then, when a gradient is needed, the logits gradient
written over the logits buffer in place and folded into ``d hidden_c = dlogits @ weight`` and
``d weight += dlogits.T @ hidden_c``. The gradients are therefore computed in the forward (the loss is a
scalar: the backward only scales them by the upstream gradient), as in Liger-Kernel's fused linear
cross-entropy (arXiv 2410.10989 §3.3). Peak extra memory: one (C, V) logits chunk, plus a float32 (V, D)
weight-gradient accumulator.
"""

from __future__ import annotations

import torch
from pipeloom.kernels.cross_entropy import (
    cross_entropy_grad,
    cross_entropy_stats,
    cross_entropy_torch,
    loss_from_stats,
)

CHUNK_ELEMENTS = 1 << 26  # default chunk: this many logits (128 MiB in bf16) at a time


def linear_cross_entropy_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The reference: full logits ``hidden @ weight.T`` (N, V), then ``F.cross_entropy`` in float32."""
    return cross_entropy_torch(hidden @ weight.T, target, ignore_index, label_smoothing, reduction)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked head + cross-entropy; saves the gradients it computed in the forward, not the logits."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
        chunk_size: int,
        compute_grad: bool,
    ):
        N, D = hidden.shape  # hidden (N, D), weight (V, D), target (N,)
        V = weight.shape[0]
        keep = target != ignore_index  # (N,)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # accumulators
        # mean: 1 / (kept rows) as a tensor (no host sync); NaN loss when every row is ignored, as torch
        scale = keep.sum().to(acc).reciprocal() if reduction == "mean" else 1.0
        grad_hidden = torch.empty_like(hidden) if compute_grad and ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros((V, D), dtype=acc, device=weight.device)
            if compute_grad and ctx.needs_input_grad[1]
            else None
        )
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for r in range(0, N, chunk_size):
            h, t = hidden[r : r + chunk_size], target[r : r + chunk_size]  # (C, D), (C,)
            logits = h @ weight.T  # (C, V) in the hidden dtype
            lse, loss = loss_from_stats(cross_entropy_stats(logits, t), t, ignore_index, label_smoothing, V)
            total += loss.sum()
            if grad_hidden is None and grad_weight is None:
                continue
            row_grad = keep[r : r + chunk_size].to(acc) * scale  # (C,), 0 for ignored rows
            dlogits = cross_entropy_grad(
                logits, t, lse, row_grad, label_smoothing=label_smoothing, out=logits
            )
            if grad_hidden is not None:
                grad_hidden[r : r + chunk_size] = dlogits @ weight  # (C, D)
            if grad_weight is not None:
                grad_weight += dlogits.T @ h  # (V, D), accumulated in float32 (float64 for float64)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return (total * scale).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, target)`` without ever holding the (N, V) logits.

    hidden: (..., D); weight: (V, D), the LM head (no bias); target: (...) ids or ``ignore_index``.
    reduction: "mean" over non-ignored rows or "sum" (a per-row loss would need the logits again in the
    backward; use :func:`pipeloom.kernels.cross_entropy.cross_entropy` for "none"). chunk_size: rows per
    chunk (default: about 2**26 logits per chunk). The loss has the hidden dtype.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy supports reduction 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden (..., {hidden.shape[-1]}) does not match weight {tuple(weight.shape)} (V, D)"
        )
    hidden2, target2 = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(
        hidden2, weight, target2, ignore_index, label_smoothing, reduction, chunk, compute_grad
    )
