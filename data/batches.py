# Deterministic batches from a token stream: a function of (seed, step), so resume at any step is exact.
"""The stream is cut into ``n = (N - 1) // T`` non-overlapping windows of ``T + 1`` ids (inputs and the
targets shifted by one). Each epoch visits every window once in an order drawn from
``np.random.default_rng([seed, epoch])``. Global sequence number ``i`` (step ``s`` holds
``s*B .. s*B+B-1``) is window ``perm[epoch = i // n][i % n]``: nothing is stateful, so the batch of any
step is computed directly - resuming at step k reads exactly what the uninterrupted run read.

The global batch of ``B`` sequences does not depend on the parallel layout: data-parallel rank ``r``
of ``dp`` takes rows ``r*B/dp .. (r+1)*B/dp - 1`` and cuts them into microbatches, so a run resumed
under another (pp, tp, dp) layout trains on the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from .stream import TokenStream


class TokenBatches:
    """Training batches of ``batch_size`` sequences of ``seq_len`` tokens from ``stream``."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int = 0):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.windows = (len(stream) - 1) // seq_len
        self._orders: dict[int, np.ndarray] = {}
        if self.windows < 1:
            raise ValueError(f"the token stream {stream.path} holds {len(stream)} tokens, fewer than one sequence "
                             f"of data.seq_len={seq_len} + 1; use a shorter seq_len or more data")

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
        return self._orders[epoch]

    def sequences(self, first: int, count: int) -> np.ndarray:
        """Global sequences ``first .. first+count-1`` as an int64 array (count, T + 1)."""
        T = self.seq_len
        out = np.empty((count, T + 1), dtype=np.int64)
        for j in range(count):
            epoch, pos = divmod(first + j, self.windows)
            w = int(self._order(epoch)[pos])
            out[j] = self.stream.tokens[w * T: w * T + T + 1]
        return out

    def global_batch(self, step: int) -> np.ndarray:
        """All ``batch_size`` sequences of ``step``: (B, T + 1) int64."""
        return self.sequences(step * self.batch_size, self.batch_size)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.windows

    def microbatches(self, step: int, dp_rank: int = 0, dp: int = 1, microbatches: int = 1
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This dp rank's share of ``step``, as ``microbatches`` pairs (inputs, targets), each (b, T) long."""
        per_rank, rem = divmod(self.batch_size, dp)
        if rem or per_rank % microbatches:
            raise ValueError(f"data.batch_size={self.batch_size} must be divisible by dp * microbatches = "
                             f"{dp} * {microbatches}")
        rows = self.sequences(step * self.batch_size + dp_rank * per_rank, per_rank)  # (B/dp, T+1)
        data = torch.from_numpy(rows)
        return [(mb[:, :-1], mb[:, 1:]) for mb in data.chunk(microbatches)]  # each (b, T), (b, T)


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int, count: int) -> list[torch.Tensor]:
    """``count`` fixed validation batches, each (batch_size, T + 1) long, spread evenly over the stream.

    The same every call (no randomness), so validation losses of different runs compare directly.
    """
    windows = (len(stream) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"the validation stream {stream.path} holds {len(stream)} tokens, fewer than one sequence "
                         f"of data.seq_len={seq_len} + 1")
    total = min(count * batch_size, windows)
    picks = np.linspace(0, windows - 1, total).astype(np.int64)
    rows = np.stack([np.asarray(stream.tokens[w * seq_len: w * seq_len + seq_len + 1], dtype=np.int64)
                     for w in picks])
    return list(torch.from_numpy(rows).split(batch_size))
