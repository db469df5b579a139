# Packed token streams on disk: a small JSON header, then the token ids, read back through np.memmap.
"""File format (``.bin``)::

    PIPELOOM-TOKENS\\n{"version": 1, "dtype": "uint16", "num_tokens": N, "tokenizer": {...}, ...}  <spaces>\\n
    <N little-endian ids of dtype>   # starting at byte HEADER_BYTES (4096)

The header is human-readable (``head -c 300 train.bin``); the ids are read lazily with ``np.memmap``, so
a stream larger than memory costs nothing to open. Files are written to a temporary name and renamed,
so concurrent writers (several ranks preparing the same cache) never expose a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

MAGIC = b"PIPELOOM-TOKENS\n"
HEADER_BYTES = 4096
VERSION = 1


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_stream(path: str, chunks: Iterable[np.ndarray | bytes], vocab_size: int, **meta) -> str:
    """Concatenate ``chunks`` (arrays of ids, or ``bytes`` = byte-level ids) into a stream file at ``path``."""
    dtype = dtype_for(vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    with open(tmp, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for chunk in chunks:
            ids = np.frombuffer(chunk, dtype=np.uint8) if isinstance(chunk, (bytes, bytearray)) else chunk
            ids = np.asarray(ids)
            if ids.size and int(ids.max()) >= vocab_size:
                raise ValueError(f"token id {int(ids.max())} >= vocab_size={vocab_size}")
            f.write(ids.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            n += ids.size
        header = json.dumps({"version": VERSION, "dtype": dtype.name, "num_tokens": n, "vocab_size": vocab_size,
                             **meta}, sort_keys=True).encode()
        if len(MAGIC) + len(header) + 1 > HEADER_BYTES:
            raise ValueError(f"token stream header of {len(header)} bytes exceeds {HEADER_BYTES}")
        f.seek(0)
        f.write(MAGIC + header + b" " * (HEADER_BYTES - len(MAGIC) - len(header) - 1) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class TokenStream:
    """A read-only stream file: ``len(stream)`` ids, ``stream.tokens`` the (N,) memmap, ``stream.header``."""

    def __init__(self, path: str):
        self.path = path
        self.header = read_header(path)
        dtype = np.dtype(self.header["dtype"]).newbyteorder("<")
        expected = HEADER_BYTES + self.header["num_tokens"] * dtype.itemsize
        actual = os.path.getsize(path)
        if actual != expected:
            raise ValueError(f"token stream {path} is {actual} bytes, its header promises {expected}: the file is "
                             "truncated or corrupted; delete it and it will be rebuilt")
        self.tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(self.header["num_tokens"],))

    def __len__(self) -> int:
        return int(self.header["num_tokens"])

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    def __repr__(self) -> str:
        return f"TokenStream({self.path!r}, {len(self)} tokens, vocab {self.vocab_size})"


def read_header(path: str) -> dict:
    """The JSON header of a stream file (raises ``ValueError`` for a file that is not one)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head.startswith(MAGIC) or len(head) < HEADER_BYTES:
        raise ValueError(f"{path} is not a pipeloom token stream (no {MAGIC!r} header)")
    try:
        header = json.loads(head[len(MAGIC):].decode().strip())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable token stream header ({err})") from None
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: token stream version {header.get('version')} is not {VERSION}")
    return header
