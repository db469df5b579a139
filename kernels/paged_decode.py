# Decode attention over a paged KV cache (one new token per sequence): torch reference, split-K Triton, custom op.
"""A decode step's attention: sequence s has ONE new token, its query ``q[s]`` (Hq, hd), key ``k[s]`` and value
``v[s]`` (Hkv, hd), and ``seq_lens[s]`` tokens in the cache counting the new one, which is written at cache slot
``slot_mapping[s]`` by the same call. Keys/values live in the blocks ``block_tables[s]`` (slot
``block * block_size + offset``), caches (num_blocks, block_size, Hkv, hd) as in
:mod:`pipeloom.kernels.paged_attention`.

The Triton path is flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023; vLLM's
``triton_decode_attention``): programs over (sequence, key/value head, split). Each program covers the whole
GQA group of that key/value head (its ``Hq/Hkv`` query heads share every key it loads) and one contiguous share
of the sequence's keys, ``BLOCK_N`` keys per iteration, with an online softmax (FlashAttention, arXiv
2205.14135). With ``splits == 1`` it writes the output; otherwise each split writes its partial sum, running
max and normaliser, and a second kernel merges the splits. The number of splits is a launch constant (CUDA
graphs capture it): a split whose share is empty writes an empty partial. The new token's key and value are
stored into the cache by the program that covers its position, which attends to them from registers rather
than reading the slot back: its online softmax starts from the new token (score ``q . k``, weight 1, value
``v``) and every tile it loads leaves that slot masked, so the write costs no extra kernel and needs no
ordering inside the program, and the tiles go into the dots as loaded (no per-element select).

With ``cos`` and ``sin`` (whole rotary tables (P, hd), :mod:`pipeloom.kernels.rotary`'s rotate_half layout) the
kernel first rotates ``q`` and ``k`` by the new token's position ``seq_lens[s] - 1`` (rounded to their dtype, as
the separate rotary kernel stores them), so a decode step launches no rotary kernel of its own.

An fp8 cache (``kernels/kv_fp8.py``: per block a plane of e4m3 codes and a plane of float32 scales, one per token
and head) is read as codes, converted exactly to float16 for float16 dots (one conversion instruction per pair of
codes), with each key's scale applied to its score and each value's scale to its softmax weight (``q . (c s) =
(q . c) s``), so no tile is multiplied out; q and the weights are first divided by powers of two near their
largest magnitudes (exact), so both fit float16's range (which holds a bfloat16 q exactly and the weights more
precisely than bfloat16 would). The new token's key and value are quantized in registers and stored, and
attended as those codes and scales, so the kernel attends over exactly the values the torch reference reads back
from the cache.

:func:`paged_decode` is the entry point (``backend`` "torch", "triton" or "auto"). Under ``torch.compile`` it
is the custom op ``torch.ops.pipeloom.paged_decode`` (a fake implementation gives its output shape), so a
compiled decode forward keeps the kernel inside one graph with no graph break; the op declares that it writes
the caches.
"""

from __future__ import annotations

import math

import torch
from pipeloom.kernels import tl, triton, use_triton
from pipeloom.kernels.kv_fp8 import as_float16, f16_range, is_fp8, kernel_views, read_blocks, round_e4m3, write_rows
from pipeloom.kernels.paged_attention import check_pair, load_keys, load_tile, per_block, tile_offsets
from pipeloom.kernels.rotary import rotary_torch

MAX_SPLITS = 16  # the reduce kernel merges at most this many (a power of two)


def rotate_new_tokens(q: torch.Tensor, k: torch.Tensor, seq_lens: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, hd), k (B, Hkv, hd) rotated at each new token's position ``seq_lens - 1`` by the tables (P, hd)."""
    rows = (seq_lens.long() - 1)[None]  # (1, B): the batch as one sequence of B tokens
    return rotary_torch(q[None], cos[rows], sin[rows])[0], rotary_torch(k[None], cos[rows], sin[rows])[0]


