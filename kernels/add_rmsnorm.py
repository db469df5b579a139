# Fused residual add + RMSNorm (vLLM's fused_add_rms_norm): torch reference, Triton kernel, autograd wrapper.
"""``s = x + residual`` and ``y = rmsnorm(s) * w`` in one pass over the row: a pre-norm block's residual add and
the next norm, which eagerly are an add and an RMSNorm (one kernel each fused, several unfused). As vLLM's
``fused_add_rms_norm`` (vllm/csrc/layernorm_kernels.cu), but out of place: both results are new tensors.

``s`` is rounded to the inputs' dtype before it is normalised, as the unfused ``x = x + r; rmsnorm(x)`` does, so
the two paths see the same residual stream; the norm is computed in float32 and rounded once (see
:mod:`pipeloom.kernels.rmsnorm`). The backward reuses RMSNorm's backward kernel on the saved ``s``.
"""

from __future__ import annotations

import torch
from pipeloom.kernels import tl, triton, use_triton
from pipeloom.kernels.rmsnorm import MAX_FUSED_DIM, _num_warps, _rows, rmsnorm_bwd, rmsnorm_torch


def add_rmsnorm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: (s, y) with s = x + residual in ``x.dtype`` and y = rmsnorm(s) * weight (float32 inside)."""
    s = x + residual  # (..., D)
    return s, rmsnorm_torch(s, weight, eps)


@triton.jit
def _add_rmsnorm_fwd_kernel(X, R, W, S, Y, RSTD, stride_x, stride_r, stride_s, stride_y, D, eps,
                            BLOCK_D: tl.constexpr):
    # One program per row: X, R (M, D) -> S = X + R, Y = rmsnorm(S) * W (M, D), RSTD (M,) float32.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(S.dtype.element_ty)  # rounded as the unfused add rounds it
    tl.store(S + row * stride_s + cols, s, mask=mask)
    s = s.to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (s * rstd * w).to(Y.dtype.element_ty), mask=mask)


def add_rmsnorm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel: ``x``, ``residual`` (..., D), rows of any stride -> (s, y) like ``x`` and rstd (M,)."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rmsnorm needs x and residual of one shape and dtype, got {tuple(x.shape)} "
                         f"{x.dtype} and {tuple(residual.shape)} {residual.dtype}")
    D = x.shape[-1]
    if D > MAX_FUSED_DIM:
        raise ValueError(f"fused add + RMSNorm handles rows up to {MAX_FUSED_DIM} wide, got {D}; "
                         "use pipeloom.kernels.torch_path() for wider rows")
    x2, r2 = _rows(x), _rows(residual)
    M = x2.shape[0]
    s = torch.empty((M, D), dtype=x.dtype, device=x.device)
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block = triton.next_power_of_2(D)
        _add_rmsnorm_fwd_kernel[(M,)](x2, r2, weight, s, y, rstd, x2.stride(0), r2.stride(0), s.stride(0),
                                      y.stride(0), D, eps, BLOCK_D=block, num_warps=_num_warps(block))
    return s.view(x.shape), y.view(x.shape), rstd


class AddRMSNormFunction(torch.autograd.Function):
    """Triton add + RMSNorm; saves s, the weight and rstd. d(x) = d(residual) = ds + RMSNorm's dx for dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        s, y, rstd = add_rmsnorm_fwd(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        return s, y

    @staticmethod
    def backward(ctx, ds: torch.Tensor | None, dy: torch.Tensor | None):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            grad, dw = torch.zeros_like(s) if ds is None else ds, torch.zeros_like(weight)
        else:
            dx, dw = rmsnorm_bwd(dy, s, weight, rstd)
            grad = dx if ds is None else dx + ds
        return grad, grad, dw, None


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rmsnorm(x + residual) * weight) for ``x``, ``residual`` (..., D) and ``weight`` (D,): one
    fused Triton kernel when :func:`use_triton` allows, else :func:`add_rmsnorm_torch`."""
    if use_triton(x):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, weight)):
            return AddRMSNormFunction.apply(x, residual, weight, eps)
        return add_rmsnorm_fwd(x, residual, weight, eps)[:2]
    return add_rmsnorm_torch(x, residual, weight, eps)
