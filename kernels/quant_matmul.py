# Weight-only quantized matmul for decode (few rows): int8 per channel and int4 group-wise; torch refs + Triton.
"""``y = x W^T (+ b)`` where ``W`` is stored quantized (formats in ``pipeloom.inference.quant.formats``):

* int8: codes ``q`` (N, K) int8 and per-channel scales ``s`` (N,): ``y = (x q^T) * s``;
* int4: packed codes (N, K/2) uint8 (low nibble = even column), scales and offsets (N, K/g):
  ``W = q * s + m`` per group of g columns.

Batch-1 decode reads every weight once per token, so its speed is bytes read / bandwidth (the gpt-fast
argument). Rows beyond :data:`MAX_KERNEL_ROWS` (prefill) take the torch path: dequantize, then one cuBLAS
matmul. For 1-16 rows:

* int8: the GEMV of ``kernels/int8_gemv.py`` (one reduction per program, int8 -> float32 by bit tricks;
  fixed configurations named there, ``PIPELOOM_INT8_GEMV`` picks one);
* int4: on a CUDA GPU with bf16 activations, torch's tinygemm kernel (``kernels/int4_tinygemm.py``; its
  weight layout is built once per layer by :class:`~pipeloom.inference.quant.QuantizedLinear`), else the
  Triton kernel below: each program owns ``BLOCK_N`` output channels, walks K in ``BLOCK_J`` packed-byte
  steps, dequantizes in registers and reduces on the CUDA cores, over a few fixed tile shapes.

The Triton kernels accumulate in float32 and are registered as custom ops (``pipeloom::int8_matmul``,
``pipeloom::int4_matmul``) so that a ``torch.compile``d decode step (CUDA graphs included) calls them as
opaque nodes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from pipeloom import features
from pipeloom.kernels import interpreted, tl, triton
from pipeloom.kernels.int8_gemv import MAX_ROWS, int8_gemv

MAX_KERNEL_ROWS = MAX_ROWS  # 16; more rows than this: dequantize + cuBLAS (the GEMM is no longer bandwidth bound)
BACKENDS = ("auto", "triton", "torch")


# ------------------------------------------------------------------------------------------ references


def int8_matmul_torch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x q^T) * s + b`` in ``x.dtype`` (float32 input: the float32 reference); x (..., K) -> (..., N).

    The codes convert to ``x.dtype`` exactly (|q| <= 127); the per-channel scale is applied after the
    matmul, as gpt-fast does, so Inductor can fuse the conversion into the matmul's operand load.
    """
    y = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)  # (..., N)
    return y if bias is None else y + bias.to(x.dtype)


