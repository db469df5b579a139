# Tokenizers behind one small interface: byte-level (default), BPE trained locally, or a checkpoint's tokenizer.json.
"""Three tokenizers, one interface (``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``spec``):

* :class:`ByteTokenizer` - UTF-8 bytes are the ids (vocabulary 256). Needs nothing, never fails, and is
  what the tiny CPU models (``vocab_size=256``) expect.
* :class:`HFTokenizer` - a ``tokenizer.json`` read with the ``tokenizers`` package: the one shipped with an
  imported Hugging Face checkpoint, or one trained here by :func:`train_bpe` (byte-level BPE).

``spec`` is a short JSON-able description written into token-stream headers and checkpoints, so a
stream or a checkpoint made with one tokenizer is not silently reused with another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

from pipeloom import features


class Tokenizer(Protocol):
    """What the data pipeline and text sampling need from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def spec(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; decoding replaces invalid byte sequences."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> bytes:
        """Raw file bytes are already ids: no decode/encode round trip (files need not be valid UTF-8)."""
        return data

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @property
    def spec(self) -> dict:
        return {"kind": "byte", "vocab_size": 256}


class HFTokenizer:
    """A ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file."""

    def __init__(self, path: str):
        features.require("tokenizers", "a BPE or Hugging Face tokenizer")
        from tokenizers import Tokenizer as _Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist; pass the path of a tokenizer.json "
                                    "(data.tokenizer_path) or use data.tokenizer=byte")
        self.path = path
        self._tok = _Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        with open(path, "rb") as f:
            self._digest = hashlib.sha256(f.read()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def spec(self) -> dict:
        return {"kind": "tokenizer.json", "vocab_size": self.vocab_size, "sha256": self._digest}


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> str:
    """Train a byte-level BPE of ``vocab_size`` ids on ``texts`` and write it to ``path`` (tokenizer.json).

    Byte-level (GPT-2 style pre-tokenizer and decoder), so any text round-trips; the 256 byte symbols are
    always in the vocabulary. Written atomically (a temporary file renamed into place).
    """
    features.require("tokenizers", "training a BPE tokenizer (data.tokenizer=bpe)")
    from tokenizers import Tokenizer as _Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"data.bpe_vocab_size={vocab_size} must exceed 256 (the byte alphabet) for BPE merges")
    tok = _Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return path


def build_tokenizer(kind: str = "byte", path: str | None = None) -> ByteTokenizer | HFTokenizer:
    """``kind``: "byte", or "bpe"/"hf" with ``path`` to a tokenizer.json (see :func:`train_bpe`)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "hf"):
        if path is None:
            raise ValueError(f"data.tokenizer={kind} needs a tokenizer.json path")
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer={kind!r} is not one of 'byte', 'bpe', 'hf'")
