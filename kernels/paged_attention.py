# Attention of a ragged batch over a paged KV cache: torch reference, Triton kernel, launcher.
"""Paged attention (vLLM, arXiv 2309.06180 §4.1) for a flattened ragged batch: sequence s has
``query_lens[s]`` new tokens (rows ``query_start[s]:query_start[s+1]`` of ``q``) and ``seq_lens[s]`` tokens in
the cache after they are written; its keys and values live in the blocks ``block_tables[s]``, slot
``block * block_size + offset``. New token i of sequence s sits at position ``seq_lens[s] - query_lens[s] + i``
and attends causally to cache positions ``0 ..`` its own. Prefill chunks and decode tokens mix freely.

Layout: ``q`` (N, Hq, hd); caches (num_blocks, block_size, Hkv, hd), or for an fp8 cache uint8 (..., hd + 4)
bytes per token and head holding per block a plane of e4m3 codes and a plane of float32 scales
(``kernels/kv_fp8.py``: the reference dequantizes, the kernel runs float16 dots over the codes and applies the
scales to scores and softmax weights, as the decode kernel does; ``tile_offsets``, ``load_tile`` and
``load_keys`` here are shared with it); grouped-query attention reads key/value head ``h // (Hq / Hkv)`` for
query head ``h``. Softmax scale ``1/sqrt(hd)``, as the training path's SDPA.

Two paths: :func:`paged_attention_torch` gathers each sequence's blocks and calls SDPA with the causal
offset mask (CPU, float64, any dtype); :func:`paged_attention_triton` is one kernel over (query tile,
key/value head) programs with an online softmax over the sequence's blocks (FlashAttention, arXiv
2205.14135), reading the block table in the kernel, so nothing is gathered and a decode batch is one launch
(CUDA-graph capturable: its grid depends only on the number of query tiles).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pipeloom.kernels import tl, triton, use_triton
from pipeloom.kernels.kv_fp8 import as_float16, f16_range, is_fp8, kernel_views, read_blocks, write_rows


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values ``k``, ``v`` (N, Hkv, hd) at cache slots ``slot_mapping`` (N,) long (quantized rows
    for an fp8 cache)."""
    write_rows(k_cache, k, slot_mapping, "key")
    write_rows(v_cache, v, slot_mapping, "value")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch, backend: str = "auto",
                    k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """(N, Hq, hd) attention output of ``q`` over the paged cache described by ``batch`` (a
    :class:`pipeloom.models.kv.PagedBatch`). ``backend``: "torch", "triton", or "auto" (Triton where
    :func:`pipeloom.kernels.use_triton` allows, the torch reference elsewhere).

    On the Triton path, the sequences listed in ``batch.dense`` (long prompts with nothing cached: their
    keys are exactly the new ``k``, ``v``) run SDPA's fused causal attention instead (FlashAttention on a GPU);
    the kernel's work list ``batch.tiles`` then leaves them out."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}; choose 'auto', 'torch' or 'triton'")
    if backend == "triton" or (backend == "auto" and use_triton(q)):
        out = torch.empty_like(q)
        if batch.tiles is None or batch.tiles[0].numel():
            paged_attention_triton(q, k_cache, v_cache, batch.query_start, batch.seq_lens, batch.block_tables,
                                   max_query_len=batch.max_query_len, tiles=batch.tiles, out=out)
        for start, n in batch.dense:
            out[start : start + n] = dense_causal(q[start : start + n], k[start : start + n], v[start : start + n])
        return out
    query_lens = batch.query_lens
    if query_lens is None:
        starts = batch.query_start.tolist()
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
    seq_lens = batch.seq_lens_host if batch.seq_lens_host is not None else batch.seq_lens.tolist()
    return paged_attention_torch(q, k_cache, v_cache, query_lens, seq_lens, batch.block_tables)


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole new sequence: q (n, Hq, hd), k/v (n, Hkv, hd) -> (n, Hq, hd)."""
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k.to(q.dtype), v.to(q.dtype)))  # (1, H, n, hd)
    y = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=kh.size(1) != qh.size(1))
    return y[0].transpose(0, 1)  # (n, Hq, hd)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_lens: list[int],
                          seq_lens: list[int], block_tables: torch.Tensor) -> torch.Tensor:
    """The reference: per sequence, gather its cache blocks and run SDPA with a causal offset mask."""
    _, block_size, n_kv, _ = k_cache.shape
    n_heads, hd = q.size(1), q.size(2)
    out = torch.empty_like(q)  # (N, Hq, hd)
    start = 0
    for s, (n, length) in enumerate(zip(query_lens, seq_lens)):
        blocks = block_tables[s, : -(-length // block_size)].long()
        k = read_blocks(k_cache, blocks, q.dtype, "key").reshape(-1, n_kv, hd)[:length].transpose(0, 1)  # (Hkv, L, hd)
        v = read_blocks(v_cache, blocks, q.dtype, "value").reshape(-1, n_kv, hd)[:length].transpose(0, 1)
        if n_kv != n_heads:
            k = k.repeat_interleave(n_heads // n_kv, dim=0)  # (Hq, L, hd)
            v = v.repeat_interleave(n_heads // n_kv, dim=0)
        qs = q[start : start + n].transpose(0, 1)  # (Hq, n, hd)
        # query i (position length - n + i) sees keys j <= length - n + i
        keys = torch.arange(length, device=q.device)
        mask = keys[None, :] <= keys[length - n :, None]  # (n, L)
        y = F.scaled_dot_product_attention(qs, k.to(qs.dtype), v.to(qs.dtype), attn_mask=mask)  # (Hq, n, hd)
        out[start : start + n] = y.transpose(0, 1)
        start += n
    return out


@triton.jit
def tile_offsets(table_row, start, limit, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PER_BLOCK: tl.constexpr):
    # Keys start .. start + BLOCK_N of one sequence (block table row `table_row`): (cache block, slot in block,
    # position, block_ok). PER_BLOCK (BLOCK_SIZE a power of two dividing BLOCK_N, `start` a multiple of BLOCK_N):
    # shapes (NB, 1), (1, BLOCK_SIZE), (NB, BLOCK_SIZE), (NB, 1), whole cache blocks, one table read each, so a
    # block's rows are known contiguous; else per key, all (BLOCK_N,). Blocks from `limit` on are not read.
    if PER_BLOCK:
        bidx = start // BLOCK_SIZE + tl.arange(0, BLOCK_N // BLOCK_SIZE)  # (NB,)
        block_ok = (bidx * BLOCK_SIZE < limit)[:, None]
        block = tl.load(table_row + bidx[:, None], mask=block_ok, other=0).to(tl.int64)
        slot = tl.arange(0, BLOCK_SIZE)[None, :]
        kpos = bidx[:, None] * BLOCK_SIZE + slot
    else:
        kpos = start + tl.arange(0, BLOCK_N)
        block_ok = kpos < limit
        block = tl.load(table_row + kpos // BLOCK_SIZE, mask=block_ok, other=0).to(tl.int64)
        slot = kpos % BLOCK_SIZE
    return block, slot, kpos, block_ok


@triton.jit
def load_tile(BASE, rows, dims, stride_d, row_ok, d_ok, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PER_BLOCK: tl.constexpr):
    # The (BLOCK_N, BLOCK_D) tile at row offsets `rows` (shaped as tile_offsets gives them) and dims * stride_d;
    # masked entries 0. Whole blocks load as (NB, BLOCK_SIZE, BLOCK_D), so a dim-major block (value codes) is
    # seen as BLOCK_SIZE contiguous bytes per dim.
    if PER_BLOCK:
        x = tl.load(BASE + rows[:, :, None] + dims[None, None, :] * stride_d,
                    mask=row_ok[:, :, None] & d_ok[None, None, :], other=0)
        x = tl.reshape(x, (BLOCK_N, BLOCK_D))
    else:
        x = tl.load(BASE + rows[:, None] + dims[None, :] * stride_d, mask=row_ok[:, None] & d_ok[None, :], other=0)
    return x


@triton.jit
def load_keys(BASE, rows, row_ok, BLOCK_N: tl.constexpr, PER_BLOCK: tl.constexpr):
    # The (BLOCK_N,) values (scales) at `rows` (shaped as tile_offsets gives them); masked entries 0.
    x = tl.load(BASE + rows, mask=row_ok, other=0.0)
    if PER_BLOCK:
        x = tl.reshape(x, (BLOCK_N,))
    return x


@triton.jit
def _paged_attention_kernel(
    Q, K, V, K_SCALE, V_SCALE, OUT, QUERY_START, SEQ_LENS, BLOCK_TABLES, TILE_SEQ, TILE_START,
    scale, stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_sb, stride_ss, stride_sh, stride_on, stride_oh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PER_BLOCK: tl.constexpr, UPCAST: tl.constexpr,
    FP8: tl.constexpr,
):
    # Program (tile, kv head): rows = BLOCK_M // GROUP new tokens x GROUP query heads sharing kv head `kvh`.
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(TILE_SEQ + tile)
    tok0 = tl.load(TILE_START + tile)  # first new token (0-based within the sequence's query) of this tile
    q_begin = tl.load(QUERY_START + s)
    q_len = tl.load(QUERY_START + s + 1) - q_begin
    seq_len = tl.load(SEQ_LENS + s)
    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP  # (BLOCK_M,) token index within this sequence's query
    head = kvh * GROUP + rows % GROUP  # (BLOCK_M,) query head
    row_ok = tok < q_len
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q_ptr = Q + (q_begin + tok)[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:  # the interpreter's dot on bfloat16 is wrong (Triton 3.9): compute in float32 there
        q = q.to(tl.float32)
    if FP8:  # float16 dots over the codes; q scaled into float16's range (exactly, see paged_decode.py)
        q_pow = f16_range(tl.max(tl.abs(q.to(tl.float32)), 1))  # (BLOCK_M,)
        q16 = (q.to(tl.float32) * (1.0 / q_pow)[:, None]).to(tl.float16)
        q_mult = q_pow * scale
    pos = seq_len - q_len + tok  # (BLOCK_M,) absolute position of each row's token
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # keys up to the tile's last token's position; positions beyond are masked anyway
    last = tl.minimum(seq_len, seq_len - q_len + tok0 + BLOCK_M // GROUP)
    table_row = BLOCK_TABLES + s * stride_bt
    for start in range(0, last, BLOCK_N):
        block, slot, kpos, block_ok = tile_offsets(table_row, start, seq_len, BLOCK_N, BLOCK_SIZE, PER_BLOCK)
        key_ok = kpos < seq_len  # (NB, BLOCK_SIZE) or (BLOCK_N,)
        k_rows = block * stride_kb + slot * stride_ks + kvh * stride_kh
        if FP8:  # value codes: their own plane layout (dim-major)
            v_rows = block * stride_vb + slot * stride_vs + kvh * stride_vh
        else:  # a float cache: values laid out as keys (check_pair)
            v_rows = k_rows
        k = load_tile(K, k_rows, dims, 1, key_ok, d_ok, BLOCK_N, BLOCK_D, PER_BLOCK)  # (BLOCK_N, BLOCK_D)
        if FP8:  # codes as exact float16 values; each key's and value's scale multiplies outside the dots
            s_rows = block * stride_sb + slot * stride_ss + kvh * stride_sh
            k_s = load_keys(K_SCALE, s_rows, key_ok, BLOCK_N, PER_BLOCK)  # (BLOCK_N,)
            scores = tl.dot(q16, tl.trans(as_float16(k))) * q_mult[:, None] * k_s[None, :]  # (BLOCK_M, BLOCK_N)
        else:
            scores = tl.dot(q, tl.trans(k).to(q.dtype)).to(tl.float32) * scale  # (BLOCK_M, BLOCK_N)
        kp = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        visible = (kp[None, :] <= pos[:, None]) & (kp < seq_len)[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:  # value codes by whole blocks (dim-major: contiguous along keys); weights p * s in float16's range
            v = load_tile(V, v_rows, dims, stride_vd, block_ok, d_ok, BLOCK_N, BLOCK_D, PER_BLOCK)
            v_s = load_keys(V_SCALE, s_rows, key_ok, BLOCK_N, PER_BLOCK)
            v_pow = f16_range(tl.max(v_s, 0))
            pv = tl.dot((p * (v_s * (1.0 / v_pow))[None, :]).to(tl.float16), as_float16(v)) * v_pow
        else:
            v = load_tile(V, v_rows, dims, stride_vd, key_ok, d_ok, BLOCK_N, BLOCK_D, PER_BLOCK)
            if UPCAST:
                v = v.to(tl.float32)
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv.to(tl.float32)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = OUT + (q_begin + tok)[:, None].to(tl.int64) * stride_on + head[:, None] * stride_oh + dims[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def per_block(block_size: int, block_n: int, k_cache: torch.Tensor) -> bool:
    """Whether the kernels tile keys by whole cache blocks (``tile_offsets``): for an fp8 cache (whose value codes
    need it to be read as contiguous runs) with a power-of-two block size dividing the keys per iteration. A float
    cache keeps the per-key tiles, which the compiler pipelines better for it (bench/kernel_sass.py)."""
    return is_fp8(k_cache) and block_size & (block_size - 1) == 0 and block_n % block_size == 0


def check_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, k_strides, v_strides, scale_strides,
               v_scale_strides) -> None:
    """A ValueError unless the key and value caches are one kind of cache: dtype, shape, keys with unit stride along
    the head dimension, the same scale layout, and for a float cache the same strides (the kernels read both
    through the keys' offsets)."""
    if (v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or k_strides[3] != 1
            or v_scale_strides != scale_strides or (not is_fp8(k_cache) and v_strides != k_strides)):
        raise ValueError(f"k_cache and v_cache must be one kind of cache, laid out alike; got {k_cache.dtype} "
                         f"{tuple(k_cache.shape)} strides {tuple(k_strides)} and {v_cache.dtype} "
                         f"{tuple(v_cache.shape)} strides {tuple(v_strides)}")


def query_tiles(query_lens: list[int], group: int, block_m: int) -> tuple[list[int], list[int]]:
    """(sequence, first token) of every query tile: ``block_m // group`` tokens of one sequence per tile."""
    per_tile = max(block_m // group, 1)
    seqs, starts = [], []
    for s, n in enumerate(query_lens):
        for t in range(0, n, per_tile):
            seqs.append(s)
            starts.append(t)
    return seqs, starts


def tile_rows(group: int, max_query_len: int) -> int:
    """Rows per program: the GQA group times enough tokens for the longest query, a power of two in [16, 64]."""
    rows = group * max(max_query_len, 1)
    return max(16, min(64, triton.next_power_of_2(rows))) if rows <= 64 else max(64, triton.next_power_of_2(group))


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int,
                           tiles: tuple[torch.Tensor, torch.Tensor] | None = None, block_m: int | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path; ``tiles`` (per-program sequence and first token, int32) may be given (CUDA graphs),
    else they are built from ``query_start`` on the host."""
    _, block_size, n_kv, _ = k_cache.shape
    n_heads, hd = q.size(1), q.size(2)
    group = n_heads // n_kv
    block_m = block_m or tile_rows(group, max_query_len)
    if tiles is None:
        starts = query_start.tolist()
        seqs, firsts = query_tiles([b - a for a, b in zip(starts, starts[1:])], group, block_m)
        tiles = (torch.tensor(seqs, dtype=torch.int32, device=q.device),
                 torch.tensor(firsts, dtype=torch.int32, device=q.device))
    out = torch.empty_like(q) if out is None else out
    block_n = 64 if block_size >= 64 else max(16, block_size)
    grid = (tiles[0].numel(), n_kv)
    k_data, k_scales, k_strides, scale_strides = kernel_views(k_cache, "key")
    v_data, v_scales, v_strides, v_scale_strides = kernel_views(v_cache, "value")
    check_pair(k_cache, v_cache, k_strides, v_strides, scale_strides, v_scale_strides)
    _paged_attention_kernel[grid](
        q, k_data, v_data, k_scales, v_scales, out, query_start, seq_lens, block_tables, tiles[0], tiles[1],
        1.0 / math.sqrt(hd), q.stride(0), q.stride(1), *k_strides[:3], *v_strides, *scale_strides, out.stride(0),
        out.stride(1), block_tables.stride(0),
        GROUP=group, HEAD_DIM=hd, BLOCK_D=triton.next_power_of_2(hd), BLOCK_M=block_m, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, PER_BLOCK=per_block(block_size, block_n, k_cache), UPCAST=q.device.type == "cpu",
        FP8=is_fp8(k_cache),
    )
    return out
