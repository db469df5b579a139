# Fused LayerNorm (weight and bias) over the last dimension: torch reference, Triton kernels, autograd.
"""LayerNorm, arXiv 1607.06450: ``y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b`` (biased variance),
as ``torch.nn.functional.layer_norm``; computed in float32 and cast back to ``x.dtype``.
"""

from __future__ import annotations

import torch
from pipeloom.kernels import tl, triton, upcast, use_triton

MAX_FUSED_DIM = 65536  # one row must fit one program's block


def layernorm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """The reference: LayerNorm of ``x`` (..., D), ``weight``, ``bias`` (D,) in float32, in ``x.dtype``."""
    xf = upcast(x)
    y = torch.nn.functional.layer_norm(xf, x.shape[-1:], weight.to(xf.dtype), bias.to(xf.dtype), eps)
    return y.to(x.dtype)


@triton.jit
def _layernorm_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    # One program per row: X (M, D) -> Y (M, D), MEAN and RSTD (M,) float32.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_bwd_kernel(
    X,
    W,
    DY,
    DX,
    MEAN,
    RSTD,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_x,
    stride_dy,
    stride_dx,
    M,
    D,
    rows_per_program,
    BLOCK_D: tl.constexpr,
):
    # Each program walks `rows_per_program` rows: DX (M, D), and partial DW, DB rows [pid] (D,) in float32.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 offsets: M * D may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(x_hat * wdy, axis=0) / D
        c2 = tl.sum(wdy, axis=0) / D
        dx = (wdy - (x_hat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * D + cols, db, mask=mask)


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


def layernorm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """Launch the forward kernel: ``x`` (..., D) -> (y (..., D), mean (M,), rstd (M,) float32)."""
    D = x.shape[-1]
    if D > MAX_FUSED_DIM:
        raise ValueError(
            f"fused LayerNorm handles rows up to {MAX_FUSED_DIM} wide, got {D}; "
            "use pipeloom.kernels.torch_path() for wider rows"
        )
    x2 = _rows(x)
    M = x2.shape[0]
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(D)
    _layernorm_fwd_kernel[(M,)](
        x2,
        weight,
        bias,
        y,
        mean,
        rstd,
        x2.stride(0),
        y.stride(0),
        D,
        eps,
        BLOCK_D=block,
        num_warps=_num_warps(block),
    )
    return y.view(x.shape), mean, rstd


def layernorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
):
    """Launch the backward kernel: returns (dx like ``x``, dweight, dbias like ``weight``)."""
    D = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    dx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    programs = _backward_programs(x, M)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, D), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, D), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(D)
    _layernorm_bwd_kernel[(programs,)](
        x2,
        weight,
        dy2,
        dx,
        mean,
        rstd,
        dw_partial,
        db_partial,
        x2.stride(0),
        dy2.stride(0),
        dx.stride(0),
        M,
        D,
        rows_per_program,
        BLOCK_D=block,
        num_warps=_num_warps(block),
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


class LayerNormFunction(torch.autograd.Function):
    """Triton LayerNorm with a fused backward; saves x and the per-row mean and rstd (float32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, rstd = layernorm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layernorm_bwd(dy, x, weight, mean, rstd)
        return dx, dw, db, None


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of ``x`` (..., D) with ``weight`` and ``bias`` (D,); fused Triton kernel when allowed."""
    if use_triton(x):
        return LayerNormFunction.apply(x, weight, bias, eps)
    return layernorm_torch(x, weight, bias, eps)
