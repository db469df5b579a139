# A random stream per tensor-parallel rank, for dropout on sharded activations (Megatron's RNG tracker).
"""Dropout under tensor parallelism needs two kinds of randomness (arXiv 1909.08053 §3; Megatron-LM's
``CudaRNGStatesTracker``):

* on *replicated* activations (the all-reduced output of a row-parallel layer) every tp rank must draw the
  same mask, or the copies drift apart: the default generator, seeded alike on every rank, gives that;
* on *sharded* activations (attention probabilities of a rank's own heads; with sequence parallelism,
  its slice of the sequence) each rank must draw its own mask, as one process would for those
  heads or tokens: :class:`ShardedRNG` is that stream, seeded ``seed + 2718 + tp_rank``.

:meth:`ShardedRNG.fork` swaps the stream in for the default generator of a device and swaps it back,
keeping where it stopped; the default stream is left exactly as it was. Activation recomputation must
replay the same masks: :func:`pipeloom.parallel.apply.apply_recompute` snapshots every stream of a
recomputed block when its forward runs and restores them around the recomputation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

SEED_OFFSET = 2718  # Megatron-LM's model-parallel seed offset
_STREAMS: list[weakref.ref] = []  # every ShardedRNG made in this process, in order (for checkpoints)


class ShardedRNG:
    """The random stream of one tensor-parallel rank for dropout on sharded activations."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.states: dict[str, torch.Tensor] = {}  # device ("cpu", "cuda:0", ...) -> generator state
        _STREAMS.append(weakref.ref(self))

    @classmethod
    def for_rank(cls, tp_rank: int, base_seed: int | None = None) -> ShardedRNG:
        """``base_seed`` (default ``torch.initial_seed()``, the same on ranks seeded alike) + 2718 + tp_rank."""
        base = torch.initial_seed() if base_seed is None else base_seed
        return cls(base + SEED_OFFSET + tp_rank)

    @contextlib.contextmanager
    def fork(self, device: torch.device | str = "cpu") -> Iterator[None]:
        """Within this block the default generator of ``device`` draws from this stream."""
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            key, saved = f"cuda:{index}", torch.cuda.get_rng_state(index)
            if key not in self.states:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(self.seed)
                self.states[key] = torch.cuda.get_rng_state(index)
            torch.cuda.set_rng_state(self.states[key], index)
            try:
                yield
            finally:
                self.states[key] = torch.cuda.get_rng_state(index)
                torch.cuda.set_rng_state(saved, index)
        else:
            saved = torch.get_rng_state()
            if "cpu" not in self.states:
                self.states["cpu"] = torch.Generator().manual_seed(self.seed).get_state()
            torch.set_rng_state(self.states["cpu"])
            try:
                yield
            finally:
                self.states["cpu"] = torch.get_rng_state()
                torch.set_rng_state(saved)

    def get_state(self) -> dict[str, torch.Tensor]:
        return {key: state.clone() for key, state in self.states.items()}

    def set_state(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {key: state.clone() for key, state in states.items()}


def stream_states() -> list[dict]:
    """The states of this process's live streams, oldest first (what a checkpoint saves with the default
    generator's state, so that a resumed run draws the same dropout masks)."""
    return [{"seed": rng.seed, "states": rng.get_state()} for rng in _live()]


def set_stream_states(saved: list[dict]) -> bool:
    """Restore :func:`stream_states` into the live streams; False (nothing changed) when they do not match
    (another layout or model: different streams)."""
    live = _live()
    if len(live) != len(saved) or any(rng.seed != s["seed"] for rng, s in zip(live, saved)):
        return False
    for rng, s in zip(live, saved):
        rng.set_state(s["states"])
    return True


def _live() -> list[ShardedRNG]:
    _STREAMS[:] = [ref for ref in _STREAMS if ref() is not None]
    return [ref() for ref in _STREAMS]


def fork_if(rng: ShardedRNG | None, device, active: bool = True):
    """``rng.fork(device)`` when there is a stream and dropout is active, else a no-op context."""
    return rng.fork(device) if rng is not None and active else contextlib.nullcontext()


class ShardedDropout(torch.nn.Dropout):
    """``nn.Dropout`` drawing its mask from a :class:`ShardedRNG` (activations sharded across tp ranks)."""

    def __init__(self, p: float, rng: ShardedRNG):
        super().__init__(p)
        self.sharded_rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fork_if(self.sharded_rng, x.device, self.training and self.p > 0):
            return super().forward(x)
