# Checkpoint folders on disk: finding them, manifests and per-rank checksums, and replacing one atomically.
"""The file side of :mod:`pipeloom.training.checkpoint`.

A complete checkpoint is a folder ``step_N/`` with a manifest (``pipeloom.json``) listing every file's
size and sha256. Each rank hashes the files it wrote itself (its DCP data file ``__R_*.distcp`` and its
``rng_rankR.pt``; rank 0 also ``.metadata``), all at once, and rank 0 collects the lists into the manifest;
on load each rank checks the sizes of all files (a stat) and the checksums of the files it reads.

Replacing: a save writes ``step_N.tmp/`` and renames it to ``step_N`` only when complete. Saving a step
that exists already (a resumed run saving its final step again) first renames the old folder to
``step_N.old``, then the new one into place, then deletes the old: at every moment one complete copy is
found, because :func:`checkpoint_steps` takes ``step_N.old`` when ``step_N`` is missing (a crash between
the two renames), and the next save of that step starts by putting such a copy back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch.distributed as dist

MANIFEST = "pipeloom.json"
FORMAT = "pipeloom-checkpoint-1"
_STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupted or does not fit the model being trained."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_steps(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the complete checkpoint folders in ``directory``, oldest first (``step_N``, or
    ``step_N.old`` where a crash between a re-save's two renames left only that)."""
    if not directory or not os.path.isdir(directory):
        return []
    found: dict[int, str] = {}
    for entry in sorted(os.listdir(directory)):  # "step_N" sorts before "step_N.old"
        m = _STEP_DIR.match(entry)
        path = os.path.join(directory, entry)
        if m and os.path.isdir(path) and (not m.group(2) or os.path.isfile(os.path.join(path, MANIFEST))):
            found.setdefault(int(m.group(1)), path)
    return sorted(found.items())


def latest_checkpoint(directory: str) -> str | None:
    """The newest complete checkpoint folder in ``directory`` (``.tmp`` folders are ignored), or None."""
    steps = checkpoint_steps(directory)
    return steps[-1][1] if steps else None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def own_files(folder: str, rank: int) -> list[str]:
    """The files of ``folder`` this rank wrote: its DCP data files (``__{rank}_*``, FileSystemWriter's
    naming), its RNG states, and (rank 0, DCP's coordinator) ``.metadata``."""
    names = [n for n in os.listdir(folder) if n.startswith(f"__{rank}_") or n == f"rng_rank{rank}.pt"]
    return sorted(names + ([".metadata"] if rank == 0 else []))


def describe_own_files(folder: str) -> dict[str, dict]:
    """``{name: {size, sha256}}`` of this rank's own files, each flushed to disk first."""
    out = {}
    for name in own_files(folder, _rank()):
        path = os.path.join(folder, name)
        fsync(path)
        out[name] = {"size": os.path.getsize(path), "sha256": sha256(path)}
    return out


def gather_file_lists(files: dict[str, dict]) -> dict[str, dict] | None:
    """Every rank's :func:`describe_own_files`, merged on rank 0 (None elsewhere; collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(files)
    parts = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(files, parts, dst=0)
    if _rank() != 0:
        return None
    return {name: info for part in parts for name, info in part.items()}


def write_manifest(folder: str, manifest: dict) -> None:
    """Write the manifest, after checking that it lists every file of ``folder``."""
    unlisted = sorted(set(os.listdir(folder)) - set(manifest["files"]) - {MANIFEST})
    if unlisted:
        raise CheckpointError(f"checkpoint {folder}: files {unlisted} were written by no rank's list; the save is "
                              "incomplete (is another job writing to this folder?)")
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def replace_folder(tmp: str, final: str) -> None:
    """Move the complete ``tmp`` to ``final`` with a complete copy of the step on disk at every moment."""
    old = final + ".old"
    if os.path.isdir(old):  # an earlier re-save stopped between its renames
        if os.path.isdir(final):
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(os.path.dirname(final) or ".")
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str, verify: bool = True, files=None) -> dict:
    """The manifest of checkpoint ``path`` after checking that every listed file is there with its size,
    and (``verify``) that the checksums of ``files`` (None: all listed files) match."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete (an interrupted save) or not "
                              "a pipeloom checkpoint; delete it or point checkpoint.dir elsewhere")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({err}); the checkpoint is corrupted") \
            from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for name, info in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} is corrupted: file {name} is missing")
        size = os.path.getsize(file)
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} is {size} bytes, the manifest says "
                                  f"{info['size']}; delete this checkpoint (older ones in the folder still work)")
    if verify:
        verify_files(path, manifest, manifest["files"] if files is None else files)
    return manifest


def verify_files(path: str, manifest: dict, names) -> None:
    """Check the sha256 of each of ``names`` against the manifest (files it does not list are refused)."""
    for name in sorted(set(names)):
        info = manifest["files"].get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {path}: {name} is not listed in its manifest; the checkpoint is "
                                  "corrupted or was written by another tool")
        if sha256(os.path.join(path, name)) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the sha256 of {name} does not match the manifest; "
                                  "delete this checkpoint (older ones in the folder still work)")
