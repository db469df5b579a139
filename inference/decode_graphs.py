# CUDA-graph decode and verification: static input buffers, one graph per batch size, replay from numpy.
"""Decode-only iterations (one new token per sequence, every slice sampling) replay a CUDA graph captured for
the next larger batch size of ``graph_batch_sizes``, as vLLM and gpt-fast do: at batch 1 a decode step is
otherwise dominated by kernel launches. Padded rows write to a scratch block and are dropped.

The graph's inputs are two static device buffers, one int64 (token ids | positions | slots) and one int32
(sequence lengths | block tables, ``max_blocks`` per row); a step fills their pinned host mirrors with
numpy (the block tables from :class:`~pipeloom.inference.host_inputs.BlockTables`, no per-block Python) and
copies each with ONE host-to-device copy. The forward a graph captures is the runner's
:meth:`~pipeloom.inference.model_runner.ModelRunner.graph_forward`, or its ``torch.compile``'d form (Inductor
fuses the norms, rotary, SwiGLU and residual adds; the paged decode kernel is a custom op inside the same
graph). All sizes are captured at the first replay, largest first, into one shared memory pool.

:class:`VerifyGraphs` does the same for speculative decoding's verification step, where each sequence brings
its last token and up to ``tokens - 1`` drafts: every sequence is padded to ``tokens`` query rows (padding rows
write to the scratch block and their logits are dropped), so one graph per batch size serves every mix of draft
counts. Its forward runs the general paged-attention kernel over a static work list. Without it, a verification
step runs eagerly, and at batch 1 its kernel launches cost more than the tokens it accepts save.

``emulate=True`` keeps everything but the capture: ``replay`` reruns the forward over the static buffers (CPU
tests of the padding and bookkeeping; a compiled decode forward without CUDA graphs).
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from .host_inputs import INDEX, SMALL, BlockTables, decode_ids, slice_arrays


class DecodeGraphs:
    """One graph per batch size over shared static buffers (see the module docstring); ``tokens`` query rows per
    sequence (1: decode)."""

    tokens = 1

    def __init__(self, runner, sizes: tuple[int, ...], forward, *, emulate: bool):
        self.runner, self.forward, self.emulate = runner, forward, emulate
        self.sizes = sorted(sizes)
        if not self.sizes or self.sizes[0] < 1:
            raise ValueError(f"graph_batch_sizes={sizes!r} must be positive batch sizes")
        n, mb, dev, q = self.sizes[-1], runner.max_blocks_per_seq, runner.device, self.tokens
        self.n_max, self.max_blocks = n, mb
        self.scratch_slot = runner.scratch_block * runner.block_size
        self.index = torch.zeros(3 * n * q, dtype=torch.long, device=dev)  # ids | positions | slots
        self.small = torch.zeros(n + n * mb, dtype=torch.int32, device=dev)  # seq_lens | tables (n, mb)
        pin = dev.type == "cuda"
        self._hosts = [(torch.zeros(3 * n * q, dtype=torch.long, pin_memory=pin),
                        torch.zeros(n + n * mb, dtype=torch.int32, pin_memory=pin)) for _ in range(2 if pin else 1)]
        self._events: list[torch.cuda.Event | None] = [None] * len(self._hosts)
        self._turn = 0
        self.rows = torch.arange(n, device=dev)  # kept for the graphs' lifetime (a graph reads captured memory)
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    @staticmethod
    def graphable(iteration, largest: int) -> bool:
        return (0 < len(iteration.slices) <= largest
                and all(sl.n_tokens == 1 and sl.samples for sl in iteration.slices))

    def size_for(self, batch: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    @staticmethod
    def unpack(index: torch.Tensor, small: torch.Tensor, n: int, max_blocks: int, tokens: int = 1
               ) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots (n tokens,) each, seq_lens (n,), tables (n, max_blocks)) of batch size ``n`` as
        views of the two static buffers."""
        m, r = index.size(0) // 3, n * tokens
        t = small.size(0) // (1 + max_blocks)  # where the tables start: the largest batch size
        return (index[:r], index[m : m + r], index[2 * m : 2 * m + r], small[:n],
                small[t : t + n * max_blocks].view(n, max_blocks))

    # ------------------------------------------------------------------ capture

    def capture(self, n: int) -> None:
        """Capture (or, emulated, set up) the graph of batch size ``n``; padding rows point at the scratch block."""
        _, _, slots, seq_lens, tables = self.unpack(self.index, self.small, n, self.max_blocks, self.tokens)
        slots.fill_(self.scratch_slot)
        seq_lens.fill_(self.tokens)
        tables.fill_(self.runner.scratch_block)
        # the forward takes the whole buffers and the size: views made outside would differ in storage offset
        # per size, and a compiled forward would guard (and recompile) on those
        args = (self.index, self.small, n)
        if self.emulate:
            self.logits[n] = self.forward(*args)
            self.graphs[n] = _EagerGraph(lambda: self.logits[n].copy_(self.forward(*args)))
            return
        dev = self.runner.device
        with torch.inference_mode():
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):  # warm up off the capture (compiles, autotunes, allocator settles)
                for _ in range(2):
                    self.forward(*args)
            torch.cuda.current_stream(dev).wait_stream(stream)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[n] = self.forward(*args)
        self.pool = graph.pool()
        self.graphs[n] = graph

    def capture_all(self) -> None:
        for n in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool memory
            if n not in self.graphs:
                self.capture(n)

    # ------------------------------------------------------------------ replay

    def replay(self, iteration, block_manager, tables: BlockTables, fill_missing=None) -> torch.Tensor:
        """Logits (b, V) of a decode-only ``iteration`` of b sequences. ``fill_missing(ids, missing)`` writes
        on the device the ids the host does not know yet (sampled by a step in flight)."""
        requests, firsts, _, _ = slice_arrays(iteration)
        b = len(requests)
        n = self.size_for(b)
        if not self.graphs:
            self.capture_all()
        rows = tables.rows([r.id for r in requests], block_manager)
        bs, m = block_manager.block_size, self.n_max
        index_host, small_host = self._host()
        index_np = index_host.numpy()
        index_np[:b], missing = decode_ids(requests, firsts.tolist())
        index_np[m : m + b] = firsts
        block = tables.array[rows, firsts // bs].astype(INDEX)
        index_np[2 * m : 2 * m + b] = block * bs + firsts % bs
        index_np[b:n] = 0
        index_np[m + b : m + n] = 0
        index_np[2 * m + b : 2 * m + n] = self.scratch_slot
        self._upload(index_host, small_host, n, firsts + 1, tables.array[rows])
        if missing:
            fill_missing(self.index, missing)
        self.graphs[n].replay()
        return self.logits[n][:b]

    def _upload(self, index_host: torch.Tensor, small_host: torch.Tensor, n: int, seq_lens: np.ndarray,
                tables: np.ndarray) -> None:
        """Fill the small mirror for batch size ``n``: the b real sequences' lengths (b,) and block tables (b, W),
        the padding sequences' ``tokens`` and the scratch block; then ONE copy per mirror to the static buffers."""
        b, t, mb = len(seq_lens), self.n_max, self.max_blocks
        small_np = small_host.numpy()
        small_np[:b] = seq_lens.astype(SMALL)
        small_np[b:n] = self.tokens
        table_np = small_np[t : t + n * mb].reshape(n, mb)
        table_np[:b] = tables
        table_np[b:n] = self.runner.scratch_block
        used = t + n * mb
        self.index.copy_(index_host, non_blocking=True)
        self.small[:used].copy_(small_host[:used], non_blocking=True)
        self._record()

    def _host(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pinned host mirrors to fill now (the other pair may still be copying: wait for its event)."""
        self._turn = (self._turn + 1) % len(self._hosts)
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
        return self._hosts[self._turn]

    def _record(self) -> None:
        if self.runner.device.type == "cuda":
            event = self._events[self._turn] = self._events[self._turn] or torch.cuda.Event()
            event.record()


class VerifyGraphs(DecodeGraphs):
    """Graphs of iterations whose sequences bring at most ``tokens`` new tokens each (a speculative verification:
    the last token and its drafts), every sequence padded to ``tokens`` query rows (see the module docstring).
    ``forward(index, small, n)`` is the runner's :meth:`~pipeloom.inference.model_runner.ModelRunner.verify_forward`:
    the logits of all ``n * tokens`` rows."""

    def __init__(self, runner, sizes: tuple[int, ...], forward, *, emulate: bool, tokens: int):
        if not isinstance(tokens, int) or tokens < 2:
            raise ValueError(f"verify_tokens={tokens!r} must be an integer >= 2 (the last token and a draft)")
        self.tokens = tokens
        super().__init__(runner, sizes, forward, emulate=emulate)

    def fits(self, iteration) -> bool:
        """Whether ``iteration`` can replay a verification graph: at most the largest batch size, every slice
        at most ``tokens`` new tokens, and the padded rows' positions inside the model's context."""
        q, limit, slices = self.tokens, self.runner.config.max_seq_len, iteration.slices
        return 0 < len(slices) <= self.n_max and all(sl.n_tokens <= q and sl.first_token + q <= limit
                                                     for sl in slices)

    def replay(self, iteration, block_manager, tables: BlockTables, rows: np.ndarray) -> torch.Tensor:
        """Logits (R, V) of ``rows`` (indices into the iteration's new tokens, back to back as a ragged batch lays
        them out) of an iteration that :meth:`fits`. Every token id must be known on the host."""
        requests, firsts, counts, _ = slice_arrays(iteration)
        b, q = len(requests), self.tokens
        n = self.size_for(b)
        if not self.graphs:
            self.capture_all()
        table_rows = tables.rows([r.id for r in requests], block_manager)
        bs, m = block_manager.block_size, self.n_max * q
        index_host, small_host = self._host()
        index_np = index_host.numpy()
        ids = np.zeros((b, q), dtype=INDEX)
        for s, (request, first, count) in enumerate(zip(requests, firsts.tolist(), counts.tolist())):
            span = request.token_ids[first : first + count]
            if len(span) < count:
                raise RuntimeError(f"request {request.id!r}: token {first + len(span)} is not known on the host; "
                                   "a verification graph runs no overlapped step")
            ids[s, :count] = span
        positions = firsts[:, None] + np.arange(q)  # (b, q): padding rows continue their sequence
        real = np.arange(q) < counts[:, None]
        slots = tables.array[table_rows[:, None], positions // bs].astype(INDEX) * bs + positions % bs
        index_np[: n * q] = 0
        index_np[:b * q] = ids.reshape(-1)
        index_np[m : m + n * q] = 0
        index_np[m : m + b * q] = positions.reshape(-1)
        index_np[2 * m : 2 * m + n * q] = self.scratch_slot
        index_np[2 * m : 2 * m + b * q] = np.where(real, slots, self.scratch_slot).reshape(-1)
        self._upload(index_host, small_host, n, firsts + q, tables.array[table_rows])  # row i at seq_len - q + i
        starts = np.concatenate([[0], np.cumsum(counts)])
        seq = np.searchsorted(starts, rows, side="right") - 1
        picked = torch.from_numpy(seq * q + (rows - starts[seq])).to(self.runner.device, non_blocking=True)
        self.graphs[n].replay()
        return self.logits[n][picked]


class _EagerGraph:
    """Stands in for a captured CUDA graph where there is none: ``replay()`` reruns the forward over the same
    static buffers, so the padding and buffer bookkeeping of the graph path is testable on CPU."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self) -> None:
        self.fn()
