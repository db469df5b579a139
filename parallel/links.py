# Pipeline links: shared-memory links or per-direction p2p groups (owned by a Mesh or the caller), hangs, NCCL's rules.
"""The transport of each pipeline link and who owns it: shared-memory links (:mod:`pipeloom.parallel.shm_link`)
where every rank of a CPU pipeline is on this host, else one process group per direction of each link (on
gloo one for the whole pipeline); naming a hang without waiting on it; NCCL's matching rules replayed on
recorded calls.

On NCCL every batched p2p call of a process group runs on one stream, in posting order, and a send
completes only when its receive has been posted; a call that mixes directions or peers can therefore
wait on a peer that waits on this rank (found as a ZB-V deadlock on two H100s). On a link's own group
the sender only sends and the receiver only receives, in the same order, so a send never waits behind
anything but earlier sends on that link and a rank's receives never hold up its sends: the pipeline
behaves as if sends were buffered, the semantics its plans are validated under
(:func:`~pipeloom.parallel.p2p.check_rendezvous` models the NCCL rules).

:class:`PipelineLinks` owns such groups. A :class:`~pipeloom.parallel.mesh.Mesh` holds one (``mesh.links``),
a caller may pass one to several runtimes, and a runtime given neither makes its own; nothing is kept in
module globals. ``transport="auto"`` (the runtime's default for a gloo pipeline on CPU) gives shared-memory
links when every rank of the pipeline reports the same host (hostname, boot id and ``/dev/shm`` device,
gathered through the store) and that ``/dev/shm`` has room for their rings, and gloo groups otherwise;
``"shm"`` insists on them and ``"gloo"`` never uses them. Groups are created with the runtime's timeout,
which is then the deadline of every wait on them (the runtime waits without a timeout of its own, see
:mod:`pipeloom.parallel.p2p`). An owner that outlives ``destroy_process_group`` notices the new default
group and creates its links again instead of handing out dead ones.

:class:`HangWatch` names the receive a rank is stuck on where waits do not block the host (NCCL), and
:func:`check_rendezvous` replays a run's recorded p2p calls under NCCL's rules, so CPU tests catch the
deadlocks that only unbuffered sends have.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from .errors import PipelineCommError, PipelineTimeout
from .shm_connect import connect, host_identity, shm_free_bytes
from .shm_link import DEFAULT_RING_BYTES, HEADER_BYTES, ShmHub, ShmLink

log = logging.getLogger("pipeloom")


class PipelineLinks:
    """The p2p links of every pipeline of one world: ``(pp group, "link", src, dst, timeout)`` (a direction of a
    link, a process group), ``(pp group, "pipeline", *members, timeout)`` (all of a pipeline's links, one process
    group) or ``(pp group, "shm", src, dst, timeout)`` (a direction of a link, a :class:`ShmLink` end) ``-> link``.

    :meth:`groups` is collective over the whole world (``new_group`` is): every rank calls it, with its
    own pipeline group. The pairs of all ranks are gathered through the rendezvous store (so a rank that
    never arrives is named after ``timeout`` seconds), every link some rank lacks is created on every
    rank in one sorted order, and each new link group carries one small message at once, in that order: NCCL
    creates a communicator at its first use and blocks both ends until the other arrives, which inside a
    step could stall a sender until its receiver reaches the link. Shared-memory links (rings of
    ``ring_bytes``) are then set up by their two ends only.
    """

    def __init__(self, ring_bytes: int = DEFAULT_RING_BYTES):
        self.ring_bytes = ring_bytes
        self._groups: dict[tuple, object] = {}
        self._world = None  # weak reference to the default group the cached links belong to
        self._hub = ShmHub()  # this process's shared-memory links with sends queued

    def __len__(self) -> int:
        return len(self._groups)

    def _current(self) -> dict[tuple, object]:
        world = dist.group.WORLD
        if self._world is None or self._world() is not world:  # first use, or torch.distributed re-initialised
            for link in self._groups.values():
                if isinstance(link, ShmLink):
                    link.close()
            self._groups, self._hub = {}, ShmHub()
            self._world = weakref.ref(world)
        return self._groups

    def groups(self, group, ranks: Sequence[int], pairs, device=None, timeout: float = 300.0,
               per_direction: bool = True, transport: str = "gloo") -> dict[tuple[int, int], object]:
        """``{(src, dst) pipeline ranks: link}`` for ``pairs`` of the pipeline ``group`` whose members are ``ranks``
        (global, by pipeline rank); on shared memory only the pairs with this rank at one end. ``transport``:
        ``"gloo"`` (process groups of the pipeline's backend; ``per_direction=False`` puts every link of the
        pipeline on one group of its own, enough where sends are buffered, gloo; see the runtime's ``links``),
        ``"shm"`` (:class:`ShmLink` ends; every rank of the pipeline must be on this host, with room in its
        ``/dev/shm``) or ``"auto"`` (shm where that holds, else gloo). Every rank of a pipeline must ask for the
        same transport. Collective over the world; see the class docstring."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}; choose one of {TRANSPORTS}")
        cache = self._current()
        seconds = float(timeout)
        pairs = set(pairs)

        def key(a: int, b: int) -> tuple:  # flat (it travels as JSON); the kind keeps pp=2's two layouts apart
            return (group.group_name, "link", ranks[a], ranks[b], seconds) if per_direction else \
                (group.group_name, "pipeline", *sorted(ranks), seconds)

        def shm_key(a: int, b: int) -> tuple:
            return (group.group_name, "shm", ranks[a], ranks[b], seconds)

        host, why = host_identity() if transport != "gloo" else (None, "")
        shm_missing = sorted({shm_key(a, b) for a, b in pairs} - set(cache))
        need = (HEADER_BYTES + self.ring_bytes) * sum(k[2] == dist.get_rank() for k in shm_missing)  # rings made here
        mine = {"missing": sorted({key(a, b) for a, b in pairs} - set(cache)), "shm_missing": shm_missing,
                "transport": transport, "members": list(ranks), "host": host, "why": why, "need": need,
                "free": shm_free_bytes() if host is not None else 0, "run": secrets.token_hex(4)}
        gathered = _gather_over_store(mine, timeout)
        shm = _choose_shm(gathered)
        create = sorted({tuple(k) for r, part in enumerate(gathered)
                         for k in part["shm_missing" if shm[r] else "missing"]}, key=lambda k: (len(k), k))
        backend, me = dist.get_backend(group), dist.get_rank()
        for k in create:
            if k[1] == "shm":
                continue
            members, seconds_ = sorted(k[2:-1]), k[-1]
            cache[k] = link = dist.new_group(members, backend=backend, timeout=timedelta(seconds=seconds_))
            if me in members and k[1] == "link":  # a new link: one message at once (NCCL's communicator)
                src, dst = k[2:4]
                probe = torch.ones(1, device=device) if me == src else torch.zeros(1, device=device)
                op = dist.P2POp(dist.isend if me == src else dist.irecv, probe, dst if me == src else src,
                                group=link)
                for work in dist.batch_isend_irecv([op]):
                    work.wait()
        run = gathered[0]["run"]  # a name for this call's files, the same on every rank
        ends = [(f"{run}-{i}", k) for i, k in enumerate(create) if k[1] == "shm" and me in k[2:4]]
        store = dist.distributed_c10d._get_default_store()
        opened = connect([(name, k[2], k[3], k[4]) for name, k in ends], me, store, self._hub, self.ring_bytes, timeout)
        cache.update({k: opened[name] for name, k in ends})
        if shm[me]:  # a shared-memory link exists only at its two ends
            return {(a, b): cache[shm_key(a, b)] for a, b in pairs if me in (ranks[a], ranks[b])}
        return {(a, b): cache[key(a, b)] for a, b in pairs}


