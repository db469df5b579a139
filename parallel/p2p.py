# Point-to-point transfers between pipeline ranks: shape headers, batched non-blocking p2p, timeouts.
"""The communication layer of the pipeline runtime.

A forward activation travels as a small int64 *header* (number of tensors, then dtype, requires-grad
flag and shape of each) followed by the tensors, so the receiver needs no shape agreed in advance:
variable sequence lengths and an uneven last microbatch just work. A gradient travelling back needs no
header: its shapes are those of the activation the receiver sent forward.

:meth:`P2P.exchange` posts a run of consecutive transfers of a plan (for example 1F1B's "send this
activation, receive that gradient") as one ``torch.distributed.batch_isend_irecv`` call, waits only for
the receives, and keeps the sends in flight until :meth:`P2P.drain`. Every wait has a deadline: a rank
that waits longer than ``timeout`` raises :class:`PipelineTimeout` naming its rank, the action and the
peer it waits for, instead of hanging.

Messages between two ranks are matched by tag on gloo. NCCL ignores tags and matches in posting order,
so there the transfers are *ordered* (see :class:`P2P`): a rank receives a peer's messages in the order
the peer sends them, keeping any that arrive before their own receive action (ZB-V on 4 ranks sends in
an order its receiver does not follow).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_LEN = 64  # int64 slots; holds e.g. 8 tensors of up to 5 dims
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


class PipelineCommError(RuntimeError):
    """A transfer between pipeline ranks failed; the message names the rank, the action and the peer."""


class PipelineTimeout(PipelineCommError, TimeoutError):
    """A rank waited longer than the runtime's timeout for a peer."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and requires-grad flag of one transferred tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = False


