# pipeloom.data: text files -> tokenizer -> packed memory-mapped token streams (cached) -> deterministic batches.
"""Data for training, with nothing from outside by default::

    from pipeloom.data import prepare_data, TokenBatches
    data = prepare_data()                      # the stdlib's .py files, byte-level, cached
    batches = TokenBatches(data.train, seq_len=128, batch_size=16, seed=0)
    pairs = batches.microbatches(step=0, dp_rank=0, dp=1, microbatches=4)   # [(inputs, targets)] (4, 128)

:func:`prepare_data` tokenizes a corpus once into ``<cache_dir>/<key>/{train,val}.bin`` (key: the file
list, tokenizer and split) and opens the streams; later calls only open them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .batches import TokenBatches, eval_batches
from .corpus import find_files, fingerprint, read_split, stdlib_root
from .stream import TokenStream, read_header, write_stream
from .tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, train_bpe

__all__ = ["ByteTokenizer", "DataBundle", "HFTokenizer", "TokenBatches", "TokenStream", "build_tokenizer",
           "default_cache_dir", "eval_batches", "find_files", "prepare_data", "read_header", "stdlib_root",
           "train_bpe", "write_stream"]

SEPARATOR = "\n\n"  # between files in the packed stream


def default_cache_dir() -> str:
    """``$PIPELOOM_CACHE`` or ``~/.cache/pipeloom``."""
    return os.environ.get("PIPELOOM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pipeloom")


@dataclass
class DataBundle:
    """A tokenizer and the train/validation token streams made with it."""

    tokenizer: ByteTokenizer | HFTokenizer
    train: TokenStream
    val: TokenStream
    directory: str

    def describe(self) -> str:
        return (f"data: {len(self.train):,} train / {len(self.val):,} validation tokens, "
                f"tokenizer {self.tokenizer.spec['kind']} (vocab {self.tokenizer.vocab_size}), cache {self.directory}")


def prepare_data(*, files: str | None = None, tokenizer: str = "byte", tokenizer_path: str | None = None,
                 bpe_vocab_size: int = 4096, val_fraction: float = 0.05, max_bytes: int | None = None,
                 cache_dir: str | None = None) -> DataBundle:
    """Tokenize the corpus into cached train/validation streams (once) and open them.

    ``files``: a glob (None: the Python standard library's .py files). ``tokenizer``: "byte" (default),
    "bpe" (trained here on the training split, ``bpe_vocab_size`` ids, cached) or "hf" (the tokenizer.json
    at ``tokenizer_path``, e.g. an imported checkpoint's). ``val_fraction`` of the files (by content hash)
    form the validation split. ``max_bytes`` caps how much of the corpus is read (in path order).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    root, found = find_files(files)
    split_key = fingerprint(found, root, val_fraction, max_bytes)
    contents = None
    if tokenizer == "bpe" and tokenizer_path is None:
        tokenizer_path = os.path.join(cache_dir, f"bpe-{split_key}-{bpe_vocab_size}", "tokenizer.json")
        if not os.path.exists(tokenizer_path):
            contents = read_split(found, val_fraction, max_bytes)
            train_bpe((c.decode("utf-8", errors="replace") for c in contents[0]), bpe_vocab_size, tokenizer_path)
    tok = build_tokenizer(tokenizer, tokenizer_path)
    key = fingerprint(found, root, val_fraction, max_bytes, tok.spec)
    directory = os.path.join(cache_dir, f"tokens-{key}")
    paths = {split: os.path.join(directory, f"{split}.bin") for split in ("train", "val")}
    if not all(_usable(p) for p in paths.values()):
        if contents is None:
            contents = read_split(found, val_fraction, max_bytes)
        meta = {"tokenizer": tok.spec, "source": root if files is None else files, "key": key}
        for split, texts in zip(("train", "val"), contents):
            write_stream(paths[split], _encode(tok, texts), tok.vocab_size, split=split, files=len(texts), **meta)
        with open(os.path.join(directory, "info.json"), "w") as f:
            json.dump({**meta, "files": len(found), "val_fraction": val_fraction, "max_bytes": max_bytes}, f, indent=1)
    return DataBundle(tok, TokenStream(paths["train"]), TokenStream(paths["val"]), directory)


def _usable(path: str) -> bool:
    try:
        TokenStream(path)
        return True
    except (OSError, ValueError):
        return False


def _encode(tok, texts: list[bytes]):
    """Token id chunks of ``texts`` joined by :data:`SEPARATOR`; raw bytes for the byte tokenizer."""
    import numpy as np

    sep = SEPARATOR.encode()
    if isinstance(tok, ByteTokenizer):
        for i, content in enumerate(texts):
            yield (sep if i else b"") + content
        return
    sep_ids = np.asarray(tok.encode(SEPARATOR), dtype=np.int64)
    for start in range(0, len(texts), 256):
        batch = [t.decode("utf-8", errors="replace") for t in texts[start:start + 256]]
        for i, ids in enumerate(tok.encode_batch(batch)):
            if start + i:
                yield sep_ids
            yield np.asarray(ids, dtype=np.int64)
