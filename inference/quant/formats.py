# Weight formats for quantized inference: int8 per channel, int4 group-wise, float8 e4m3 per row; exact math.
"""Quantize and dequantize linear weights ``W`` (N, K) (N output channels, K inputs), and state the error.

* **int8, per output channel, symmetric** (LLM.int8's vector-wise scaling without outliers, arXiv 2208.07339
  §3; gpt-fast's int8): ``s_n = max_k |W_nk| / 127``, ``q = round(W / s)`` in [-127, 127], ``W ~ q * s``.
  A zero point buys nothing here: trained weights are centred on zero per channel.
* **int4, group-wise, asymmetric** (GPTQ/AWQ-style groups of 32/64/128 along K; the uint4 + scale + offset
  layout of gpt-fast and torchao's tinygemm): per group ``m = min``, ``s = (max - min) / 15``,
  ``q = round((W - m) / s)`` in [0, 15], ``W ~ q * s + m``. Asymmetric because int4 has only 16 levels and a
  group of 32-128 weights is seldom symmetric about zero: spanning [min, max] instead of [-max|W|, max|W|]
  makes the step up to twice finer, for one more number per group (4.25 -> 4.5 bits per weight at g=128
  with bf16 scales). Two codes per byte: ``packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4``.
* **float8 e4m3, per row** (FP8 formats, arXiv 2209.05433; torchao's rowwise float8): ``s_n = max|W_n| / 448``,
  ``W ~ float8(W / s) * s``. Activations the same way per token at run time (:func:`quantize_fp8_rows`).

Scales are stored in the weight's dtype (bf16 on a GPU: half the bytes of float32) and rounded *outward*
before the codes are computed (the scale up, the int4 offset down), so the stored grid always covers the
group and every weight is within half a step of its code. Hence the bounds, per weight:

    int8: |W - W^| <= s_n / 2        int4: |W - W^| <= s_ng / 2        fp8: |W - W^| <= 2^-4 |W| + 2^-10 s_n

(e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4 for normal numbers; below 2^-6 * s the subnormal
spacing is 2^-9 * s). For ``y = x W^T`` these add up to ``|y_n - y^_n| <= sum_k |x_k| |W_nk - W^_nk|``
(:func:`output_error_bound`), which the tests check on random and trained weights.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
INT4_LEVELS = 15  # codes 0..15
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_REL = 2.0**-4  # e4m3 unit roundoff (3 mantissa bits)
FP8_SUBNORMAL_HALF_STEP = 2.0**-10  # half the subnormal spacing 2^-9, in units of the scale
GROUP_SIZES = (32, 64, 128, 256)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) in ``dtype``, rounded toward +inf so that the stored value is >= x."""
    y = x.to(dtype)
    low = y.to(x.dtype) < x
    return torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) in ``dtype``, rounded toward -inf so that the stored value is <= x."""
    y = x.to(dtype)
    high = y.to(x.dtype) > x
    return torch.where(high, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _scale_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    dtype = dtype or weight.dtype
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"scale dtype {dtype} must be a float type of 16 bits or more (bfloat16, float16, float32)")
    return dtype


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"a linear weight must be a 2-D float tensor (out, in); got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    return weight.detach().float()


# ---------------------------------------------------------------------------------------------- int8


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (N, K) -> codes (N, K) int8 in [-127, 127] and per-channel scales (N,) in ``scale_dtype``."""
    w = _check_weight(weight)  # (N, K) float32
    amax = w.abs().amax(dim=1)  # (N,)
    scale = _round_up(amax / INT8_MAX, _scale_dtype(weight, scale_dtype))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) int8 and scales (N,) -> weights (N, K) float32."""
    return q.float() * scale.float().unsqueeze(1)


# ---------------------------------------------------------------------------------------------- int4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in [0, 15] -> (N, K/2) uint8, element 2j in the low nibble and 2j+1 in the high one."""
    if q.size(-1) % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.size(-1)}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> codes (N, K) uint8 in [0, 15] (inverse of :func:`pack_int4`)."""
    low, high = packed & 0xF, packed >> 4  # (N, K/2) each
    return torch.stack((low, high), dim=-1).reshape(packed.size(0), -1)


def check_group_size(in_features: int, group_size: int) -> None:
    """Raise a ValueError unless ``group_size`` is one of :data:`GROUP_SIZES` and divides ``in_features``."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} must be one of {GROUP_SIZES}")
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}; "
                         f"pick a group size that divides it (or skip this layer)")


