# Who talks to whom in a parallel inference engine, and the messages: one process group per link, deadlines.
"""The ranks of a ``pp x tp`` engine (one :class:`~pipeloom.parallel.mesh.Mesh`, dp = 1) talk over one-way links:

* forward links ``(stage s, tp t) -> (stage s+1, tp t)``: a microbatch's description, then its hidden states;
* fan-out links ``driver -> (stage 0, tp t)``: the first stage's other tensor-parallel ranks get the microbatch;
* the result link ``(last stage, tp 0) -> driver``: the sampled tokens come back.

Each link is its own two-rank process group (as the training pipeline's per-direction links, so on NCCL nothing a
rank receives can hold up what it sends), created on every rank in one order. Descriptions are pickled Python
objects (an int64 length, then the bytes) on a gloo group, so every rank reads them on the host without a device
sync; hidden states go on the mesh's backend (gloo on CPU, NCCL on GPUs: the same gloo group carries both on CPU).

Every host-side wait has a deadline (``timeout``); a wait that passes it, or whose peer closed its links (a
crash closes them too), raises :class:`LinkError` naming this rank, the action and the peer. On gloo a timed-out
wait closes the connection, so a deadline is final: the engine is then failed (:mod:`.health`). Idle periods are
therefore not spent in a p2p wait but on the rendezvous store (see :mod:`.health`).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class LinkError(RuntimeError):
    """A transfer between engine ranks failed or passed its deadline; ``peer`` is the global rank on the other end."""

    def __init__(self, message: str, peer: int | None = None, timed_out: bool = False):
        super().__init__(message)
        self.peer, self.timed_out = peer, timed_out


@dataclass(frozen=True)
class Topology:
    """Pure arithmetic over the mesh layout ``rank = pp_rank * tp + tp_rank`` (dp = 1): who sends to whom."""

    pp: int
    tp: int
    rank: int  # this process's global rank

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.pp * self.tp:
            raise ValueError(f"rank={self.rank} is outside a pp={self.pp} x tp={self.tp} engine")

    def rank_of(self, stage: int, tp_rank: int = 0) -> int:
        return stage * self.tp + tp_rank

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def driver(self) -> int:
        return 0

    @property
    def is_driver(self) -> bool:
        return self.rank == self.driver

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def samples(self) -> bool:
        """This rank samples the tokens (the last stage's tensor-parallel rank 0)."""
        return self.is_last and self.tp_rank == 0

    @property
    def sampler_rank(self) -> int:
        return self.rank_of(self.pp - 1, 0)

    @property
    def upstream(self) -> int | None:
        """The rank this one takes microbatches from (None for the driver)."""
        if self.is_driver:
            return None
        return self.driver if self.stage == 0 else self.rank_of(self.stage - 1, self.tp_rank)

    @property
    def downstream(self) -> list[int]:
        """The ranks this one passes each microbatch to: the next stage, and for the driver its tp peers."""
        out = [self.rank_of(self.stage + 1, self.tp_rank)] if not self.is_last else []
        if self.is_driver:
            out += [self.rank_of(0, t) for t in range(1, self.tp)]
        return out

    def links(self) -> list[tuple[int, int, str]]:
        """Every link of the engine ``(src, dst, kind)`` in one order (kind: forward, fanout, result)."""
        out = [(self.rank_of(s, t), self.rank_of(s + 1, t), "forward") for t in range(self.tp)
               for s in range(self.pp - 1)]
        out += [(self.driver, self.rank_of(0, t), "fanout") for t in range(1, self.tp)]
        if self.pp > 1:
            out.append((self.sampler_rank, self.driver, "result"))
        return out

    def describe(self, rank: int) -> str:
        return f"global rank {rank} (stage {rank // self.tp}, tp rank {rank % self.tp})"


class Links:
    """This rank's ends of the engine's links (every rank builds all groups, in :meth:`Topology.links` order)."""

    def __init__(self, topology: Topology, device: torch.device, timeout: float):
        self.topology, self.device, self.timeout = topology, device, float(timeout)
        deadline = timedelta(seconds=self.timeout)
        cuda = device.type == "cuda"
        self.meta: dict[tuple[int, int], object] = {}  # (src, dst) -> gloo group
        self.data: dict[tuple[int, int], object] = {}  # (src, dst) -> group for hidden states
        me = topology.rank
        for src, dst, kind in topology.links():  # collective: every rank creates every group, in this order
            meta = dist.new_group(sorted((src, dst)), backend="gloo", timeout=deadline)
            data = meta
            if cuda and kind == "forward":
                data = dist.new_group(sorted((src, dst)), backend="nccl", timeout=deadline)
            if me in (src, dst):
                self.meta[(src, dst)], self.data[(src, dst)] = meta, data
        self._pending: list[tuple[object, tuple]] = []  # sends in flight and the buffers they read
        if cuda:  # NCCL builds a communicator at its first use and blocks both ends: do it now, link by link
            for (src, dst), group in sorted(self.data.items()):
                if group is not self.meta[(src, dst)]:
                    probe = torch.zeros(1, device=device)
                    (dist.send if me == src else dist.recv)(probe, dst if me == src else src, group=group)

    # ------------------------------------------------------------------ sending

    def encode(self, obj) -> tuple[torch.Tensor, torch.Tensor]:
        """(length (1,) int64, payload (n,) uint8) of a pickled object."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return torch.tensor([payload.numel()], dtype=torch.int64), payload

    def send_raw(self, dst: int, message: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Send an encoded message (as :meth:`encode` or :meth:`recv` returned it) to ``dst``."""
        group = self._group(self.meta, (self.topology.rank, dst), "send to")
        for tensor in message:
            self._pending.append((dist.isend(tensor, dst, group=group), message))
        self.prune()

    def send(self, dst: int, obj) -> tuple[torch.Tensor, torch.Tensor]:
        message = self.encode(obj)
        self.send_raw(dst, message)
        return message

    def send_tensor(self, dst: int, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        group = self._group(self.data, (self.topology.rank, dst), "send to")
        self._pending.append((dist.isend(tensor, dst, group=group), (tensor,)))
        self.prune()

    def prune(self) -> None:
        """Forget completed sends (their buffers can be freed)."""
        self._pending = [(w, b) for w, b in self._pending if not w.is_completed()]

    def drain(self, action: str = "drain") -> None:
        """Wait for every send in flight."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            self._wait(work, None, action, timed=True)

    # ------------------------------------------------------------------ receiving

    def recv(self, src: int, action: str) -> tuple[object, tuple[torch.Tensor, torch.Tensor]]:
        """(the object, its encoded message for forwarding) of the next message from ``src``; ``action`` names what
        this rank was waiting for in an error."""
        group = self._group(self.meta, (src, self.topology.rank), "receive from")
        length = torch.empty(1, dtype=torch.int64)
        self._wait(dist.irecv(length, src, group=group), src, action, timed=True)
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._wait(dist.irecv(payload, src, group=group), src, action, timed=True)
        return pickle.loads(payload.numpy().tobytes()), (length, payload)

    def recv_tensor(self, src: int, shape: tuple[int, ...], dtype: torch.dtype, action: str) -> torch.Tensor:
        group = self._group(self.data, (src, self.topology.rank), "receive from")
        out = torch.empty(shape, dtype=dtype, device=self.device)
        nccl = group is not self.meta[(src, self.topology.rank)]
        # NCCL: the wait orders this stream after the transfer (the host goes on); gloo: a host wait with a deadline
        self._wait(dist.irecv(out, src, group=group), src, action, timed=not nccl)
        return out

    # ------------------------------------------------------------------ internals

    def _group(self, groups: dict, link: tuple[int, int], what: str):
        group = groups.get(link)
        if group is None:
            raise LinkError(f"{self.topology.describe(self.topology.rank)} has no link {link[0]} -> {link[1]} to "
                            f"{what}; links here: {sorted(groups)}")
        return group

    def _wait(self, work, peer: int | None, action: str, timed: bool) -> None:
        try:
            ok = work.wait(timedelta(seconds=self.timeout)) if timed else work.wait()
        except RuntimeError as error:  # gloo: the deadline passed, or the peer closed the connection (crash, abort)
            text = str(error)
            timed_out = "timed out" in text.lower() or "timeout" in text.lower()
            who = "a peer" if peer is None else self.topology.describe(peer)
            why = (f"waited more than {self.timeout:g} s" if timed_out
                   else f"lost the connection ({text.splitlines()[0][:160]})")
            raise LinkError(f"{self.topology.describe(self.topology.rank)} {why} in {action}, waiting for {who}",
                            peer, timed_out) from error
        if ok is False:
            raise LinkError(f"{self.topology.describe(self.topology.rank)} waited more than {self.timeout:g} s in "
                            f"{action}", peer, True)

    def close(self) -> None:
        """Drop this rank's links: their connections close, so peers blocked on them fail at once (no hang)."""
        self._pending = []
        for group in {id(g): g for g in (*self.meta.values(), *self.data.values())}.values():
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError):  # already gone (the world was torn down first)
                pass
        self.meta, self.data = {}, {}
