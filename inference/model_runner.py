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
  at batch 1 a decode step is otherwise dominated by kernel launches (:mod:`.decode_graphs`). With
  ``compile`` the captured decode forward is ``torch.compile``'d first (one graph, ``fullgraph=True``: Inductor
  fuses the elementwise work around the paged decode kernel, a custom op). Without ``compile``, on the Triton path
  the captured forward runs under :func:`pipeloom.kernels.always_fuse`: RMSNorm and SwiGLU take pipeloom's
  Triton kernels whatever their size (inside a graph a launch costs no host time), each residual add fuses with
  the next RMSNorm and the paged decode kernel rotates q and k itself (``fuse_decode``; bench/engine_speed.py
  counts the kernels).
  On CPU everything runs eagerly.

Decode batches on the Triton path attend with the split-K decode kernel (kernels/paged_decode.py), which also
writes the new keys and values; prefill and mixed batches stay eager (their shapes change every iteration,
and they are matmul-bound). The batch tensors are built with numpy on the host (:mod:`.host_inputs`:
incremental block tables, one host-to-device copy per dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pipeloom.kernels import always_fuse
from pipeloom.kernels.kv_fp8 import bytes_per_token_head, cache_dtype, check_kv_cache_dtype, row_width
from pipeloom.kernels.paged_attention import tile_rows
from pipeloom.kernels.paged_decode import decode_splits, num_sms
from pipeloom.models.kv import PagedBatch, kv_cache_shape, paged_context

from .decode_graphs import DecodeGraphs, VerifyGraphs
from .host_inputs import INDEX, SMALL, BlockTables, RaggedInputs, Staging, query_tiles_np, ragged_inputs

DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
VERIFY_ATTENTION = ("tiles", "split")  # how verification graphs attend (ModelRunner.verify_forward)
CPU_KV_BYTES = 1 << 30  # on CPU, kv.gpu_memory_fraction is a share of this budget


@dataclass
class HostBatch:
    """One iteration's ragged batch as host lists (what :meth:`ModelRunner.tensors` turns into device tensors;
    a pipeline's driver sends it to every stage, whose caches share the driver's block tables)."""

    ids: list[int]  # (N,) the new tokens of every slice, back to back
    positions: list[int]  # (N,) their positions in their sequences
    slots: list[int]  # (N,) the cache slot each new token writes
    query_lens: list[int]  # (S,) new tokens per slice
    seq_lens: list[int]  # (S,) tokens of each sequence in the cache after this iteration
    tables: list[list[int]]  # (S, *) each sequence's blocks
    rows: list[int]  # (R,) the last token of each slice that samples

    def ragged(self) -> RaggedInputs:
        """The same batch as the numpy arrays :meth:`ModelRunner.tensors` reads."""
        width = max(len(t) for t in self.tables)
        tables = np.zeros((len(self.tables), width), dtype=SMALL)
        for i, t in enumerate(self.tables):
            tables[i, : len(t)] = t
        query_start = np.zeros(len(self.query_lens) + 1, dtype=SMALL)
        np.cumsum(self.query_lens, out=query_start[1:])
        return RaggedInputs(np.asarray(self.ids, dtype=INDEX), np.asarray(self.positions, dtype=INDEX),
                            np.asarray(self.slots, dtype=INDEX), query_start,
                            np.asarray(self.seq_lens, dtype=SMALL), tables, np.asarray(self.rows, dtype=INDEX), [])


def host_batch(iteration, block_manager) -> HostBatch:
    """The :class:`HostBatch` of ``iteration`` over ``block_manager``'s tables."""
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
    return HostBatch(ids, positions, slots, query_lens, seq_lens, tables, rows)


def local_kv_heads(attn: torch.nn.Module) -> int:
    """Key/value heads ``attn`` computes here: all of them, or a tensor-parallel shard's share."""
    wk = attn.wk
    return getattr(wk, "local_out_features", wk.out_features) // attn.head_dim


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes over all layers, keys and values: 2 L block_size Hkv hd element_size, or with an
    fp8 cache 2 L block_size Hkv (hd + 4) (e4m3 codes and a float32 scale per row: kernels/kv_fp8.py)."""
    per_row = bytes_per_token_head(config.head_dim, dtype, kv_cache_dtype)
    return 2 * config.n_layers * block_size * config.n_kv_heads * per_row


def num_blocks_for_budget(config, block_size: int, dtype: torch.dtype, device: torch.device,
                          gpu_memory_fraction: float = 0.9, reserve_bytes: int = 1 << 30,
                          kv_cache_dtype: str = "auto") -> int:
    """Blocks that fit in ``gpu_memory_fraction`` of the device memory, less what is allocated already and
    ``reserve_bytes`` for activations (on CPU: the fraction of a fixed 1 GiB budget); an fp8 cache
    (``kv_cache_dtype="fp8"``) fits about twice the blocks of a bfloat16 one."""
    if not 0.0 < gpu_memory_fraction <= 1.0:
        raise ValueError(f"kv.gpu_memory_fraction={gpu_memory_fraction} must be in (0, 1]")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # memory the caching allocator holds but no tensor uses counts as free
        free, total = torch.cuda.mem_get_info(device)
        budget = gpu_memory_fraction * total - (total - free) - reserve_bytes
    else:
        budget = gpu_memory_fraction * CPU_KV_BYTES
    per_block = kv_bytes_per_block(config, block_size, dtype, kv_cache_dtype)
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError(f"kv.gpu_memory_fraction={gpu_memory_fraction} leaves no room for a KV block "
                         f"({per_block} bytes); raise it or set kv.num_blocks")
    return blocks


def fuse_qkv(model: torch.nn.Module) -> dict:
    """Each attention's q/k/v weights as ONE tensor, with ``wq/wk/wv`` re-pointed at views of it (no second
    copy): the inference forward then runs one GEMM without concatenating the weights every step (the
    training path's ``Attention._project`` concatenates per call). Modules with other linears are skipped."""
    return {block.attn: fused for block in model.blocks
            if (fused := _fuse_linears((block.attn.wq, block.attn.wk, block.attn.wv))) is not None}


def fuse_gate_up(model: torch.nn.Module) -> dict:
    """Each SwiGLU's gate and up weights (``w1``, ``w3``) as ONE tensor, the linears re-pointed at views of it:
    one GEMM of ``2F`` outputs per MLP instead of two (at batch 1 each is a weight-streaming GEMV, and a
    launch). GPT MLPs, and SwiGLUs with other linears, are skipped."""
    return {block.mlp: fused for block in model.blocks
            if hasattr(block.mlp, "w3") and (fused := _fuse_linears((block.mlp.w1, block.mlp.w3))) is not None}


def share_rope_tables(model: torch.nn.Module) -> int:
    """Point every attention's rotary tables at the first one's where they hold the same values (one config built
    them all), so an inference batch gathers their rows at its positions once for all layers
    (:meth:`pipeloom.models.kv.PagedBatch.rope_rows`), and keeps one copy; returns the layers that now share."""
    first, shared = None, 0
    for block in model.blocks:
        attn = block.attn
        if not getattr(attn, "rotary", False):
            continue
        if first is None:
            first = attn
        elif all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                 for a, b in ((attn.rope_cos, first.rope_cos), (attn.rope_sin, first.rope_sin))):
            attn.rope_cos, attn.rope_sin = first.rope_cos, first.rope_sin
            shared += 1
    return shared


