# int4 weight-only matmul through torch's tinygemm CUDA kernel (aten._weight_int4pack_mm): layout and call.
"""pipeloom's int4 format (``inference/quant/formats.py``) stores per group of g columns ``W ~ q * s + m``
with q in [0, 15], two codes per byte, the even column in the low nibble. tinygemm (the tensor-core kernel
behind gpt-fast's and torchao's int4 weight-only layouts, ``aten/src/ATen/native/cuda/int4mm.cu``, sm_80+)
computes with the code as a signed int4 and a zero point::

    W = (q - 8) * s + z,   so   z = m + 8 s

with ``scales_and_zeros`` of shape (K/g, N, 2) bf16 (``[..., 0]`` the scale, ``[..., 1]`` the zero), and
takes its codes as (N, K/2) uint8 with the *even* column in the *high* nibble, which
``aten._convert_weight_to_int4pack(codes, inner_k_tiles)`` rearranges into the m16n8k16 B-operand tiles
(int32, (N/8, K/(16 inner_k_tiles), 32, inner_k_tiles/2)). The conversion is exact but for z, which is
rounded to bf16 once: ``|z_bf16 - (m + 8 s)| <= 2^-8 |m + 8 s|`` (bf16 keeps 8 significant bits); the kernel
then rounds each dequantized weight ``(q - 8) * s + z`` to bf16 (one fused multiply-add) and accumulates the
bf16 x bf16 products in float32. Our reference dequantizes ``q * s + m`` in float32 and rounds to bf16 once,
so the two weights differ by at most ``2^-8 |m + 8 s| + 2^-8 (|W| + |W'|)`` (:func:`weight_difference_bound`).

Constraints (checked by :func:`unsupported`): activations bf16 and contiguous, K a multiple of
``16 * inner_k_tiles`` (128 for the default 8 inner k-tiles: 4096 and 11008 both are), N a multiple of 8,
g in 32/64/128/256, a CUDA device of compute capability 8.0+.
"""

from __future__ import annotations

import torch

INNER_K_TILES = 8  # 16-byte loads of the packed codes (gpt-fast's and torchao's default)
GROUP_SIZES = (32, 64, 128, 256)
BF16_UNIT_ROUNDOFF = 2.0**-8


def scales_and_zeros(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Our scales and offsets (N, G) -> tinygemm's (G, N, 2) bf16: ``[..., 0] = s``, ``[..., 1] = m + 8 s``."""
    if scale.shape != offset.shape or scale.dim() != 2:
        raise ValueError(f"scale {tuple(scale.shape)} and offset {tuple(offset.shape)} must both be (N, G)")
    zero = offset.float() + 8.0 * scale.float()  # (N, G), exact in float32 for bf16/fp16 inputs of similar size
    return torch.stack((scale.to(torch.bfloat16), zero.to(torch.bfloat16)), dim=-1).transpose(0, 1).contiguous()


def tinygemm_codes(packed: torch.Tensor) -> torch.Tensor:
    """Our packed codes (N, K/2) uint8 (even column low) -> tinygemm's (even column high): the nibbles swapped."""
    return (packed << 4) | (packed >> 4)


def dequantize_tinygemm(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """What tinygemm's weights are before its bf16 rounding, float32 (N, K): ``(q - 8) * s + z``.

    ``codes`` (N, K/2) uint8 in tinygemm's nibble order, ``scales_zeros`` (G, N, 2). For tests on any device.
    """
    q = torch.stack((codes >> 4, codes & 0xF), dim=-1).reshape(codes.size(0), -1).float()  # (N, K)
    s = scales_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)  # (N, K)
    z = scales_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q - 8.0) * s + z


def weight_difference_bound(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                            group_size: int) -> torch.Tensor:
    """Per weight (N, K): the most tinygemm's bf16 weight may differ from our reference's bf16 weight, given
    the dequantized weight ``weight`` = q s + m (float32); see the module docstring."""
    mid = (offset.float() + 8.0 * scale.float()).abs().repeat_interleave(group_size, dim=1)  # (N, K)
    return BF16_UNIT_ROUNDOFF * (mid + 2.0 * weight.abs() + BF16_UNIT_ROUNDOFF * mid)


def available(device: torch.device | str) -> bool:
    """tinygemm can run on ``device``: CUDA of compute capability 8.0+ and this torch has the op."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm") or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def unsupported(n: int, k: int, group_size: int, inner_k_tiles: int = INNER_K_TILES) -> str | None:
    """Why a (N, K) weight with groups of ``group_size`` cannot use tinygemm, or None when it can."""
    if group_size not in GROUP_SIZES:
        return f"group_size={group_size} is not one of {GROUP_SIZES}"
    if inner_k_tiles not in (2, 4, 8):
        return f"inner_k_tiles={inner_k_tiles} is not 2, 4 or 8"
    if k % (16 * inner_k_tiles) or k % group_size:
        return f"in_features={k} is not a multiple of {16 * inner_k_tiles} (16 x inner_k_tiles) and {group_size}"
    if n % 8:
        return f"out_features={n} is not a multiple of 8"
    return None


def pack(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
         inner_k_tiles: int = INNER_K_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 buffers on a CUDA device -> (tinygemm's int32 weight tiles, its (G, N, 2) bf16 scales/zeros)."""
    n, k = packed.size(0), 2 * packed.size(1)
    reason = unsupported(n, k, group_size, inner_k_tiles)
    if reason is not None:
        raise ValueError(f"tinygemm cannot take this int4 weight: {reason}; use the Triton or torch path")
    if not available(packed.device):
        raise ValueError(f"tinygemm needs a CUDA GPU of compute capability 8.0+ (weights are on {packed.device})")
    weight = torch.ops.aten._convert_weight_to_int4pack(tinygemm_codes(packed).contiguous(), inner_k_tiles)
    return weight, scales_and_zeros(scale, offset).to(packed.device)


def int4_matmul_tinygemm(x: torch.Tensor, weight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` with tinygemm: x (..., K) bf16 -> (..., N) bf16; ``weight``, ``scales_zeros`` from :func:`pack`."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"tinygemm takes bfloat16 activations, got {x.dtype}; use the Triton or torch path")
    x2 = x.reshape(-1, x.size(-1)).contiguous()  # (M, K)
    if x2.data_ptr() % 16:  # the kernel loads x in 4-byte words: a view at an odd element offset gets a copy
        x2 = x2.clone()
    y = torch.ops.aten._weight_int4pack_mm(x2, weight, group_size, scales_zeros)  # (M, N) bf16
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.size(-1))
