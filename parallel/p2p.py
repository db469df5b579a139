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

Messages between two ranks are matched by tag on gloo; NCCL ignores tags and matches in posting order,
which :func:`message_order_mismatch` checks for a plan.
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
    hold the received values and ``specs`` their description. ``done`` is the completion time.
    """

    action: object  # the plan Action, for messages and the timeline
    send: bool
    peer: int
    tag: int
    tensors: list = field(default_factory=list)
    specs: list | None = None
    header: bool = False
    done: float = 0.0


class P2P:
    """Batched, non-blocking, deadline-checked point-to-point transfers inside one pipeline group.

    ``ranks[i]`` is the global rank of pipeline rank ``i``; ``rank`` is this process's pipeline rank.
    """

    def __init__(self, group, ranks: Sequence[int], rank: int, device: torch.device, timeout: float):
        self.group = group
        self.ranks = list(ranks)
        self.rank = rank
        self.device = device
        self.timeout = float(timeout)
        self.pending: list[tuple[object, Transfer]] = []  # sends in flight (work, transfer)

    def _op(self, fn, tensor: torch.Tensor, t: Transfer) -> dist.P2POp:
        return dist.P2POp(fn, tensor, self.ranks[t.peer], group=self.group, tag=t.tag)

    def exchange(self, transfers: list[Transfer]) -> None:
        """Post all ``transfers`` at once, wait for the receives, leave the sends in flight."""
        ops: list[dist.P2POp] = []
        owners: list[Transfer] = []
        headers: dict[int, torch.Tensor] = {}
        for t in transfers:
            if t.send:
                header = encode_header(t.tensors, self.device) if t.header else None  # before detach
                tensors = [x.detach().contiguous() for x in t.tensors]
                t.tensors = tensors
                if header is not None:
                    tensors = [header] + tensors
                for x in tensors:
                    ops.append(self._op(dist.isend, x, t))
                    owners.append(t)
            elif t.specs is None:
                headers[id(t)] = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                ops.append(self._op(dist.irecv, headers[id(t)], t))
                owners.append(t)
            else:
                t.tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in t.specs]
                for x in t.tensors:
                    ops.append(self._op(dist.irecv, x, t))
                    owners.append(t)
        works = dist.batch_isend_irecv(ops) if ops else []
        now = time.perf_counter()
        later: list[dist.P2POp] = []
        later_owners: list[Transfer] = []
        for work, t in zip(works, owners):
            if t.send:
                self.pending.append((work, t))
                t.done = now
                continue
            self.wait(work, t)
            t.done = time.perf_counter()
            if id(t) in headers:  # the header arrived: post the payload receives
                t.specs = decode_header(headers.pop(id(t)))
                t.tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in t.specs]
                later += [self._op(dist.irecv, x, t) for x in t.tensors]
                later_owners += [t] * len(t.tensors)
        for work, t in zip(dist.batch_isend_irecv(later) if later else [], later_owners):
            self.wait(work, t)
            t.done = time.perf_counter()

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


def message_order_mismatch(plan) -> str | None:
    """For NCCL (which matches p2p messages by order, not tag): a description of the first rank pair whose
    sends and receives come in different orders in ``plan``, or None when all pairs agree."""
    from pipeloom.schedules.ir import Kind

    def peer(a) -> int:
        target = a.stage + 1 if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1
        return plan.rank_of(target)

    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for rank, actions in enumerate(plan.ranks):
        for a in actions:  # a message is named by its direction, the sending stage and the microbatch
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                message = (a.kind is Kind.SEND_F, a.stage, a.microbatch)
                sent.setdefault((rank, peer(a)), []).append(message)
            elif a.kind in (Kind.RECV_F, Kind.RECV_B):
                sender = a.stage - 1 if a.kind is Kind.RECV_F else a.stage + 1
                message = (a.kind is Kind.RECV_F, sender, a.microbatch)
                received.setdefault((peer(a), rank), []).append(message)
    for pair in sorted(set(sent) | set(received)):
        if sent.get(pair) != received.get(pair):
            return f"rank {pair[0]} sends to rank {pair[1]} in an order its receives do not follow"
    return None
