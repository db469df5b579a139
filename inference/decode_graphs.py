# CUDA-graph decode: static input buffers, one graph per batch size captured on first use, replay from numpy.
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

``emulate=True`` keeps everything but the capture: ``replay`` reruns the forward over the static buffers (CPU
tests of the padding and bookkeeping; a compiled decode forward without CUDA graphs).
"""

from __future__ import annotations

import bisect

import torch

from .host_inputs import INDEX, SMALL, BlockTables, decode_ids, slice_arrays


class DecodeGraphs:
    """One graph per batch size over shared static buffers (see the module docstring)."""

    def __init__(self, runner, sizes: tuple[int, ...], forward, *, emulate: bool):
        self.runner, self.forward, self.emulate = runner, forward, emulate
        self.sizes = sorted(sizes)
        if not self.sizes or self.sizes[0] < 1:
            raise ValueError(f"graph_batch_sizes={sizes!r} must be positive batch sizes")
        n, mb, dev = self.sizes[-1], runner.max_blocks_per_seq, runner.device
        self.n_max, self.max_blocks = n, mb
        self.scratch_slot = runner.scratch_block * runner.block_size
        self.index = torch.zeros(3 * n, dtype=torch.long, device=dev)  # ids | positions | slots
        self.small = torch.zeros(n + n * mb, dtype=torch.int32, device=dev)  # seq_lens | tables (n, mb)
        pin = dev.type == "cuda"
        self._hosts = [(torch.zeros(3 * n, dtype=torch.long, pin_memory=pin),
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
    def unpack(index: torch.Tensor, small: torch.Tensor, n: int, max_blocks: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, seq_lens, tables) of batch size ``n`` as views of the two static buffers."""
        m = index.size(0) // 3
        return (index[:n], index[m : m + n], index[2 * m : 2 * m + n], small[:n],
                small[m : m + n * max_blocks].view(n, max_blocks))

    # ------------------------------------------------------------------ capture

    def capture(self, n: int) -> None:
        """Capture (or, emulated, set up) the graph of batch size ``n``; padding rows point at the scratch block."""
        _, _, slots, seq_lens, tables = self.unpack(self.index, self.small, n, self.max_blocks)
        slots.fill_(self.scratch_slot)
        seq_lens.fill_(1)
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
        bs, m, mb = block_manager.block_size, self.n_max, self.max_blocks
        index_host, small_host = self._host()
        index_np, small_np = index_host.numpy(), small_host.numpy()
        index_np[:b], missing = decode_ids(requests, firsts.tolist())
        index_np[m : m + b] = firsts
        block = tables.array[rows, firsts // bs].astype(INDEX)
        index_np[2 * m : 2 * m + b] = block * bs + firsts % bs
        index_np[b:n] = 0
        index_np[m + b : m + n] = 0
        index_np[2 * m + b : 2 * m + n] = self.scratch_slot
        small_np[:b] = (firsts + 1).astype(SMALL)
        small_np[b:n] = 1
        table_np = small_np[m : m + n * mb].reshape(n, mb)
        table_np[:b] = tables.array[rows]
        table_np[b:n] = self.runner.scratch_block
        used = m + n * mb
        self.index.copy_(index_host, non_blocking=True)
        self.small[:used].copy_(small_host[:used], non_blocking=True)
        self._record()
        if missing:
            fill_missing(self.index, missing)
        self.graphs[n].replay()
        return self.logits[n][:b]

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


class _EagerGraph:
    """Stands in for a captured CUDA graph where there is none: ``replay()`` reruns the forward over the same
    static buffers, so the padding and buffer bookkeeping of the graph path is testable on CPU."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self) -> None:
        self.fn()
