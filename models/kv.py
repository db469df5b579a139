# The inference forward context: a ragged batch over a paged KV cache that Attention and Embedding read.
"""While :func:`paged_context` is active, the same :class:`~pipeloom.models.Transformer` runs inference:

* the input is one flattened ragged batch ``(1, N)`` of new tokens (prefill chunks and decode tokens of
  several sequences back to back, no padding), with their absolute ``positions`` (N,);
* :class:`~pipeloom.models.layers.Attention` writes each new token's key and value into its cache slot
  (``slot_mapping``), then attends, per sequence, over that sequence's cached prefix and its new tokens
  causally (vLLM, arXiv 2309.06180: paged attention over a block table);
* :class:`~pipeloom.models.transformer.Embedding` adds learned positions at ``positions`` (GPT), and
  Attention rotates queries and keys at ``positions`` (Llama).

Outside the context nothing changes: the training forward is the code it always was. The context is set
per thread (the engine may step the model in a background thread), and the per-layer caches are bound to
the Attention modules themselves, so a pipeline stage that holds only some blocks needs no other signature
(as vLLM's forward context does).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

_local = threading.local()


@dataclass
class PagedBatch:
    """One ragged batch: S sequences, N new tokens in all, over a cache of blocks of ``block_size`` slots.

    Device tensors feed the kernels; the host lists (``query_lens``, ``seq_lens_host``) let the torch
    reference loop over sequences without reading device memory back.
    """

    positions: torch.Tensor  # (N,) long: absolute position of each new token in its sequence
    slot_mapping: torch.Tensor  # (N,) long: cache slot (block * block_size + offset) each new token writes
    query_start: torch.Tensor | None  # (S + 1,) int32: sequence s's new tokens are rows query_start[s]:query_start[s+1]
    # (None for a decode batch: one token per sequence)
    seq_lens: torch.Tensor  # (S,) int32: tokens of sequence s in the cache after this step (cached + new)
    block_tables: torch.Tensor  # (S, max_blocks) int32: cache blocks of each sequence, in order
    block_size: int
    caches: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # ^ Attention module -> (k_cache, v_cache), each (num_blocks, block_size, Hkv, hd)
    query_lens: list[int] | None = None  # host copy of the new-token counts (reference path)
    seq_lens_host: list[int] | None = None  # host copy of seq_lens (reference path)
    max_query_len: int = 1  # longest query of the batch (kernel tiling)
    backend: str = "auto"  # "torch" (reference), "triton" (kernels/paged_attention.py), "auto"
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None  # Triton work list (sequence, first token) per
    # program, int32; None: built from query_start on the host (CUDA graphs pass static ones)
    dense: list[tuple[int, int]] = field(default_factory=list)  # (first row, tokens) of whole new prompts that
    # the Triton path hands to SDPA's fused causal attention (their tiles are left out of ``tiles``)
    fused: dict[torch.nn.Module, tuple[torch.Tensor | torch.nn.Module, torch.Tensor | None, list[int]]] = field(
        default_factory=dict)
    # ^ Attention -> (wq|wk|wv weight, bias or None, split sizes); SwiGLU -> (w1|w3 ...): concatenated once by
    # the runner, so each is one GEMM (quantized linears: one quantized layer over their stacked rows instead)
    decode_splits: int | None = None  # a decode batch (ONE new token per sequence): attention and the cache
    # write run as the split-K decode kernel (kernels/paged_decode.py) with this many splits; None: the general path
    prewrite: bool = False  # a decode batch whose rows include several new tokens of one sequence (a speculative
    # verification's drafts as rows of their own, each with its own seq_len): every row's key and value is written
    # before any row attends (rows read the earlier rows' keys from the cache), so q and k come in rotated
    rope: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # (cos table, sin table, cos rows, sin rows)
    # at ``positions``: gathered once per batch by :meth:`rope_rows`, for every layer holding the same tables

    def kv_cache(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k_cache, v_cache) bound to the Attention ``module``; a clear error when it has none."""
        try:
            return self.caches[module]
        except KeyError:
            raise KeyError(f"no KV cache is bound to attention module {type(module).__name__} at {id(module):#x}; "
                           "bind every block's attention (PagedBatch.caches) before running the model") from None

    def rope_rows(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows (N, hd) of the rotary tables ``cos``, ``sin`` (max_seq_len, hd) at ``positions``, gathered on
        the first call for these very tables (compared by identity, never by value or id: an entry holds its
        tables, so another table can never be answered from it) and reused by every later layer that holds them
        (the runner lets the layers share one pair of equal tables)."""
        for cos_table, sin_table, cos_rows, sin_rows in self.rope:
            if cos_table is cos and sin_table is sin:
                return cos_rows, sin_rows
        rows = cos[self.positions], sin[self.positions]  # (N, hd) each
        self.rope.append((cos, sin, *rows))
        return rows

    def project(self, module: torch.nn.Module, x: torch.Tensor):
        """The outputs of ``module``'s pre-fused projection of ``x`` (q, k, v of an Attention; gate, up of a
        SwiGLU), or None when it has none."""
        fused = self.fused.get(module)
        if fused is None:
            return None
        weight, bias, sizes = fused
        if isinstance(weight, torch.nn.Module):  # a fused quantized layer
            return weight(x).split(sizes, dim=-1)
        return torch.nn.functional.linear(x, weight, bias).split(sizes, dim=-1)

    def attend(self, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Write the new ``k``, ``v`` (N, Hkv, hd) into ``module``'s cache, then attention of ``q`` (N, Hq, hd)
        over each sequence's cache (cached prefix + new tokens, causal): (N, Hq, hd). ``rope``: rotary tables
        (cos, sin), each (max_seq_len, hd), that a decode batch's kernel rotates q and k by first, at ``positions``
        (= ``seq_lens - 1``)."""
        from pipeloom.kernels.paged_attention import paged_attention, write_kv

        k_cache, v_cache = self.kv_cache(module)
        if self.decode_splits is not None:  # one op: the cache write and flash-decoding (a custom op when compiled)
            from pipeloom.kernels.paged_decode import paged_decode

            if self.prewrite:  # every key in place before any row reads; the kernel then stores nothing
                if rope is not None:
                    raise ValueError("a prewrite decode batch writes rotated keys first: rotate q and k before attend")
                write_kv(k_cache, v_cache, k, v, self.slot_mapping)
            cos, sin = rope or (None, None)  # positions = seq_lens - 1: the kernel reads the rows itself
            return paged_decode(q, k, v, k_cache, v_cache, self.slot_mapping, self.seq_lens, self.block_tables,
                                self.decode_splits, backend=self.backend, cos=cos, sin=sin, store=not self.prewrite)
        if rope is not None:
            raise ValueError("PagedBatch.attend rotates q and k itself only in a decode batch (decode_splits set); "
                             "rotate them before attend otherwise")
        write_kv(k_cache, v_cache, k, v, self.slot_mapping)
        return paged_attention(q, k_cache, v_cache, self, backend=self.backend, k=k, v=v)


def current() -> PagedBatch | None:
    """The active inference batch of this thread, or None (the training path)."""
    return getattr(_local, "batch", None)


@contextlib.contextmanager
def paged_context(batch: PagedBatch) -> Iterator[PagedBatch]:
    """Run the model's forward over ``batch`` (see the module docstring); restores the previous one after."""
    previous = current()
    _local.batch = batch
    try:
        yield batch
    finally:
        _local.batch = previous


def kv_cache_shape(num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """Shape of one layer's K (or V) cache: (num_blocks, block_size, Hkv, hd)."""
    return (num_blocks, block_size, n_kv_heads, head_dim)
