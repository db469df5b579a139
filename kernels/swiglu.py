# Fused SwiGLU activation silu(a) * b: torch reference, Triton kernels, autograd wrapper.
"""SwiGLU, arXiv 2002.05202: ``y = silu(a) * b`` where ``a`` and ``b`` are the gate and up projections'
outputs (same shape). Computed in float32, returned in ``a.dtype``; the backward recomputes silu from the
saved inputs instead of storing it. The forward takes strided ``a``, ``b`` (the two halves of one fused
gate|up projection's output) without copying them: only the last dimension needs unit stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pipeloom.kernels import tl, triton, upcast, use_triton

BLOCK = 1024  # elements per program


def swiglu_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference: silu(a) * b in float32, in ``a.dtype``."""
    af = upcast(a)
    return (F.silu(af) * b.to(af.dtype)).to(a.dtype)


@triton.jit
def _swiglu_fwd_kernel(A, B, Y, F, stride_a, stride_b, stride_y, BLOCK: tl.constexpr):
    # Program (row, column block) of A, B, Y (M, F), each with its own row stride.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(A, B, DY, DA, DB, N, BLOCK: tl.constexpr):
    # Flat elementwise: da = dy * b * sig(a) * (1 + a (1 - sig(a))), db = dy * silu(a).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dy * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dy * silu).to(DB.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (M, F) with unit stride along F: a view when the leading dimensions merge (a split half of
    a (B, T, 2F) output does), else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on same-shaped ``a``, ``b`` (strided rows allowed); returns a new contiguous y
    of that shape in ``a.dtype``."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu needs a and b of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a2, b2 = _rows(a), _rows(b)
    M, F = a2.shape
    y = torch.empty((M, F), dtype=a.dtype, device=a.device)
    if y.numel():
        _swiglu_fwd_kernel[(M, triton.cdiv(F, BLOCK))](a2, b2, y, F, a2.stride(0), b2.stride(0), y.stride(0),
                                                       BLOCK=BLOCK, num_warps=4)
    return y.view(a.shape)


def swiglu_bwd(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns (da like ``a``, db like ``b``)."""
    dy = dy.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, dy, da, db, n, BLOCK=BLOCK, num_warps=4)
    return da, db


class SwiGLUFunction(torch.autograd.Function):
    """Triton SwiGLU; saves the two inputs (contiguous) and recomputes the activation in the backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return swiglu_fwd(a, b)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        a, b = ctx.saved_tensors
        return swiglu_bwd(dy, a, b)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for the gate ``a`` and up ``b`` projections' outputs (any shape, the same for both)."""
    if use_triton(a):
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return SwiGLUFunction.apply(a, b)
        return swiglu_fwd(a, b)  # inference: no saved inputs, strided halves read in place
    return swiglu_torch(a, b)
