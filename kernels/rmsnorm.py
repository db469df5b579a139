# Fused RMSNorm (Llama convention) over the last dimension: torch reference, Triton kernels, autograd wrapper.
"""RMSNorm, arXiv 1910.07467: ``y = x * rsqrt(mean(x^2, -1) + eps) * w``.

Computed in float32 and cast back to ``x.dtype`` once at the end. (Hugging Face's LlamaRMSNorm casts the
normalised x to the input dtype *before* multiplying by w; the two differ by at most one rounding.)
"""

from __future__ import annotations

import torch
from pipeloom.kernels import tl, triton, upcast, use_triton

MAX_FUSED_DIM = 65536  # one row must fit one program's block


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference: RMSNorm of ``x`` (..., D), ``weight`` (D,) in float32 (or float64), in ``x.dtype``."""
    xf = upcast(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    # One program per row: X (M, D) -> Y (M, D), RSTD (M,) float32.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    X,
    W,
    DY,
    DX,
    RSTD,
    DW_PARTIAL,
    stride_x,
    stride_dy,
    stride_dx,
    M,
    D,
    rows_per_program,
    BLOCK_D: tl.constexpr,
):
    # Each program walks `rows_per_program` rows: DX (M, D), and its partial weight gradient DW_PARTIAL[pid].
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 offsets: M * D may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        wdy = w * dy
        c = tl.sum(wdy * x_hat, axis=0) / D
        dx = (wdy - x_hat * c) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with unit stride along D (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _backward_programs(x: torch.Tensor, rows: int) -> int:
    """How many programs share the weight-gradient reduction: a few per SM on GPU, a handful on CPU."""
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(rows, target))


def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``x`` (..., D) -> (y (..., D), rstd (M,) float32)."""
    D = x.shape[-1]
    if D > MAX_FUSED_DIM:
        raise ValueError(
            f"fused RMSNorm handles rows up to {MAX_FUSED_DIM} wide, got {D}; "
            "use pipeloom.kernels.torch_path() for wider rows"
        )
    x2 = _rows(x)
    M = x2.shape[0]
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(D)
    _rmsnorm_fwd_kernel[(M,)](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps, BLOCK_D=block, num_warps=_num_warps(block)
    )
    return y.view(x.shape), rstd


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Launch the backward kernel: returns (dx like ``x``, dweight like ``weight``)."""
    D = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    dx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    programs = _backward_programs(x, M)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, D), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(D)
    _rmsnorm_bwd_kernel[(programs,)](
        x2,
        weight,
        dy2,
        dx,
        rstd,
        dw_partial,
        x2.stride(0),
        dy2.stride(0),
        dx.stride(0),
        M,
        D,
        rows_per_program,
        BLOCK_D=block,
        num_warps=_num_warps(block),
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm with a fused backward; saves x and the per-row rstd (float32), not the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rmsnorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_bwd(dy, x, weight, rstd)
        return dx, dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x`` (..., D) with ``weight`` (D,); fused Triton kernel when :func:`use_triton` allows."""
    if use_triton(x):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return RMSNormFunction.apply(x, weight, eps)
        return rmsnorm_fwd(x, weight, eps)[0]  # inference: nothing saved for a backward
    return rmsnorm_torch(x, weight, eps)
