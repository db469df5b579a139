# Incremental detokenization: new token ids in, the text to emit out; stop tokens, stop strings and length ends.
"""One :class:`IncrementalDetokenizer` per output sequence. ``add(ids)`` takes the tokens sampled this
iteration and returns the text delta that is safe to send:

* never half a character. Token ids are decoded over a short window (vLLM's prefix/read offsets: the
  tokens of the last emission plus the new ones, so tokenizers that drop a leading space at the start of a
  decode still get it right), and nothing is emitted while the window's text ends in U+FFFD, the
  replacement character of an incomplete UTF-8 sequence (a byte tokenizer emits one byte per token; a
  byte-level BPE can split a character across tokens too). When the sequence ends the rest is flushed, so
  the joined deltas equal ``tokenizer.decode(output ids)``.
* never part of a stop string. A stop string is found even when split across tokens; the longest suffix
  of the pending text that is a prefix of some stop string is held back until it either completes a stop
  string (the text is cut there, the stop string kept only with ``include_stop_str_in_output``) or
  diverges (then it is emitted).

Ends: ``finish_reason`` "stop" (a stop string, a ``stop_token_ids`` token, or EOS unless ``ignore_eos``;
``stop_reason`` says which; the stop token is kept in ``token_ids`` but not in the text) or "length"
(``max_tokens`` tokens, or :meth:`finish` called by the engine, e.g. at the model's context length). Before
``min_tokens`` tokens are out nothing stops the sequence (vLLM's rule): a stop string counts only when it
ends in text of the ``min_tokens``-th token or later. Tokens after the end in one ``add`` are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from .sampling import SamplingParams

REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence
PROMPT_CONTEXT = 5  # prompt tokens decoded with the first output tokens (vLLM's initial offset)


class IncrementalDetokenizer:
    """Text deltas for one sequence. ``tokenizer``: anything with ``decode(ids) -> str`` (pipeloom's
    ByteTokenizer or HFTokenizer), or None for token-id-only requests (then the text stays empty and stop
    strings are refused). ``prompt_ids``: the prompt, whose last tokens give the decoding context."""

    def __init__(self, tokenizer, params: SamplingParams, *, prompt_ids: Sequence[int] = (),
                 eos_token_id: int | None = None):
        if tokenizer is None and params.stop:
            raise ValueError(f"stop={params.stop!r} needs a tokenizer to match text; this request has none "
                             "(use stop_token_ids instead)")
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_ids.add(eos_token_id)
        self.token_ids: list[int] = []  # every output token received until the end (a stop token included)
        self.text = ""  # the text emitted so far (the joined deltas)
        self.finished = False
        self.finish_reason: str | None = None  # "stop" or "length"
        self.stop_reason: str | int | None = None  # the matched stop string or stop token id
        self._pending = ""  # decoded but not yet emitted: a possible start of a stop string
        self._floor = 0  # stop strings must end after this text offset (min_tokens)
        self._ids: list[int] = []  # the decoding window's tokens: prompt context, then output tokens
        if tokenizer is not None and prompt_ids:
            context = [int(t) for t in list(prompt_ids)[-PROMPT_CONTEXT:]]
            if not tokenizer.decode(context).endswith(REPLACEMENT):  # a clean character boundary
                self._ids = context
        self._prefix = 0  # window start: the tokens of the last emission, for context
        self._read = len(self._ids)  # the tokens before this offset have been emitted

    def add(self, new_ids: Sequence[int]) -> str:
        """Take this iteration's sampled ids; return the text to emit now ('' when none or when finished)."""
        before = len(self.text)
        for token in new_ids:
            if self.finished:
                break
            token = int(token)
            self.token_ids.append(token)
            count = len(self.token_ids)
            stoppable = count >= self.params.min_tokens
            if stoppable and token in self.stop_ids:
                self._end("stop", token)
                break
            self._ids.append(token)
            self._take(self._decode_new(final=False))
            if not stoppable:  # text so far cannot hold the stop string that ends this sequence
                self._floor = len(self.text) + len(self._pending)
            if not self.finished and count >= self.params.max_tokens:
                self._end("length", None)
        return self.text[before:]

    def push(self, token: int) -> None:
        """``add([token])`` without decoding now, for callers that read the text only later (offline
        generation): the stop-token and length checks happen here; the text is decoded by the next ``add``,
        ``flush`` or the end, over all the tokens pushed since (the same text: decoding a longer window gives
        the joined deltas). With stop strings the text is needed to stop, so this is ``add``."""
        if self.finished:
            return
        if self.params.stop:
            self.add((token,))
            return
        token = int(token)
        self.token_ids.append(token)
        count = len(self.token_ids)
        if count >= self.params.min_tokens and token in self.stop_ids:
            self._end("stop", token)
            return
        self._ids.append(token)
        if count >= self.params.max_tokens:
            self._end("length", None)

    def flush(self) -> str:
        """Decode what ``push`` left pending; return the text to emit now (as ``add`` would)."""
        before = len(self.text)
        if not self.finished:
            self._take(self._decode_new(final=False))
        return self.text[before:]

    def finish(self, reason: str = "length") -> str:
        """End the sequence from outside (e.g. the context is full, or an abort): flush the held text."""
        before = len(self.text)
        if not self.finished:
            self._end(reason, None)
        return self.text[before:]

    # ---- internals ----

    def _end(self, reason: str, stop_token: int | None) -> None:
        """Flush the held characters and the held stop-string prefix (a stop string may still complete)."""
        if not self._take(self._decode_new(final=True), final=True):
            self._emit(len(self._pending))
            self.finished, self.finish_reason, self.stop_reason = True, reason, stop_token

    def _decode_new(self, final: bool) -> str:
        """Text of the window's new tokens, or '' while it ends in an incomplete character (unless final)."""
        if self.tokenizer is None or self._read == len(self._ids):
            return ""
        prefix_text = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        if len(text) > len(prefix_text) and (final or not text.endswith(REPLACEMENT)):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text):]
        if final:
            self._read = len(self._ids)
        return ""

    def _take(self, delta: str, final: bool = False) -> bool:
        """Add decoded text; cut at the first stop string (True when one matched), else emit what is safe."""
        self._pending += delta
        stops = self.params.stop
        if not stops:
            self._emit(len(self._pending))
            return False
        if len(self.token_ids) >= self.params.min_tokens:
            match = self._first_stop()
            if match is not None:
                start, stop = match
                self._emit(start + len(stop) if self.params.include_stop_str_in_output else start)
                self._pending = ""
                self.finished, self.finish_reason, self.stop_reason = True, "stop", stop
                return True
        if final:
            return False
        hold = 0
        for k in range(min(len(self._pending), max(map(len, stops)) - 1), 0, -1):
            tail = self._pending[-k:]
            if any(s.startswith(tail) for s in stops):
                hold = k
                break
        self._emit(len(self._pending) - hold)
        return False

    def _first_stop(self) -> tuple[int, str] | None:
        """The stop string occurrence in the pending text that ends first (and past the min_tokens floor)."""
        floor = self._floor - len(self.text)  # an occurrence must end after this offset of _pending
        best = None
        for s in self.params.stop:
            at = self._pending.find(s, max(0, floor - len(s) + 1))
            if at >= 0 and (best is None or (at + len(s), at) < (best[0] + len(best[1]), best[0])):
                best = (at, s)
        return best

    def _emit(self, n: int) -> None:
        self.text += self._pending[:n]
        self._pending = self._pending[n:]
