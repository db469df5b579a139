# Fused SwiGLU activation silu(a) * b: torch reference, Triton kernels, autograd wrapper.
"""SwiGLU, arXiv 2002.05202: ``y = silu(a) * b`` where ``a`` and ``b`` are the gate and up projections'
outputs (same shape). Computed in float32, returned in ``a.dtype``; the backward recomputes silu from the
saved inputs instead of storing it.
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
def _swiglu_fwd_kernel(A, B, Y, N, BLOCK: tl.constexpr):
    # Flat elementwise: A, B, Y (N,).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


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


def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on same-shaped ``a``, ``b``; returns y of that shape in ``a.dtype``."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu needs a and b of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    y = torch.empty_like(a)
    n = a.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK, num_warps=4)
    return y


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
        return SwiGLUFunction.apply(a, b)
    return swiglu_torch(a, b)