TRANSPORTS = ("gloo", "shm", "auto")  # PipelineLinks.groups(transport=...)


def _choose_shm(gathered: list) -> list[bool]:
    """Per world rank: whether its pipeline's links are shared-memory ones. The same answer on every rank (all
    read the same gathered requests), so a refusal raises everywhere, before any collective could hang. A host
    whose ``/dev/shm`` has less room than the rings asked of it there gets none (a ring past the room would
    end in SIGBUS at its first touch of a missing page)."""
    need, free = Counter(), {}
    for part in gathered:
        if part["host"] is not None:
            need[part["host"]] += part["need"]
            free[part["host"]] = min(free.get(part["host"], part["free"]), part["free"])
    out = []
    for part in gathered:
        members = part["members"]
        asked = {gathered[m]["transport"] for m in members}
        if len(asked) > 1:
            raise ValueError(f"the ranks of the pipeline of global ranks {members} asked for different p2p transports "
                             f"{ {m: gathered[m]['transport'] for m in members} }; build every rank's runtime with the "
                             f"same links= and the same PIPELOOM_P2P environment variable")
        hosts = {gathered[m]["host"] for m in members}
        together = len(hosts) == 1 and None not in hosts
        host = part["host"]
        if together and free[host] < need[host]:
            if part["transport"] == "shm":
                raise ValueError(f"shared-memory p2p links (links='shm' or PIPELOOM_P2P=shm) for the pipeline of "
                                 f"global ranks {members}: the rings need {need[host] / 2**20:.1f} MiB of /dev/shm on "
                                 f"this host but {free[host] / 2**20:.1f} MiB are free; give it more room (docker run "
                                 f"--shm-size), smaller rings (PipelineLinks(ring_bytes=...)), or use links='gloo'")
            together = False
        if part["transport"] == "shm" and not together:
            why = sorted({gathered[m]["why"] for m in members if gathered[m]["why"]})
            raise ValueError(f"shared-memory p2p links (links='shm' or PIPELOOM_P2P=shm) need every rank of the "
                             f"pipeline of global ranks {members} on this host with a usable /dev/shm; their hosts: "
                             f"{ {m: gathered[m]['host'] for m in members} }{'; ' + '; '.join(why) if why else ''}. "
                             f"Use links='gloo' (or PIPELOOM_P2P=gloo)")
        out.append(part["transport"] != "gloo" and together)
    return out


