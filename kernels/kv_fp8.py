# The fp8 KV cache layout: each (token, kv head) row holds hd e4m3 codes followed by its float32 scale.
"""``inference.kv_cache_dtype=fp8`` stores keys and values as float8 e4m3 (the format of vLLM's and TensorRT-LLM's
fp8 KV caches; Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433) with one scale per token
and key/value head, so that no later token can change an earlier token's codes (a per-block scale would have to
be fixed before the block's tokens are known, or requantize them).

A cache is a ``torch.uint8`` tensor (num_blocks, block_size, Hkv, hd + 4): bytes ``[0, hd)`` of a row are the
e4m3 codes of ``x / s`` and bytes ``[hd, hd + 4)`` the float32 scale ``s = max|x| / 448`` (448: e4m3's largest
finite value), so ``x ~ code * s`` with a relative error of at most 2^-4 per element above e4m3's subnormal range.
A row is ``hd + 4`` bytes against ``2 hd`` for bfloat16: for hd = 128 the pool holds 256/132 = 1.94x the tokens.
Keeping the scale in the row keeps a layer's cache one tensor per K and V, so every path that takes
``(k_cache, v_cache)`` (the block tables, the CUDA graphs, the decode custom op) is unchanged; the Triton kernels
read the scale through a float32 pointer at byte ``hd`` of the row (``hd`` must be a multiple of 4 for it to be
aligned).

This file holds the torch side (quantize rows, dequantize rows, shapes and sizes) and :func:`round_e4m3`, the
rounding the decode kernel quantizes with; the kernels in ``paged_attention.py`` and ``paged_decode.py`` read the
same layout.
"""

from __future__ import annotations

import torch
from pipeloom.kernels import tl, triton

KV_CACHE_DTYPES = ("auto", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_BYTES = 4  # one float32 scale per row


def is_fp8(cache: torch.Tensor) -> bool:
    """True for a cache in this layout (uint8 rows of codes + scale)."""
    return cache.dtype == torch.uint8


def check_kv_cache_dtype(kv_cache_dtype: str, head_dim: int) -> None:
    """A ValueError naming ``inference.kv_cache_dtype`` when it is unknown or the head size does not fit fp8 rows."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"inference.kv_cache_dtype={kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype == "fp8" and head_dim % SCALE_BYTES:
        raise ValueError(f"inference.kv_cache_dtype='fp8' needs a head size that is a multiple of {SCALE_BYTES} "
                         f"(the scale is stored aligned after the codes); this model's is {head_dim}; use 'auto'")


def row_width(head_dim: int, kv_cache_dtype: str) -> int:
    """Elements in the last dimension of a cache: hd (the model's dtype) or hd + 4 bytes (fp8)."""
    return head_dim + SCALE_BYTES if kv_cache_dtype == "fp8" else head_dim


def cache_dtype(model_dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    """The storage dtype of a cache: the model's for "auto", uint8 (codes + scale bytes) for "fp8"."""
    return torch.uint8 if kv_cache_dtype == "fp8" else model_dtype


def bytes_per_token_head(head_dim: int, model_dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes one token's key (or value) takes for one kv head."""
    if kv_cache_dtype == "fp8":
        return head_dim + SCALE_BYTES
    return head_dim * model_dtype.itemsize


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` (..., hd) float -> (..., hd + 4) uint8: e4m3 codes of ``x / s``, then ``s`` as float32 bytes."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX  # (..., 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    codes = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)  # (..., hd)
    return torch.cat([codes, scale.view(torch.uint8)], dim=-1)  # (..., hd + 4)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., hd + 4) uint8 rows -> (..., hd) values ``code * s`` in ``dtype`` (computed in float32)."""
    hd = rows.size(-1) - SCALE_BYTES
    codes = rows[..., :hd].contiguous().view(FP8).float()  # (..., hd)
    scale = rows[..., hd:].contiguous().view(torch.float32)  # (..., 1)
    return (codes * scale).to(dtype)


def write_rows(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Store rows ``x`` (N, Hkv, hd) at ``slots`` (N,) of ``cache`` (num_blocks, block_size, Hkv, width), quantizing
    them when the cache is fp8."""
    nb, bs, h, width = cache.shape
    rows = quantize_rows(x) if is_fp8(cache) else x.to(cache.dtype)
    cache.view(nb * bs, h, width).index_copy_(0, slots, rows)


def read_rows(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gathered cache (or part of one; last dimension width) as values of ``dtype``."""
    return dequantize_rows(cache, dtype) if is_fp8(cache) else cache.to(dtype)


@triton.jit
def round_e4m3(y):
    # y (float32, |y| <= 448) rounded to the nearest e4m3 value, ties to even, as torch's cast does. Done by hand
    # so that the cast after it is exact: Triton 3.9's interpreter drops the carry when rounding up crosses a power
    # of two (1.97 -> 1.0); on a GPU the hardware cast would round the same way as this.
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # the exponent; e4m3's subnormals share 2^-6's spacing
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): three mantissa bits
    z = y / step
    f = tl.floor(z)
    rest = z - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(rest > 0.5, f + 1.0, tl.where(rest < 0.5, f, f + odd)) * step


__all__ = ["FP8_MAX", "KV_CACHE_DTYPES", "bytes_per_token_head", "cache_dtype", "check_kv_cache_dtype",
           "dequantize_rows", "is_fp8", "quantize_rows", "read_rows", "round_e4m3", "row_width", "write_rows"]
