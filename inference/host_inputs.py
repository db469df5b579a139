# One iteration's batch inputs built on the host with numpy: incremental block tables, one staging copy per dtype.
"""The model runner's host side, vectorised so that a step costs little Python per sequence:

* :class:`BlockTables` mirrors the block manager's per-request block tables in one numpy array, one row per
  live sequence, updated by appending the blocks a sequence gained since the last step (a table is only
  rebuilt when the block manager replaced it: after a preemption);
* :func:`ragged_inputs` turns an iteration into the flat arrays of one ragged forward (token ids, positions,
  cache slots, query starts, sequence lengths, block tables, sampled rows) with numpy instead of per-token
  Python lists;
* :class:`Staging` packs arrays of one dtype into one host buffer (pinned on CUDA, two of them used in turn
  so a copy still in flight is never overwritten) and moves them to the device in ONE copy, handing back
  views of the device buffer.

The per-sequence Python left is reading each slice's request, first token and count, and its token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INDEX = np.int64  # ids, positions, slots (torch long on the device)
SMALL = np.int32  # query starts, lengths, block tables, kernel tiles (torch int32 on the device)


class BlockTables:
    """Host copy of each sequence's block table: ``array[row, :length]`` are its blocks, zeros after.

    Rows are assigned per request id on first sight and released by :meth:`forget` (the engine calls it when
    a sequence ends); rows left behind by callers that never forget are reclaimed when the array fills.
    """

    def __init__(self, max_blocks: int, rows: int = 64):
        self.max_blocks = max_blocks
        self.array = np.zeros((rows, max_blocks), dtype=SMALL)
        self._row: dict[str, int] = {}
        self._source: list[list[int] | None] = [None] * rows  # the block manager's list each row mirrors
        self._length = [0] * rows
        self._free = list(range(rows - 1, -1, -1))

    def rows(self, seq_ids: list[str], block_manager) -> np.ndarray:
        """Row indices (S,) of ``seq_ids``, each row brought up to date with ``block_manager``'s table."""
        if len(self._free) < len(seq_ids):
            self._make_room(len(seq_ids))
        tables, out = block_manager.tables, np.empty(len(seq_ids), dtype=np.intp)
        for i, sid in enumerate(seq_ids):
            table = tables.get(sid, ())
            row = self._row.get(sid)
            if row is None:
                row = self._row[sid] = self._free.pop()
                self._source[row], self._length[row] = None, 0
            have = self._length[row]
            if self._source[row] is not table:  # new, or replaced after a preemption: rewrite the row
                self.array[row, :have] = 0
                self._source[row], have = table, 0
            if len(table) != have:
                if len(table) < have:  # shrank in place (not done by BlockManager): rewrite
                    self.array[row, :have] = 0
                    have = 0
                self.array[row, have : len(table)] = table[have:]
                self._length[row] = len(table)
            out[i] = row
        return out

    def forget(self, seq_id: str) -> None:
        """Release the row of a sequence that ended (no-op for unknown ids)."""
        row = self._row.pop(seq_id, None)
        if row is not None:
            self._source[row] = None
            self._free.append(row)

    def _make_room(self, needed: int) -> None:
        rows = self.array.shape[0]
        if len(self._row) > 4 * max(needed, 64):  # rows nobody forgot: start over (rows re-sync on demand)
            self._row.clear()
            self._source = [None] * rows
            self._length = [0] * rows
            self._free = list(range(rows - 1, -1, -1))
            self.array[:] = 0
        if len(self._free) >= needed:
            return
        grow = max(rows, needed)
        self.array = np.concatenate([self.array, np.zeros((grow, self.max_blocks), dtype=SMALL)])
        self._source += [None] * grow
        self._length += [0] * grow
        self._free = list(range(rows + grow - 1, rows - 1, -1)) + self._free


@dataclass
class RaggedInputs:
    """One ragged forward's host arrays (S sequences, N new tokens, R sampled rows)."""

    ids: np.ndarray  # (N,) int64 token ids (0 where ``missing``)
    positions: np.ndarray  # (N,) int64
    slots: np.ndarray  # (N,) int64 cache slot of each new token
    query_start: np.ndarray  # (S + 1,) int32
    seq_lens: np.ndarray  # (S,) int32 tokens in the cache after the step
    tables: np.ndarray  # (S, W) int32 block tables, W = blocks of the longest sequence, zero padded
    rows: np.ndarray  # (R,) int64 logits rows: the last token of each slice that samples
    missing: list[tuple[int, str]]  # (row in ids, request id) of tokens sampled by a step still in flight


def slice_arrays(iteration) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(requests, first tokens (S,), token counts (S,), samples (S,) bool) of an iteration's slices."""
    slices = iteration.slices
    s = len(slices)
    requests = [sl.request for sl in slices]
    firsts = np.fromiter((sl.first_token for sl in slices), dtype=INDEX, count=s)
    counts = np.fromiter((sl.n_tokens for sl in slices), dtype=INDEX, count=s)
    samples = np.fromiter((sl.samples for sl in slices), dtype=bool, count=s)
    return requests, firsts, counts, samples


