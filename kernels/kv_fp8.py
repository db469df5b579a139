# The fp8 KV cache layout: per block, a plane of e4m3 codes (head-major), then a plane of float32 scales.
"""``inference.kv_cache_dtype=fp8`` stores keys and values as float8 e4m3 (the format of vLLM's and TensorRT-LLM's
fp8 KV caches; Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433) with one scale per token
and key/value head, so that no later token can change an earlier token's codes (a per-block scale would have to
be fixed before the block's tokens are known, or requantize them). A value is ``x ~ code * s`` with ``s = max|x|
/ 448`` over its row of hd (448: e4m3's largest finite value), within 2^-4 relative per element above e4m3's
subnormal range.

A cache is a ``torch.uint8`` tensor allocated as (num_blocks, block_size, Hkv, hd + 4): hd code bytes and 4 scale
bytes per token and head, so for hd = 128 the pool holds 256/132 = 1.94x the tokens of bfloat16. Inside each
block the bytes are two planes, not rows::

    block b: codes  [Hkv][block_size][hd]  uint8 (e4m3 bits), keys: a row of hd per token
                    [Hkv][hd][block_size]  uint8,             values: a row of block_size per dimension
             scales [Hkv][block_size]      float32

so the codes of a (block, kv head) are ``block_size * hd`` contiguous bytes starting on a 16-byte boundary (hd a
multiple of 16) and its scales ``block_size`` contiguous floats. Keys are rows per token because ``q . k`` runs
along the head dimension; values are rows per dimension (as in vLLM's paged value cache) because ``p @ v`` runs
along the keys, whose pairs the float16 tensor-core operand wants adjacent. The kernels stream codes with 16-byte
asynchronous copies, convert them to float16 (one instruction per pair) and keep the scales out of the inner
products (``q . (c s) = (q . c) s`` per key, ``sum_j p_j c_j s_j = (p s) . c`` per value).

The first layout, rows of hd codes with their scale after them (132 bytes apart), put rows off 16-byte
boundaries, so the compiler could prove no alignment: compiled for sm_90 (bench/kernel_sass.py) the decode kernel
read the cache with 128 one-byte loads per thread and step of 64 keys, no asynchronous copies, ran out of
registers (255, 876 B spilled) and spent 3178 instructions per step against 711 for a bfloat16 cache (now 532
against 392); it decoded at 8k context 3.5x slower than bfloat16 (bench/RESULTS.md). Index a cache only through
:func:`planes` (views shaped like a bfloat16 cache: codes (num_blocks, block_size, Hkv, hd), scales (num_blocks,
block_size, Hkv)), saying whether it holds keys or values: the allocation's shape gives the sizes, but its element
[b, t, h] is not token t's row. ``hd`` must be a multiple of 4 (aligned scales).

This file holds the torch side (quantize, dequantize, the planes, write and read) and :func:`round_e4m3`, the
rounding the decode kernel quantizes with; the kernels in ``paged_attention.py`` and ``paged_decode.py`` read the
same layout through :func:`kernel_views`.
"""

from __future__ import annotations

import torch
from pipeloom.kernels import tl, triton

