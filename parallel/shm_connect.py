# Setting shared-memory p2p links up: which ranks share a host, the files in /dev/shm, the handshake through the store.
"""How the two ends of a :class:`~pipeloom.parallel.shm_link.ShmLink` find each other.

:func:`host_identity` says whether this process can use shared-memory links and what identifies its host
(hostname, boot id and the ``/dev/shm`` device): ranks with equal identities share ``/dev/shm``.
:func:`connect` makes this process's ends of a list of links: the sender creates the ring file and the two
FIFOs under a name unique to the run and publishes its pid through the rendezvous store; the receiver opens
them, unlinks them at once (both ends have them open then, so nothing is left in ``/dev/shm`` whatever
happens to the processes later) and answers with its pid. Each end then opens a pidfd on the other, which
``poll`` reports readable when that process exits. Every wait on the peer is bounded by the timeout and
ends in a :class:`~pipeloom.parallel.errors.PipelineTimeout` naming it, after removing any file made here.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import socket
import sys
import tempfile
from datetime import timedelta

from .errors import PipelineTimeout
from .shm_link import ALIGN, HEADER_BYTES, SHM_DIR, ShmHub, ShmLink


def host_identity() -> tuple[str | None, str]:
    """(identity, why not): ranks with equal identities share this host's ``/dev/shm``; None where shared memory
    links cannot run here, with the reason."""
    if sys.platform != "linux" or not hasattr(os, "mkfifo"):
        return None, f"shared-memory links need Linux (this is {sys.platform})"
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"shared-memory links rely on x86-64's store ordering (this is {platform.machine()})"
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        fd, probe = tempfile.mkstemp(dir=SHM_DIR, prefix="pipeloom-probe-")
        os.close(fd)
        os.unlink(probe)
        device = os.stat(SHM_DIR).st_dev
    except OSError as error:
        return None, f"{SHM_DIR} is not usable here: {error}"
    return f"{socket.gethostname()}/{boot}/{device}", ""


def shm_free_bytes() -> int:
    """Bytes free in ``/dev/shm`` (0 where it cannot be read): a ring beyond them would fail at first touch."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def connect(links: list[tuple[str, int, int, float]], me: int, store, hub: ShmHub, ring_bytes: int,
            timeout: float) -> dict[str, ShmLink]:
    """This process's ends of ``links`` ``[(name, src, dst, timeout), ...]`` (global ranks), by name; each
    link's other end calls this at about the same time. ``name`` must be unique on the host for this run.

    The sender creates the files and publishes its pid in ``store``; the receiver opens them, unlinks them at
    once (both ends have them open then) and answers with its pid. Every wait on the peer is bounded by
    ``timeout`` and ends in a :class:`PipelineTimeout` naming it, after removing any file made here."""
    base = {name: os.path.join(SHM_DIR, f"pipeloom-{name}") for name, *_ in links}
    made: dict[str, tuple] = {}
    out: dict[str, ShmLink] = {}
    identity = {"pid": os.getpid(), "pidns": _pid_namespace()}
    try:
        for name, src, _, _ in links:  # sending ends: make the files, say where they are
            if src == me:
                made[name] = _make(base[name], ring_bytes)
                store.set(f"pipeloom/shm/{name}/src", json.dumps(identity))
        for name, src, dst, seconds in links:  # receiving ends: open, unlink, answer
            if dst == me:
                peer = _await(store, f"pipeloom/shm/{name}/src", timeout, src, me)
                files = _open(base[name])
                _unlink(base[name])
                store.set(f"pipeloom/shm/{name}/dst", json.dumps(identity))
                out[name] = ShmLink(name, src, dst, me, *files, _pidfd(peer, identity), hub, seconds)
        for name, src, dst, seconds in links:
            if src == me:
                peer = _await(store, f"pipeloom/shm/{name}/dst", timeout, dst, me)
                _unlink(base[name])
                out[name] = ShmLink(name, src, dst, me, *made[name], _pidfd(peer, identity), hub, seconds)
    finally:
        for name in made:
            _unlink(base[name])
    return out


def _make(path: str, ring_bytes: int) -> tuple:
    if ring_bytes <= 0 or ring_bytes % ALIGN:
        raise ValueError(f"ring_bytes={ring_bytes}: give a positive multiple of {ALIGN}")
    fd = os.open(path + ".ring", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, HEADER_BYTES + ring_bytes)
        ring = mmap.mmap(fd, HEADER_BYTES + ring_bytes)
    finally:
        os.close(fd)
    for suffix in (".data", ".free"):
        os.mkfifo(path + suffix, 0o600)
    return ring, *_open_fifos(path)


def _open(path: str) -> tuple:
    fd = os.open(path + ".ring", os.O_RDWR)
    try:
        ring = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return ring, *_open_fifos(path)


def _open_fifos(path: str) -> tuple[int, int]:
    flags = os.O_RDWR | os.O_NONBLOCK  # read-write: opening never blocks, and neither end ever sees EOF
    return os.open(path + ".data", flags), os.open(path + ".free", flags)


def _unlink(path: str) -> None:
    for suffix in (".ring", ".data", ".free"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def _await(store, key: str, timeout: float, peer: int, me: int) -> dict:
    try:
        store.wait([key], timedelta(seconds=timeout))
    except Exception as error:  # DistStoreError on timeout (its class moved between torch versions)
        raise PipelineTimeout(f"global rank {me} waited {timeout:g} s for global rank {peer} to open its end of a "
                              f"shared-memory link ({key}); build the runtime on every rank") from error
    return json.loads(store.get(key))


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pidfd(peer: dict, mine: dict) -> int | None:
    """A descriptor that polls readable when the peer exits (None where its pid means nothing here)."""
    if not mine["pidns"] or peer["pidns"] != mine["pidns"] or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(peer["pid"])
    except OSError:  # gone already, or no pidfd support: the deadline still ends every wait
        return None
