# int4 group-wise weight-only GEMV for decode (1-16 rows): one AND and one FMA per weight, scales per 32 columns.
"""``y = x W^T (+ b)`` with ``W = q * s + m`` per group of g columns: x (M, K) float with M <= 16, packed codes
(N, K/2) uint8 (``packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4``), scales s and offsets m (N, K/g).

Batch-1 decode streams the packed codes once per token. An H200 at ~4 TB/s brings each SM ~16 bytes = 32 weights
per clock, and an SM issues 128 lane-instructions per clock: a kernel that spends more than ~4 instructions per
weight cannot reach the bandwidth (dequantize-then-multiply spends ~6-10, one of them an I2F conversion at a
quarter of the FMA rate). What this kernel does about it (SASS of the default config: ~3 instructions per weight,
counted by ``tests/test_quant_int4_gemv.py``'s sm_90 compile test):

* **The algebra of groups**: ``y_n = sum_g (s_ng * sum_{k in g} x_k q_nk + m_ng * X_g)`` with ``X_g`` the sum
  of x over the group, so the inner loop multiplies x by the bare code: one FMA per weight. Thread t of a step
  owns chunk t: 4 int32 words = 32 columns = one 16-byte load per row, inside one group (g >= 32); the chunk's
  sum of ``x q`` (one chain of 32 FMAs per row) and of x (shared by the BLOCK_N rows) meet the chunk's scale and
  offset once, and the (BLOCK_N, chunks) accumulators are reduced across lanes once after the loop.
* **Codes to floats with one AND, exactly**: word w holds columns ``8w + i`` in bits ``4i .. 4i+3``. A word
  masked to one nibble in place (i < 4; the upper four after one 12-bit shift of the word) read as float32 bits
  is the *subnormal* ``q * 2^p * 2^-149`` (p the nibble's bit position): no exponent bits, so no implicit leading
  one and nothing to subtract (the magic-number conversion of ``int8_gemv.py`` needs an add and a subtract).
  Multiplied by ``x * 2^(A - p)`` (x scaled once per element, shared by the rows) each product is
  ``x q 2^(A - 149)``, a normal float for ``|x q| >= 2^(23 - A)``; the sums are scaled by ``2^(149 - A)`` once at
  the end. With A = 64 the products are those of the reference for ``2^-41 <= |x q|`` and ``|x| < 2^64``
  (smaller products lose bits below ``2^-64`` absolute). Hopper's float32 FMA takes subnormal operands at full
  rate unless the code flushes them (``.ftz``), which this kernel never asks for (the compile test checks the PTX).
* **bf16 without the conversion unit**: for bf16 activations and scales the launcher passes int32 views, and a
  pair converts by a shift (low half) and a mask (high half); scales and offsets come as (s, m) pairs, one 4-byte
  load per row and chunk (:func:`scales_offsets` builds them once per layer; ``QuantizedLinear`` keeps them as a
  derived buffer).
* **Unmasked loads**: rows past N read row ``n % N`` (never stored); full steps carry no mask, a ragged last step
  of K runs once after the loop with a per-chunk mask (K is a multiple of g, so of 32: chunks are whole).
* **No shared memory** (``num_stages=1``, the default config): the codes go from global memory straight into
  registers, one 16-byte load per row and step. Software pipelining (``num_stages > 1``: cp.async copies of the
  next steps into shared memory) cost this kernel 3x on an H200: Triton laid the copied tile out with the row
  index fastest within each thread's 16 bytes, so a warp's 16-byte reads fell into the same banks (8-way
  conflicts). ncu measured 0.15-0.34 instructions issued per cycle and scheduler, 40% of stalls waiting on shared
  memory and the L1/shared pipe 84% busy at 0.86 TB/s of DRAM (``bench/RESULTS.md``). The tile is now loaded as
  (rows, words), which Triton copies row-contiguous, but the copy-free config is still the fastest: 2.7 TB/s per
  7B layer against tinygemm's 1.8 TB/s. x of M rows runs as M programs of one row at adjacent program ids, so the
  other rows' programs find the codes in L2.

Configurations are named ``n{BLOCK_N}k{BLOCK_K}w{warps}s{stages}`` with BLOCK_K the columns per step (BLOCK_K / 2
bytes of each row); :data:`CONFIGS` holds the few worth measuring (``bench/quant_gemv.py`` times them on the 7B
decode shapes), :data:`DEFAULT_CONFIG` runs unless ``PIPELOOM_INT4_GEMV`` names another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pipeloom.kernels import tl, triton
from pipeloom.kernels.int8_gemv import named_config

MAX_ROWS = 16
ENV_CONFIG = "PIPELOOM_INT4_GEMV"
CHUNK_COLUMNS = 32  # per thread, row and step: 4 int32 words of codes, one 16-byte load
X_EXPONENT = 64  # A: x is scaled by 2^(A - p), the sums by 2^(149 - A) (module docstring)
GROUP_SIZES = (32, 64, 128, 256)  # a chunk lies in one group; a step (>= 256 columns) spans whole groups


@dataclass(frozen=True)
class Int4GemvConfig:
    """A tile shape and launch setting of :func:`int4_gemv`."""

    block_n: int  # output channels per program (per thread: block_n / (num_warps / warps over K) rows)
    block_k: int  # columns per step: a power of two >= 256 (block_k / 32 chunks, one per thread and row)
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop (1: none)

    @property
    def name(self) -> str:
        return f"n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"


# Read off the sm_90 SASS: 8 rows per thread is ~3.1 instructions per weight, 16 rows ~2.8, 4 rows ~3.7. Measured on
# an H200 (bench/RESULTS.md, one 7B layer's four GEMVs): n8k2048w2s1 39.9 us, n8k1024w1s1 41.2, n4k1024w1s1 43.7,
# n16k1024w1s1 48.3, tinygemm 59.9; every config with shared-memory stages 111 us or more.
CONFIGS = {c.name: c for c in (
    Int4GemvConfig(8, 2048, 2, 1),  # the default: two warps per step of 2048 columns, 8 rows per thread
    Int4GemvConfig(8, 1024, 1, 1),  # one warp per step of 1024 columns
    Int4GemvConfig(4, 1024, 1, 1),  # 4 rows per thread: twice the programs
    Int4GemvConfig(16, 1024, 1, 1),  # 16 rows per thread: x loads shared by more rows, more registers
    Int4GemvConfig(16, 1024, 2, 3),  # the fastest with shared-memory stages (cp.async), for comparison
)}
DEFAULT_CONFIG = "n8k2048w2s1"
INTERPRETER_CONFIG = Int4GemvConfig(32, 256, 1, 1)  # few programs: the interpreter runs them one by one, paying per op


def int4_gemv_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: ``x W^T + b`` with ``W = q s + m`` dequantized in float32; x (M, K) -> (M, N) float32."""
    from pipeloom.inference.quant.formats import dequantize_int4

    y = x.float() @ dequantize_int4(packed, scale.float(), offset.float(), group_size).t()  # (M, N)
    return y if bias is None else y + bias.float()