def _fuse_linears(linears) -> tuple[torch.Tensor | torch.nn.Module, torch.Tensor | None, list[int]] | None:
    """(concatenated weight, bias or None, output sizes) of plain ``nn.Linear``s over one input, each linear's
    parameters re-pointed at views of the concatenation; for pipeloom's quantized layers (alike) ONE quantized
    layer over their stacked rows in place of the weight (``quant.linear.fuse_quantized``); None otherwise."""
    from pipeloom.inference.quant.linear import QuantizedLinear, fuse_quantized

    sizes = [lin.out_features for lin in linears]
    if all(isinstance(lin, QuantizedLinear) for lin in linears):
        fused = fuse_quantized(list(linears))
        return None if fused is None else (fused, None, sizes)
    if not all(type(lin) is torch.nn.Linear and type(lin.weight) in (torch.Tensor, torch.nn.Parameter)
               for lin in linears):
        return None
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])  # (sum of outputs, D)
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        for lin, w in zip(linears, weight.split(sizes)):
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
        if bias is not None:
            for lin, b in zip(linears, bias.split(sizes)):
                lin.bias = torch.nn.Parameter(b, requires_grad=False)
    return weight, bias, sizes


class ModelRunner:
    """Runs iterations of ``model`` (a :class:`pipeloom.models.Transformer`) over a paged KV cache.

    ``compile``: False, or True / a ``torch.compile`` mode ("default", "max-autotune-no-cudagraphs") for the
    decode forward over the decode graphs' static buffers (captured in CUDA graphs on a GPU, replayed
    uncaptured elsewhere). ``kv_cache_dtype``: "auto" (the model's dtype) or "fp8" (e4m3 rows with a scale each,
    :mod:`pipeloom.kernels.kv_fp8`). ``verify_tokens`` (0: none): where the decode graphs are used, also graphs
    of verification steps of up to that many tokens per sequence (:meth:`run_rows`; speculative decoding's
    last token and drafts, :class:`~pipeloom.inference.decode_graphs.VerifyGraphs`); ``verify_attention``: how
    they attend (:meth:`verify_forward`), "tiles" or "split".
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, *, backend: str = "auto",
                 cuda_graphs: bool | str = True, graph_batch_sizes: tuple[int, ...] = DEFAULT_GRAPH_SIZES,
                 dense_prefill_tokens: int | None = 256, compile: bool | str = False, kv_cache_dtype: str = "auto",
                 verify_tokens: int = 0, verify_attention: str = "tiles"):
        self.model, self.config = model, model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size, self.num_blocks, self.backend = block_size, num_blocks, backend
        self.dense_prefill_tokens = dense_prefill_tokens  # whole prompts at least this long: SDPA (Triton path)
        self.max_blocks_per_seq = -(-self.config.max_seq_len // block_size)
        self.scratch_block = num_blocks  # one extra block: padded graph rows write here
        check_kv_cache_dtype(kv_cache_dtype, self.config.head_dim)
        self.kv_cache_dtype = kv_cache_dtype
        store, width = cache_dtype(self.dtype, kv_cache_dtype), row_width(self.config.head_dim, kv_cache_dtype)
        self.caches = {}
        for block in model.blocks:  # each attention's own key/value heads (a tensor-parallel shard holds some)
            shape = kv_cache_shape(num_blocks + 1, block_size, local_kv_heads(block.attn), width)
            self.caches[block.attn] = (torch.zeros(shape, dtype=store, device=self.device),
                                       torch.zeros(shape, dtype=store, device=self.device))
        self.kv_heads = local_kv_heads(model.blocks[0].attn) if len(model.blocks) else self.config.n_kv_heads
        self.fused = {**fuse_qkv(model), **fuse_gate_up(model)}  # module -> one GEMM's weights
        share_rope_tables(model)
        self.triton_path = backend == "triton" or (backend == "auto" and self.device.type == "cuda")
        self.tables = BlockTables(self.max_blocks_per_seq)  # host block tables, appended to step by step
        self._stage_long = Staging(self.device, torch.long)
        self._stage_int = Staging(self.device, torch.int32)
        self._stage_pending = Staging(self.device, torch.long)
        self.compiled = bool(compile)
        # the decode graphs' forward runs the fused kernels at any size (read when a graph is captured); not when
        # compiled: Inductor fuses the torch path itself
        self.fuse_decode = self.triton_path and not self.compiled
        forward = compile_decode(self.graph_forward, compile) if compile else self.fused_graph_forward
        # graphs: on CUDA with the Triton path; "emulate" (and compile without graphs) replays the forward over
        # the same static buffers (CPU tests of the padding and bookkeeping)
        on_gpu = cuda_graphs is True and self.device.type == "cuda" and backend != "torch"
        self.use_graphs = cuda_graphs == "emulate" or on_gpu or self.compiled
        self.graph_sizes = sorted(graph_batch_sizes)
        self.decode_graphs = DecodeGraphs(self, self.graph_sizes, forward, emulate=not on_gpu)
        check_verify_attention(verify_attention)
        self.verify_attention = verify_attention
        self.verify_graphs = None
        if verify_tokens and self.use_graphs:
            self.verify_graphs = VerifyGraphs(self, self.graph_sizes, self.verify_forward, emulate=not on_gpu,
                                              tokens=verify_tokens)

    @property
    def graphs(self) -> dict:
        """Batch size -> captured graph (those captured so far)."""
        return self.decode_graphs.graphs

    def forget(self, seq_id: str) -> None:
        """A sequence ended: release its host block-table row."""
        self.tables.forget(seq_id)

    # ------------------------------------------------------------------ batch tensors

    def prepare(self, iteration, block_manager, pending=None) -> tuple[torch.Tensor, PagedBatch, torch.Tensor]:
        """(input ids (1, N), the PagedBatch, logits row indices (R,)) of ``iteration``; ``pending``: see
        :meth:`run`."""
        return self.tensors(ragged_inputs(iteration, block_manager, self.tables), pending)

    def tensors(self, host: RaggedInputs | HostBatch, pending=None) -> tuple[torch.Tensor, PagedBatch, torch.Tensor]:
        """The device tensors of one ragged batch: (input ids (1, N), the PagedBatch, logits rows (R,)). A
        pipeline's stages get a :class:`HostBatch` from the driver, whose block tables their caches share."""
        if isinstance(host, HostBatch):
            host = host.ragged()
        query_lens = np.diff(host.query_start)
        dense, tiled_max, splits, extra = [], int(query_lens.max()), None, []
        if self.triton_path and tiled_max == 1:  # a decode batch: the split-K decode kernel writes and attends
            splits = decode_splits(len(query_lens), self.kv_heads, int(host.seq_lens.max()),
                                   num_sms(self.device))
        elif self.triton_path:
            # long prompts with nothing cached go to SDPA's fused attention; the rest to the kernel, whose work
            # list is built here from host arrays (no device->host read per layer)
            lens = query_lens
            if self.dense_prefill_tokens is not None:
                whole = (query_lens == host.seq_lens) & (query_lens >= self.dense_prefill_tokens)
                dense = list(zip(host.query_start[:-1][whole].tolist(), query_lens[whole].tolist()))
                lens = np.where(whole, 0, query_lens)
            group = self.config.n_heads // self.config.n_kv_heads
            tiled_max = max(int(lens.max()), 1)  # the kernel's tile size follows its longest query
            extra = list(query_tiles_np(lens, group, tile_rows(group, tiled_max)))
        ids, positions, slots, rows = self._stage_long.to_device(host.ids, host.positions, host.slots, host.rows)
        if host.missing:
            self._fill_missing(pending, ids, host.missing)
        starts, seq_lens, tables, *tile_tensors = self._stage_int.to_device(
            host.query_start, host.seq_lens, host.tables, *extra)
        batch = PagedBatch(positions=positions, slot_mapping=slots, query_start=starts, seq_lens=seq_lens,
                           block_tables=tables, block_size=self.block_size, caches=self.caches,
                           fused=self.fused, query_lens=query_lens.tolist(),
                           seq_lens_host=host.seq_lens.tolist(), max_query_len=tiled_max, backend=self.backend,
                           tiles=tuple(tile_tensors) if tile_tensors else None, dense=dense, decode_splits=splits)
        return ids[None], batch, rows

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, batch: PagedBatch, rows: torch.Tensor | None) -> torch.Tensor:
        """Logits (R, V) of the sampled rows (None: all N): embed and blocks over all N tokens, the head over R."""
        model = self.model
        with paged_context(batch):
            h, residual = model.embed(input_ids), None  # (1, N, D); the stream after each block is h + residual
            for block in model.blocks:
                h, residual = block.forward_residual(h, residual)  # (1, N, D) each
            pick = (lambda t: t[0]) if rows is None else (lambda t: t[0, rows])  # (N, D) or (R, D)
            return model.head.forward_residual(pick(h), None if residual is None else pick(residual))  # (R, V)

    def decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
                       tables: torch.Tensor, splits: int = 0) -> torch.Tensor:
        """Logits (B, V) of a decode batch: token ``ids[s]`` of sequence s at ``positions[s]`` (B,), written at
        ``slots[s]``; ``seq_lens`` (B,) int32 counts it; ``tables`` (B, W) int32; ``splits`` of the decode
        kernel (0: by batch size). What the graphs capture and ``torch.compile`` traces (one graph: the decode
        kernel is a custom op)."""
        batch = PagedBatch(positions=positions, slot_mapping=slots, query_start=None, seq_lens=seq_lens,
                           block_tables=tables, block_size=self.block_size, caches=self.caches,
                           fused=self.fused, backend="triton" if self.triton_path else "torch",
                           decode_splits=splits)
        return self.forward(ids[None], batch, None)

    def graph_forward(self, index: torch.Tensor, small: torch.Tensor, n: int) -> torch.Tensor:
        """:meth:`decode_forward` of batch size ``n`` over the decode graphs' two static buffers."""
        return self.decode_forward(*DecodeGraphs.unpack(index, small, n, self.max_blocks_per_seq))

    def fused_graph_forward(self, index: torch.Tensor, small: torch.Tensor, n: int) -> torch.Tensor:
        """:meth:`graph_forward` under :func:`~pipeloom.kernels.always_fuse` while ``fuse_decode``: what the decode
        graphs capture unless compiled (captured, a fused kernel always costs less than the eager ops it
        replaces: 9 kernels per Llama layer instead of 38, tests/test_decode_fusion.py)."""
        with always_fuse(self.fuse_decode):
            return self.graph_forward(index, small, n)

    def verify_forward(self, index: torch.Tensor, small: torch.Tensor, n: int) -> torch.Tensor:
        """Logits (n q, V) of ``n`` sequences of ``q = verify_graphs.tokens`` new tokens each over the verification
        graphs' static buffers; the norms and SwiGLU fused on the Triton path, as in the decode graphs. Attention,
        by ``verify_attention``:

        * "tiles": the general paged-attention kernel (causal within each sequence's rows) over a work list
          computed here on the device, so the graph holds it: one program per (sequence's rows, KV head), each
          over the whole context;
        * "split": the split-K decode kernel over the ``n q`` rows as sequences of their own (row i of a
          sequence sees its position + 1 keys, through its sequence's block table), every key written first
          (``PagedBatch.prewrite``): the context split over many programs, as a decode step's is.
        """
        q = self.verify_graphs.tokens
        ids, positions, slots, seq_lens, tables = DecodeGraphs.unpack(index, small, n, self.max_blocks_per_seq, q)
        dev, backend = ids.device, "triton" if self.triton_path else "torch"
        if self.verify_attention == "split":
            row = torch.arange(1 - q, 1, dtype=torch.int32, device=dev)  # (q,): keys of row i less the last row's
            batch = PagedBatch(positions=positions, slot_mapping=slots, query_start=None,
                               seq_lens=(seq_lens[:, None] + row).reshape(-1),
                               block_tables=tables.repeat_interleave(q, dim=0), block_size=self.block_size,
                               caches=self.caches, fused=self.fused, backend=backend, decode_splits=0, prewrite=True)
        else:
            group = self.config.n_heads // self.config.n_kv_heads
            per_tile = max(tile_rows(group, q) // group, 1)  # tokens of one sequence per kernel program
            tiles_per_seq = -(-q // per_tile)
            tile = torch.arange(n * tiles_per_seq, dtype=torch.int32, device=dev)
            starts = torch.arange(0, n * q + 1, q, dtype=torch.int32, device=dev)  # (n + 1,)
            batch = PagedBatch(positions=positions, slot_mapping=slots, query_start=starts, seq_lens=seq_lens,
                               block_tables=tables, block_size=self.block_size, caches=self.caches, fused=self.fused,
                               max_query_len=q, backend=backend,
                               tiles=(tile // tiles_per_seq, tile % tiles_per_seq * per_tile))
        with always_fuse(self.triton_path):
            return self.forward(ids[None], batch, None)

    @torch.inference_mode()
    def run_rows(self, iteration, block_manager, rows: np.ndarray) -> torch.Tensor:
        """Logits (R, V) at ``rows``, indices into the iteration's new tokens laid back to back (a speculative
        verification reads every drafted position, not only each slice's last); float32, or float64 for a
        float64 model. Replays a verification graph where the iteration fits one (``verify_tokens``)."""
        if self.verify_graphs is not None and self.verify_graphs.fits(iteration):
            logits = self.verify_graphs.replay(iteration, block_manager, self.tables, rows)
        else:
            input_ids, batch, _ = self.prepare(iteration, block_manager)
            logits = self.forward(input_ids, batch, torch.as_tensor(rows, dtype=torch.long).to(self.device))
        return logits if logits.dtype == torch.float64 else logits.float()

    @torch.inference_mode()
    def run(self, iteration, block_manager, pending: tuple[torch.Tensor, dict[str, int]] | None = None) -> torch.Tensor:
        """Logits (R, V) of the slices with ``samples``, in order (R may be 0); float32, or float64 for a
        float64 model. ``pending``: (token ids (R',) on the device, request id -> row) sampled by the previous
        iteration and not yet appended on the host (the engine's overlapped steps): the ids of the slices that
        start at such a token are taken from there on the device."""
        def fill(ids, missing):
            self._fill_missing(pending, ids, missing)

        if self.use_graphs and DecodeGraphs.graphable(iteration, self.graph_sizes[-1]):
            logits = self.decode_graphs.replay(iteration, block_manager, self.tables, fill)
        else:
            input_ids, batch, rows = self.prepare(iteration, block_manager, pending)
            logits = self.forward(input_ids, batch, rows)
        return logits if logits.dtype == torch.float64 else logits.float()

    def _fill_missing(self, pending, ids: torch.Tensor, missing: list[tuple[int, str]]) -> None:
        if pending is None:
            raise RuntimeError(f"the token ids of {[sid for _, sid in missing]} are not known: pass the pending "
                               "tokens of the iteration in flight to ModelRunner.run")
        tokens, row_of = pending
        dst, src = self._stage_pending.to_device(np.array([row for row, _ in missing], dtype=np.int64),
                                                 np.array([row_of[sid] for _, sid in missing], dtype=np.int64))
        ids[dst] = tokens[src]

    def capture(self) -> None:
        """Capture the decode graph (and verification graph) of every size in ``graph_batch_sizes`` now
        (otherwise each kind on first use)."""
        self.decode_graphs.capture_all()
        if self.verify_graphs is not None:
            self.verify_graphs.capture_all()


def check_verify_attention(value: str, key: str = "verify_attention") -> None:
    """A ValueError naming ``key`` unless ``value`` is one of :data:`VERIFY_ATTENTION`."""
    if value not in VERIFY_ATTENTION:
        raise ValueError(f"{key}={value!r}; choose one of {', '.join(VERIFY_ATTENTION)}")


def compile_decode(fn, mode: bool | str):
    """``torch.compile(fn)`` for the decode forward: one graph (``fullgraph=True``), the batch dimension dynamic
    (one compilation serves every graph size; batch 1 is specialised), no Inductor CUDA graphs (the runner
    captures its own over static buffers). ``mode``: True/"default" or "max-autotune-no-cudagraphs"."""
    modes = ("default", "max-autotune-no-cudagraphs")
    mode = "default" if mode is True else mode
    if mode not in modes:
        raise ValueError(f"compile={mode!r}; choose False, True or one of {modes}")
    return torch.compile(fn, fullgraph=True, dynamic=True, mode=mode)


__all__ = ["DEFAULT_GRAPH_SIZES", "VERIFY_ATTENTION", "ModelRunner", "check_verify_attention", "compile_decode",
           "fuse_gate_up", "fuse_qkv", "kv_bytes_per_block", "num_blocks_for_budget", "share_rope_tables"]
