# Point-to-point transfers between pipeline ranks: cached shape headers, early receives, deadlines without spinning.
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
activation, receive that gradient"), waits only for the receives, and keeps the sends in flight until
:meth:`P2P.drain`. :meth:`P2P.prepost` posts receives *before* their action comes, as soon as their
shapes are known (the runtime posts those of the next run of transfers while it computes): the message
then lands while this rank works, and gloo's rendezvous (a send moves its data once the receive is
posted) costs no round trip on the critical path. On gloo each operation is posted directly on its
process group (``batch_isend_irecv`` would post them one by one too); on NCCL the operations of one
process group go out as one coalesced ``batch_isend_irecv``. :attr:`P2P.counts` counts the step's
calls, operations, headers, waits and timed waits.

Deadlines. A rank that waits longer than ``timeout`` must say which rank, action and peer it waited for,
but a wait with a timeout makes NCCL's host thread poll until the transfer is done (and turns an
asynchronous receive into a host sync). The runtime's own link groups are created with ``timeout`` as
the process group's timeout (:mod:`pipeloom.parallel.links`), so waits on them pass none: on gloo the
group's deadline raises inside the blocking wait and :meth:`P2P.wait` turns it into a
:class:`PipelineTimeout` naming rank, action and peer; on NCCL a wait only orders the compute stream
after the transfer, NCCL's watchdog enforces the group's deadline, and a :class:`HangWatch` thread
(sleeping, never spinning) names the oldest receive still open past ``timeout`` before the watchdog
tears the process down. Only a caller's own process group (``links="shared"``, gloo) keeps timed waits.

