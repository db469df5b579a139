# Fused cross-entropy without float32 logits: per-row softmax statistics of a vocab slice, and the gradient.
"""Cross-entropy over (N, V) logits in any float dtype, computed from per-row statistics.

One pass over a row (online softmax, Milakov & Gimelshein arXiv 1805.02867) gives, for the vocabulary
columns ``[v_start, v_end)`` that a logits tensor holds, the row max, ``sum exp(z - max)``, the target's
logit (0 when the target is not in the slice) and the sum of logits (label smoothing). Ranks of a
vocabulary-parallel head combine these (``parallel/cross_entropy.py``: max all-reduce, then rescaled sums);
one rank alone gives ``lse = max + log(sumexp)`` and

    loss = (1 - eps) (lse - z_target) + eps (lse - sum_j z_j / V)        (F.cross_entropy's label smoothing)

The gradient ``row_grad * (softmax - (1 - eps) onehot - eps / V)`` is written chunk by chunk in the logits
dtype; no full float32 copy of the logits is ever made, on either path (the torch path works on row chunks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pipeloom.kernels import tl, triton, upcast, use_triton

BLOCK_V = 4096  # vocabulary columns per step of the Triton loops
TORCH_CHUNK_ELEMENTS = 1 << 24  # the torch path upcasts at most this many logits at once (64 MiB float32)


class CEStats(NamedTuple):
    """Per-row statistics of a vocabulary slice, each (N,) float32 (float64 for float64 logits)."""

    row_max: torch.Tensor  # max_j z_j over the slice (-inf for a slice of padding only)
    sum_exp: torch.Tensor  # sum_j exp(z_j - row_max)
    target_logit: torch.Tensor  # z_target when the target is in the slice, else 0
    sum_logits: torch.Tensor  # sum_j z_j (for label smoothing)


def cross_entropy_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The reference: ``F.cross_entropy`` on float32 logits (float64 stays float64), in ``logits.dtype``."""
    z = upcast(logits)
    loss = F.cross_entropy(
        z.reshape(-1, z.shape[-1]),
        target.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return loss.to(logits.dtype)


@triton.jit
def _ce_stats_kernel(
    LOGITS,
    TARGET,
    ROW_MAX,
    SUM_EXP,
    TARGET_LOGIT,
    SUM_LOGITS,
    stride_row,
    v_start,
    n_valid,
    BLOCK_V: tl.constexpr,
):
    # One program per row of LOGITS (N, Vs): four float32 outputs (N,); columns >= n_valid are padding.
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m = float("-inf")
    s = 0.0
    total = 0.0
    for start in range(0, n_valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_valid
        z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        total += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new
    t = tl.load(TARGET + row).to(tl.int64) - v_start
    here = (t >= 0) & (t < n_valid)
    z_t = tl.load(base + t, mask=here, other=0.0).to(tl.float32)
    tl.store(ROW_MAX + row, m)
    tl.store(SUM_EXP + row, s)
    tl.store(TARGET_LOGIT + row, z_t)
    tl.store(SUM_LOGITS + row, total)


@triton.jit
def _ce_grad_kernel(
    LOGITS,
    GRAD,
    TARGET,
    LSE,
    ROW_GRAD,
    stride_row,
    stride_grad,
    v_start,
    n_valid,
    n_cols,
    on_target,
    on_every,
    BLOCK_V: tl.constexpr,
):
    # One program per row: GRAD (N, Vs) = row_grad * (exp(z - lse) - on_every - on_target [col == target]),
    # 0 in padding columns. GRAD may be LOGITS itself (each element is read before it is written).
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(LSE + row)
    g = tl.load(ROW_GRAD + row)
    t = tl.load(TARGET + row).to(tl.int64) - v_start
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_valid
        z = tl.load(LOGITS + row * stride_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        d = tl.exp(z - lse) - tl.where(valid, on_every, 0.0) - tl.where(cols == t, on_target, 0.0)
        tl.store(GRAD + row * stride_grad + cols, (d * g).to(GRAD.dtype.element_ty), mask=cols < n_cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _chunk_rows(n_cols: int) -> int:
    return max(1, TORCH_CHUNK_ELEMENTS // max(n_cols, 1))


def cross_entropy_stats(
    logits: torch.Tensor, target: torch.Tensor, v_start: int = 0, v_end: int | None = None
) -> CEStats:
    """Per-row softmax statistics of a vocabulary slice.

    logits: (N, Vs), columns ``[v_start, v_start + Vs)`` of the vocabulary; target: (N,) vocabulary ids
    (anything outside ``[v_start, v_end)``, e.g. ignore_index, gives target_logit 0); v_end: end of the real
    vocabulary within the slice (default ``v_start + Vs``), columns past it are padding and are skipped.
    """
    logits = _rows(logits)
    N, Vs = logits.shape
    n_valid = max(0, min(Vs, (v_start + Vs if v_end is None else v_end) - v_start))
    target = target.reshape(-1)
    if use_triton(logits) and n_valid > 0:
        out = torch.empty((4, N), dtype=torch.float32, device=logits.device)
        _ce_stats_kernel[(N,)](
            logits,
            target,
            out[0],
            out[1],
            out[2],
            out[3],
            logits.stride(0),
            v_start,
            n_valid,
            BLOCK_V=min(BLOCK_V, triton.next_power_of_2(n_valid)),
            num_warps=8,
        )
        return CEStats(*out.unbind(0))
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty((4, N), dtype=compute, device=logits.device)
    if n_valid == 0:
        out[0].fill_(float("-inf"))
        out[1:].zero_()
        return CEStats(*out.unbind(0))
    local = target - v_start  # (N,)
    here = (local >= 0) & (local < n_valid)
    step = _chunk_rows(n_valid)
    for r in range(0, N, step):
        z = logits[r : r + step, :n_valid].to(compute)  # (C, n_valid): one chunk upcast at a time
        row_max = z.max(dim=-1).values
        out[0, r : r + step] = row_max
        out[1, r : r + step] = torch.exp(z - row_max.unsqueeze(-1)).sum(-1)
        picked = z.gather(-1, torch.where(here[r : r + step], local[r : r + step], 0).unsqueeze(-1)).squeeze(
            -1
        )
        out[2, r : r + step] = torch.where(here[r : r + step], picked, 0.0)
        out[3, r : r + step] = z.sum(-1)
    return CEStats(*out.unbind(0))


def cross_entropy_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    row_grad: torch.Tensor,
    v_start: int = 0,
    v_end: int | None = None,
    label_smoothing: float = 0.0,
    vocab_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d loss / d logits for a vocabulary slice, in ``logits.dtype``, chunk by chunk.

    logits: (N, Vs) as in :func:`cross_entropy_stats`; lse: (N,) the log-sum-exp over the FULL vocabulary;
    row_grad: (N,) upstream gradient of each row's loss (0 for ignored rows); vocab_size: V for the label
    smoothing term (default the slice's real width); out: where to write (N, Vs), may be ``logits`` itself.
    Padding columns get 0.
    """
    logits = _rows(logits)
    N, Vs = logits.shape
    n_valid = max(0, min(Vs, (v_start + Vs if v_end is None else v_end) - v_start))
    V = n_valid if vocab_size is None else vocab_size
    on_every = label_smoothing / V if label_smoothing else 0.0
    on_target = 1.0 - label_smoothing
    target = target.reshape(-1)
    grad = torch.empty_like(logits) if out is None else out
    if use_triton(logits):
        lse32, g32 = lse.float().contiguous(), row_grad.float().contiguous()
        _ce_grad_kernel[(N,)](
            logits,
            grad,
            target,
            lse32,
            g32,
            logits.stride(0),
            grad.stride(0),
            v_start,
            n_valid,
            Vs,
            on_target,
            on_every,
            BLOCK_V=min(BLOCK_V, triton.next_power_of_2(Vs)),
            num_warps=8,
        )
        return grad
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    local = target - v_start
    here = (local >= 0) & (local < n_valid)
    step = _chunk_rows(Vs)
    for r in range(0, N, step):
        z = logits[r : r + step].to(compute)  # (C, Vs)
        d = torch.exp(z - lse[r : r + step, None].to(compute))
        d[:, n_valid:] = 0.0
        d[:, :n_valid] -= on_every
        rows = torch.nonzero(here[r : r + step]).squeeze(-1)
        d[rows, local[r : r + step][rows]] -= on_target
        grad[r : r + step] = d * row_grad[r : r + step, None].to(compute)
    return grad


def loss_from_stats(
    stats: CEStats,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, loss) per row, each (N,), from statistics over the FULL vocabulary; ignored rows' loss is 0."""
    lse = stats.row_max + torch.log(stats.sum_exp)
    loss = (1.0 - label_smoothing) * (lse - stats.target_logit)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - stats.sum_logits / vocab_size)
    return lse, torch.where(target.reshape(-1) != ignore_index, loss, 0.0)


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy from per-row statistics; saves the logits (as given) and lse (N,) float32."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index: int, label_smoothing: float, reduction: str, loss_dtype=None):
        logits, target = _rows(logits), target.reshape(-1)
        V = logits.shape[-1]
        lse, loss = loss_from_stats(
            cross_entropy_stats(logits, target), target, ignore_index, label_smoothing, V
        )
        keep = target != ignore_index
        ctx.save_for_backward(logits, target, lse, keep)
        ctx.label_smoothing, ctx.reduction = label_smoothing, reduction
        out_dtype = loss_dtype or logits.dtype
        if reduction == "none":
            return loss.to(out_dtype)
        total = loss.sum()
        return (total / keep.sum() if reduction == "mean" else total).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse, keep = ctx.saved_tensors
        g = grad_loss.to(lse.dtype)
        if ctx.reduction == "mean":
            g = g / keep.sum()
        row_grad = torch.where(keep, g.expand(keep.shape), 0.0)
        grad = cross_entropy_grad(logits, target, lse, row_grad, label_smoothing=ctx.label_smoothing)
        return grad, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(logits, target)`` for logits (..., V) and target (...), without float32 logits.

    reduction: "mean" over non-ignored rows (NaN when all rows are ignored, as torch), "sum", or "none"
    (a loss per row, 0 for ignored rows). The loss has ``loss_dtype`` (default ``logits.dtype``; it is
    computed in float32 either way); the gradient is computed chunk by chunk in ``logits.dtype`` (Triton
    when :func:`use_triton` allows, else torch row chunks).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    loss = CrossEntropyFunction.apply(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index, label_smoothing, reduction,
        loss_dtype,
    )
    return loss.view(target.shape) if reduction == "none" else loss
