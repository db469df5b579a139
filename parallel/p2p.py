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

NCCL also does not buffer sends: a process group's calls run one after another on one stream and a send
finishes only when its receive is posted, so one group carrying both directions can deadlock where gloo
does not (ZB-V did, on two H100s: each rank's send queued in front of the receive the other needed). By
default each direction of each link gets its own group (:func:`pipeline_links`): a sender only sends on
it, its receiver only receives, in the same order, and nothing a rank receives can hold up what it sends.
:func:`check_rendezvous` replays the calls a run recorded (``P2P.log``) under NCCL's rules, so CPU tests
catch such deadlocks.
"""

from __future__ import annotations

import itertools
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
    it, tags tell messages apart (gloo) and receives are posted as the plan lists them. ``links``
    (``{(src, dst) pipeline ranks: group}`` from :func:`pipeline_links`) carries each direction on its own
    group; without it every transfer goes on ``group``. A batch is posted as one call per group, sends first.

    ``shape_specs`` maps a forward message's shape key to its specs (the module docstring explains the
    cache); :meth:`reset` takes, per forward message of the step, its shape key and whether it carries a
    header. ``counts`` (reset each step): ``calls`` (batched calls), ``ops`` (isend/irecv posted),
    ``headers`` (header ops, sent or received), ``waits`` (all waits, drained sends included) and
    ``forward_waits`` (waits for receiving forward messages, headers included).
    """

    def __init__(self, group, ranks: Sequence[int], rank: int, device: torch.device, timeout: float,
                 inbound: dict[int, list] | None = None, spec_of=None, links: dict | None = None):
        self.group = group
        self.links = links
        self.log: list | None = None  # set to [] to record calls and waits for check_rendezvous
        self._call_of: dict[int, int] = {}  # id(work) -> its call's index in the log
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
        group = self.group
        if self.links is not None:
            link = (self.rank, t.peer) if t.send else (t.peer, self.rank)
            if link not in self.links:
                raise PipelineCommError(f"pipeline rank {self.rank}: action {t.action} uses the link {link[0]} "
                                        f"-> {link[1]} (pipeline ranks), which was not set up; links: "
                                        f"{sorted(self.links)}")
            group = self.links[link]
        return dist.P2POp(fn, tensor, self.ranks[t.peer], group=group, tag=0 if self.inbound else t.tag)

    def _stream_name(self, group) -> tuple:
        return (self.ranks[self.rank], group.group_name)

    def _link_name(self, op: dist.P2POp) -> tuple:
        me = self.ranks[self.rank]
        return (op.group.group_name, me, op.peer) if op.op is dist.isend else (op.group.group_name, op.peer, me)

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
        sends: list[tuple[dist.P2POp, Transfer, None]] = []
        for t in transfers:
            if t.send:
                if t.shape_key is not None:
                    self._check_cached(t)
                header = encode_header(t.tensors, self.device) if t.header else None  # before detach
                t.tensors = [x.detach().contiguous() for x in t.tensors]
                self.counts["headers"] += header is not None
                for x in ([header] if header is not None else []) + t.tensors:
                    sends.append((self._op(dist.isend, x, t), t, None))
        queues = self._queue([t for t in transfers if not t.send])
        batch = sends  # (op, transfer, header buffer or None)
        while True:
            for q in queues.values():  # per peer: known-shape messages, up to the next header
                while q:
                    t = q[0]
                    if t.specs is None and t.header:
                        buffer = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                        batch.append((self._op(dist.irecv, buffer, t), t, buffer))
                        self.counts["headers"] += 1
                        break
                    if t.specs is None:  # cached: its key's header came with an earlier message
                        t.specs = self._cached_specs(t)
                    t.tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in t.specs]
                    batch += [(self._op(dist.irecv, x, t), t, None) for x in t.tensors]
                    q.pop(0)
            if not batch:
                break
            received, posted, waited = [], set(), set()  # ids of works: a coalesced call has one for all ops
            for entries in self._by_group(batch):  # sends first: they never wait for this rank's receives
                for work, (_, t, header) in zip(self._post([op for op, _, _ in entries]), entries):
                    if not t.send:
                        received.append((work, t, header))
                        continue
                    t.done = time.perf_counter()
                    if id(work) not in posted:
                        posted.add(id(work))
                        self.pending.append((work, t))
            for work, t, header in received:
                if id(work) not in waited:
                    waited.add(id(work))
                    self.wait(work, t)
                self.counts["forward_waits"] += t.key is not None and t.key[0]
                t.done = time.perf_counter()
                if header is not None:  # its payload goes out in the next round
                    t.specs = decode_header(header)
                    if t.shape_key is not None:
                        self.shape_specs[t.shape_key] = t.specs
            batch = []
        for t in transfers:
            if not t.send and t.key is not None and t.key in self.kept and self.kept[t.key] is not t:
                early = self.kept.pop(t.key)
                t.tensors, t.specs, t.done = early.tensors, early.specs, time.perf_counter()
            elif not t.send and t.key is not None:
                self.kept.pop(t.key, None)

    def _by_group(self, batch: list) -> list[list]:
        """The batch cut into one call per process group (``batch_isend_irecv`` takes one group), sends first."""
        calls: dict[int, list] = {}
        for entry in sorted(batch, key=lambda e: not e[1].send):
            calls.setdefault(id(entry[0].group), []).append(entry)
        return list(calls.values())

    def _post(self, ops: list[dist.P2POp]) -> list:
        """One batched call; returns a work per op. NCCL coalesces the call into one work that completes
        when all its ops have; gloo returns one work per op."""
        works = dist.batch_isend_irecv(ops)
        self.counts["calls"] += 1
        self.counts["ops"] += len(ops)
        if len(works) == 1 and len(ops) > 1:
            works = works * len(ops)
        if len(works) != len(ops):
            raise PipelineCommError(f"pipeline rank {self.rank}: batch_isend_irecv returned {len(works)} works for "
                                    f"{len(ops)} operations")
        if self.log is not None:
            call = len(self.log)
            self.log.append(("post", call, self._stream_name(ops[0].group), [
                (op.op is dist.isend, self._link_name(op), tuple(op.tensor.shape), str(op.tensor.dtype))
                for op in ops]))
            for work in works:
                self._call_of[id(work)] = call
        return works

    def wait(self, work, t: Transfer) -> None:
        """Wait for ``work`` of transfer ``t``; raise a named error on timeout or failure."""
        start = time.perf_counter()
        self.counts["waits"] += 1
        if self.log is not None:
            self.log.append(("wait", self._call_of[id(work)]))
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