def scales_offsets(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Scales and offsets (N, G) -> the kernel's (N, G, 2) pairs (``[..., 0]`` the scale), contiguous."""
    if scale.shape != offset.shape or scale.dim() != 2 or scale.dtype != offset.dtype:
        raise ValueError(f"scale {tuple(scale.shape)} {scale.dtype} and offset {tuple(offset.shape)} {offset.dtype} "
                         "must both be (N, G) of one dtype")
    return torch.stack((scale, offset), dim=-1).contiguous()


@triton.jit
def _word(part, w, x_ptrs, valid, MASKED: tl.constexpr, BF16: tl.constexpr):
    # part (BN, T) + the 8 products of word w (BN, T) with its columns: part + sum_i x_i q_i 2^(A - 149), and the
    # sum of the 8 columns (T,). x_ptrs: BF16 (T, 4) int32 pairs of bf16 (converted by a shift and a mask), else
    # (T, 8) of x's dtype. Column i of the word, masked in place (i < 4) or after a 12-bit shift (i >= 4), is the
    # subnormal q 2^p 2^-149; x_i is scaled by 2^(A - p) with A = 64: every product is x q 2^(A - 149).
    # (Splits, not helper functions: the interpreter pays per call.)
    if MASKED:
        x = tl.load(x_ptrs, mask=valid[:, None], other=0)
    else:
        x = tl.load(x_ptrs)
    t: tl.constexpr = x.shape[0]
    if BF16:
        a, b = tl.split(tl.reshape(x, (t, 2, 2)))  # pairs 0, 2 | 1, 3: columns (0, 1), (4, 5) | (2, 3), (6, 7)
        p0, p2 = tl.split(a)
        p1, p3 = tl.split(b)
        x0, x1 = (p0 << 16).to(tl.float32, bitcast=True), (p0 & -65536).to(tl.float32, bitcast=True)
        x2, x3 = (p1 << 16).to(tl.float32, bitcast=True), (p1 & -65536).to(tl.float32, bitcast=True)
        x4, x5 = (p2 << 16).to(tl.float32, bitcast=True), (p2 & -65536).to(tl.float32, bitcast=True)
        x6, x7 = (p3 << 16).to(tl.float32, bitcast=True), (p3 & -65536).to(tl.float32, bitcast=True)
    else:
        even, odd = tl.split(tl.reshape(x.to(tl.float32), (t, 4, 2)))  # (T, 4): columns 2j, 2j + 1
        e02, e13 = tl.split(tl.reshape(even, (t, 2, 2)))
        o02, o13 = tl.split(tl.reshape(odd, (t, 2, 2)))
        x0, x4 = tl.split(e02)
        x2, x6 = tl.split(e13)
        x1, x5 = tl.split(o02)
        x3, x7 = tl.split(o13)
    hi = w.to(tl.uint32, bitcast=True) >> 12  # columns 4..7 to bits 4..19 (no mask at bit 0: one LOP3 each)
    part += (w & 0x0000F).to(tl.float32, bitcast=True) * (x0 * 2.0**64)[None, :]
    part += (w & 0x000F0).to(tl.float32, bitcast=True) * (x1 * 2.0**60)[None, :]
    part += (w & 0x00F00).to(tl.float32, bitcast=True) * (x2 * 2.0**56)[None, :]
    part += (w & 0x0F000).to(tl.float32, bitcast=True) * (x3 * 2.0**52)[None, :]
    part += (hi & 0x000F0).to(tl.float32, bitcast=True) * (x4 * 2.0**60)[None, :]
    part += (hi & 0x00F00).to(tl.float32, bitcast=True) * (x5 * 2.0**56)[None, :]
    part += (hi & 0x0F000).to(tl.float32, bitcast=True) * (x6 * 2.0**52)[None, :]
    part += (hi & 0xF0000).to(tl.float32, bitcast=True) * (x7 * 2.0**48)[None, :]
    return part, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))


