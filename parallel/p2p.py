# Point-to-point transfers between pipeline ranks: cached shape headers, batched non-blocking p2p, timeouts.
"""The communication layer of the pipeline runtime.

A forward activation may travel behind a small int64 *header* (number of tensors, then dtype,
requires-grad flag and shape of each), so the receiver needs no shape agreed in advance. Waiting for a
header and then for the payload costs a second wait per activation, so by default (``shapes="cached"``
in :class:`~pipeloom.parallel.runtime.PipelineRuntime`) a header is sent only the first time a message's
*shape key* appears: the sending stage and the microbatch's input signature (shapes and dtypes of its
inputs and extras, and the autocast state), which both ranks compute from the batch they are given. Both
ends keep the specs of every key seen (the receiver from the header, the sender from what it sent);
later messages with that key go without a header and the receiver posts the payload receive at once.
Which message carries the header is decided by both ranks from state they share: the first message with
a new key in the order the receiver takes them. A new sequence length or an uneven last microbatch is a
new key (one header, once). The sender checks every message against its key's specs and raises
:class:`PipelineCommError` naming the stage, microbatch, both shapes and ``shapes="per-message"`` (a
header on every forward message, for outputs whose shape depends on the data) when they differ. A
gradient travelling back never needs a header: its shapes are those of the activation the receiver sent
forward.

:meth:`P2P.exchange` posts a run of consecutive transfers of a plan (for example 1F1B's "send this
activation, receive that gradient") as one ``torch.distributed.batch_isend_irecv`` call, waits only for
the receives, and keeps the sends in flight until :meth:`P2P.drain`. Every wait has a deadline: a rank
that waits longer than ``timeout`` raises :class:`PipelineTimeout` naming its rank, the action and the
peer it waits for, instead of hanging. :attr:`P2P.counts` counts the step's batched calls, operations,
headers and waits.

Messages between two ranks are matched by tag on gloo. NCCL ignores tags and matches in posting order,
so there the transfers are *ordered* (see :class:`P2P`): a rank receives a peer's messages in the order
the peer sends them, keeping any that arrive before their own receive action (ZB-V on 4 ranks sends in
an order its receiver does not follow); the header then goes with the first new-key message in the
sender's order, which is the order this receiver takes them in.
"""

from __future__ import annotations