def paged_decode_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                       block_tables: torch.Tensor, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None, store: bool = True) -> torch.Tensor:
    """The reference, vectorised over sequences (no host reads): rotate q/k when given tables, write k/v (unless
    ``store`` is False: the caller wrote them), gather each sequence's blocks, mask positions past its length,
    softmax in float32 (float64 stays). q (B, Hq, hd) -> (B, Hq, hd)."""
    if cos is not None:
        q, k = rotate_new_tokens(q, k, seq_lens, cos, sin)
    n_kv = k_cache.size(2)
    if store:
        write_rows(k_cache, k, slot_mapping, "key")
        write_rows(v_cache, v, slot_mapping, "value")
    b, n_heads, hd = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    blocks = block_tables.long()  # (B, W)
    keys = read_blocks(k_cache, blocks, dtype, "key").reshape(b, -1, n_kv, hd)  # (B, W*bs, Hkv, hd)
    values = read_blocks(v_cache, blocks, dtype, "value").reshape(b, -1, n_kv, hd)
    qg = q.to(dtype).view(b, n_kv, n_heads // n_kv, hd)  # (B, Hkv, G, hd)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys) / math.sqrt(hd)  # (B, Hkv, G, L)
    visible = torch.arange(keys.size(1), device=q.device)[None, :] < seq_lens[:, None]  # (B, L)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", scores.softmax(dim=-1), values)  # (B, Hkv, G, hd)
    return out.reshape(b, n_heads, hd).to(q.dtype)


@triton.jit
def _decode_split_kernel(
    Q, K_NEW, V_NEW, K, V, K_SCALE, V_SCALE, SLOTS, SEQ_LENS, BLOCK_TABLES, OUT, PART_O, PART_ML, COS, SIN,
    scale, stride_qn, stride_qh, stride_kn, stride_kh_new, stride_vn, stride_vh_new,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_sb, stride_ss, stride_sh,
    stride_bt, stride_on, stride_oh, stride_rope,
    N_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    PER_BLOCK: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr, ROTARY: tl.constexpr, STORE: tl.constexpr,
):
    # Program (sequence s, kv head, split): the GROUP query heads of `kvh` over one share of s's keys.
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + s)
    share = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N  # keys per split, whole BLOCK_N steps
    lo = split * share
    hi = tl.minimum(lo + share, seq_len)
    last = seq_len - 1  # the new token's position: its key/value come from K_NEW/V_NEW
    g = tl.arange(0, BLOCK_G)
    head = kvh * GROUP + g  # (BLOCK_G,) query heads
    g_ok = g < GROUP
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q_ptr = Q + s * stride_qn + head[:, None] * stride_qh
    k_ptr = K_NEW + s * stride_kn + kvh * stride_kh_new
    q = tl.load(q_ptr + dims[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    k_new = tl.load(k_ptr + dims, mask=d_ok, other=0.0)  # (BLOCK_D,)
    v_new = tl.load(V_NEW + s * stride_vn + kvh * stride_vh_new + dims, mask=d_ok, other=0.0)
    if ROTARY:  # rotate_half at the new token's position: y = x cos + (-x[d + hd/2] | x[d - hd/2]) sin
        first_half = dims < HEAD_DIM // 2
        partner = tl.where(first_half, dims + HEAD_DIM // 2, dims - HEAD_DIM // 2)
        sign = tl.where(first_half, -1.0, 1.0)
        row = (seq_len - 1).to(tl.int64) * stride_rope
        cos = tl.load(COS + row + dims, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(SIN + row + dims, mask=d_ok, other=0.0).to(tl.float32) * sign
        q_partner = tl.load(q_ptr + partner[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        k_partner = tl.load(k_ptr + partner, mask=d_ok, other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(q.dtype)
        k_new = (k_new.to(tl.float32) * cos + k_partner.to(tl.float32) * sin).to(k_new.dtype)
    if UPCAST:  # the interpreter's dot on bfloat16 is wrong (Triton 3.9): compute in float32 there
        q = q.to(tl.float32)
    if FP8:  # e4m3 codes and one float32 scale per row (kernels/kv_fp8.py): the new token is attended as stored
        k_scale = tl.max(tl.abs(k_new.to(tl.float32)), 0) / 448.0  # e4m3fn's largest finite value (FP8_MAX)
        k_scale = tl.where(k_scale > 0, k_scale, 1.0)
        v_scale = tl.max(tl.abs(v_new.to(tl.float32)), 0) / 448.0
        v_scale = tl.where(v_scale > 0, v_scale, 1.0)
        k_code = round_e4m3(tl.clamp(k_new.to(tl.float32) / k_scale, -448.0, 448.0)).to(tl.float8e4nv)
        v_code = round_e4m3(tl.clamp(v_new.to(tl.float32) / v_scale, -448.0, 448.0)).to(tl.float8e4nv)
        # the dots run in float16, which e4m3 converts to in one instruction per pair; q is divided by a power of
        # two near its row's largest magnitude (exact) so that it fits float16's range whatever the model's
        q_pow = f16_range(tl.max(tl.abs(q.to(tl.float32)), 1))  # (BLOCK_G,)
        q16 = (q.to(tl.float32) * (1.0 / q_pow)[:, None]).to(tl.float16)  # (BLOCK_G, BLOCK_D), |q16| < 2
        q_mult = q_pow * scale
    if STORE and (lo <= last) & (last < hi):  # this program covers the new token: store it into the cache
        slot = tl.load(SLOTS + s).to(tl.int64)
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_dst = K + block * stride_kb + offset * stride_ks + kvh * stride_kh + dims
        v_dst = V + block * stride_vb + offset * stride_vs + kvh * stride_vh + dims * stride_vd
        if FP8:  # codes into the code planes, scales into the scale planes (kernels/kv_fp8.py)
            tl.store(k_dst, k_code.to(tl.uint8, bitcast=True), mask=d_ok)
            tl.store(v_dst, v_code.to(tl.uint8, bitcast=True), mask=d_ok)
            srow = block * stride_sb + offset * stride_ss + kvh * stride_sh
            tl.store(K_SCALE + srow, k_scale)
            tl.store(V_SCALE + srow, v_scale)
        else:
            tl.store(k_dst, k_new.to(K.dtype.element_ty), mask=d_ok)
            tl.store(v_dst, v_new.to(V.dtype.element_ty), mask=d_ok)
    # The new token's key and value never go through memory: the program covering its position starts its online
    # softmax from it (score q . k, weight 1, value v), and every loaded tile leaves that slot masked. So the
    # tiles feed the dots as loaded, with no per-element select.
    covers = (lo <= last) & (last < hi)
    if FP8:
        s_new = tl.sum(q.to(tl.float32) * k_code.to(tl.float32)[None, :], 1) * (k_scale * scale)  # (BLOCK_G,)
        v_row = v_code.to(tl.float32) * v_scale  # (BLOCK_D,)
    else:
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        v_row = v_new.to(tl.float32)
    m_i = tl.where(covers, s_new, float("-inf"))
    l_i = tl.where(covers, 1.0, 0.0) + tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.where(covers, 1.0, 0.0) * v_row[None, :] + tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = BLOCK_TABLES + s * stride_bt
    for start in range(lo, hi, BLOCK_N):
        block, slot, kpos, block_ok = tile_offsets(table_row, start, hi, BLOCK_N, BLOCK_SIZE, PER_BLOCK)
        cached = (kpos < hi) & (kpos != last)  # (NB, BLOCK_SIZE) or (BLOCK_N,): keys read from the cache
        k_rows = block * stride_kb + slot * stride_ks + kvh * stride_kh
        if FP8:  # value codes: their own plane layout (dim-major)
            v_rows = block * stride_vb + slot * stride_vs + kvh * stride_vh
        else:  # a float cache: values laid out as keys (check_pair)
            v_rows = k_rows
        k = load_tile(K, k_rows, dims, 1, cached, d_ok, BLOCK_N, BLOCK_D, PER_BLOCK)  # (BLOCK_N, BLOCK_D)
        if FP8:  # codes as exact float16 values; each key's and value's scale multiplies outside the dots
            s_rows = block * stride_sb + slot * stride_ss + kvh * stride_sh
            k_s = load_keys(K_SCALE, s_rows, cached, BLOCK_N, PER_BLOCK)  # (BLOCK_N,)
            scores = tl.dot(q16, tl.trans(as_float16(k))) * q_mult[:, None] * k_s[None, :]  # (BLOCK_G, BLOCK_N)
        else:
            scores = tl.dot(q, tl.trans(k).to(q.dtype)).to(tl.float32) * scale  # (BLOCK_G, BLOCK_N)
        kp = start + tl.arange(0, BLOCK_N)
        scores = tl.where(((kp < hi) & (kp != last))[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep p and alpha at 0
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:  # value codes by whole blocks (dim-major: contiguous along keys; the slots not attended have p = 0
            # and scale 0, and their codes are finite); weights p * s over a power of two near the tile's largest
            # scale, in float16's range
            v = load_tile(V, v_rows, dims, stride_vd, block_ok, d_ok, BLOCK_N, BLOCK_D, PER_BLOCK)
            v_s = load_keys(V_SCALE, s_rows, cached, BLOCK_N, PER_BLOCK)  # (BLOCK_N,)
            v_pow = f16_range(tl.max(v_s, 0))
            pv = tl.dot((p * (v_s * (1.0 / v_pow))[None, :]).to(tl.float16), as_float16(v)) * v_pow
        else:
            v = load_tile(V, v_rows, dims, stride_vd, cached, d_ok, BLOCK_N, BLOCK_D, PER_BLOCK)
            if UPCAST:
                v = v.to(tl.float32)
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv.to(tl.float32)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]  # every sequence has >= 1 key: l_i > 0
        o_ptr = OUT + s * stride_on + head[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:  # partials (B, Hq, SPLITS, HEAD_DIM) and (B, Hq, SPLITS, 2): an empty split leaves m=-inf, l=0
        row = (s * N_HEADS + head) * SPLITS + split  # (BLOCK_G,)
        tl.store(PART_O + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(PART_ML + row * 2, m_i, mask=g_ok)
        tl.store(PART_ML + row * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _decode_merge_kernel(PART_O, PART_ML, OUT, stride_on, stride_oh, N_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    # Program (sequence s, query head h): softmax-weighted merge of the splits' partial sums.
    s = tl.program_id(0)
    h = tl.program_id(1)
    row = (s * N_HEADS + h) * SPLITS + tl.arange(0, SPLITS)  # (SPLITS,)
    m = tl.load(PART_ML + row * 2)
    l_part = tl.load(PART_ML + row * 2 + 1)
    m_max = tl.max(m, 0)  # finite: the split holding key 0 is never empty
    w = tl.exp(m - m_max)  # empty splits: exp(-inf) = 0
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    o = tl.load(PART_O + row[:, None] * HEAD_DIM + dims[None, :], mask=d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(l_part * w, 0)  # (BLOCK_D,)
    tl.store(OUT + s * stride_on + h * stride_oh + dims, out.to(OUT.dtype.element_ty), mask=d_ok)


def decode_splits(num_seqs: int, n_kv_heads: int, max_seq_len: int, num_sms: int, block_n: int = 64) -> int:
    """Splits per (sequence, kv head): enough programs for two waves over ``num_sms`` multiprocessors, a power
    of two, at most ``MAX_SPLITS`` and at most the ``block_n``-key steps of the longest sequence."""
    programs = max(num_seqs * n_kv_heads, 1)
    want = -(-2 * num_sms // programs)
    cap = min(MAX_SPLITS, max(1, -(-max_seq_len // block_n)))
    splits = 1
    while splits * 2 <= min(want, cap):
        splits *= 2
    return splits


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's stand-in)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def paged_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, splits: int = 0, cos: torch.Tensor | None = None,
                        sin: torch.Tensor | None = None, store: bool = True, *, block_n: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """The Triton path: (B, Hq, hd) output; writes k/v (B, Hkv, hd) at ``slot_mapping`` (B,), rotated first by the
    tables ``cos``, ``sin`` (P, hd) when given; ``store=False`` leaves the cache alone (the caller wrote the new
    keys and values: a verification's rows read each other's). ``splits`` 0: :func:`decode_splits` of the batch
    size and the longest sequence the block tables can hold. ``block_n`` (keys per iteration, a power of two >= 16),
    ``num_warps``, ``num_stages``: the split kernel's tiling, None for the defaults (64 keys up to head size 128,
    else 32; Triton's 4 warps, 3 stages); bench/kv_fp8_gpu.py --parts sweep times alternatives."""
    b, n_heads, hd = q.shape
    rotary = cos is not None
    if rotary and (cos.shape != sin.shape or cos.dim() != 2 or cos.shape[-1] != hd or hd % 2
                   or cos.stride() != sin.stride() or cos.stride(-1) != 1):
        raise ValueError(f"cos and sin must be rotary tables (P, {hd}) of one layout with unit stride along the "
                         f"head dimension (even), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _, block_size, n_kv, _ = k_cache.shape
    block_n = block_n or (64 if hd <= 128 else 32)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two >= 16")
    if splits == 0:
        splits = decode_splits(b, n_kv, block_tables.size(1) * block_size, num_sms(q.device), block_n)
    if splits < 1 or splits > MAX_SPLITS or splits & (splits - 1):
        raise ValueError(f"splits={splits} must be 0 (by batch size) or a power of two in [1, {MAX_SPLITS}]")
    group = n_heads // n_kv
    out = torch.empty_like(q)
    tiling = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    block_d = triton.next_power_of_2(hd)
    if splits > 1:
        part_o = torch.empty(b, n_heads, splits, hd, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(b, n_heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out  # unused
    k_data, k_scales, k_strides, scale_strides = kernel_views(k_cache, "key")
    v_data, v_scales, v_strides, v_scale_strides = kernel_views(v_cache, "value")
    check_pair(k_cache, v_cache, k_strides, v_strides, scale_strides, v_scale_strides)
    _decode_split_kernel[(b, n_kv, splits)](
        q, k, v, k_data, v_data, k_scales, v_scales, slot_mapping, seq_lens, block_tables, out, part_o, part_ml,
        cos if rotary else q, sin if rotary else q,
        1.0 / math.sqrt(hd), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_strides[:3], *v_strides, *scale_strides, block_tables.stride(0), out.stride(0), out.stride(1),
        cos.stride(0) if rotary else 0,
        N_HEADS=n_heads, GROUP=group, HEAD_DIM=hd, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLITS=splits, PER_BLOCK=per_block(block_size, block_n, k_cache),
        UPCAST=q.device.type == "cpu", FP8=is_fp8(k_cache), ROTARY=rotary, STORE=store, **tiling,
    )
    if splits > 1:
        _decode_merge_kernel[(b, n_heads)](part_o, part_ml, out, out.stride(0), out.stride(1), N_HEADS=n_heads,
                                           HEAD_DIM=hd, BLOCK_D=block_d, SPLITS=splits)
    return out


@torch.library.custom_op("pipeloom::paged_decode", mutates_args=("k_cache", "v_cache"))
def _paged_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, splits: int, backend: str, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, store: bool) -> torch.Tensor:
    return _run(q, k, v, k_cache, v_cache, slot_mapping, seq_lens, block_tables, splits, backend, cos, sin, store)


@_paged_decode_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, seq_lens, block_tables, splits, backend, cos, sin, store):
    return torch.empty_like(q)


def _run(q, k, v, k_cache, v_cache, slot_mapping, seq_lens, block_tables, splits, backend, cos=None,
         sin=None, store=True) -> torch.Tensor:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}; choose 'auto', 'torch' or 'triton'")
    if (cos is None) != (sin is None):
        raise ValueError("paged_decode needs both rotary tables cos and sin, or neither")
    if backend == "triton" or (backend == "auto" and use_triton(q)):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return paged_decode_triton(q, k, v, k_cache, v_cache, slot_mapping, seq_lens, block_tables, splits, cos, sin,
                                   store)
    return paged_decode_torch(q, k, v, k_cache, v_cache, slot_mapping, seq_lens, block_tables, cos, sin, store)


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, splits: int = 0,
                 backend: str = "auto", cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, store: bool = True) -> torch.Tensor:
    """Write the new ``k``, ``v`` (B, Hkv, hd) at ``slot_mapping`` and return the attention (B, Hq, hd) of
    ``q`` (B, Hq, hd) over each sequence's ``seq_lens[s]`` cached tokens; with rotary tables ``cos``, ``sin``
    (P, hd), q and k are first rotated at the new token's position ``seq_lens[s] - 1``. ``store=False``: the
    caller has written ``k`` and ``v`` into the cache already (rows of one sequence that read each other's keys,
    ``PagedBatch.prewrite``), and the call leaves the cache alone. ``splits``: of each
    sequence's keys (Triton path), 0 to choose by batch size when the kernel runs (so a compiled graph holds no
    constant that changes with the batch size). Traced by ``torch.compile`` as the custom op
    ``pipeloom::paged_decode``; eager calls skip the dispatcher."""
    if torch.compiler.is_compiling():
        return _paged_decode_op(q, k, v, k_cache, v_cache, slot_mapping, seq_lens, block_tables, splits, backend,
                                cos, sin, store)
    return _run(q, k, v, k_cache, v_cache, slot_mapping, seq_lens, block_tables, splits, backend, cos, sin, store)
