# Runs one scheduled iteration on the model: ragged batch tensors, the paged KV cache, CUDA-graph decode.
"""The model runner owns the KV cache tensors and turns an ``Iteration`` into one forward pass:

* the new tokens of every slice (prefill chunks and decode tokens together) flattened into one ``(1, N)``
  batch, with their positions, cache slots, each sequence's block table and length
  (:class:`pipeloom.models.kv.PagedBatch`), and the rows whose logits are sampled (the last token of each
  slice that reaches its sequence's end);
* the model runs under :func:`pipeloom.models.kv.paged_context` (the same Transformer as training), the
  head only on the sampled rows;
* on CUDA, decode-only iterations replay a CUDA graph captured for the next larger batch size of
  ``graph_batch_sizes`` (padded rows write to a scratch block and are dropped), as vLLM and gpt-fast do:
  at batch 1 a decode step is otherwise dominated by kernel launches. On CPU everything runs eagerly.
"""

from __future__ import annotations

import bisect

import torch
from pipeloom.kernels.paged_attention import query_tiles, tile_rows
from pipeloom.models.kv import PagedBatch, kv_cache_shape, paged_context

DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
CPU_KV_BYTES = 1 << 30  # on CPU, kv.gpu_memory_fraction is a share of this budget


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, keys and values: 2 L block_size Hkv hd element_size."""
    return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * dtype.itemsize


def num_blocks_for_budget(config, block_size: int, dtype: torch.dtype, device: torch.device,
                          gpu_memory_fraction: float = 0.9, reserve_bytes: int = 1 << 30) -> int:
    """Blocks that fit in ``gpu_memory_fraction`` of the device memory, less what is allocated already and
    ``reserve_bytes`` for activations (on CPU: the fraction of a fixed 1 GiB budget)."""
    if not 0.0 < gpu_memory_fraction <= 1.0:
        raise ValueError(f"kv.gpu_memory_fraction={gpu_memory_fraction} must be in (0, 1]")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # memory the caching allocator holds but no tensor uses counts as free
        free, total = torch.cuda.mem_get_info(device)
        budget = gpu_memory_fraction * total - (total - free) - reserve_bytes
    else:
        budget = gpu_memory_fraction * CPU_KV_BYTES
    blocks = int(budget // kv_bytes_per_block(config, block_size, dtype))
    if blocks < 1:
        raise ValueError(f"kv.gpu_memory_fraction={gpu_memory_fraction} leaves no room for a KV block "
                         f"({kv_bytes_per_block(config, block_size, dtype)} bytes); raise it or set kv.num_blocks")
    return blocks


def fuse_qkv(model: torch.nn.Module) -> dict:
    """Each attention's q/k/v weights as ONE tensor, with ``wq/wk/wv`` re-pointed at views of it (no second
    copy): the inference forward then runs one GEMM without concatenating the weights every step (the
    training path's ``Attention._project`` concatenates per call). Modules with other linears are skipped."""
    fused = {}
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            linears = (attn.wq, attn.wk, attn.wv)
            if not all(type(lin) is torch.nn.Linear for lin in linears):
                continue
            sizes = [lin.out_features for lin in linears]
            weight = torch.cat([lin.weight for lin in linears])  # (Hq*hd + 2*Hkv*hd, D)
            bias = None if attn.wq.bias is None else torch.cat([lin.bias for lin in linears])
            for lin, w in zip(linears, weight.split(sizes)):
                lin.weight = torch.nn.Parameter(w, requires_grad=False)
            if bias is not None:
                for lin, b in zip(linears, bias.split(sizes)):
                    lin.bias = torch.nn.Parameter(b, requires_grad=False)
            fused[attn] = (weight, bias, sizes)
    return fused


class ModelRunner:
    """Runs iterations of ``model`` (a :class:`pipeloom.models.Transformer`) over a paged KV cache."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, *, backend: str = "auto",
                 cuda_graphs: bool | str = True, graph_batch_sizes: tuple[int, ...] = DEFAULT_GRAPH_SIZES,
                 dense_prefill_tokens: int | None = 256):
        self.model, self.config = model, model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size, self.num_blocks, self.backend = block_size, num_blocks, backend
        self.dense_prefill_tokens = dense_prefill_tokens  # whole prompts at least this long: SDPA (Triton path)
        self.max_blocks_per_seq = -(-self.config.max_seq_len // block_size)
        self.scratch_block = num_blocks  # one extra block: padded graph rows write here
        shape = kv_cache_shape(num_blocks + 1, block_size, self.config.n_kv_heads, self.config.head_dim)
        self.caches = {block.attn: (torch.zeros(shape, dtype=self.dtype, device=self.device),
                                    torch.zeros(shape, dtype=self.dtype, device=self.device))
                       for block in model.blocks}
        self.fused_qkv = fuse_qkv(model)
        # graphs: on CUDA with the Triton path; "emulate" replays eager forwards over the same static buffers
        # (CPU tests of the padding and buffer bookkeeping)
        on_gpu = cuda_graphs is True and self.device.type == "cuda" and backend != "torch"
        self.use_graphs = cuda_graphs == "emulate" or on_gpu
        self.graph_sizes = sorted(graph_batch_sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EagerGraph] = {}
        self._static: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ batch tensors

    def prepare(self, iteration, block_manager) -> tuple[torch.Tensor, PagedBatch, torch.Tensor]:
        """(input ids (1, N), the PagedBatch, logits row indices (R,)) of ``iteration``."""
        ids, positions, slots, query_lens, seq_lens, tables, rows = [], [], [], [], [], [], []
        for sl in iteration.slices:
            seq, first, n = sl.request, sl.first_token, sl.n_tokens
            ids.extend(seq.token_ids[first : first + n])
            positions.extend(range(first, first + n))
            slots.extend(block_manager.slots(seq.id, first, n))
            query_lens.append(n)
            seq_lens.append(first + n)
            tables.append(block_manager.block_table(seq.id))
            if sl.samples:
                rows.append(len(ids) - 1)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        dev = self.device

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        tiles, dense, tiled_max = None, [], max(query_lens)
        if self.backend == "triton" or (self.backend == "auto" and self.device.type == "cuda"):
            # long prompts with nothing cached go to SDPA's fused attention; the rest to the kernel, whose work
            # list is built here from host lists (no device->host read per layer)
            if self.dense_prefill_tokens is not None:
                dense = [(starts[i], n) for i, (n, end) in enumerate(zip(query_lens, seq_lens))
                         if n == end and n >= self.dense_prefill_tokens]
            skip = {start for start, _ in dense}
            lens = [0 if starts[i] in skip else n for i, n in enumerate(query_lens)]
            group = self.config.n_heads // self.config.n_kv_heads
            tiled_max = max(max(lens), 1)  # the kernel's tile size follows its longest query
            seqs, firsts = query_tiles(lens, group, tile_rows(group, tiled_max))
            tiles = (tensor(seqs, torch.int32), tensor(firsts, torch.int32))
        batch = PagedBatch(positions=tensor(positions, torch.long), slot_mapping=tensor(slots, torch.long),
                           query_start=tensor(starts, torch.int32), seq_lens=tensor(seq_lens, torch.int32),
                           block_tables=tensor(table, torch.int32), block_size=self.block_size, caches=self.caches,
                           fused_qkv=self.fused_qkv, query_lens=query_lens, seq_lens_host=seq_lens,
                           max_query_len=tiled_max, backend=self.backend, tiles=tiles, dense=dense)
        return tensor(ids, torch.long)[None], batch, tensor(rows, torch.long)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, batch: PagedBatch, rows: torch.Tensor) -> torch.Tensor:
        """Logits (R, V) of the sampled rows: embed and blocks over all N tokens, the head over R rows."""
        model = self.model
        with paged_context(batch):
            x = model.embed(input_ids)  # (1, N, D)
            for block in model.blocks:
                x = block(x)  # (1, N, D)
            return model.head(x[0, rows])  # (R, V)

    @torch.inference_mode()
    def run(self, iteration, block_manager) -> torch.Tensor:
        """Logits (R, V) of the slices with ``samples``, in order (R may be 0); float32, or float64 for a
        float64 model."""
        if self.use_graphs and self._graphable(iteration):
            return self._replay(iteration, block_manager)
        input_ids, batch, rows = self.prepare(iteration, block_manager)
        logits = self.forward(input_ids, batch, rows)
        return logits if logits.dtype == torch.float64 else logits.float()

    # ------------------------------------------------------------------ CUDA graphs (decode only)

    def _graphable(self, iteration) -> bool:
        return (0 < len(iteration.slices) <= self.graph_sizes[-1]
                and all(sl.n_tokens == 1 and sl.samples for sl in iteration.slices))

    def capture(self) -> None:
        """Capture one decode graph per size in ``graph_batch_sizes`` (largest first, sharing a memory pool)."""
        n_max, dev = self.graph_sizes[-1], self.device
        st = self._static = {
            "ids": torch.zeros(n_max, dtype=torch.long, device=dev),
            "positions": torch.zeros(n_max, dtype=torch.long, device=dev),
            "slots": torch.full((n_max,), self.scratch_block * self.block_size, dtype=torch.long, device=dev),
            "starts": torch.arange(n_max + 1, dtype=torch.int32, device=dev),
            "seq_lens": torch.ones(n_max, dtype=torch.int32, device=dev),
            "tables": torch.full((n_max, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32, device=dev),
            "tile_seq": torch.arange(n_max, dtype=torch.int32, device=dev),
            "tile_first": torch.zeros(n_max, dtype=torch.int32, device=dev),
            # the logits rows live here too: a graph reads the memory it was captured with, so an index
            # tensor made per capture and then freed would be overwritten by later allocations
            "rows": torch.arange(n_max, device=dev),
        }
        pool, emulate = None, self.device.type != "cuda"
        for n in reversed(self.graph_sizes):
            batch = PagedBatch(positions=st["positions"][:n], slot_mapping=st["slots"][:n],
                               query_start=st["starts"][: n + 1], seq_lens=st["seq_lens"][:n],
                               block_tables=st["tables"][:n], block_size=self.block_size, caches=self.caches,
                               fused_qkv=self.fused_qkv, max_query_len=1,
                               backend=self.backend if emulate else "triton",
                               tiles=(st["tile_seq"][:n], st["tile_first"][:n]))
            rows = st["rows"][:n]
            ids = st["ids"][:n][None]
            if emulate:
                st[f"logits{n}"] = self.forward(ids, batch, rows)
                self.graphs[n] = _EagerGraph(lambda n=n, ids=ids, batch=batch, rows=rows:
                                             st[f"logits{n}"].copy_(self.forward(ids, batch, rows)))
                continue
            with torch.inference_mode():
                for _ in range(2):  # warm up (Triton compiles, allocator settles) outside the graph
                    self.forward(ids, batch, rows)
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    st[f"logits{n}"] = self.forward(ids, batch, rows)
            pool = graph.pool()
            self.graphs[n] = graph

    def _replay(self, iteration, block_manager) -> torch.Tensor:
        if not self.graphs:
            self.capture()
        b = len(iteration.slices)
        n = self.graph_sizes[bisect.bisect_left(self.graph_sizes, b)]
        st = self._static
        ids, positions, slots, lens, tables = [], [], [], [], []
        for sl in iteration.slices:
            seq, pos = sl.request, sl.first_token
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.extend(block_manager.slots(seq.id, pos, 1))
            lens.append(pos + 1)
            t = block_manager.block_table(seq.id)
            tables.append(t + [self.scratch_block] * (self.max_blocks_per_seq - len(t)))
        dev = self.device
        st["ids"][:b].copy_(torch.tensor(ids), non_blocking=True)
        st["positions"][:b].copy_(torch.tensor(positions), non_blocking=True)
        st["slots"][:b].copy_(torch.tensor(slots), non_blocking=True)
        st["slots"][b:n].fill_(self.scratch_block * self.block_size)
        st["seq_lens"][:b].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        st["seq_lens"][b:n].fill_(1)
        st["tables"][:b].copy_(torch.tensor(tables, dtype=torch.int32).to(dev, non_blocking=True))
        st["tables"][b:n].fill_(self.scratch_block)
        self.graphs[n].replay()
        return st[f"logits{n}"][:b].float()


class _EagerGraph:
    """Stands in for a captured CUDA graph where there is none: ``replay()`` reruns the forward over the same
    static buffers, so the padding and buffer bookkeeping of the graph path is testable on CPU."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self) -> None:
        self.fn()