def decode_ids(requests: list, firsts: list[int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Token ``firsts[s]`` of each request (one per sequence) and the (row, request id) of those not known on
    the host yet: sampled by the iteration in flight (the engine's overlapped steps), their ids left 0."""
    ids = np.fromiter((t[f] if f < len(t) else -1 for t, f in zip((r.token_ids for r in requests), firsts)),
                      dtype=INDEX, count=len(firsts))  # -1: not known yet (token ids are >= 0)
    unknown = np.flatnonzero(ids < 0)
    if not len(unknown):
        return ids, []
    ids[unknown] = 0
    return ids, [(int(i), requests[i].id) for i in unknown]


def ragged_layout(firsts: np.ndarray, counts: np.ndarray, table: np.ndarray, rows: np.ndarray, block_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where the new tokens of a ragged batch go: sequence s appends ``counts[s]`` tokens after its ``firsts[s]``
    cached ones, its blocks are row ``rows[s]`` of ``table``. Returns (query starts (S + 1,) INDEX, positions (N,),
    cache slots (N,), sequence lengths after the step (S,), the sequences' block tables (S, W))."""
    starts = np.zeros(len(firsts) + 1, dtype=INDEX)
    np.cumsum(counts, out=starts[1:])
    if bool((counts == 1).all()):  # decodes (and one-token chunks): one token per sequence
        positions, seq_of_token = firsts, np.arange(len(firsts))
    else:
        seq_of_token = np.repeat(np.arange(len(firsts)), counts)  # (N,)
        positions = np.arange(int(starts[-1]), dtype=INDEX) - (starts[:-1] - firsts)[seq_of_token]
    seq_lens = firsts + counts
    width = max(1, int(-(-seq_lens.max() // block_size)))
    slots = table[rows[seq_of_token], positions // block_size].astype(INDEX) * block_size + positions % block_size
    return starts, positions, slots, seq_lens, table[rows, :width]


def ragged_inputs(iteration, block_manager, tables: BlockTables) -> RaggedInputs:
    """The :class:`RaggedInputs` of ``iteration`` (vectorised; equal to building them token by token)."""
    requests, firsts, counts, samples = slice_arrays(iteration)
    rows = tables.rows([r.id for r in requests], block_manager)  # (S,)
    starts, positions, slots, seq_lens, seq_tables = ragged_layout(firsts, counts, tables.array, rows,
                                                                   block_manager.block_size)
    n = int(starts[-1])
    if bool((counts == 1).all()):  # decodes (and one-token chunks): no per-token spans to concatenate
        ids, missing = decode_ids(requests, firsts.tolist())
    else:
        spans = [r.token_ids[f : f + c] for r, f, c in zip(requests, firsts.tolist(), counts.tolist())]
        # a span is one short when its last token is still being sampled (an overlapped step): left 0
        missing = [(int(starts[i + 1]) - 1, r.id) for i, (r, span, c) in enumerate(zip(requests, spans,
                                                                                      counts.tolist()))
                   if len(span) < c]
        ids = np.fromiter((t for span in spans for t in span), dtype=INDEX, count=n - len(missing))
        if missing:
            known = np.ones(n, dtype=bool)
            known[[row for row, _ in missing]] = False
            ids, given = np.zeros(n, dtype=INDEX), ids
            ids[known] = given
    return RaggedInputs(ids=ids, positions=positions, slots=slots, query_start=starts.astype(SMALL),
                        seq_lens=seq_lens.astype(SMALL), tables=seq_tables, rows=(starts[1:] - 1)[samples],
                        missing=missing)


def query_tiles_np(query_lens: np.ndarray, group: int, block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pipeloom.kernels.paged_attention.query_tiles` with numpy: (sequence, first token) per tile."""
    per_tile = max(block_m // group, 1)
    tiles = -(-query_lens // per_tile)  # (S,) tiles per sequence (0 for a sequence with no tokens)
    seqs = np.repeat(np.arange(len(query_lens), dtype=SMALL), tiles)
    first_tile = np.zeros(len(query_lens), dtype=INDEX)
    np.cumsum(tiles[:-1], out=first_tile[1:])
    firsts = (np.arange(int(tiles.sum()), dtype=INDEX) - np.repeat(first_tile, tiles)) * per_tile
    return seqs, firsts.astype(SMALL)


class Staging:
    """Packs host arrays of one dtype into one buffer and copies them to ``device`` at once.

    On CUDA the host buffers are pinned and the copy is asynchronous; two buffers alternate, and each waits on
    the event of its previous copy before it is refilled. On CPU the arrays become tensors without a copy.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self._host: list[torch.Tensor | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Device tensors holding ``arrays`` (each 1-D or 2-D; views of one device buffer on CUDA)."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=self.np_dtype)) for a in arrays]
        total = sum(a.size for a in arrays)
        turn, self._turn = self._turn, 1 - self._turn
        host = self._host[turn]
        if host is None or host.numel() < total:
            host = self._host[turn] = torch.empty(max(total, 1024) * 2, dtype=self.dtype, pin_memory=True)
        elif self._events[turn] is not None:
            self._events[turn].synchronize()  # its previous copy has left the buffer
        flat = host.numpy()
        at = 0
        for a in arrays:
            flat[at : at + a.size] = a.reshape(-1)
            at += a.size
        device_buffer = host[:total].to(self.device, non_blocking=True)
        event = self._events[turn] = self._events[turn] or torch.cuda.Event()
        event.record()
        out, at = [], 0
        for a in arrays:
            out.append(device_buffer[at : at + a.size].view(a.shape))
            at += a.size
        return out