On a CPU pipeline whose ranks share one host the links are :class:`~pipeloom.parallel.shm_link.ShmLink`
ends instead of gloo groups (the runtime's default): they take the same ``send``/``recv`` calls and give works
with the same ``wait``/``is_completed``, a send completes as soon as its bytes are in the shared ring (no
rendezvous), and their waits end at the link's deadline like a gloo group's.

Messages between two ranks are matched by tag on gloo (and on shared-memory links). NCCL ignores tags and
matches in posting order, so there the transfers are *ordered* (see :class:`P2P`): a rank posts a peer's
messages in the order the peer sends them, keeping any that arrive before their own receive action (ZB-V
on 4 ranks sends in an order its receiver does not follow); the header then goes with the first new-key
message in the sender's order, which is the order this receiver takes them in. NCCL also does not buffer
sends, hence one process group per direction of each link (:mod:`pipeloom.parallel.links`);
:func:`check_rendezvous` replays the calls a run recorded (``P2P.log``) under NCCL's rules, so CPU tests
catch deadlocks.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import PipelineCommError, PipelineTimeout
from .links import HangWatch, check_rendezvous
from .shm_link import ShmLink

__all__ = ["P2P", "PipelineCommError", "PipelineTimeout", "TensorSpec", "Transfer", "check_rendezvous",
           "inbound_messages"]

HEADER_LEN = 64  # int64 slots; holds e.g. 8 tensors of up to 5 dims
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


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


def _specs_of(tensors) -> list[TensorSpec]:
    return [TensorSpec(tuple(x.shape), x.dtype, x.requires_grad) for x in tensors]


@dataclass(slots=True)
class Transfer:
    """One communication action: send ``tensors`` to, or receive from, pipeline rank ``peer``.

    A send with ``header`` sends a header before the tensors. A receive with ``header`` and ``specs=None``
    first receives a header; one without either takes the specs cached for ``shape_key`` (learnt from an
    earlier header). After :meth:`P2P.exchange` its ``tensors`` hold the received values and ``specs``
    their description. ``key`` names a plan message ``(forward, sending stage, microbatch)``;
    ``shape_key`` (forward messages in cached mode) ``(sending stage, input signature)``; ``done`` is the
    completion time. ``works`` and ``header_work`` are the posted receive's pending operations.
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
    works: list = field(default_factory=list)
    header_buffer: torch.Tensor | None = None
    header_work: object = None


class P2P:
    """Batched, non-blocking, deadline-checked point-to-point transfers inside one pipeline group.

    ``ranks[i]`` is the global rank of pipeline rank ``i``; ``rank`` is this process's pipeline rank.
    Receives from one peer are always posted in the order that peer's messages are taken (a header, then
    its payload, then the next message), so a backend that matches messages by order (NCCL) pairs them
    right. With ``inbound`` (peer -> the message keys it sends here, in its order) the transfers are
    *ordered*: all tags are 0 and a receive first posts any message the peer sends before it, keeping it
    until its own receive action comes (``spec_of(key)`` gives the shapes of gradient messages, None
    while they are not known). Without it, tags tell messages apart (gloo) and receives are posted as the
    plan lists them. ``links`` (``{(src, dst) pipeline ranks: group}``, :mod:`pipeloom.parallel.links`)
    carries each direction on its own group; without it every transfer goes on ``group``.

    ``timed_waits`` (default: only without ``links``) passes ``timeout`` to every wait; otherwise the
    groups' own timeout is the deadline. ``watch`` (default: on a GPU) starts a :class:`HangWatch`.
    ``shape_specs`` maps a forward message's shape key to its specs (the module docstring explains the
    cache); :meth:`reset` takes, per forward message of the step, its shape key and whether it carries a
    header. ``counts`` (reset each step): ``calls`` (one per process group per posting), ``ops``
    (isend/irecv posted), ``headers`` (header ops, sent or received), ``waits`` (all waits, drained sends
    included; on shared-memory links a send is done once its bytes are in the ring, so :meth:`prune` drops it
    and only sends still queued for room are waited), ``timed_waits`` (those given a timeout),
    ``forward_waits`` (waits for receiving forward messages, headers included) and ``early_receives``
    (receives posted before their own exchange).
    """

    def __init__(self, group, ranks: Sequence[int], rank: int, device: torch.device, timeout: float,
                 inbound: dict[int, list] | None = None, spec_of=None, links: dict | None = None,
                 timed_waits: bool | None = None, watch: bool | None = None):
        self.group = group
        self.links = links
        self.coalesce = dist.get_backend(group) != "gloo"  # NCCL: one coalesced call per group and posting
        self.timed_waits = links is None if timed_waits is None else bool(timed_waits)
        self.log: list | None = None  # set to [] to record calls and waits for check_rendezvous
        self._call_of: dict[int, int] = {}  # id(work) -> its call's index in the log
        self.ranks = list(ranks)
        self.rank = rank
        self.device = device
        self.timeout = float(timeout)
        self._wait_timeout = timedelta(seconds=self.timeout)
        self._group_rank: dict[tuple, int] = {}  # (id(group), global rank) -> rank in that group
        self.pending: list[tuple[object, Transfer]] = []  # sends in flight (work, transfer)
        self.inbound = inbound
        self._position = {peer: {key: i for i, key in enumerate(keys)} for peer, keys in (inbound or {}).items()}
        self.spec_of = spec_of
        self.next_index = dict.fromkeys(inbound or {}, 0)  # per peer: messages before it were posted
        self.blocked: dict[int, Transfer] = {}  # ordered: per peer, a message whose header came but not its payload
        self.open: dict[tuple, Transfer] = {}  # posted ahead of their own receive action, by message key
        self.shape_specs: dict[tuple, list[TensorSpec]] = {}  # shape key -> specs, kept across steps
        self.forward: dict[tuple, tuple] = {}  # this step: message key -> (shape key or None, header?)
        self.counts: Counter = Counter()
        self._waited: dict[int, object] = {}  # id(work) -> work, for works shared by several transfers
        self.watch = HangWatch(self) if (device.type != "cpu" if watch is None else watch) else None

    def reset(self, forward: dict[tuple, tuple] | None = None) -> None:
        """Start of a step: the peers' message sequences start again.

        ``forward``: per forward message key ``(True, sending stage, microbatch)`` this rank sends or
        receives, ``(shape key, header?)``; a message not listed carries a header and is not cached.
        """
        if self.open:
            raise PipelineCommError(f"pipeline rank {self.rank} received messages {sorted(self.open)} that no "
                                    f"receive action took")
        self.next_index = dict.fromkeys(self.inbound or {}, 0)
        self.blocked = {}
        self.forward = forward if forward is not None else {}
        self.counts = Counter()
        self._waited = {}

    # ----- posting ------------------------------------------------------------------------------------
    def _entry(self, send: bool, tensor: torch.Tensor, t: Transfer, header: bool) -> tuple:
        group = self.group
        if self.links is not None:
            link = (self.rank, t.peer) if send else (t.peer, self.rank)
            group = self.links.get(link)
            if group is None:
                raise PipelineCommError(f"pipeline rank {self.rank}: action {t.action} uses the link {link[0]} "
                                        f"-> {link[1]} (pipeline ranks), which was not set up; links: "
                                        f"{sorted(self.links)}")
        return (group, send, tensor, t, header)

    def _flush(self, batch: list) -> None:
        """Post ``batch`` (entries of :meth:`_entry`) as one call per process group, sends first; empty it."""
        if not batch:
            return
        calls: dict[int, list] = {}
        for entry in batch:
            calls.setdefault(id(entry[0]), []).append(entry)
        batch.clear()
        now = time.perf_counter()
        for entries in calls.values():
            works = self._post(entries)
            sent = set()
            for work, (_, send, _, t, header) in zip(works, entries):
                if send:
                    t.done = now
                    if id(work) not in sent:  # a coalesced call has one work for all its operations
                        sent.add(id(work))
                        self.pending.append((work, t))
                elif header:
                    t.header_work = work
                else:
                    t.works.append(work)
                if self.watch is not None and not send:
                    self.watch.opened(work, t)

    def _post(self, entries: list) -> list:
        """One call on one process group; returns a work per operation. NCCL coalesces the call into one
        work that completes when all its operations have; gloo gives one work per operation."""
        group = entries[0][0]
        tag_of = (lambda t: 0) if self.inbound is not None else (lambda t: t.tag)
        if self.coalesce:
            ops = [dist.P2POp(dist.isend if send else dist.irecv, x, self.ranks[t.peer], group=group, tag=tag_of(t))
                   for _, send, x, t, _ in entries]
            works = dist.batch_isend_irecv(ops)
            if len(works) == 1 and len(ops) > 1:
                works = works * len(ops)
        else:
            works = []
            for _, send, x, t, _ in entries:
                peer = self._group_rank.get((id(group), t.peer))
                if peer is None:  # a shared-memory link takes the global rank
                    peer = self._group_rank[(id(group), t.peer)] = self.ranks[t.peer] if isinstance(
                        group, ShmLink) else dist.get_group_rank(group, self.ranks[t.peer])
                x = torch.view_as_real(x) if x.is_complex() else x
                works.append(group.send([x], peer, tag_of(t)) if send else group.recv([x], peer, tag_of(t)))
        self.counts["calls"] += 1
        self.counts["ops"] += len(entries)
        if len(works) != len(entries):
            raise PipelineCommError(f"pipeline rank {self.rank}: {len(works)} works for {len(entries)} operations")
        if self.log is not None:
            call, me = len(self.log), self.ranks[self.rank]
            self.log.append(("post", call, (me, group.group_name), [
                (send, (group.group_name, me, self.ranks[t.peer]) if send else
                 (group.group_name, self.ranks[t.peer], me), tuple(x.shape), str(x.dtype))
                for _, send, x, t, _ in entries]))
            for work in works:
                self._call_of[id(work)] = call
        return works

    def _post_sends(self, t: Transfer, batch: list) -> None:
        if t.shape_key is not None:
            self._check_cached(t)
        if t.header:
            batch.append(self._entry(True, encode_header(t.tensors, self.device), t, True))  # before detach
            self.counts["headers"] += 1
        t.tensors = [x.detach().contiguous() for x in t.tensors]
        batch.extend(self._entry(True, x, t, False) for x in t.tensors)

    def _post_receive(self, t: Transfer, batch: list) -> None:
        """Post the header (specs unknown) or the payload (specs known) of receive ``t``."""
        if t.specs is None:
            t.header_buffer = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            batch.append(self._entry(False, t.header_buffer, t, True))
            self.counts["headers"] += 1
            return
        t.tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in t.specs]
        batch.extend(self._entry(False, x, t, False) for x in t.tensors)

    def _resolve_specs(self, t: Transfer) -> None:
        """Fill ``t.specs`` from the shape cache where no header comes with the message."""
        if t.specs is None and not t.header and t.shape_key is not None:
            t.specs = self.shape_specs.get(t.shape_key)

    def _finish_header(self, t: Transfer, batch: list) -> None:
        """Wait for ``t``'s header, learn its specs and queue its payload receive."""
        self.wait(t.header_work, t)
        self.counts["forward_waits"] += t.key is not None and t.key[0]
        t.specs = decode_header(t.header_buffer)
        if t.shape_key is not None:
            self.shape_specs[t.shape_key] = t.specs
        t.header_work = t.header_buffer = None
        self._post_receive(t, batch)

    def _early(self, key: tuple, peer: int, action) -> Transfer:
        """A receive for message ``key``, posted before its own action (ordered mode)."""
        shape_key, header = self.forward.get(key, (None, True)) if key[0] else (None, False)
        specs = None if key[0] else self.spec_of(key)
        return Transfer(action, False, peer, 0, header=header, key=key, shape_key=shape_key, specs=specs)

    def _open_through(self, t: Transfer, batch: list, can_wait: bool) -> bool:
        """Ordered mode: post the messages of ``t.peer`` up to ``t``'s in the peer's send order (earlier ones
        are kept for their own actions). Without ``can_wait``, stop (False) at anything needing a wait first."""
        key, peer = t.key, t.peer
        position = self._position[peer].get(key)
        if position is None:
            raise PipelineCommError(f"pipeline rank {self.rank}: message {key} is not among those pipeline rank "
                                    f"{peer} sends here {self.inbound[peer]}")
        while self.next_index[peer] <= position:
            blocked = self.blocked.get(peer)
            if blocked is not None:  # its payload must be posted before anything later from this peer
                if not can_wait:
                    return False
                self._flush(batch)
                self._finish_header(blocked, batch)
                del self.blocked[peer]
            k = self.inbound[peer][self.next_index[peer]]
            u = t if k == key else self._early(k, peer, t.action)
            self._resolve_specs(u)
            if u.specs is None and not u.header:
                if not can_wait:
                    return False
                self._missing_specs(u)
            self._post_receive(u, batch)
            if u.specs is None:
                self.blocked[peer] = u
            self.open[k] = u
            self.next_index[peer] += 1
        return True

    def _missing_specs(self, t: Transfer):
        raise PipelineCommError(f"pipeline rank {self.rank} has no shapes for message {t.key} in action "
                                f"{t.action} from pipeline rank {t.peer} (shape key {t.shape_key}); every rank "
                                f'must be given the same batch, or use PipelineRuntime(..., shapes="per-message")')

    def prepost(self, receives: list[Transfer]) -> None:
        """Post ``receives`` ahead of their actions where that needs no wait (their shapes are known, or a
        header can be posted); :meth:`exchange` later waits for them. Others are left to the exchange.

        Only safe on per-direction links: on NCCL a posted receive blocks its group's stream until matched,
        so on a group that also carries this rank's sends it would hold up sends the peer needs first."""
        batch: list = []
        before = len(self.open)
        for t in receives:
            if t.key in self.open:
                continue
            if self.inbound is not None:
                self._open_through(t, batch, can_wait=False)
                continue
            self._resolve_specs(t)
            if t.specs is None and not t.header:
                continue
            self._post_receive(t, batch)
            self.open[t.key] = t
        self.counts["early_receives"] += len(self.open) - before
        self._flush(batch)

    # ----- one run of transfers -----------------------------------------------------------------------
    def exchange(self, transfers: list[Transfer], ahead: list[Transfer] = ()) -> None:
        """Post the sends and the receives not yet posted, then ``ahead`` (receives of later actions, as
        :meth:`prepost`), wait for the receives of ``transfers``, leave the sends in flight."""
        batch: list = []
        receives = []
        for t in transfers:
            if t.send:
                self._post_sends(t, batch)
            else:
                receives.append(t)
        states = []
        for t in receives:
            if t.key is not None and t.key not in self.open and self.inbound is not None:
                self._open_through(t, batch, can_wait=True)
            if t.key is not None and t.key in self.open:
                states.append(self.open.pop(t.key))
                continue
            self._resolve_specs(t)
            if t.specs is None and not t.header:
                self._missing_specs(t)
            self._post_receive(t, batch)
            states.append(t)
        self._flush(batch)
        if ahead and self.links is not None:  # on one shared group an early receive would hold up later sends
            self.prepost(ahead)
        for s in states:
            if s.header_work is not None:
                self._finish_header(s, batch)
                if self.blocked.get(s.peer) is s:
                    del self.blocked[s.peer]
        self._flush(batch)
        for t, s in zip(receives, states):
            for work in s.works:
                if id(work) not in self._waited:
                    self._waited[id(work)] = work
                    self.wait(work, s)
            self.counts["forward_waits"] += s.key is not None and s.key[0]
            t.done = time.perf_counter()
            if s is not t:
                t.tensors, t.specs = s.tensors, s.specs
            s.works = []

    def _check_cached(self, t: Transfer) -> None:
        """A send without a per-message header: its tensors must match its shape key's specs."""
        cached = self.shape_specs.get(t.shape_key)
        if cached is None:
            self.shape_specs[t.shape_key] = _specs_of(t.tensors)
            return
        if len(cached) == len(t.tensors) and all(
                s.shape == x.shape and s.dtype == x.dtype and s.requires_grad == x.requires_grad
                for s, x in zip(cached, t.tensors)):
            return

        def show(specs):
            return [(s.shape, str(s.dtype).replace("torch.", ""), s.requires_grad) for s in specs]

        a = t.action
        raise PipelineCommError(
            f"pipeline rank {self.rank}: stage {a.stage} microbatch {a.microbatch} sends outputs "
            f"(shape, dtype, requires_grad) {show(_specs_of(t.tensors))}, but an earlier microbatch with the same "
            f"input shapes sent {show(cached)}; with cached shapes (the default) a stage's output shapes must "
            f"follow from its microbatch's input shapes. If they depend on the data, build the runtime with "
            f'PipelineRuntime(..., shapes="per-message") (a shape header on every activation)')

    # ----- waiting ------------------------------------------------------------------------------------
    def wait(self, work, t: Transfer) -> None:
        """Wait for ``work`` of transfer ``t``; raise a named error on timeout or failure."""
        start = time.perf_counter()
        self.counts["waits"] += 1
        if self.log is not None:
            self.log.append(("wait", self._call_of[id(work)]))
        try:
            if self.timed_waits:
                self.counts["timed_waits"] += 1
                ok = work.wait(self._wait_timeout)
            else:  # the process group's own timeout is the deadline (gloo raises, NCCL's watchdog aborts)
                ok = work.wait()
        except RuntimeError as error:  # gloo raises on timeout or a dead peer
            raise self._error(t, time.perf_counter() - start, error) from error
        if ok is False:
            raise self._error(t, time.perf_counter() - start, None)

    def _error(self, t: Transfer, waited: float, cause) -> PipelineCommError:
        timed_out = cause is None or waited >= 0.9 * self.timeout or "timed out" in str(cause).lower()
        cls = PipelineTimeout if timed_out else PipelineCommError
        what = f"timed out after {waited:.1f} s (timeout={self.timeout:g} s)" if timed_out else f"failed: {cause}"
        return cls(self.describe(t, what))

    def describe(self, t: Transfer, what: str) -> str:
        direction = "to send to" if t.send else "to receive from"
        return (f"pipeline rank {self.rank} (global rank {self.ranks[self.rank]}) {what} in action {t.action}, "
                f"waiting {direction} pipeline rank {t.peer} (global rank {self.ranks[t.peer]}); that peer may "
                f"have crashed, be stuck, or be running a different plan")

    def prune(self) -> None:
        """Forget the oldest sends while they have completed (their buffers can be freed). Only from the
        front, stopping at the first still in flight: one ``is_completed`` call per run where a scan of
        every pending send made the step quadratic in its sends (on gloo a send reports completion only
        after ``wait``, so a scan never freed anything: 2080 calls per 1F1B step at m=32 on a middle rank).
        On NCCL a send that completes before an older one is freed with it, or at :meth:`drain`."""
        pending = self.pending
        done = 0
        while done < len(pending) and pending[done][0].is_completed():
            done += 1
        if done:
            del pending[:done]

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
