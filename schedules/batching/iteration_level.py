# Iteration-level batching policies: continuous (Orca), prefill-first (vLLM v0), chunked-prefill, splitfuse.
"""The batch is re-formed every iteration (Orca, OSDI'22: iteration-level scheduling); they differ in how a
prompt enters:

- ``continuous``: running requests decode, waiting ones join with their whole prompt in the same iteration
  (Orca's selective batching mixes them).
- ``prefill-first``: an iteration is all-prefill when a waiting request fits, else all-decode (vLLM v0's default
  scheduler; nano-vllm's ``Scheduler.schedule``).
- ``chunked-prefill``: Sarathi-Serve's stall-free batching (arXiv 2403.02310 §4.3, Algorithm 2; chunking from
  Sarathi, arXiv 2308.16369): a token budget per iteration filled by every running decode first, then the
  unfinished prefills' next chunks, then new requests chunked to what is left.
- ``splitfuse``: DeepSpeed-FastGen's Dynamic SplitFuse (arXiv 2401.08671 §3): a fixed token count per forward,
  decodes first, long prompts split and short ones fused to fill it; as DeepSpeed-MII's ragged batcher
  (``RaggedBatchBase.schedule_requests``) a new prompt starts only when the KV cache can hold all of it.
"""

from __future__ import annotations

from typing import ClassVar

from .policy import BatchingPolicy, BatchingError, check_int
from .request import Request, RequestStatus
from .scheduler import Step


def decode_running(step: Step) -> None:
    """Schedule the next decode token of every running request that is past its prefill, in running order."""
    for r in step.running_at_start:
        if r.status is RequestStatus.RUNNING and not r.is_prefilling and not step.scheduled(r):
            step.schedule(r, 1)


def admit_whole(step: Step) -> int:
    """Admit waiting requests in queue order with their whole prompts while they fit; stop at the first that
    does not (no overtaking). Returns how many joined."""
    joined = 0
    for r in list(step.waiting):
        if not step.admit(r):
            break
        joined += 1
    return joined


def _is_prefilling(r: Request) -> bool:
    return r.is_prefilling


class Continuous(BatchingPolicy):
    """Orca's iteration-level batching: decodes plus whole prompts of newly joined requests."""

    name = "continuous"
    aliases = ("orca",)
    stall_free = True

    def schedule(self, step: Step) -> None:
        decode_running(step)
        if not step.preempted:  # vLLM v1: no admissions in an iteration that preempted
            admit_whole(step)


class PrefillFirst(BatchingPolicy):
    """All-prefill iterations whenever a waiting request fits, else all-decode (vLLM v0, nano-vllm)."""

    name = "prefill-first"
    aliases = ("vllm-v0",)

    def schedule(self, step: Step) -> None:
        if admit_whole(step):
            return
        decode_running(step)


class ChunkedPrefill(BatchingPolicy):
    """Sarathi-Serve stall-free batching under a per-iteration ``token_budget``."""

    name = "chunked-prefill"
    aliases = ("sarathi", "sarathi-serve")
    options: ClassVar[dict[str, object]] = {"token_budget": 512}  # Sarathi-Serve's strict-SLO chunk (2048 relaxed)
    chunks_prompts = True
    stall_free = True

    def check(self) -> None:
        check_int(self.name, "token_budget", self.opts["token_budget"])
        if self.opts["token_budget"] < self.max_num_seqs:
            raise BatchingError(
                f"{self.name}: token_budget={self.opts['token_budget']} is below max_num_seqs={self.max_num_seqs}: "
                f"the running decodes would not fit; raise token_budget or lower max_num_seqs"
            )

    @property
    def token_limit(self) -> float:
        return min(self.opts["token_budget"], super().token_limit)

    def schedule(self, step: Step) -> None:
        decode_running(step)  # Algorithm 2: decodes first, so no decode stalls behind a prompt
        self.continue_prefills(step)
        if not step.preempted:
            self.admit_chunks(step)

    def continue_prefills(self, step: Step) -> None:
        """The next chunk of each unfinished prefill, in running order, to the budget left. A chunk that lacks
        blocks preempts a prefilling request (never a decode: stall-free)."""
        for r in step.running_at_start:
            if step.tokens_left < 1 or step.seats_left < 1:
                return
            if r.status is RequestStatus.RUNNING and r.is_prefilling and not step.scheduled(r):
                step.schedule(r, int(min(r.num_uncomputed, step.tokens_left)), victims=_is_prefilling)

    def admit_chunks(self, step: Step) -> None:
        """New requests in queue order, each chunked to the budget left; stop at the first that cannot start."""
        for r in list(step.waiting):
            if step.tokens_left < 1 or not self.may_start(step, r):
                return
            if not step.admit(r, limit=int(step.tokens_left)):
                return

    def may_start(self, step: Step, request: Request) -> bool:
        return True


class SplitFuse(ChunkedPrefill):
    """DeepSpeed-FastGen Dynamic SplitFuse: ``token_budget`` tokens per forward (768 in FastGen's evaluation)."""

    name = "splitfuse"
    aliases = ("dynamic-splitfuse", "fastgen")
    options: ClassVar[dict[str, object]] = {"token_budget": 768}

    def may_start(self, step: Step, request: Request) -> bool:
        # DeepSpeed-MII: "We don't schedule requests when we find that a prompt is too long to fit to the KV
        # cache" - a prompt starts only if all of its tokens would find blocks now.
        cached = step.capacity.cached_prefix(request)
        return step.fits(request, request.num_tokens - cached, start=cached)
