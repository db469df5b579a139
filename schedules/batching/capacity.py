# KV-cache capacity as the policies see it: the KVCapacity protocol and BlockCounter, its pure form.
"""How many KV blocks are left, asked of a small interface so the engine plugs its real block pool in.

The KV cache is paged (vLLM, SOSP'23): fixed-size blocks of ``block_size`` tokens, a request holding
``ceil(tokens / block_size)`` of them. :class:`BlockCounter` counts blocks and nothing else, for the serving
simulator and the tests; the engine's block manager implements the same :class:`KVCapacity` protocol over
real tensors (with prefix hashes and reference counts).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from .request import Request


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens."""
    return -(-tokens // block_size)


@runtime_checkable
class KVCapacity(Protocol):
    """What a batching policy may ask of the KV cache."""

    block_size: int

    def num_free_blocks(self) -> int: ...

    def num_total_blocks(self) -> int: ...

    def cached_prefix(self, request: Request) -> int:
        """Prompt tokens already in the prefix cache: a multiple of block_size, < request.num_tokens; 0 without."""
        ...

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Room for tokens ``[num_computed, num_computed + num_new_tokens)``; all or nothing.

        On a request's first allocation after admission with ``num_computed == k > 0`` (a prefix hit) the
        implementation attaches the cached blocks for ``[0, k)`` itself.
        """
        ...

    def free(self, request: Request) -> None:
        """Release all its blocks (finish, abort, preemption)."""
        ...


class BlockCounter:
    """A pure :class:`KVCapacity`: ``num_blocks`` blocks of ``block_size`` tokens, counted per request.

    ``prefix`` optionally models a prefix cache: a function ``request -> cached prompt tokens``. Cached blocks
    are shared (they live in the cache, outside the per-request count), so a hit costs no free blocks.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, prefix: Callable[[Request], int] | None = None):
        for label, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BlockCounter: {label} must be an integer >= 1, got {value!r}")
        self.block_size = block_size
        self._total = num_blocks
        self._prefix = prefix
        self._held: dict[Request, int] = {}  # blocks a request holds, counting attached cached ones
        self._shared: dict[Request, int] = {}  # of those, cached blocks that cost nothing here
        self._used = 0

    def num_free_blocks(self) -> int:
        return self._total - self._used

    def num_total_blocks(self) -> int:
        return self._total

    def num_held(self, request: Request) -> int:
        """Blocks ``request`` holds now (0 when it holds none)."""
        return self._held.get(request, 0)

    def cached_prefix(self, request: Request) -> int:
        if self._prefix is None:
            return 0
        hit = int(self._prefix(request))
        hit -= hit % self.block_size  # whole blocks only
        return max(0, min(hit, (request.num_tokens - 1) // self.block_size * self.block_size))

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        if num_new_tokens < 1:
            raise ValueError(f"allocate({request.id!r}): num_new_tokens must be >= 1, got {num_new_tokens}")
        if request not in self._held and request.num_computed:  # first allocation after a prefix hit
            shared = blocks_for(request.num_computed, self.block_size)
            self._held[request], self._shared[request] = shared, shared
        need = blocks_for(request.num_computed + num_new_tokens, self.block_size) - self._held.get(request, 0)
        if need > self.num_free_blocks():
            if request in self._shared and self._held[request] == self._shared[request]:
                del self._held[request], self._shared[request]  # all or nothing: drop the attachment again
            return False
        if need > 0:
            self._held[request] = self._held.get(request, 0) + need
            self._used += need
        return True

    def free(self, request: Request) -> None:
        held = self._held.pop(request, 0)
        self._used -= held - self._shared.pop(request, 0)

    def __repr__(self) -> str:
        return f"BlockCounter({self.num_free_blocks()}/{self._total} free, block_size={self.block_size})"
