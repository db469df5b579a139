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
* int4: the GEMV of ``kernels/int4_gemv.py`` (one AND and one FMA per weight, group scales applied once per
  32 columns; ``PIPELOOM_INT4_GEMV`` picks its configuration). It reads the scales and offsets as (s, m) pairs:
  :func:`int4_matmul` builds them per call, :class:`~pipeloom.inference.quant.QuantizedLinear` once per layer
  (:func:`int4_pairs_matmul`). On a GPU the layer may run torch's tinygemm instead
  (``kernels/int4_tinygemm.py``; ``PIPELOOM_INT4_KERNEL`` chooses for ``backend="auto"``).

The Triton kernels accumulate in float32 and are registered as custom ops (``pipeloom::int8_matmul``,
``pipeloom::int4_matmul``, ``pipeloom::int4_gemv``) so that a ``torch.compile``d decode step (CUDA graphs
included) calls them as opaque nodes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from pipeloom import features
from pipeloom.kernels import interpreted
from pipeloom.kernels.int4_gemv import int4_gemv, scales_offsets
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


def int8_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 GEMV (``kernels/int8_gemv.py``): x (..., K) with at most MAX_KERNEL_ROWS rows -> (..., N)."""
    return int8_gemv(x, qweight, scale, bias)


def int4_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The int4 GEMV (``kernels/int4_gemv.py``) over pairs built for this call: x (..., K), at most
    MAX_KERNEL_ROWS rows -> (..., N)."""
    return int4_gemv(x, packed, scales_offsets(scale, offset), group_size, bias)


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


@torch.library.custom_op("pipeloom::int4_gemv", mutates_args=())
def _int4_pairs_op(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
    return int4_gemv(x, packed, scale_offset, group_size, bias)


@_int4_pairs_op.register_fake
def _(x, packed, scale_offset, group_size, bias):
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


def runs_kernel(x: torch.Tensor, backend: str) -> bool:
    """Run the kernel? ``triton``: whenever the rows fit (prefill-sized inputs take the torch path under every
    backend: the kernels are GEMVs); ``auto``: where :func:`kernel_usable`; ``torch``: never."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        return 0 < x.numel() <= MAX_KERNEL_ROWS * x.size(-1)
    return backend == "auto" and kernel_usable(x)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """``x W^T + b`` for an int8 per-channel weight: the kernel for few rows where usable, else torch."""
    if runs_kernel(x, backend):
        return _int8_op(x, qweight, scale, bias)
    return int8_matmul_torch(x, qweight, scale, bias)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``x W^T + b`` for an int4 group-wise weight: the kernel for few rows where usable, else torch."""
    if runs_kernel(x, backend):
        return _int4_op(x, packed, scale, offset, group_size, bias)
    return int4_matmul_torch(x, packed, scale, offset, group_size, bias)


def int4_pairs_matmul(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor | None, scale: torch.Tensor,
                      offset: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """:func:`int4_matmul` with the kernel's (s, m) pairs built once by the caller (``scale_offset``, from
    ``int4_gemv.scales_offsets``; None: built for this call); the torch path uses ``scale`` and ``offset``."""
    if runs_kernel(x, backend):
        if scale_offset is None:
            return _int4_op(x, packed, scale, offset, group_size, bias)
        return _int4_pairs_op(x, packed, scale_offset, group_size, bias)
    return int4_matmul_torch(x, packed, scale, offset, group_size, bias)