_LINKS: dict[tuple, object] = {}  # (pipeline group name, src global rank, dst global rank) -> its link group


_LINK_ROUNDS = itertools.count()  # calls of pipeline_links in this process (the same sequence on every rank)


def _gather_over_store(value, timeout: float) -> list:
    """Every world rank's ``value`` (JSON), through the default store; a rank that does not arrive
    within ``timeout`` seconds is named in a :class:`PipelineTimeout` instead of a silent hang."""
    import json

    store = dist.distributed_c10d._get_default_store()  # the rendezvous store of init_process_group
    world, me = dist.get_world_size(), dist.get_rank()
    round_ = next(_LINK_ROUNDS)
    keys = [f"pipeloom/links/{round_}/{r}" for r in range(world)]
    store.set(keys[me], json.dumps(value))
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as error:  # DistStoreError on timeout
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise PipelineTimeout(
            f"global rank {me} waited {timeout:g} s for every rank to build its PipelineRuntime (links="
            f'"directional" creates p2p groups, a collective over the whole world); global ranks {missing} did '
            f"not. Build the runtime on every rank, or use links=\"shared\" (gloo only)") from error
    return [json.loads(store.get(key)) for key in keys]


def pipeline_links(group, ranks: Sequence[int], pairs, device=None,
                   timeout: float = 300.0) -> dict[tuple[int, int], object]:
    """One process group per direction of each pipeline link: ``{(src, dst) pipeline ranks: group}``.

    On NCCL every batched p2p call of a process group runs on one stream, in posting order, and a send
    completes only when its receive has been posted; a call that mixes directions or peers can therefore
    wait on a peer that waits on this rank (found as a ZB-V deadlock on two H100s). On a link's own group
    the sender only sends and the receiver only receives, in the same order, so a send never waits
    behind anything but earlier sends on that link and a rank's receives never hold up its sends: the
    pipeline behaves as if sends were buffered, the semantics its plans are validated under
    (:func:`check_rendezvous` models the NCCL rules).

    Collective over the whole world (``new_group`` is): every rank calls it, with its own pipeline group;
    the pairs of all pipeline groups are gathered (through the rendezvous store, so a rank that never
    arrives is named after ``timeout`` seconds) and created in one order. Groups are cached per
    (pipeline group, direction), so runtimes built again on the same pipeline group reuse them. A new
    link carries one small message at once, in that same order on every rank: NCCL creates a
    communicator at its first use and blocks both ends until the other arrives, which inside a step
    could stall a sender until its receiver reaches the link.
    """
    me = (group.group_name, [(ranks[a], ranks[b]) for a, b in sorted(set(pairs))])
    gathered = _gather_over_store(me, timeout)
    backend, rank = dist.get_backend(group), dist.get_rank()
    for key in sorted({(name, a, b) for name, links in gathered for a, b in links}):
        if key in _LINKS:
            continue
        _LINKS[key] = link = dist.new_group(sorted(key[1:]), backend=backend)
        if rank in key[1:]:
            src, dst = key[1:]
            probe = torch.ones(1, device=device) if rank == src else torch.zeros(1, device=device)
            op = dist.P2POp(dist.isend if rank == src else dist.irecv, probe, dst if rank == src else src, group=link)
            for work in dist.batch_isend_irecv([op]):
                work.wait()
    return {(a, b): _LINKS[(group.group_name, ranks[a], ranks[b])] for a, b in set(pairs)}