KV_CACHE_DTYPES = ("auto", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_BYTES = 4  # one float32 scale per row


def is_fp8(cache: torch.Tensor) -> bool:
    """True for a cache in this layout (uint8 planes of codes and scales)."""
    return cache.dtype == torch.uint8


def check_kv_cache_dtype(kv_cache_dtype: str, head_dim: int) -> None:
    """A ValueError naming ``inference.kv_cache_dtype`` when it is unknown or the head size does not fit fp8 rows."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"inference.kv_cache_dtype={kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype == "fp8" and head_dim % SCALE_BYTES:
        raise ValueError(f"inference.kv_cache_dtype='fp8' needs a head size that is a multiple of {SCALE_BYTES} "
                         f"(the scales are stored aligned after the codes); this model's is {head_dim}; use 'auto'")


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


KINDS = ("key", "value")


def planes(cache: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of an fp8 ``cache`` (num_blocks, block_size, Hkv, hd + 4) uint8, contiguous, of keys or values
    (``kind``): the codes (num_blocks, block_size, Hkv, hd) uint8 and the scales (num_blocks, block_size, Hkv)
    float32 (see the module docstring: key codes are rows per token, value codes rows per dimension)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose 'key' or 'value'")
    nb, bs, h, width = cache.shape
    hd = width - SCALE_BYTES
    if not is_fp8(cache) or not cache.is_contiguous() or hd % SCALE_BYTES or cache.storage_offset() % SCALE_BYTES:
        raise ValueError(f"an fp8 KV cache must be a contiguous uint8 tensor (num_blocks, block_size, Hkv, hd + 4) "
                         f"with hd a multiple of 4, 4-byte aligned; got {cache.dtype} {tuple(cache.shape)} "
                         f"{'contiguous' if cache.is_contiguous() else 'strided'}, offset {cache.storage_offset()}")
    per_block = bs * h * width  # bytes
    base = cache.storage_offset()
    strides = (per_block, hd, bs * hd, 1) if kind == "key" else (per_block, 1, bs * hd, bs)
    codes = cache.as_strided((nb, bs, h, hd), strides, base)
    words = cache.view(-1).view(torch.float32)  # the same bytes as float32 (storage offset base / 4)
    scales = words.as_strided((nb, bs, h), (per_block // SCALE_BYTES, 1, bs), (base + bs * h * hd) // SCALE_BYTES)
    return codes, scales


def kernel_views(cache: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...],
                                                         tuple[int, ...]]:
    """What a Triton kernel reads a cache of keys or values through: (data, scales, data strides (block, slot,
    head, dim), scale strides (block, slot, head)). fp8: the code plane and the scale plane; otherwise the cache
    itself, with the cache as an unused scale pointer and zero scale strides."""
    if is_fp8(cache):
        codes, scales = planes(cache, kind)
        return codes, scales, codes.stride(), scales.stride()
    return cache, cache, cache.stride(), (0, 0, 0)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x`` (..., hd) float -> (e4m3 codes of ``x / s`` as uint8 (..., hd), scales ``s`` float32 (...))."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX  # (..., 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    codes = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)  # (..., hd)
    return codes, scale[..., 0]


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (..., hd) uint8 and scales (...) -> values ``code * s`` (..., hd) in ``dtype`` (computed in float32)."""
    return (codes.view(FP8).float() * scales[..., None].float()).to(dtype)


def quantize_cache(x: torch.Tensor, kind: str) -> torch.Tensor:
    """An fp8 cache of keys or values (``kind``), (num_blocks, block_size, Hkv, hd + 4), holding the values ``x``
    (num_blocks, block_size, Hkv, hd) quantized (what writing every slot would leave)."""
    nb, bs, h, hd = x.shape
    cache = torch.zeros(nb, bs, h, hd + SCALE_BYTES, dtype=torch.uint8, device=x.device)
    codes, scales = planes(cache, kind)
    codes[:], scales[:] = quantize_rows(x)
    return cache


def write_rows(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, kind: str) -> None:
    """Store rows ``x`` (N, Hkv, hd) at ``slots`` (N,) of a cache of keys or values (``kind``), (num_blocks,
    block_size, Hkv, width), quantizing them when the cache is fp8."""
    nb, bs, h, width = cache.shape
    if not is_fp8(cache):
        cache.view(nb * bs, h, width).index_copy_(0, slots, x.to(cache.dtype))
        return
    codes, scales = planes(cache, kind)
    new_codes, new_scales = quantize_rows(x)
    where = (slots // bs, slots % bs)
    codes.index_put_(where, new_codes)
    scales.index_put_(where, new_scales)


def read_blocks(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """Blocks ``blocks`` (any shape, long) of a cache of keys or values (``kind``) as values (*blocks.shape,
    block_size, Hkv, hd) of ``dtype``."""
    if not is_fp8(cache):
        return cache[blocks].to(dtype)
    codes, scales = planes(cache, kind)
    return dequantize_rows(codes[blocks], scales[blocks], dtype)


@triton.jit
def as_float16(codes):
    # e4m3 codes (uint8) as their exact float16 values (one conversion instruction per pair on sm_89+)
    return codes.to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def f16_range(x):
    # 2^floor(log2 x) for float32 x > 0 (1 where x is 0 or subnormal): dividing by it is exact and leaves values up
    # to x below 2, in float16's range; the fp8 kernels scale q and the softmax weights by it before float16 dots.
    p = (x.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(p > 0, p, 1.0)


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


__all__ = ["FP8_MAX", "KINDS", "KV_CACHE_DTYPES", "as_float16", "bytes_per_token_head", "cache_dtype",
           "check_kv_cache_dtype", "dequantize_rows", "f16_range", "is_fp8", "kernel_views", "planes",
           "quantize_cache", "quantize_rows", "read_blocks", "round_e4m3", "row_width", "write_rows"]