@triton.jit
def _int4_step(acc, w_ptrs, x_ptrs, sm_ptrs, valid, MASKED: tl.constexpr, BF16: tl.constexpr):
    # one K step: w (BN, T, 4) int32 words; x_ptrs the columns of each chunk's first word; sm the scale and offset
    # of each chunk's group (BF16: (BN, T) int32 pairs, else (BN, T, 2)); returns
    # acc (BN, T) + s * sum(x q) + m * sum(x) over each chunk (32 columns)
    bn: tl.constexpr = w_ptrs.shape[0]
    t: tl.constexpr = x_ptrs.shape[0]
    if MASKED:
        w = tl.load(w_ptrs, mask=tl.reshape(tl.broadcast_to(valid[:, None], (t, 4)), (4 * t,))[None, :], other=0)
    else:
        w = tl.load(w_ptrs)  # (BN, 4T): 4T contiguous words per row, so copies into shared memory keep rows whole
    w = tl.reshape(w, (bn, t, 4))
    if BF16:
        if MASKED:
            sm = tl.load(sm_ptrs, mask=valid[None, :], other=0)
        else:
            sm = tl.load(sm_ptrs)
        s, m = (sm << 16).to(tl.float32, bitcast=True), (sm & -65536).to(tl.float32, bitcast=True)  # (BN, T)
    else:
        if MASKED:
            sm = tl.load(sm_ptrs, mask=valid[None, :, None], other=0.0)
        else:
            sm = tl.load(sm_ptrs)
        s, m = tl.split(sm.to(tl.float32))  # (BN, T)
    w02, w13 = tl.split(tl.reshape(w, (bn, t, 2, 2)))  # the chunk's four words, in registers
    wa, wc = tl.split(w02)
    wb, wd = tl.split(w13)
    STRIDE: tl.constexpr = 4 if BF16 else 8  # x elements per word
    part = tl.zeros((bn, t), dtype=tl.float32)
    part, xa = _word(part, wa, x_ptrs, valid, MASKED, BF16)  # (BN, T): one chain of 32 FMAs per row and chunk
    part, xb = _word(part, wb, x_ptrs + STRIDE, valid, MASKED, BF16)
    part, xc = _word(part, wc, x_ptrs + 2 * STRIDE, valid, MASKED, BF16)
    part, xd = _word(part, wd, x_ptrs + 3 * STRIDE, valid, MASKED, BF16)
    xsum = ((xa + xb) + (xc + xd)) * 2.0**-85  # (T,) sum of x over the chunk, times 2^(A - 149)
    return acc + s * part + m * xsum[None, :]