import time
from collections import Counter
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

    A send with ``header`` sends a header before the tensors. A receive with ``header`` and ``specs=None``
    first receives a header; one without either takes the specs cached for ``shape_key`` (learnt from an
    earlier header). After :meth:`P2P.exchange` its ``tensors`` hold the received values and ``specs``
    their description. ``key`` names a plan message ``(forward, sending stage, microbatch)``;
    ``shape_key`` (forward messages in cached mode) ``(sending stage, input signature)``; ``done`` is the
    completion time.
    """

    action: object  # the plan Action, for messages and the timeline
    send: bool
    peer: int
    tag: int
    tensors: list = field(default_factory=list)
    specs: list | None = None
    header: bool = False
    key: tuple | None = None
    shape_key: tuple | None = None
    done: float = 0.0


class P2P:
    """Batched, non-blocking, deadline-checked point-to-point transfers inside one pipeline group.

    ``ranks[i]`` is the global rank of pipeline rank ``i``; ``rank`` is this process's pipeline rank.
    Receives from one peer are always posted in the order that peer's messages are taken (a header, then
    its payload, then the next message), so a backend that matches messages by order (NCCL) pairs them
    right. With ``inbound`` (peer -> the message keys it sends here, in its order) the transfers are
    *ordered*: all tags are 0 and a receive first takes any message the peer sent before it, keeping it
    until its own receive action comes (``spec_of(key)`` gives the shapes of gradient messages). Without
    it, tags tell messages apart (gloo) and receives are posted as the plan lists them.

    ``shape_specs`` maps a forward message's shape key to its specs (the module docstring explains the
    cache); :meth:`reset` takes, per forward message of the step, its shape key and whether it carries a
    header. ``counts`` (reset each step): ``calls`` (batched calls), ``ops`` (isend/irecv posted),
    ``headers`` (header ops, sent or received), ``waits`` (all waits, drained sends included) and
    ``forward_waits`` (waits for receiving forward messages, headers included).
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
        self.shape_specs: dict[tuple, list[TensorSpec]] = {}  # shape key -> specs, kept across steps
        self.forward: dict[tuple, tuple] = {}  # this step: message key -> (shape key or None, header?)
        self.counts: Counter = Counter()

    def reset(self, forward: dict[tuple, tuple] | None = None) -> None:
        """Start of a step: the peers' message sequences start again.

        ``forward``: per forward message key ``(True, sending stage, microbatch)`` this rank sends or
        receives, ``(shape key, header?)``; a message not listed carries a header and is not cached.
        """
        if self.kept:
            raise PipelineCommError(f"pipeline rank {self.rank} received messages {sorted(self.kept)} that no "
                                    f"receive action took")
        self.next_index = dict.fromkeys(self.inbound or {}, 0)
        self.forward = dict(forward or {})
        self.counts = Counter()

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
                shape_key, header = self.forward.get(key, (None, True)) if key[0] else (None, False)
                early = Transfer(t.action, False, t.peer, 0, header=header, key=key, shape_key=shape_key,
                                 specs=None if key[0] else self.spec_of(key))
                self.kept[key] = early
                queues.setdefault(t.peer, []).append(early)
            queues.setdefault(t.peer, []).append(t)
            self.next_index[t.peer] = target + 1
        return queues

    def _check_cached(self, t: Transfer) -> None:
        """A send without a per-message header: its tensors must match its shape key's specs."""
        actual = [TensorSpec(tuple(x.shape), x.dtype, x.requires_grad) for x in t.tensors]
        cached = self.shape_specs.setdefault(t.shape_key, actual)
        if actual != cached:
            def show(specs):
                return [(s.shape, str(s.dtype).replace("torch.", ""), s.requires_grad) for s in specs]

            a = t.action
            raise PipelineCommError(
                f"pipeline rank {self.rank}: stage {a.stage} microbatch {a.microbatch} sends outputs "
                f"(shape, dtype, requires_grad) {show(actual)}, but an earlier microbatch with the same input "
                f"shapes sent {show(cached)}; with cached shapes (the default) a stage's output shapes must "
                f"follow from its microbatch's input shapes. If they depend on the data, build the runtime with "
                f'PipelineRuntime(..., shapes="per-message") (a shape header on every activation)')

    def _cached_specs(self, t: Transfer) -> list[TensorSpec]:
        specs = self.shape_specs.get(t.shape_key)
        if specs is None:
            raise PipelineCommError(f"pipeline rank {self.rank} has no shapes for message {t.key} in action "
                                    f"{t.action} from pipeline rank {t.peer} (shape key {t.shape_key}); every rank "
                                    f'must be given the same batch, or use PipelineRuntime(..., shapes="per-message")')
        return specs

    def exchange(self, transfers: list[Transfer]) -> None:
        """Post the sends and the receives together, wait for the receives, leave the sends in flight."""
        ops: list[dist.P2POp] = []
        owners: list[tuple[Transfer, torch.Tensor | None]] = []  # (transfer, header buffer or None)
        for t in transfers:
            if t.send:
                if t.shape_key is not None:
                    self._check_cached(t)
                header = encode_header(t.tensors, self.device) if t.header else None  # before detach
                t.tensors = [x.detach().contiguous() for x in t.tensors]
                self.counts["headers"] += header is not None
                for x in ([header] if header is not None else []) + t.tensors:
                    ops.append(self._op(dist.isend, x, t))
                    owners.append((t, None))
        queues = self._queue([t for t in transfers if not t.send])
        while True:
            for q in queues.values():  # per peer: known-shape messages, up to the next header
                while q:
                    t = q[0]
                    if t.specs is None and t.header:
                        buffer = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                        ops.append(self._op(dist.irecv, buffer, t))
                        owners.append((t, buffer))
                        self.counts["headers"] += 1
                        break
                    if t.specs is None:  # cached: its key's header came with an earlier message
                        t.specs = self._cached_specs(t)
                    t.tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in t.specs]
                    for x in t.tensors:
                        ops.append(self._op(dist.irecv, x, t))
                        owners.append((t, None))
                    q.pop(0)
            if not ops:
                break
            works = dist.batch_isend_irecv(ops)
            self.counts["calls"] += 1
            self.counts["ops"] += len(ops)
            now = time.perf_counter()
            for work, (t, header) in zip(works, owners):
                if t.send:
                    self.pending.append((work, t))
                    t.done = now
                    continue
                self.wait(work, t)
                self.counts["forward_waits"] += t.key is not None and t.key[0]
                t.done = time.perf_counter()
                if header is not None:  # its payload goes out in the next round
                    t.specs = decode_header(header)
                    if t.shape_key is not None:
                        self.shape_specs[t.shape_key] = t.specs
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
        self.counts["waits"] += 1
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