def _gather_over_store(value, timeout: float) -> list:
    """Every world rank's ``value`` (JSON), through the default store; a rank that does not arrive
    within ``timeout`` seconds is named in a :class:`PipelineTimeout` instead of a silent hang.

    Rounds are counted in the store itself (each rank counts its own calls there), so the n-th call of
    every rank meets the n-th call of the others whichever object asked, and a re-initialised world
    (a new store) starts again at round 1."""
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store of init_process_group
    world, me = dist.get_world_size(), dist.get_rank()
    round_ = store.add(f"pipeloom/links/calls/{me}", 1)
    keys = [f"pipeloom/links/{round_}/{r}" for r in range(world)]
    store.set(keys[me], json.dumps(value))
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as error:  # DistStoreError on timeout (its class moved between torch versions)
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise PipelineTimeout(
            f"global rank {me} waited {timeout:g} s for every rank to build its PipelineRuntime (its link groups "
            f"are created by a collective over the whole world); global ranks {missing} did "
            f"not. Build the runtime on every rank, or use links=\"shared\" (gloo only)") from error
    return [json.loads(store.get(key)) for key in keys]


class HangWatch:
    """Names a receive that stays open past the deadline, without ever waiting on it.

    On NCCL a wait does not block the host, so a hang surfaces far from the action that caused it and
    NCCL's watchdog reports it only as a sequence number. This daemon thread sleeps ``interval`` seconds
    at a time, asks each open receive's work whether it completed (``is_completed``, which never blocks),
    and logs (``logging.getLogger("pipeloom")``) and keeps in :attr:`hang` the rank, action and peer of
    the oldest one open for more than the P2P's timeout.
    """

    def __init__(self, p2p, interval: float | None = None):
        self.interval = interval if interval is not None else min(1.0, p2p.timeout / 4)
        self.timeout = p2p.timeout
        self.hang: str | None = None
        self._open: dict[int, tuple] = {}  # id(work) -> (work, action, peer, posted at)
        self._p2p = weakref.ref(p2p)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeloom-hang-watch", daemon=True)
        self._thread.start()

    def opened(self, work, t) -> None:
        """A receive was posted (only what names it is kept, not its tensors)."""
        self._open.setdefault(id(work), (work, _Named(t.action, t.send, t.peer), time.monotonic()))

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            p2p = self._p2p()
            if p2p is None:
                return
            now, oldest = time.monotonic(), None
            for key, (work, t, since) in list(self._open.items()):
                if work.is_completed():
                    self._open.pop(key, None)
                elif now - since > self.timeout and (oldest is None or since < oldest[1]):
                    oldest = (t, since)
            if oldest is not None and self.hang is None:
                t, since = oldest
                self.hang = p2p.describe(t, f"timed out after {now - since:.1f} s (timeout={self.timeout:g} s)")
                log.error("PipelineTimeout: %s", self.hang)
            del p2p


class _Named(NamedTuple):
    """What names a transfer in a message: its action, direction and peer."""

    action: object
    send: bool
    peer: int


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
