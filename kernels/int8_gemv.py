# int8 weight-only GEMV for decode (1-16 rows): one reduction per program, int8 -> float32 exactly by bit tricks.
"""``y = (x q^T) * s (+ b)``: x (M, K) float with M <= 16, codes q (N, K) int8, per-channel scales s (N,).

Batch-1 decode reads each weight once per token, so the kernel is a stream of int8 rows; the work per byte
must stay far below what an SM issues per byte of its share of the bandwidth (an H200: ~4.8 TB/s over 132
SMs at ~1.98 GHz is ~18 bytes per SM per clock). What the kernel does about it:

* **One reduction per program.** Each program owns ``BLOCK_N`` output channels and walks K in ``BLOCK_K``
  steps, accumulating ``x * w`` elementwise into a (BLOCK_M, BLOCK_N, BLOCK_K) float32 register tile; the
  sum over K (in-thread, across lanes and, with several warps, across warps through shared memory) happens
  once at the end. The previous design reduced every step (a warp shuffle tree per row per step, and a
  shared-memory barrier per step when several warps split K); ``reduce_each_step=True`` keeps that design
  as a benchmark variant.
* **int8 -> float32 without the conversion unit** (the magic-number trick of FasterTransformer's
  ``interleaved_numeric_conversion.h``, here in 32 bits): for q in [-128, 127] the bits ``0x4B000080 + q``
  are the float ``2^23 + 128 + q`` (an exponent of 2^23 makes the mantissa count units), so
  ``float(bits) - (2^23 + 128)`` is q exactly, with an integer add and a float subtract, both full-rate,
  where ``I2F`` runs at a quarter of the FMA rate on sm_80/sm_90. ``exact_bits=False`` converts by cast.
* **Scale once**: the per-channel scale multiplies the (BLOCK_M, BLOCK_N) sums, not every weight.
* **Rows past N or M** read row ``n % N`` / ``m % M`` (valid memory, results never stored), so the weight
  and activation loads carry no mask except on a ragged last K step; ``EVEN_K`` drops that one too.
* ``num_stages`` software-pipelines the K loop (``tl.range``): loads of the next steps are in flight while
  this one computes.

Configurations are named ``n{BLOCK_N}k{BLOCK_K}w{warps}s{stages}``; :data:`CONFIGS` holds the few worth
measuring (``bench/quant_gemv.py`` times them all on the decode shapes of a 7B model), :data:`DEFAULT_CONFIG`
is the one used unless ``PIPELOOM_INT8_GEMV`` names another. With M > 1 rows the K step shrinks to
``max(BLOCK_K // BLOCK_M, 32)`` so the register tile stays the size of the M = 1 one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from pipeloom.kernels import interpreted, tl, triton

MAX_ROWS = 16
ENV_CONFIG = "PIPELOOM_INT8_GEMV"
MAGIC_BITS = 0x4B000080  # the float32 bits of 2^23 + 128
MAGIC_VALUE = 8388736.0  # 2^23 + 128


@dataclass(frozen=True)
class GemvConfig:
    """A tile shape and launch setting of :func:`int8_gemv`."""

    block_n: int  # output channels per program
    block_k: int  # int8 columns per step (per row of x)
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop (1: none)
    exact_bits: bool = True  # int8 -> float32 by the magic-number trick (False: a cast, I2F)
    reduce_each_step: bool = False  # the previous design: sum over K after every step

    @property
    def name(self) -> str:
        suffix = "-step" if self.reduce_each_step else ""
        suffix += "" if self.exact_bits else "-i2f"
        return f"n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}{suffix}"


# Chosen by reasoning, not by a sweep (bench/RESULTS.md: the wide autotune of the old kernel ran out of device
# time; its winner was 4 channels x 512 columns on 1 warp at triton.Config's default 3 stages, 2.0 TB/s on the
# 12288 x 4096 GEMV):
CONFIGS = {c.name: c for c in (
    GemvConfig(4, 512, 1, 3, exact_bits=False, reduce_each_step=True),  # the old kernel: its design, best tile
    GemvConfig(4, 512, 1, 3),  # the same tile and stages, one reduction, exact bits: what the redesign buys
    GemvConfig(4, 512, 1, 1),  # the same without software pipelining: what the 3 stages buy
    GemvConfig(4, 2048, 4, 2),  # 4 warps split each 2 KB row segment: 4x the warps per SM for N = 4096
    GemvConfig(8, 1024, 4, 2),  # 8 KB per step per program, 16-byte loads, 64 accumulators per thread
    GemvConfig(2, 1024, 2, 3),  # twice the programs (small N), 2 warps per 1 KB row segment
)}
DEFAULT_CONFIG = "n4k512w1s3"
INTERPRETER_CONFIG = GemvConfig(16, 64, 1, 1)  # few programs: the interpreter runs them one at a time in numpy


def int8_gemv_torch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: ``(x q^T) * s + b`` in float32 (codes convert to float exactly); x (M, K) -> (M, N)."""
    y = x.float() @ qweight.float().t() * scale.float()
    return y if bias is None else y + bias.float()


