# Fused rotary position embedding (HF rotate_half convention): torch reference, Triton kernel, autograd.
"""Rotary embedding, RoFormer arXiv 2104.09864, in the Hugging Face "rotate_half" layout:

    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

on ``x`` of shape (B, T, H, D). ``cos`` and ``sin`` have the FULL head dimension D, as Hugging Face
builds them (``emb = cat(freqs, freqs)``): shape (T, D), shared by the batch, or (B, T, D), one row per
sequence position (continuous batching with per-sequence offsets). Computed in float32, returned in
``x.dtype``. ``cos`` and ``sin`` are treated as constants: they receive no gradient.

:func:`rotary_qk` rotates queries and keys (their head counts may differ) in ONE launch, and with ``positions``
reads each token's row of whole tables (P, D) inside the kernel, so an inference batch gathers no rows first.
Inputs may be strided (e.g. q and k as views of one fused projection's output): only the head dimension needs
unit stride.
"""

from __future__ import annotations

import torch
from pipeloom.kernels import tl, triton, upcast, use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) over the last dimension, x = cat(x1, x2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _batched(table: torch.Tensor) -> torch.Tensor:
    """(T, D) or (B, T, D) -> (B or 1, T, 1, D), to broadcast against (B, T, H, D)."""
    return (table if table.dim() == 3 else table.unsqueeze(0)).unsqueeze(2)


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference: rotary embedding of ``x`` (B, T, H, D) with ``cos``, ``sin`` (T, D) or (B, T, D)."""
    xf = upcast(x)
    return (xf * _batched(cos).to(xf.dtype) + rotate_half(xf) * _batched(sin).to(xf.dtype)).to(x.dtype)


@triton.jit
def _rotate_heads(X, Y, H, stride_xh, stride_yh, c1, c2, s1, s2, HALF, BACKWARD: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # X, Y point at one token's (H, D) rows; c1, c2, s1, s2 (1, BLOCK_HALF) the halves of its cos/sin rows.
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    mask = (heads < H) & (cols < HALF)
    x_ptr = X + heads * stride_xh + cols
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_ptr = Y + heads * stride_yh + cols
    tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    X, Y, K, YK, COS, SIN, POS, T, H, HK, HALF,
    stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
    stride_kb, stride_kt, stride_kh, stride_ykb, stride_ykt, stride_ykh, stride_cb, stride_ct,
    BACKWARD: tl.constexpr, HAS_K: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One program per (b, t): all H heads of X[b, t] (H, D) -> Y[b, t], and with HAS_K the HK heads of K[b, t] ->
    # YK[b, t] by the same cos/sin row: table row t of batch b, or with HAS_POS row POS[b * T + t] of (P, D)
    # tables. BACKWARD applies the transpose.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    col_mask = cols < HALF
    if HAS_POS:
        table = tl.load(POS + pid).to(tl.int64) * stride_ct + cols
    else:
        table = b * stride_cb + t * stride_ct + cols
    c1 = tl.load(COS + table, mask=col_mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + table + HALF, mask=col_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + table, mask=col_mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + table + HALF, mask=col_mask, other=0.0).to(tl.float32)
    _rotate_heads(X + b * stride_xb + t * stride_xt, Y + b * stride_yb + t * stride_yt, H, stride_xh, stride_yh,
                  c1, c2, s1, s2, HALF, BACKWARD, BLOCK_H, BLOCK_HALF)
    if HAS_K:
        _rotate_heads(K + b * stride_kb + t * stride_kt, YK + b * stride_ykb + t * stride_ykt, HK, stride_kh,
                      stride_ykh, c1, c2, s1, s2, HALF, BACKWARD, BLOCK_HK, BLOCK_HALF)


def _check_tables(shape, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None) -> None:
    B, T, _, D = shape
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {D}")
    if positions is not None:
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[-1] != D:
            raise ValueError(f"with positions, cos and sin must both be whole tables (P, {D}), got "
                             f"{tuple(cos.shape)} and {tuple(sin.shape)}")
        if positions.numel() != B * T:
            raise ValueError(f"positions has {positions.numel()} entries; it needs one per token, B*T = {B * T}")
    elif cos.shape != sin.shape or cos.shape[-2:] != (T, D) or cos.dim() not in (2, 3):
        raise ValueError(
            f"cos and sin must both be (T, D) = ({T}, {D}) or (B, T, D), got {tuple(cos.shape)} "
            f"and {tuple(sin.shape)}"
        )


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
                  k: torch.Tensor | None = None, positions: torch.Tensor | None = None):
    """Launch the kernel on ``x`` (B, T, H, D), and ``k`` (B, T, Hk, D) when given, any strides but unit stride
    along D (else copied); returns a new contiguous (B, T, H, D), or the pair. ``positions`` (B*T,): read the rows
    of whole tables ``cos``, ``sin`` (P, D) there; without: ``cos``, ``sin`` (T, D) or (B, T, D)."""
    B, T, H, D = x.shape
    _check_tables(x.shape, cos, sin, positions)
    if k is not None and (k.shape[:2] != (B, T) or k.shape[-1] != D):
        raise ValueError(f"q {tuple(x.shape)} and k {tuple(k.shape)} must share (B, T) and the head dimension")
    x, cos, sin = _unit_last(x), _unit_last(cos), _unit_last(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    stride_cb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    kk = x if k is None else _unit_last(k)
    yk = y if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    pos = x if positions is None else positions.reshape(-1)
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(D // 2)
    block_hk = triton.next_power_of_2(kk.shape[2])
    _rotary_kernel[(B * T,)](
        x, y, kk, yk, cos, sin, pos, T, H, kk.shape[2], D // 2,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        kk.stride(0), kk.stride(1), kk.stride(2), yk.stride(0), yk.stride(1), yk.stride(2),
        stride_cb, cos.stride(-2),
        BACKWARD=backward, HAS_K=k is not None, HAS_POS=positions is not None,
        BLOCK_H=block_h, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=rotary_warps(block_h + (block_hk if k is not None else 0), block_half),
    )
    return y if k is None else (y, yk)


def rotary_warps(rows: int, block_half: int) -> int:
    """Warps of one rotary program over ``rows`` heads (q's and k's together) of ``block_half`` pairs: one per 256
    elements, a power of two (Triton refuses others: 16 query + 8 key heads of 64 would ask for 3), 1 to 8."""
    return min(triton.next_power_of_2(max(rows * block_half // 256, 1)), 8)


class RotaryFunction(torch.autograd.Function):
    """Triton rotary embedding; the backward is the same kernel with the rotation transposed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotary_launch(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rotary_launch(dy, cos, sin, backward=True), None, None


class RotaryQKFunction(torch.autograd.Function):
    """Triton rotary embedding of q and k in one launch (tables read at ``positions`` when given)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions):
        ctx.save_for_backward(cos, sin, positions)
        ctx.meta = [(t.shape, t.dtype, t.device) for t in (q, k)]
        return rotary_launch(q, cos, sin, k=k, positions=positions)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, positions = ctx.saved_tensors
        dq, dk = (torch.zeros(shape, dtype=dtype, device=device) if d is None else d
                  for d, (shape, dtype, device) in zip((dq, dk), ctx.meta))
        dq, dk = rotary_launch(dq, cos, sin, backward=True, k=dk, positions=positions)
        return dq, dk, None, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, T, H, D) with ``cos``, ``sin`` (T, D) or (B, T, D), HF rotate_half."""
    if use_triton(x):
        return RotaryFunction.apply(x, cos, sin)
    return rotary_torch(x, cos, sin)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k), both (B, T, H*, D) (head counts may differ: grouped-query attention), rotated: one kernel launch
    on the Triton path. ``cos``, ``sin``: (T, D) or (B, T, D); or whole tables (P, D) read at ``positions``
    (B*T,), each token's absolute position (an inference batch: no gather of the rows)."""
    _check_tables(q.shape, cos, sin, positions)
    if use_triton(q):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return RotaryQKFunction.apply(q, k, cos, sin, positions)
        return rotary_launch(q, cos, sin, k=k, positions=positions)
    if positions is not None:
        rows = positions.reshape(q.shape[:2])  # (B, T)
        cos, sin = cos[rows], sin[rows]  # (B, T, D)
    return rotary_torch(q, cos, sin), rotary_torch(k, cos, sin)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k) both (B, T, H*, D), H may differ (grouped-query attention) -> rotated (q, k)."""
    return rotary(q, cos, sin), rotary(k, cos, sin)
