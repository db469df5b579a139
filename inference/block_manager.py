# Paged KV cache bookkeeping: block pool, per-sequence block tables, slot mapping, prefix caching (KVCapacity).
"""The block manager owns which cache block holds which tokens; the tensors live in the model runner.

* A pool of ``num_blocks`` blocks of ``block_size`` token slots, a free list and a reference count per
  block; each request has a block table (vLLM, arXiv 2309.06180 §4.2). Token ``t`` of a request is stored at
  slot ``table[t // block_size] * block_size + t % block_size``.
* Prefix caching (on by default): a FULL block is keyed by a chained hash of (the previous block's hash, its
  token ids), as vLLM and nano-vllm do; a hit is verified against the stored token ids, so a hash collision
  can never hand out wrong keys and values. Blocks whose count drops to zero keep their key and are evicted
  least-recently-freed first (the tail of a sequence before its head) only when a fresh block is needed.
* A block is keyed as soon as it is allocated for the step that fills it: its keys and values are written
  in that step's forward, at every layer before any attention reads the cache, so a request admitted in the
  same step (the other samples of an ``n > 1`` request) already shares it.

Implements the ``KVCapacity`` protocol of :mod:`pipeloom.schedules.batching`: ``cached_prefix``,
``allocate``, ``free``, ``num_free_blocks``, ``num_total_blocks``. Requests are the engine's sequences:
anything with ``id``, ``num_computed``, ``num_tokens`` and ``token_ids``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from pipeloom import features


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """64-bit chained hash of one full block: H(parent hash, token ids) (xxh64 when installed, else blake2b)."""
    data = (b"" if parent is None else parent.to_bytes(8, "little")) + array("q", tokens).tobytes()
    if features.has("xxhash"):
        import xxhash

        return xxhash.xxh64_intdigest(data)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` slots with reference counts and an optional prefix cache."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"kv.{name}={value!r} must be a positive integer")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_list: list[int] = list(range(num_blocks - 1, -1, -1))  # never-keyed blocks, pop() from the end
        self.evictable: OrderedDict[int, None] = OrderedDict()  # keyed blocks with count 0, oldest first
        self.block_key: dict[int, int] = {}  # block -> its chained hash
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # block -> the token ids it holds (hit verification)
        self.cache: dict[int, int] = {}  # chained hash -> block
        self.tables: dict[str, list[int]] = {}  # request id -> its block table
        self._hashes: dict[str, list[int]] = {}  # request id -> chained hashes of its leading full blocks
        self._pending: set[int] = set()  # keyed this step, written by the coming forward (mark_computed)
        self.hits = self.queries = 0  # prompt tokens found / looked up in the prefix cache

    # ------------------------------------------------------------------ KVCapacity

    def num_total_blocks(self) -> int:
        return self.num_blocks

    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-keyed free blocks plus evictable cached ones."""
        return len(self.free_list) + len(self.evictable)

    def cached_prefix(self, request) -> int:
        """Tokens of ``request`` whose blocks are in the prefix cache (full blocks, < ``num_tokens``)."""
        if not self.enable_prefix_caching or not hasattr(request, "token_ids"):
            return 0
        hits = len(self._lookup(request))
        self.queries += request.num_tokens
        self.hits += hits * self.block_size
        return hits * self.block_size

    def allocate(self, request, num_new_tokens: int) -> bool:
        """Room for tokens [num_computed, num_computed + num_new_tokens); all or nothing.

        On a request's first allocation with ``num_computed == k > 0`` the cached blocks of [0, k) are
        attached (their counts raised) before fresh blocks are taken.
        """
        table = self.tables.get(request.id)
        if table is not None:  # a decode step (or chunk) inside the blocks it holds, filling none: nothing to do
            end, bs = request.num_computed + num_new_tokens, self.block_size
            if end <= len(table) * bs and (end // bs <= len(self._hashes.get(request.id, ()))
                                           or not self.enable_prefix_caching or not hasattr(request, "token_ids")):
                return True
        hit_blocks: list[int] = []
        if table is None:
            if request.num_computed:
                hit_blocks = self._lookup(request)[: request.num_computed // self.block_size]
                if len(hit_blocks) * self.block_size != request.num_computed:
                    raise RuntimeError(f"request {request.id} starts at num_computed={request.num_computed} but "
                                       f"only {len(hit_blocks) * self.block_size} tokens are in the prefix cache")
            table = []
        end = request.num_computed + num_new_tokens
        needed = -(-end // self.block_size) - len(table) - len(hit_blocks)
        revived = sum(1 for b in hit_blocks if self.ref_counts[b] == 0)  # leave the free pool when attached
        if needed > self.num_free_blocks() - revived:
            return False
        for b in hit_blocks:
            if self.ref_counts[b] == 0:
                del self.evictable[b]
            self.ref_counts[b] += 1
        table = self.tables.setdefault(request.id, table)
        table.extend(hit_blocks)
        for _ in range(max(needed, 0)):
            table.append(self._take_block())
        if hit_blocks:
            self._hashes[request.id] = [self.block_key[b] for b in hit_blocks]
        self._key_full_blocks(request, end)
        return True

    def free(self, request) -> None:
        """Release all blocks of ``request`` (finish, abort, preemption); unknown requests are a no-op."""
        table = self.tables.pop(request.id, None)
        self._hashes.pop(request.id, None)
        for b in reversed(table or []):  # tail first: evicted before the shared head
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if b in self._pending:  # keyed for a forward that will not write it (preempted when scheduled)
                    self._unkey(b)
                if b in self.block_key:
                    self.evictable[b] = None
                else:
                    self.free_list.append(b)

    def mark_computed(self) -> None:
        """The forward of the scheduled iteration ran: the blocks keyed for it now hold their tokens."""
        self._pending.clear()

    # ------------------------------------------------------------------ tables and slots

    def block_table(self, request_id: str) -> list[int]:
        """The blocks of a request, in token order (empty when it holds none)."""
        return self.tables.get(request_id, [])

    def slots(self, request_id: str, first: int, count: int) -> list[int]:
        """Cache slots of tokens [first, first + count) of a request (its blocks must be allocated)."""
        table, bs = self.tables[request_id], self.block_size
        return [table[t // bs] * bs + t % bs for t in range(first, first + count)]

    def usage(self) -> float:
        """Share of blocks held by requests (0..1)."""
        return 1.0 - self.num_free_blocks() / self.num_blocks

    # ------------------------------------------------------------------ internals

    def _lookup(self, request) -> list[int]:
        """Cached blocks for the leading full blocks of request's tokens, verified, stopping at num_tokens - 1."""
        bs, tokens = self.block_size, request.token_ids
        blocks, parent = [], None
        for i in range((request.num_tokens - 1) // bs):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            key = block_hash(parent, chunk)
            b = self.cache.get(key)
            if b is None or self.block_tokens[b] != chunk:
                break
            blocks.append(b)
            parent = key
        return blocks

    def _take_block(self) -> int:
        if self.free_list:
            b = self.free_list.pop()
        else:
            b, _ = self.evictable.popitem(last=False)  # least recently freed cached block
            self._unkey(b)
        self.ref_counts[b] = 1
        return b

    def _unkey(self, b: int) -> None:
        key = self.block_key.pop(b)
        del self.block_tokens[b]
        self._pending.discard(b)
        if self.cache.get(key) == b:
            del self.cache[key]

    def _key_full_blocks(self, request, end: int) -> None:
        """Key the request's blocks that tokens [0, end) fill completely (and are not keyed yet)."""
        if not self.enable_prefix_caching or not hasattr(request, "token_ids"):
            return
        hashes = self._hashes.setdefault(request.id, [])
        table, bs, tokens = self.tables[request.id], self.block_size, request.token_ids
        end = min(end, len(tokens))  # a token still being sampled (an overlapped step): its block is keyed later
        for i in range(len(hashes), end // bs):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            key = block_hash(hashes[-1] if hashes else None, chunk)
            hashes.append(key)
            b = table[i]
            if b in self.block_key or key in self.cache:  # already keyed, or an equal block is (keep that one)
                continue
            self.cache[key] = b
            self.block_key[b] = key
            self.block_tokens[b] = chunk
            self._pending.add(b)

    def truncate(self, request, num_tokens: int) -> None:
        """Keep only the blocks that tokens [0, num_tokens) of ``request`` occupy and release the rest: the slots
        of speculative decoding's rejected draft tokens (their keys and values are stale). A released block that
        was keyed loses its key."""
        table = self.tables.get(request.id)
        if table is None:
            return
        keep = -(-num_tokens // self.block_size)
        for b in reversed(table[keep:]):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if b in self.block_key:
                    self._unkey(b)
                self.free_list.append(b)
        # a new list, not ``del table[keep:]``: the model runner's host block tables (host_inputs.BlockTables)
        # refresh a row when its list object changes or grows; shrunk in place and regrown to the same length
        # by the next allocation, the row would keep the released blocks' ids
        self.tables[request.id] = table[:keep]
        hashes = self._hashes.get(request.id)
        if hashes is not None:
            del hashes[num_tokens // self.block_size :]

    def key_computed(self, request, num_tokens: int) -> None:
        """Key the full blocks of tokens [0, num_tokens) of ``request`` for the prefix cache (after its tokens were
        allocated with a request that carries no ``token_ids``: speculative decoding's drafts, unknown then)."""
        self._key_full_blocks(request, num_tokens)

    def check(self) -> None:
        """Assert the pool's invariants (tests): counts equal table references, every block in one place."""
        counts = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts differ from the block tables"
        free, evict = set(self.free_list), set(self.evictable)
        assert len(free) == len(self.free_list) and not free & evict, "a block is free twice"
        for b in range(self.num_blocks):
            held = counts[b] > 0
            assert held + (b in free) + (b in evict) == 1, f"block {b} is held, free or evictable not exactly once"
            assert (b in evict) <= (b in self.block_key), f"evictable block {b} has no key"
        for key, b in self.cache.items():
            assert self.block_key.get(b) == key, f"cache entry {key} -> {b} does not match the block's key"