@triton.jit
def _int8_gemv_kernel(X, W, S, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, EXACT_BITS: tl.constexpr, REDUCE_EACH_STEP: tl.constexpr,
                      EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # X (M, K) float, W (N, K) int8, S (N,), B (N,), Y (M, N) in X's dtype; one program per BLOCK_N channels.
    # BLOCK_M == 1 (batch-1 decode) keeps every tile 2-D: (BN, BK) products of a (BK,) row of x.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_x, rows_w = offs_m % M, offs_n % N  # rows past M / N re-read a valid row; never stored
    w_ptrs = W + rows_w[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # (BN, BK)
    if BLOCK_M == 1:
        x_ptrs = X + offs_k  # (BK,)
    else:
        x_ptrs = X + rows_x[:, None] * stride_xm + offs_k[None, :]  # (BM, BK)
    if REDUCE_EACH_STEP:  # the old design: a (BM, BN) sum updated every step
        if BLOCK_M == 1:
            sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            sums = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # products accumulated elementwise, summed once after the loop
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            in_k = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0)
            if BLOCK_M == 1:
                x = tl.load(x_ptrs, mask=in_k, other=0.0)
            else:
                x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
        if EXACT_BITS:  # 2^23 + 128 + q as float bits, minus 2^23 + 128: q exactly (module docstring)
            wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            wf = w.to(tl.float32)
        if BLOCK_M == 1:
            prod = x.to(tl.float32)[None, :] * wf  # (BN, BK)
            if REDUCE_EACH_STEP:
                sums += tl.sum(prod, axis=1)
            else:
                acc += prod
        else:
            prod = x.to(tl.float32)[:, None, :] * wf[None, :, :]  # (BM, BN, BK)
            if REDUCE_EACH_STEP:
                sums += tl.sum(prod, axis=2)
            else:
                acc += prod
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if BLOCK_M == 1:
        if not REDUCE_EACH_STEP:
            sums = tl.sum(acc, axis=1)  # the one reduction over K
        sums = sums[None, :]  # (1, BN)
    elif not REDUCE_EACH_STEP:
        sums = tl.sum(acc, axis=2)  # (BM, BN)
    y = sums * tl.load(S + rows_w).to(tl.float32)[None, :]  # (BM, BN)
    if HAS_BIAS:
        y += tl.load(B + rows_w).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def named_config(name: str | None, env: str, configs: dict, default: str, interpreter_config, what: str):
    """The configuration ``name``, else ``$env``'s, else ``configs[default]`` (``interpreter_config`` under the
    interpreter unless named); an unknown name is a ValueError naming ``what`` and the choices."""
    name = name or os.environ.get(env)
    if name is None:
        return interpreter_config if interpreted() else configs[default]
    if name not in configs:
        raise ValueError(f"{what} config {name!r} (argument or {env}) is not one of {sorted(configs)}")
    return configs[name]


def config_for(name: str | None = None) -> GemvConfig:
    """The configuration ``name``, else ``$PIPELOOM_INT8_GEMV``, else :data:`DEFAULT_CONFIG` (a small fixed
    one under the interpreter unless named)."""
    return named_config(name, ENV_CONFIG, CONFIGS, DEFAULT_CONFIG, INTERPRETER_CONFIG, "int8 GEMV")


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              config: str | GemvConfig | None = None) -> torch.Tensor:
    """Launch the kernel: x (..., K) with at most :data:`MAX_ROWS` rows -> (..., N) in ``x.dtype``."""
    x2 = x.reshape(-1, x.size(-1)).contiguous()  # (M, K)
    m, k = x2.shape
    n = qweight.size(0)
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"the int8 GEMV takes at most {MAX_ROWS} rows (and at least one), got {m}; use the "
                         "torch path (backend='torch') for prefill-sized inputs")
    if qweight.shape != (n, k) or qweight.dtype != torch.int8 or qweight.stride(1) != 1:
        raise ValueError(f"qweight must be ({n}, {k}) int8 with contiguous rows, got {tuple(qweight.shape)} "
                         f"{qweight.dtype} strides {qweight.stride()}")
    cfg = config if isinstance(config, GemvConfig) else config_for(config)
    block_m = triton.next_power_of_2(m)
    block_k = cfg.block_k if block_m == 1 else max(cfg.block_k // block_m, 32)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _int8_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, qweight, scale, bias if bias is not None else scale, y, m, n, k, x2.stride(0), qweight.stride(0),
        y.stride(0), HAS_BIAS=bias is not None, EXACT_BITS=cfg.exact_bits, REDUCE_EACH_STEP=cfg.reduce_each_step,
        EVEN_K=k % block_k == 0, NUM_STAGES=cfg.num_stages, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.reshape(*x.shape[:-1], n)