def quantize_int4(weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` (N, K) -> packed codes (N, K/2) uint8, scales (N, K/g) and offsets (N, K/g) in ``scale_dtype``."""
    w = _check_weight(weight)
    n, k = w.shape
    check_group_size(k, group_size)
    dtype = _scale_dtype(weight, scale_dtype)
    groups = w.view(n, k // group_size, group_size)  # (N, G, g)
    offset = _round_down(groups.amin(dim=2), dtype)  # (N, G), <= every weight of its group
    scale = _round_up((groups.amax(dim=2) - offset.float()) / INT4_LEVELS, dtype)  # (N, G): covers the max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is exact at code 0
    q = torch.round((groups - offset.float().unsqueeze(2)) / scale.float().unsqueeze(2)).clamp_(0, INT4_LEVELS)
    return pack_int4(q.view(n, k)), scale, offset


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """Packed codes (N, K/2), scales and offsets (N, K/g) -> weights (N, K) float32: ``q * s + m``."""
    q = unpack_int4(packed).float()  # (N, K)
    n, k = q.shape
    s = scale.float().repeat_interleave(group_size, dim=1)  # (N, K)
    m = offset.float().repeat_interleave(group_size, dim=1)
    if s.shape != (n, k):
        raise ValueError(f"scales {tuple(scale.shape)} with group_size={group_size} do not cover weights ({n}, {k})")
    return q * s + m


# ---------------------------------------------------------------------------------------------- float8


def quantize_fp8_rows(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (..., K) -> e4m3 values (..., K) and per-row scales (..., 1): ``x ~ x8 * s``.

    For weights (N, K) once at load time, and for activations per token at run time (dynamic scaling).
    """
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    scale = _round_up(amax / FP8_MAX, scale_dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    x8 = (xf / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (N, K) -> e4m3 (N, K) and per-row scales (N,) float32 (what ``torch._scaled_mm`` takes)."""
    w8, scale = quantize_fp8_rows(_check_weight(weight))
    return w8, scale.squeeze(1)


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 (N, K) and scales (N,) -> weights (N, K) float32."""
    return w8.float() * scale.float().unsqueeze(1)


def fp8_matmul_emulated(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """``(x8 @ w8^T) * x_scale * w_scale^T`` in float32: x8 (M, K), x_scale (M, 1), w8 (N, K), w_scale (N,).

    The math of a rowwise-scaled float8 GEMM (``torch._scaled_mm`` on Hopper): each e4m3 x e4m3 product is
    exact in float32 (4 + 4 significant bits), products are summed in float32, then both scales applied.
    """
    acc = x8.float() @ w8.float().t()  # (M, N), exact products, float32 sums
    return (acc * x_scale.float() * w_scale.float().unsqueeze(0)).to(out_dtype)


def fp8_matmul(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """Rowwise-scaled float8 GEMM: ``torch._scaled_mm`` where it runs (CUDA sm 8.9+, CPU), else the emulation."""
    m, k = x8.shape
    n = w8.size(0)
    if x8.is_cuda and (torch.cuda.get_device_capability(x8.device) < (8, 9) or k % 16 or n % 16):
        return fp8_matmul_emulated(x8, x_scale, w8, w_scale, out_dtype)  # no float8 tensor cores, or odd shapes
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale.float().reshape(m, 1).contiguous(),
                            scale_b=w_scale.float().reshape(1, n).contiguous(), out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------- bounds


def weight_error_bound(mode: str, weight: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Largest |W - W^| each weight (N, K) may have under ``mode`` (see the module docstring), float32."""
    w = weight.detach().float()
    n, k = w.shape
    s = scale.float()
    if mode == "int8":
        return (s / 2).unsqueeze(1).expand(n, k)
    if mode == "int4":
        return (s / 2).repeat_interleave(group_size, dim=1)
    if mode == "fp8":
        return FP8_REL * w.abs() + FP8_SUBNORMAL_HALF_STEP * s.unsqueeze(1)
    raise ValueError(f"mode={mode!r} has no weight error bound; choose 'int8', 'int4' or 'fp8'")


def output_error_bound(x: torch.Tensor, weight_bound: torch.Tensor) -> torch.Tensor:
    """``|x| @ bound^T``: the largest |x W^T - x W^^T| per output (..., N) given per-weight bounds (N, K)."""
    return x.detach().float().abs() @ weight_bound.t()
