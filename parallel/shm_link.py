# Shared-memory p2p links between pipeline ranks on one host: per direction a data ring and a FIFO doorbell.
"""A transport for the pipeline's point-to-point messages when every rank runs on this host.

On gloo a send completes only once the receiver has posted its receive (a rendezvous round trip per
message), and every message wakes gloo's I/O threads on both ends: several context switches per message on
a box with fewer cores than ranks. A :class:`ShmLink` carries one *direction* ``src -> dst`` of a pipeline
link instead, through three files in ``/dev/shm`` that both ends map or open and then unlink (so nothing is
left behind, even when a process dies):

* a **data ring** (``HEADER_BYTES`` of header, then ``ring_bytes`` of data), mapped by both. The sender
  copies a message into the ring at its *head*; the receiver copies it out and publishes its *tail* (the
  ring position it has consumed up to) in the header. Positions only grow; a position's place in the ring is
  ``position % ring_bytes``, every chunk starts ``ALIGN``-aligned, and a chunk never wraps (the sender
  skips a short end of the ring, or cuts the message into chunks: a message larger than the whole ring
  goes through it in pieces);
* a **data FIFO** (``os.mkfifo``; both ends open it read-write, which on Linux never blocks): one fixed
  ``RECORD`` per chunk, (tag, message bytes, offset in the message, chunk bytes, ring position), written in
  one ``write`` (atomic, far below ``PIPE_BUF``) after the chunk's bytes. The receiver blocks in ``poll``
  on it (no spinning) with the deadline;
* a **freed FIFO** the other way: a byte per consumed chunk, written without blocking (dropped when the
  FIFO is full; the tail in the header is the truth, the byte only wakes a sender waiting for room).

A send therefore completes at once: the link is *buffered*, the semantics the plans are validated under
(:mod:`pipeloom.parallel.links`). When the ring (or the data FIFO) lacks room the send is queued on its link,
never blocking the rank where gloo's ``isend`` would not (that could deadlock a plan), and :class:`ShmHub`
flushes the queues whenever this process next enters the transport: any post, any wait, and a rank blocked
in a receive also polls the freed FIFOs of its links with queued sends, so a receiver freeing room lets it
send while it waits. Messages match receives by tag, first in first out per tag, as on gloo; the receiver
consumes the ring in order, so a chunk whose receive is not posted yet (ZB-V sends in an order its
receiver does not take) is copied into a stash and waits there for its receive. A peer that exits is seen
at once through a pidfd in the same ``poll``; a wait past the deadline raises ``RuntimeError`` ("timed
out"), which :meth:`~pipeloom.parallel.p2p.P2P.wait` turns into a ``PipelineTimeout`` naming rank, action
and peer.

Ordering: the sender stores the chunk, then writes its record; the receiver reads the record (a system call
on both ends orders these), copies the chunk out, then stores the tail; the sender loads the tail before
overwriting. That the tail store cannot pass the copy's loads, and the sender's stores cannot pass its tail
load, is x86-64's store ordering (TSO), so :func:`~pipeloom.parallel.shm_connect.host_identity` offers
shared memory only there. The tail is one aligned 8-byte store and load (``ctypes``), never torn.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import select
import struct
import time
import weakref
from datetime import timedelta

import torch

SHM_DIR = "/dev/shm"
HEADER_BYTES = 4096  # the ring file's first page: the receiver's tail, an aligned int64 at offset 0
ALIGN = 64  # every chunk starts at a multiple of this in the ring
CHUNK_MIN = 64 << 10  # a ring end shorter than this is skipped rather than filled with a small chunk
DEFAULT_RING_BYTES = 8 << 20
RECORD = struct.Struct("<qqqqq")  # tag, message bytes, offset in the message, chunk bytes, ring position
_READ = RECORD.size * 256


class ShmHub:
    """The shared-memory links of one process that have sends queued for lack of room."""

    def __init__(self):
        self.queued: dict[ShmLink, None] = {}  # an ordered set

    def flush(self) -> None:
        """Move queued sends into their rings as far as room allows."""
        for link in list(self.queued):
            if link._flush():
                del self.queued[link]

    def _poll_queued(self, poll) -> None:
        for link in self.queued:
            poll.register(link._free_fd, select.POLLIN)
            if link._pidfd is not None:
                poll.register(link._pidfd, select.POLLIN)


class _Message:
    """An incoming message: where its bytes go (a posted receive's tensor, or a stash) and how many came."""

    __slots__ = ("buf", "total", "received", "complete", "work")

    def __init__(self, buf: torch.Tensor, total: int):
        self.buf, self.total, self.received, self.complete, self.work = buf, total, 0, False, None


class _SendWork:
    """A send: done once all its bytes are in the ring (until then it is queued on its link)."""

    __slots__ = ("link", "data", "tag", "total", "sent", "done")

    def __init__(self, link: ShmLink, data: torch.Tensor, tag: int):
        self.link, self.data, self.tag, self.total, self.sent, self.done = link, data, tag, data.numel(), 0, False

    def is_completed(self) -> bool:
        if not self.done and self.link.hub.queued:
            self.link.hub.flush()
        return self.done

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        if not self.done:
            self.link._wait(self, timeout)
        return True


class _RecvWork:
    """A receive into ``data`` (its tensor's bytes): done once its message has fully arrived there."""

    __slots__ = ("link", "data", "tag", "message", "done")

    def __init__(self, link: ShmLink, data: torch.Tensor, tag: int):
        self.link, self.data, self.tag, self.message, self.done = link, data, tag, None, False

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        if not self.done:
            self.link._wait(self, timeout)
        return True

    def take(self, message: _Message) -> None:
        if message.total != self.data.numel():
            raise RuntimeError(f"{self.link.group_name}: a message of {message.total} bytes with tag {self.tag} "
                               f"arrived for a receive of {self.data.numel()} bytes; both ends must agree on shapes")
        self.message, message.work = message, self
        if message.complete:
            self.finish()

    def finish(self) -> None:
        if self.message.buf is not self.data:  # it waited in the stash
            self.data.copy_(self.message.buf)
        self.message = None
        self.done = True


class ShmLink:
    """One end of the direction ``src -> dst`` (global ranks) of a pipeline link; made by
    :func:`~pipeloom.parallel.shm_connect.connect`.

    The sending end (``me == src``) has :meth:`send`, the receiving end :meth:`recv`; both return works with
    ``wait(timeout=None)`` (default: the link's ``timeout`` seconds) and ``is_completed()``, as a process
    group's ``send``/``recv`` do. ``group_name`` names the link in :class:`~pipeloom.parallel.p2p.P2P`'s log.
    """

    def __init__(self, name: str, src: int, dst: int, me: int, ring: mmap.mmap, data_fd: int, free_fd: int,
                 pidfd: int | None, hub: ShmHub, timeout: float):
        self.name, self.src, self.dst, self.sending = name, src, dst, me == src
        self.group_name = f"shm:{src}>{dst}"
        self.hub, self.timeout = hub, float(timeout)
        self._mm = ring
        # One aligned 8-byte load or store (struct.pack_into would write it a byte at a time: a torn tail).
        self._shared_tail = ctypes.c_int64.from_buffer(ring, 0)
        self.size = len(ring) - HEADER_BYTES
        self._ring = torch.frombuffer(ring, dtype=torch.uint8)[HEADER_BYTES:]  # (size,) shared with the peer
        self._data_fd, self._free_fd, self._pidfd = data_fd, free_fd, pidfd
        self._head = self._tail = 0  # ring positions: written up to (sender), consumed up to (both ends' view)
        self._queue: collections.deque[_SendWork] = collections.deque()
        self._posted: dict[int, collections.deque] = collections.defaultdict(collections.deque)  # tag -> receives
        self._stash: dict[int, collections.deque] = collections.defaultdict(collections.deque)  # tag -> messages
        self._current: _Message | None = None  # the message whose chunks are arriving
        self._partial = b""
        self._poll = select.poll()  # the receiving end waits on its data FIFO and on the peer's exit
        self._poll.register(data_fd if not self.sending else free_fd, select.POLLIN)
        if pidfd is not None:
            self._poll.register(pidfd, select.POLLIN)
        self._finalizer = weakref.finalize(self, _close_fds, [fd for fd in (data_fd, free_fd, pidfd) if fd is not None])

    def __repr__(self) -> str:
        return f"ShmLink({self.group_name}, {'send' if self.sending else 'receive'} end, ring {self.size} bytes)"

    def close(self) -> None:
        """Close this end's file descriptors (the memory goes with the last reference)."""
        self._finalizer()

    def _check(self, sending: bool, peer: int) -> None:
        if sending != self.sending or peer != (self.dst if sending else self.src):
            raise ValueError(f"{self.group_name} (the {'sending' if self.sending else 'receiving'} end, on global "
                             f"rank {self.src if self.sending else self.dst}) cannot "
                             f"{'send to' if sending else 'receive from'} global rank {peer}")

    # ----- sending ----------------------------------------------------------------------------------------
    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> _SendWork:
        self._check(True, peer)
        (x,) = tensors
        work = _SendWork(self, x.reshape(-1).view(torch.uint8), tag)
        if self.hub.queued:
            self.hub.flush()
        if self._queue or not self._write(work):
            self._queue.append(work)
            self.hub.queued[self] = None
        return work

    def _write(self, work: _SendWork) -> bool:
        """Put as much of ``work`` into the ring as fits, a chunk and its record at a time; True when all of it."""
        size = self.size
        while not work.done:
            left, n = work.total - work.sent, 0
            if left:
                free = size - (self._head - self._tail)
                if free < left:
                    self._tail = self._shared_tail.value
                    free = size - (self._head - self._tail)
                if not 0 <= free <= size:
                    raise RuntimeError(f"{self.group_name}: the ring's tail {self._tail} is out of reach of its head "
                                       f"{self._head} (ring of {size} bytes); the peer process is not following "
                                       f"the protocol")
                at = self._head % size
                contiguous = min(free, size - at)
                if contiguous < min(left, CHUNK_MIN) and free > contiguous:  # a short end: go on at the start
                    self._head += contiguous
                    continue
                n = min(left, contiguous)
                if n == 0:
                    return False
                self._ring[at:at + n].copy_(work.data[work.sent:work.sent + n])
            try:
                os.write(self._data_fd, RECORD.pack(work.tag, work.total, work.sent, n, self._head))
            except BlockingIOError:  # the data FIFO is full: as good as a full ring
                return False
            self._head += (n + ALIGN - 1) & -ALIGN
            work.sent += n
            work.done = work.sent == work.total
        return True

    def _flush(self) -> bool:
        """Queued sends into the ring, in order; True when none is left."""
        _drain(self._free_fd)
        queue = self._queue
        while queue:
            if not self._write(queue[0]):
                return False
            queue.popleft()
        return True

    # ----- receiving --------------------------------------------------------------------------------------
    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> _RecvWork:
        self._check(False, peer)
        (x,) = tensors
        work = _RecvWork(self, x.view(-1).view(torch.uint8), tag)
        if self.hub.queued:
            self.hub.flush()
        stash = self._stash.get(tag)
        if stash:
            work.take(stash.popleft())
        else:
            self._posted[tag].append(work)
        return work

    def _read(self) -> None:
        """Take every record waiting in the data FIFO."""
        try:
            data = os.read(self._data_fd, _READ)
        except BlockingIOError:
            return
        if self._partial:
            data, self._partial = self._partial + data, b""
        whole = len(data) - len(data) % RECORD.size
        for record in RECORD.iter_unpack(data[:whole]):
            self._take(*record)
        self._partial = data[whole:]

    def _take(self, tag: int, total: int, offset: int, n: int, position: int) -> None:
        """One chunk: to its posted receive, or into the stash; then the ring room it used is given back."""
        if offset == 0:
            posted = self._posted.get(tag)
            message = _Message(torch.empty(total, dtype=torch.uint8) if not posted else posted[0].data, total)
            if posted:
                posted.popleft().take(message)
            else:
                self._stash[tag].append(message)
            self._current = message
        message = self._current
        if n:
            at = position % self.size
            message.buf[offset:offset + n].copy_(self._ring[at:at + n])
            self._tail = position + ((n + ALIGN - 1) & -ALIGN)
            self._shared_tail.value = self._tail
            try:
                os.write(self._free_fd, b"\0")
            except BlockingIOError:  # full of wake-ups the sender has not read: it will see the tail
                pass
        message.received += n
        if message.received == message.total:
            message.complete, self._current = True, None
            if message.work is not None:
                message.work.finish()

    # ----- waiting ----------------------------------------------------------------------------------------
    def _wait(self, work, timeout) -> None:
        """Until ``work`` is done: flush queued sends, and block in ``poll`` on what can move it (this link's
        records or freed room, the freed room of links with queued sends, the peers' exits) until the deadline."""
        seconds = self.timeout if timeout is None else (
            timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout))
        start = time.monotonic()
        hub = self.hub
        while True:
            if hub.queued:
                hub.flush()
            if not self.sending:
                self._read()
            if work.done:
                return
            poll = self._poll
            if hub.queued and (not self.sending or list(hub.queued) != [self]):
                poll = select.poll()
                hub._poll_queued(poll)
                if not self.sending:
                    poll.register(self._data_fd, select.POLLIN)
                    if self._pidfd is not None:
                        poll.register(self._pidfd, select.POLLIN)
            left = start + seconds - time.monotonic()
            if left <= 0:
                what = "room in the ring for a message" if self.sending else f"a message with tag {work.tag}"
                raise RuntimeError(f"{self.group_name} timed out after {time.monotonic() - start:.1f} s waiting for "
                                   f"{what} (global rank {self.dst if self.sending else self.src})")
            ready = {fd for fd, _ in poll.poll(left * 1e3)}
            if self._pidfd in ready or any(link._pidfd in ready for link in hub.queued):
                self._peer_exited(ready)

    def _peer_exited(self, ready: set) -> None:
        """A peer's pidfd became readable: fail, unless what it left in a FIFO may still be read."""
        if not self.sending and self._data_fd in ready:
            return
        gone = [link for link in [self, *self.hub.queued] if link._pidfd in ready]
        names = sorted({f"global rank {link.dst if link.sending else link.src}" for link in gone})
        raise RuntimeError(f"{self.group_name}: the peer process ({', '.join(names)}) exited before the transfer "
                           f"was done")


def _drain(fd: int) -> None:
    try:
        while len(os.read(fd, 65536)) == 65536:
            pass
    except BlockingIOError:
        pass


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:  # already closed: nothing to release
            pass