@triton.jit
def _int4_gemv_kernel(X, W, SM, B, Y, M, N, K, stride_xm, stride_wn, stride_smn, stride_ym,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr, NUM_STAGES: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    # X (M, K) float, W (N, K/8) int32 words of packed codes, SM (N, K/GROUP, 2) scales and offsets, Y (M, N);
    # BF16 (x, scales and offsets bfloat16): X (M, K/2) and SM (N, K/GROUP) int32 views of bf16 pairs.
    # One program per (BLOCK_N channels, row of x); program ids run over the rows of x fastest. A step is
    # BLOCK_T chunks of 4 words (32 columns) per row; chunk t of a step is thread t's (a 16-byte load per row).
    pid = tl.program_id(0)
    row = pid % M
    offs_n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = offs_n % N  # rows past N re-read a valid row; never stored
    offs_t = tl.arange(0, BLOCK_T)
    w_ptrs = W + rows_w[:, None].to(tl.int64) * stride_wn + tl.arange(0, 4 * BLOCK_T)[None, :]  # (BN, 4T) words
    PER_WORD: tl.constexpr = 4 if BF16 else 8  # elements of X per word of codes
    x_ptrs = X + row * stride_xm + offs_t[:, None] * (4 * PER_WORD) + tl.arange(0, PER_WORD)[None, :]  # (T, PER_WORD)
    sm_rows = SM + rows_w[:, None].to(tl.int64) * stride_smn  # (BN, 1)
    pair = tl.arange(0, 2)[None, None, :]  # (1, 1, 2): scale, offset (not BF16)
    kw = K // 8
    full = kw // (4 * BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for i in tl.range(0, full, num_stages=NUM_STAGES):
        g = (i * (32 * BLOCK_T) + offs_t * 32) // GROUP  # (T,) group of each chunk
        if BF16:
            sm_ptrs = sm_rows + g[None, :]  # (BN, T) int32 (s, m) pairs
        else:
            sm_ptrs = sm_rows[:, :, None] + 2 * g[None, :, None] + pair  # (BN, T, 2)
        acc = _int4_step(acc, w_ptrs + i * (4 * BLOCK_T), x_ptrs + i * (4 * PER_WORD * BLOCK_T), sm_ptrs, None,
                         MASKED=False, BF16=BF16)
    if full * (4 * BLOCK_T) < kw:  # the ragged last step: whole chunks valid or not (K is a multiple of 32)
        valid = full * (4 * BLOCK_T) + offs_t * 4 < kw
        g = tl.where(valid, (full * (32 * BLOCK_T) + offs_t * 32) // GROUP, 0)
        if BF16:
            sm_ptrs = sm_rows + g[None, :]
        else:
            sm_ptrs = sm_rows[:, :, None] + 2 * g[None, :, None] + pair
        acc = _int4_step(acc, w_ptrs + full * (4 * BLOCK_T), x_ptrs + full * (4 * PER_WORD * BLOCK_T), sm_ptrs,
                         valid, MASKED=True, BF16=BF16)
    y = tl.sum(acc, axis=1) * 2.0**85  # (BN,) the one reduction across lanes; 2^(149 - A)
    if HAS_BIAS:
        y += tl.load(B + rows_w).to(tl.float32)
    tl.store(Y + row * stride_ym + offs_n, y.to(Y.dtype.element_ty), mask=offs_n < N)


def config_for(name: str | None = None) -> Int4GemvConfig:
    """The configuration ``name``, else ``$PIPELOOM_INT4_GEMV``, else :data:`DEFAULT_CONFIG` (a small fixed
    one under the interpreter unless named)."""
    return named_config(name, ENV_CONFIG, CONFIGS, DEFAULT_CONFIG, INTERPRETER_CONFIG, "int4 GEMV")


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale_offset: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, config: str | Int4GemvConfig | None = None) -> torch.Tensor:
    """Launch the kernel: x (..., K) with at most :data:`MAX_ROWS` rows -> (..., N) in ``x.dtype``;
    ``scale_offset`` from :func:`scales_offsets`."""
    x2 = x.reshape(-1, x.size(-1)).contiguous()  # (M, K)
    m, k = x2.shape
    n = packed.size(0)
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"the int4 GEMV takes at most {MAX_ROWS} rows (and at least one), got {m}; use the "
                         "torch path (backend='torch') for prefill-sized inputs")
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group_size={group_size} must be one of {GROUP_SIZES} and divide in_features={k}")
    if packed.shape != (n, k // 2) or packed.dtype != torch.uint8 or packed.stride(1) != 1 or packed.stride(0) % 4 \
            or packed.data_ptr() % 4:
        raise ValueError(f"packed codes must be ({n}, {k // 2}) uint8 with contiguous rows, 4-byte aligned, got "
                         f"{tuple(packed.shape)} {packed.dtype} strides {packed.stride()}")
    groups = k // group_size
    if scale_offset.shape != (n, groups, 2) or scale_offset.stride()[1:] != (2, 1):
        raise ValueError(f"scale_offset must be ({n}, {groups}, 2) with contiguous pairs (scales_offsets), got "
                         f"{tuple(scale_offset.shape)} strides {scale_offset.stride()}")
    cfg = config if isinstance(config, Int4GemvConfig) else config_for(config)
    if cfg.block_k < 256 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"int4 GEMV config {cfg.name}: block_k must be a power of two >= 256 (whole groups per step)")
    words = packed.view(torch.int32)  # (N, K/8): column 8w + i in bits 4i..4i+3 (little-endian bytes)
    bf16 = x2.dtype == torch.bfloat16 and scale_offset.dtype == torch.bfloat16 and x2.stride(0) % 2 == 0 \
        and x2.data_ptr() % 4 == 0
    xk = x2.view(torch.int32) if bf16 else x2  # bf16 pairs as int32: converted by a shift and a mask
    sm = scale_offset.view(torch.int32).squeeze(-1) if bf16 else scale_offset  # (N, G) (s, m) pairs
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _int4_gemv_kernel[(m * triton.cdiv(n, cfg.block_n),)](
        xk, words, sm, bias if bias is not None else scale_offset, y, m, n, k, xk.stride(0),
        words.stride(0), sm.stride(0), y.stride(0), GROUP=group_size, HAS_BIAS=bias is not None, BF16=bf16,
        NUM_STAGES=cfg.num_stages, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_k // CHUNK_COLUMNS,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return y.reshape(*x.shape[:-1], n)