def int4_matmul_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` with ``W = q * s + m`` dequantized in float32, then cast to ``x.dtype``; x (..., K)."""
    from pipeloom.inference.quant.formats import dequantize_int4

    weight = dequantize_int4(packed, scale, offset, group_size).to(x.dtype)  # (N, K)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _int4_matmul_kernel(X, W, S, Z, B, Y, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_J: tl.constexpr):
    # X (M, K), W (N, K/2) uint8 packed (low nibble: column 2j), S scales / Z offsets (N, K/GROUP), Y (M, N).
    # BLOCK_J packed bytes = 2 * BLOCK_J columns per step; even and odd columns are reduced separately.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_J)
    mask_m, mask_n = offs_m < M, offs_n < N
    half = K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, half, BLOCK_J):
        jj = j0 + offs_j
        mask_j = jj < half
        mask_w = mask_n[:, None] & mask_j[None, :]
        b = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + jj[None, :], mask=mask_w, other=0).to(tl.int32)
        g = (2 * jj) // GROUP  # (BJ,) group of columns 2j and 2j+1
        s = tl.load(S + offs_n[:, None] * stride_sn + g[None, :], mask=mask_w, other=0.0).to(tl.float32)
        m = tl.load(Z + offs_n[:, None] * stride_sn + g[None, :], mask=mask_w, other=0.0).to(tl.float32)
        w_even = (b & 0xF).to(tl.float32) * s + m  # (BN, BJ)
        w_odd = (b >> 4).to(tl.float32) * s + m
        mask_x = mask_m[:, None] & mask_j[None, :]
        x_even = tl.load(X + offs_m[:, None] * stride_xm + 2 * jj[None, :], mask=mask_x, other=0.0).to(tl.float32)
        x_odd = tl.load(X + offs_m[:, None] * stride_xm + 2 * jj[None, :] + 1, mask=mask_x, other=0.0).to(tl.float32)
        acc += tl.sum(x_even[:, None, :] * w_even[None, :, :], axis=2)  # (BM, BN)
        acc += tl.sum(x_odd[:, None, :] * w_odd[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# A few tile shapes for the int4 kernel (its autotune over 44 shapes ran out of device time on the H200):
# small BLOCK_N for many programs, long packed-byte steps for wide contiguous loads.
INT4_TILES = ((4, 256, 1), (4, 512, 2), (8, 256, 2), (16, 128, 4))  # (BLOCK_N, BLOCK_J, warps)
_int4_tuned = None
if features.has("triton"):  # an autotuned launcher for the GPU; the interpreter launches the plain kernel
    _int4_tuned = triton.autotune([triton.Config({"BLOCK_N": bn, "BLOCK_J": bj}, num_warps=w)
                                   for bn, bj, w in INT4_TILES], key=["N", "K", "BLOCK_M"])(_int4_matmul_kernel)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    x2 = x.reshape(-1, x.size(-1)).contiguous()  # (M, K)
    m = x2.size(0)
    if m > MAX_KERNEL_ROWS:
        raise ValueError(f"the quantized matmul kernels take at most {MAX_KERNEL_ROWS} rows, got {m}; "
                         "use the torch path (backend='torch') for prefill-sized inputs")
    return x2, m, max(triton.next_power_of_2(m), 1)


def int8_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 GEMV (``kernels/int8_gemv.py``): x (..., K) with at most MAX_KERNEL_ROWS rows -> (..., N)."""
    return int8_gemv(x, qweight, scale, bias)


def int4_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the int4 kernel: x (..., K) with at most MAX_KERNEL_ROWS rows -> (..., N) in ``x.dtype``."""
    x2, m, block_m = _rows(x)
    n, k = packed.size(0), 2 * packed.size(1)
    scale, offset = scale.contiguous(), offset.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    args = (x2, packed, scale, offset, bias if bias is not None else scale, y, m, n, k, x2.stride(0),
            packed.stride(0), scale.stride(0), y.stride(0))
    if not interpreted() and os.environ.get("PIPELOOM_QUANT_AUTOTUNE", "1") == "1":
        _int4_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, GROUP=group_size,
                                                                      HAS_BIAS=bias is not None, BLOCK_M=block_m)
    else:  # the interpreter (it would run every config), or autotuning switched off: one fixed tile
        _int4_matmul_kernel[(triton.cdiv(n, 16),)](*args, GROUP=group_size, HAS_BIAS=bias is not None,
                                                   BLOCK_M=block_m, BLOCK_N=16, BLOCK_J=32)
    return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("pipeloom::int8_matmul", mutates_args=())
def _int8_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return int8_matmul_triton(x, qweight, scale, bias)


@_int8_op.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty(*x.shape[:-1], qweight.size(0))


@torch.library.custom_op("pipeloom::int4_matmul", mutates_args=())
def _int4_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
             bias: torch.Tensor | None) -> torch.Tensor:
    return int4_matmul_triton(x, packed, scale, offset, group_size, bias)


@_int4_op.register_fake
def _(x, packed, scale, offset, group_size, bias):
    return x.new_empty(*x.shape[:-1], packed.size(0))


# ------------------------------------------------------------------------------------------ dispatch


_HAS_TRITON = features.has("triton")


def kernel_usable(x: torch.Tensor) -> bool:
    """The Triton path can run on ``x``: triton present, a CUDA tensor (or CPU under TRITON_INTERPRET=1),
    few rows, a float dtype the kernels load, and kernels not switched off (``set_kernels("torch")``).
    Unlike the training kernels this stays on inside ``torch.compile`` (Inductor does not beat it here)."""
    import pipeloom.kernels as kernels

    if not _HAS_TRITON or x.dtype not in kernels.TRITON_DTYPES or x.numel() > MAX_KERNEL_ROWS * x.size(-1):
        return False
    if kernels._forced_torch or kernels._mode == "torch" or os.environ.get("PIPELOOM_KERNELS") == "torch":
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and interpreted()


def _choose(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    return backend == "triton" or (backend == "auto" and kernel_usable(x))


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """``x W^T + b`` for an int8 per-channel weight: the kernel for few rows where usable, else torch."""
    if _choose(x, backend):
        return _int8_op(x, qweight, scale, bias)
    return int8_matmul_torch(x, qweight, scale, bias)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``x W^T + b`` for an int4 group-wise weight: the kernel for few rows where usable, else torch."""
    if _choose(x, backend):
        return _int4_op(x, packed, scale, offset, group_size, bias)
    return int4_matmul_torch(x, packed, scale, offset, group_size, bias)
