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

Every stream has a name. The modules that draw from it hold it (``sharded_rng``), so no registry outlives
a model: :func:`find_streams` collects a model's streams by name, :func:`stream_states` is what a
checkpoint saves, and :func:`set_stream_states` restores them by name, raising :class:`StreamMismatch`
naming the stream when the saved and the live streams differ (another model or layout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch

SEED_OFFSET = 2718  # Megatron-LM's model-parallel seed offset
DEFAULT_NAME = "tensor-parallel-dropout"


class StreamMismatch(ValueError):
    """Saved dropout streams do not match the live ones; the message names the stream."""


class ShardedRNG:
    """The random stream (named ``name``) of one tensor-parallel rank for dropout on sharded activations."""

    def __init__(self, seed: int, name: str = DEFAULT_NAME):
        self.seed = int(seed)
        self.name = name
        self.states: dict[str, torch.Tensor] = {}  # device ("cpu", "cuda:0", ...) -> generator state

    @classmethod
    def for_rank(cls, tp_rank: int, base_seed: int | None = None, name: str = DEFAULT_NAME) -> ShardedRNG:
        """``base_seed`` (default ``torch.initial_seed()``, the same on ranks seeded alike) + 2718 + tp_rank."""
        base = torch.initial_seed() if base_seed is None else base_seed
        return cls(base + SEED_OFFSET + tp_rank, name)

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


def find_streams(modules: Iterable[torch.nn.Module]) -> dict[str, ShardedRNG]:
    """Every stream the ``modules`` draw from (``sharded_rng`` of any submodule), by name. Two different
    streams under one name raise :class:`StreamMismatch` (a checkpoint could not tell them apart)."""
    streams: dict[str, ShardedRNG] = {}
    for module in modules:
        for m in module.modules():
            rng = getattr(m, "sharded_rng", None)
            if rng is None:
                continue
            if streams.setdefault(rng.name, rng) is not rng:
                raise StreamMismatch(f"two different dropout streams are named {rng.name!r}; give each "
                                     "ShardedRNG of a model its own name")
    return streams


def stream_states(streams: Mapping[str, ShardedRNG]) -> dict[str, dict]:
    """``{name: {"seed", "states"}}`` of ``streams`` (what a checkpoint saves with the default generator's
    state, so that a resumed run draws the same dropout masks)."""
    return {name: {"seed": rng.seed, "states": rng.get_state()} for name, rng in sorted(streams.items())}


def set_stream_states(streams: Mapping[str, ShardedRNG], saved: Mapping[str, dict], where: str = "saved") -> None:
    """Restore :func:`stream_states` into ``streams`` by name. Raises :class:`StreamMismatch` naming the
    stream when one is missing on either side or was seeded differently (``where`` names the source)."""
    if not isinstance(saved, Mapping):  # an older checkpoint's list in creation order: one stream is unambiguous
        saved = ({next(iter(streams)): saved[0]} if len(saved) == 1 == len(streams)
                 else {f"#{i}": s for i, s in enumerate(saved)})
    for name in sorted(set(saved) | set(streams)):
        if name not in streams:
            raise StreamMismatch(f"dropout stream {name!r} is in the {where} states but not in this model "
                                 f"(its streams: {sorted(streams)}): another model or layout")
        if name not in saved:
            raise StreamMismatch(f"dropout stream {name!r} of this model is not in the {where} states (they hold "
                                 f"{sorted(saved)}): another model or layout")
        if streams[name].seed != saved[name]["seed"]:
            raise StreamMismatch(f"dropout stream {name!r} was seeded {saved[name]['seed']} in the {where} states, "
                                 f"{streams[name].seed} here: another seed or tensor-parallel rank")
    for name, rng in streams.items():
        rng.set_state(saved[name]["states"])


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
