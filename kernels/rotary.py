# Fused rotary position embedding (HF rotate_half convention): torch reference, Triton kernel, autograd.
"""Rotary embedding, RoFormer arXiv 2104.09864, in the Hugging Face "rotate_half" layout:

    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

on ``x`` of shape (B, T, H, D). ``cos`` and ``sin`` have the FULL head dimension D, as Hugging Face
builds them (``emb = cat(freqs, freqs)``): shape (T, D), shared by the batch, or (B, T, D), one row per
sequence position (continuous batching with per-sequence offsets). Computed in float32, returned in
``x.dtype``. ``cos`` and ``sin`` are treated as constants: they receive no gradient.
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
def _rotary_kernel(
    X,
    COS,
    SIN,
    Y,
    T,
    H,
    HALF,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_yb,
    stride_yt,
    stride_yh,
    stride_cb,
    stride_ct,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per (b, t): all H heads of X[b, t] (H, D) -> Y[b, t] (H, D). BACKWARD applies the transpose.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    col_mask = cols < HALF
    mask = (heads < H) & col_mask
    table = b * stride_cb + t * stride_ct + cols
    c1 = tl.load(COS + table, mask=col_mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + table + HALF, mask=col_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + table, mask=col_mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + table + HALF, mask=col_mask, other=0.0).to(tl.float32)
    x_ptr = X + b * stride_xb + t * stride_xt + heads * stride_xh + cols
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_ptr = Y + b * stride_yb + t * stride_yt + heads * stride_yh + cols
    tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def rotary_launch(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> torch.Tensor:
    """Launch the kernel on ``x`` (B, T, H, D), unit stride along D; returns a new (B, T, H, D)."""
    B, T, H, D = x.shape
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {D}")
    if cos.shape != sin.shape or cos.shape[-2:] != (T, D) or cos.dim() not in (2, 3):
        raise ValueError(
            f"cos and sin must both be (T, D) = ({T}, {D}) or (B, T, D), got {tuple(cos.shape)} "
            f"and {tuple(sin.shape)}"
        )
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    stride_cb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(D // 2)
    _rotary_kernel[(B * T,)](
        x,
        cos,
        sin,
        y,
        T,
        H,
        D // 2,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        stride_cb,
        cos.stride(-2),
        BACKWARD=backward,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=min(max(block_h * block_half // 256, 1), 8),
    )
    return y


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


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, T, H, D) with ``cos``, ``sin`` (T, D) or (B, T, D), HF rotate_half."""
    if use_triton(x):
        return RotaryFunction.apply(x, cos, sin)
    return rotary_torch(x, cos, sin)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k) both (B, T, H*, D), H may differ (grouped-query attention) -> rotated (q, k)."""
    return rotary(q, cos, sin), rotary(k, cos, sin)
