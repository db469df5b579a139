# Which text files make the corpus (a glob, or the Python standard library's own sources) and their split.
"""The corpus is a sorted list of files; each goes to train or validation by the hash of its contents.

Default: the ``.py`` files of the Python standard library on this machine
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``/``dist-packages``), so training needs
nothing from outside. Splitting by content hash is deterministic across runs and machines, and files
with identical contents (there are many empty ``__init__.py``) always land in the same split, so
validation never sees a verbatim copy of a training file.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass

EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True)
class SourceFile:
    """One corpus file: its path relative to the corpus root, absolute path, size and mtime."""

    rel: str
    path: str
    size: int
    mtime_ns: int


def stdlib_root() -> str:
    """Directory of the Python standard library sources."""
    return sysconfig.get_paths()["stdlib"]


def find_files(pattern: str | None = None) -> tuple[str, list[SourceFile]]:
    """``(root, files)``: files matching the glob ``pattern`` (``**`` recurses), or the stdlib's .py files.

    Files are sorted by their path relative to ``root`` (the pattern's fixed prefix or the stdlib
    directory). Raises ``FileNotFoundError`` when nothing matches.
    """
    if pattern is None:
        root = stdlib_root()
        paths = _python_files(root)
    else:
        pattern = os.path.abspath(os.path.expanduser(pattern))
        paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        prefix = pattern.split("*")[0].split("?")[0].split("[")[0]
        root = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
    files = []
    for path in paths:
        rel = os.path.relpath(path, root)
        if any(part in EXCLUDED_DIRS for part in rel.split(os.sep)):
            continue
        st = os.stat(path)
        files.append(SourceFile(rel, path, st.st_size, st.st_mtime_ns))
    if not files:
        where = pattern if pattern is not None else f"{root}/**/*.py"
        raise FileNotFoundError(f"data.files={where!r} matches no files; give a glob of text files, e.g. "
                                "'corpus/**/*.txt'")
    files.sort(key=lambda f: f.rel)
    return root, files


def _python_files(root: str) -> list[str]:
    """What ``glob(root/**/*.py, recursive=True)`` finds outside EXCLUDED_DIRS (no hidden names, links followed),
    without listing the excluded folders: the interpreter's own site-packages can hold thousands of folders, and
    every rank of every run lists the corpus (about 1 s of CPU per process on a full site-packages)."""
    paths = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in EXCLUDED_DIRS]
        paths += [os.path.join(folder, n) for n in names if n.endswith(".py") and not n.startswith(".")]
    return paths


def in_validation(content: bytes, val_fraction: float) -> bool:
    """True when a file with these bytes belongs to the validation split (sha256 of the content)."""
    h = int.from_bytes(hashlib.sha256(content).digest()[:8], "big")
    return h / 2**64 < val_fraction


def fingerprint(files: list[SourceFile], *extra) -> str:
    """A short hash of the file list (paths, sizes, mtimes) and ``extra`` values: the cache key."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\n".encode())
    for x in extra:
        h.update(repr(x).encode())
    return h.hexdigest()[:16]


def read_split(files: list[SourceFile], val_fraction: float, max_bytes: int | None = None
               ) -> tuple[list[bytes], list[bytes]]:
    """File contents as ``(train, validation)`` lists, in path order; at most ``max_bytes`` read in all.

    At least one file goes to each split (the first validation-hashed file, else the last file), so
    a small corpus still has both.
    """
    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    for f in files:
        with open(f.path, "rb") as fh:
            content = fh.read()
        if not content:
            continue
        (val if in_validation(content, val_fraction) else train).append(content)
        total += len(content)
        if max_bytes is not None and total >= max_bytes:
            break
    if not val and len(train) > 1:
        val.append(train.pop())
    if not train and len(val) > 1:
        train.append(val.pop(0))
    if not train or not val:
        raise ValueError(f"the corpus ({len(files)} files, {total} bytes) is too small to split into train and "
                         "validation; give more files (data.files) or a larger data.max_bytes")
    return train, val