def check_rendezvous(logs: dict[int, list]) -> None:
    """Replay the calls and waits the ranks' :class:`P2P` recorded (``p2p.log``) under NCCL's rules and
    raise :class:`PipelineCommError` if they would deadlock or pair mismatched tensors.

    The rules, stricter than gloo's: a process group's calls on a rank run one after another, in posting
    order, each finishing when all its operations have; a send and its receive (matched per group and
    direction by order, tags ignored) both progress only while both their calls are running - no send
    is buffered; a rank stops at a wait until the call it waits on has finished.
    """
    pos = dict.fromkeys(logs, 0)
    streams: dict[tuple, list] = {}  # (rank, group) -> its posted, unfinished calls in order
    left: dict[tuple, set] = {}  # (rank, call) -> its unmatched operations
    where: dict[tuple, tuple] = {}  # (rank, call) -> its stream
    sides: dict[tuple, dict] = {}  # (group, src, dst, n) -> {"send"/"recv": ((rank, call), shape, dtype)}
    count: Counter = Counter()
    finished: set = set()

    def advance(rank: int) -> bool:
        moved, events = False, logs[rank]
        while pos[rank] < len(events):
            event = events[pos[rank]]
            if event[0] == "wait" and (rank, event[1]) not in finished:
                break
            if event[0] == "post":
                _, call, stream, ops = event
                streams.setdefault(stream, []).append((rank, call))
                where[(rank, call)] = stream
                left[(rank, call)] = set()
                for send, link, shape, dtype in ops:
                    side = "send" if send else "recv"
                    n = count[(link, side)]
                    count[(link, side)] += 1
                    sides.setdefault((*link, n), {})[side] = ((rank, call), shape, dtype)
                    left[(rank, call)].add((*link, n))
            pos[rank] += 1
            moved = True
        return moved

    while True:
        moved = any([advance(rank) for rank in logs])
        running = {stream[0] for stream in streams.values() if stream}
        for op, ends in sides.items():
            if len(ends) == 2 and ends["send"][0] in running and ends["recv"][0] in running and op in left[
                    ends["send"][0]]:
                if ends["send"][1:] != ends["recv"][1:]:
                    raise PipelineCommError(f"message {op} (group, src, dst, index): rank {ends['send'][0][0]} "
                                            f"sends {ends['send'][1:]} but rank {ends['recv'][0][0]} receives into "
                                            f"{ends['recv'][1:]}")
                left[ends["send"][0]].discard(op)
                left[ends["recv"][0]].discard(op)
                moved = True
        for stream in streams.values():
            while stream and not left[stream[0]]:
                finished.add(stream.pop(0))
                moved = True
        if not moved:
            break
    stuck = {rank: logs[rank][pos[rank]] for rank in logs if pos[rank] < len(logs[rank])}
    unfinished = [stream for stream in streams.values() if stream]
    if stuck or unfinished:
        lines = [f"rank {rank} waits for its call {event[1]}" for rank, event in sorted(stuck.items())]
        for stream in unfinished:
            rank, call = stream[0]
            lines.append(f"rank {rank}'s call {call} on group {where[(rank, call)][1]} cannot finish: it still "
                         f"needs {sorted(left[(rank, call)])}, and {len(stream) - 1} later calls queue behind it")
        raise PipelineCommError("the recorded p2p calls deadlock under NCCL's rules:\n  " + "\n  ".join(lines))