def encode_header(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """(HEADER_LEN,) int64: [n, then per tensor: dtype code, requires_grad, ndim, *shape]."""
    values = [len(tensors)]
    for t in tensors:
        if t.dtype not in _CODE:
            raise TypeError(f"cannot send a {t.dtype} tensor between stages; supported: {_DTYPES}")
        values += [_CODE[t.dtype], int(t.requires_grad), t.dim(), *t.shape]
    if len(values) > HEADER_LEN:
        raise ValueError(f"a stage output of {len(tensors)} tensors with shapes {[tuple(t.shape) for t in tensors]} "
                         f"does not fit the {HEADER_LEN}-slot header; return fewer or flatter tensors")
    values += [0] * (HEADER_LEN - len(values))
    return torch.tensor(values, dtype=torch.int64, device=device)


def decode_header(header: torch.Tensor) -> list[TensorSpec]:
    values = header.tolist()
    specs, i = [], 1
    for _ in range(values[0]):
        code, requires_grad, ndim = values[i:i + 3]
        specs.append(TensorSpec(tuple(values[i + 3:i + 3 + ndim]), _DTYPES[code], bool(requires_grad)))
        i += 3 + ndim
    return specs


@dataclass
class Transfer:
    """One communication action: send ``tensors`` to, or receive from, pipeline rank ``peer``.

    A receive with ``specs=None`` first receives a header; after :meth:`P2P.exchange` its ``tensors``
    hold the received values and ``specs`` their description. ``key`` names a plan message
    ``(forward, sending stage, microbatch)``; ``done`` is the completion time.
    """

    action: object  # the plan Action, for messages and the timeline
    send: bool
    peer: int
    tag: int
    tensors: list = field(default_factory=list)
    specs: list | None = None
    header: bool = False
    key: tuple | None = None
    done: float = 0.0


class P2P:
    """Batched, non-blocking, deadline-checked point-to-point transfers inside one pipeline group.

    ``ranks[i]`` is the global rank of pipeline rank ``i``; ``rank`` is this process's pipeline rank.
    Receives from one peer are always posted in the order that peer sends (a header, then its payload,
    then the next message), so a backend that matches messages by order (NCCL) pairs them right. With
    ``inbound`` (peer -> the message keys it sends here, in its order) the transfers are *ordered*: all
    tags are 0 and a receive first takes any message the peer sent before it, keeping it until its own
    receive action comes (``spec_of(key)`` gives the shapes of gradient messages). Without it, tags tell
    messages apart (gloo) and receives are posted as the plan lists them.
    """

    def __init__(self, group, ranks: Sequence[int], rank: int, device: torch.device, timeout: float,
                 inbound: dict[int, list] | None = None, spec_of=None):
        self.group = group
        self.ranks = list(ranks)
        self.rank = rank
        self.device = device
        self.timeout = float(timeout)
        self.pending: list[tuple[object, Transfer]] = []  # sends in flight (work, transfer)
        self.inbound = inbound
        self.spec_of = spec_of
        self.next_index = dict.fromkeys(inbound or {}, 0)  # per peer: messages before it were taken
        self.kept: dict[tuple, Transfer] = {}  # received ahead of their own receive action

    def reset(self) -> None:
        """Start of a step: the peers' message sequences start again."""
        if self.kept:
            raise PipelineCommError(f"pipeline rank {self.rank} received messages {sorted(self.kept)} that no "
                                    f"receive action took")
        self.next_index = dict.fromkeys(self.inbound or {}, 0)

    def _op(self, fn, tensor: torch.Tensor, t: Transfer) -> dist.P2POp:
        return dist.P2POp(fn, tensor, self.ranks[t.peer], group=self.group, tag=0 if self.inbound else t.tag)

    def _queue(self, receives: list[Transfer]) -> dict[int, list[Transfer]]:
        """Per peer, the receives to post in that peer's send order (with messages it sent before)."""
        queues: dict[int, list[Transfer]] = {}
        for t in receives:
            if self.inbound is None or t.key is None:
                queues.setdefault(t.peer, []).append(t)
                continue
            order, first = self.inbound[t.peer], self.next_index[t.peer]
            if t.key in self.kept or t.key in order[:first]:
                continue  # taken earlier (or earlier in this exchange): filled from self.kept below
            target = order.index(t.key, first)
            for key in order[first:target]:  # sent before t: take it now, keep it for its own action
                early = Transfer(t.action, False, t.peer, 0, header=key[0], key=key,
                                 specs=None if key[0] else self.spec_of(key))
                self.kept[key] = early
                queues.setdefault(t.peer, []).append(early)
            queues.setdefault(t.peer, []).append(t)
            self.next_index[t.peer] = target + 1
        return queues

    def exchange(self, transfers: list[Transfer]) -> None:
        """Post the sends and the receives together, wait for the receives, leave the sends in flight."""
        ops: list[dist.P2POp] = []
        owners: list[tuple[Transfer, torch.Tensor | None]] = []  # (transfer, header buffer or None)
        for t in transfers:
            if t.send:
                header = encode_header(t.tensors, self.device) if t.header else None  # before detach
                t.tensors = [x.detach().contiguous() for x in t.tensors]
                for x in ([header] if header is not None else []) + t.tensors:
                    ops.append(self._op(dist.isend, x, t))
                    owners.append((t, None))
        queues = self._queue([t for t in transfers if not t.send])
        while True:
            for q in queues.values():  # per peer: known-shape messages, up to the next header
                while q:
                    t = q[0]
                    if t.specs is None:
                        buffer = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                        ops.append(self._op(dist.irecv, buffer, t))
                        owners.append((t, buffer))
                        break
                    t.tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in t.specs]
                    for x in t.tensors:
                        ops.append(self._op(dist.irecv, x, t))
                        owners.append((t, None))
                    q.pop(0)
            if not ops:
                break
            works = dist.batch_isend_irecv(ops)
            now = time.perf_counter()
            for work, (t, header) in zip(works, owners):
                if t.send:
                    self.pending.append((work, t))
                    t.done = now
                    continue
                self.wait(work, t)
                t.done = time.perf_counter()
                if header is not None:  # its payload goes out in the next round
                    t.specs = decode_header(header)
            ops, owners = [], []
        for t in transfers:
            if not t.send and t.key is not None and t.key in self.kept and self.kept[t.key] is not t:
                early = self.kept.pop(t.key)
                t.tensors, t.specs, t.done = early.tensors, early.specs, time.perf_counter()
            elif not t.send and t.key is not None:
                self.kept.pop(t.key, None)

    def wait(self, work, t: Transfer) -> None:
        """Wait for ``work`` of transfer ``t``; raise a named error on timeout or failure."""
        start = time.perf_counter()
        try:
            ok = work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as error:  # gloo raises on timeout or a dead peer
            raise self._error(t, time.perf_counter() - start, error) from error
        if ok is False:
            raise self._error(t, time.perf_counter() - start, None)

    def _error(self, t: Transfer, waited: float, cause) -> PipelineCommError:
        direction = "to send to" if t.send else "to receive from"
        timed_out = cause is None or waited >= 0.9 * self.timeout or "timed out" in str(cause).lower()
        cls = PipelineTimeout if timed_out else PipelineCommError
        what = f"timed out after {waited:.1f} s (timeout={self.timeout:g} s)" if timed_out else f"failed: {cause}"
        return cls(f"pipeline rank {self.rank} (global rank {self.ranks[self.rank]}) {what} in action {t.action}, "
                   f"waiting {direction} pipeline rank {t.peer} (global rank {self.ranks[t.peer]}); that peer may "
                   f"have crashed, be stuck, or be running a different plan")

    def prune(self) -> None:
        """Forget sends that have completed (their buffers can be freed)."""
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    def drain(self) -> None:
        """Wait for every send still in flight."""
        pending, self.pending = self.pending, []
        for work, t in pending:
            self.wait(work, t)


def inbound_messages(plan, rank: int) -> dict[int, list[tuple]]:
    """Per peer, the keys ``(forward, sending stage, microbatch)`` of the messages it sends to ``rank``, in
    the order it sends them (what an order-matching backend delivers)."""
    from pipeloom.schedules.ir import Kind

    inbound: dict[int, list[tuple]] = {}
    for peer, actions in enumerate(plan.ranks):
        for a in actions:
            if a.kind is Kind.SEND_F and plan.rank_of(a.stage + 1) == rank:
                inbound.setdefault(peer, []).append((True, a.stage, a.microbatch))
            elif a.kind is Kind.SEND_B and plan.rank_of(a.stage - 1) == rank:
                inbound.setdefault(peer, []).append((False, a.stage, a.microbatch))
    return inbound
