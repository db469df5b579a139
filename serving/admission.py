# Admission control: a hard bound on admitted sequences and on prompt tokens not yet prefilled; beyond it, 429 now.
"""Never an unbounded queue. A request is admitted only if, with it, the server holds at most
``max_requests`` sequences (running + waiting; a request with ``n`` samples counts ``n``) and at most
``max_queued_tokens`` prompt tokens that have not produced a first token yet. Otherwise it is refused at once
(HTTP 429 / gRPC RESOURCE_EXHAUSTED / WebSocket close 1013), as TGI refuses beyond
``max_concurrent_requests``. A request that could never fit (more samples or prompt tokens than the bounds)
is a 400 instead: retrying would not help.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import bad_request, overloaded


@dataclass
class Ticket:
    """One admitted request's share of the bounds; returned at its first token and at its end."""

    admission: Admission
    seqs: int
    tokens: int
    started: bool = False
    released: bool = False

    def first_token(self) -> None:
        """Its prompt is prefilled: its prompt tokens stop counting as queued."""
        if not self.started and not self.released:
            self.started = True
            self.admission.queued_tokens -= self.tokens

    def release(self) -> None:
        """It finished, failed or was aborted (idempotent)."""
        if not self.released:
            self.first_token()
            self.released = True
            self.admission.seqs -= self.seqs


class Admission:
    """Counts what the server has admitted (every protocol goes through :meth:`admit`)."""

    def __init__(self, max_requests: int, max_queued_tokens: int):
        self.max_requests, self.max_queued_tokens = max_requests, max_queued_tokens
        self.seqs = 0  # admitted sequences not yet finished
        self.queued_tokens = 0  # prompt tokens of admitted requests without a first token
        self.rejected = 0

    def admit(self, seqs: int, prompt_tokens: int) -> Ticket:
        """A ticket for ``seqs`` sequences over ``prompt_tokens`` prompt tokens, or an APIError (400 or 429)."""
        if seqs > self.max_requests:
            raise bad_request(f"n={seqs} sequences is more than this server ever holds at once "
                              f"(server.max_requests={self.max_requests}); ask for fewer", param="n")
        if prompt_tokens > self.max_queued_tokens:
            raise bad_request(f"the prompt has {prompt_tokens} tokens, more than this server queues at once "
                              f"(server.max_queued_tokens={self.max_queued_tokens}); shorten it", param="prompt")
        if self.seqs + seqs > self.max_requests:
            self.rejected += 1
            raise overloaded(f"{self.seqs} sequences are running or waiting (limit {self.max_requests})")
        if self.queued_tokens + prompt_tokens > self.max_queued_tokens:
            self.rejected += 1
            raise overloaded(f"{self.queued_tokens} prompt tokens are queued (limit {self.max_queued_tokens})")
        self.seqs += seqs
        self.queued_tokens += prompt_tokens
        return Ticket(self, seqs, prompt_tokens)


__all__ = ["Admission", "Ticket"]
