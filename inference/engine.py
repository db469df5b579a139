# The engine loop: add requests, then step() = schedule -> run the model -> sample -> detokenize -> update.
"""``LLMEngine`` ties the parts together, each of one concern:

* the batching policy and ``Scheduler`` of :mod:`pipeloom.schedules.batching` decide which sequences run
  this iteration and how many of their tokens (the engine only asks);
* the :class:`~pipeloom.inference.block_manager.BlockManager` is the scheduler's ``KVCapacity``: paged KV
  blocks, prefix caching, reference counts;
* the :class:`~pipeloom.inference.model_runner.ModelRunner` runs the iteration as one ragged forward;
* the ``Sampler`` draws one token per sampled row (per-request seeded generators), the
  ``IncrementalDetokenizer`` of each sequence turns tokens into text and decides stops.

Every iteration is recorded as the batching simulator's ``IterationRecord`` (composition and measured
duration), from which its cost model ``t = a + b*prefill_tokens + c*decode_seqs + d*kv_tokens_read`` is
fitted; :meth:`LLMEngine.latency_report` prints predicted against measured latency.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence as Seq

import torch
from pipeloom.schedules.batching import (IterationRecord, RequestStatus, Scheduler, fit_cost_model, fit_error,
                                         get_batching)

from pipeloom.kernels.kv_fp8 import check_kv_cache_dtype

from .block_manager import BlockManager
from .detokenize import IncrementalDetokenizer
from .model_runner import DEFAULT_GRAPH_SIZES, ModelRunner, num_blocks_for_budget
from .overlap import Overlap
from .sampling import Sampler, SamplingParams
from .sequence import CompletionOutput, RequestOutput, Sequence
from .validate import validate_request


class _Group:
    """The sequences of one user request (n samples) and what was reported of them so far."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], seqs: list[Sequence]):
        self.request_id, self.prompt, self.prompt_ids, self.seqs = request_id, prompt, prompt_ids, seqs
        self.finish: dict[int, str] = {}  # sample index -> finish reason (also abort)

    @property
    def finished(self) -> bool:
        return len(self.finish) == len(self.seqs)


class LLMEngine:
    """Continuous-batching engine over one :class:`pipeloom.models.Transformer` (see the module docstring).

    ``policy`` and ``policy_options``: a registered batching policy (``list_batching()``) and its options;
    ``token_budget`` goes to the policies that take one (chunked-prefill, splitfuse), others ignore it.
    KV cache: ``block_size`` tokens per block, ``num_blocks`` blocks or, when None, as many as
    ``gpu_memory_fraction`` of the device memory holds. ``cuda_graphs`` and ``compile`` (False, True or a
    ``torch.compile`` mode): how decode steps run (:class:`~pipeloom.inference.model_runner.ModelRunner`).
    ``overlap``: offline steps (``step(finished_only=True)``) of plain greedy sequences prepare the next
    iteration while the device runs the current one (:mod:`.overlap`); "auto" (the default): on CUDA (on the
    H200: +27% offline throughput, 4.64 against 5.8-6.0 ms per iteration, and 0.2-0.4 ms/token at batch 1;
    bench/RESULTS.md), not on the CPU (a synchronous forward hides nothing); True: also there (tests).
    ``kv_cache_dtype``: "auto" (the model's dtype) or "fp8" (e4m3 with a scale per token and head: about twice
    the tokens in the same memory).
    """

    verify_tokens = 0  # query rows per sequence the runner's verification graphs take (a SpeculativeEngine's 1 + k)
    verify_attention = "tiles"  # and how they attend (ModelRunner.verify_forward)

    def __init__(self, model: torch.nn.Module, *, tokenizer=None, eos_token_id: int | None = None,
                 policy: str = "chunked-prefill", token_budget: int | None = None, max_num_seqs: int | None = None,
                 policy_options: dict | None = None, block_size: int = 16, num_blocks: int | None = None,
                 gpu_memory_fraction: float = 0.9, enable_prefix_caching: bool = True, attention: str = "auto",
                 cuda_graphs: bool = True, compile: bool | str = False, overlap: bool | str = "auto",
                 seed: int = 0, kv_cache_dtype: str = "auto"):
        self.model = model.eval()
        self.config = model.config
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        check_kv_cache_dtype(kv_cache_dtype, self.config.head_dim)
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(self.config, block_size, self.dtype, self.device, gpu_memory_fraction,
                                               kv_cache_dtype=kv_cache_dtype)
        self.policy = _make_policy(policy, token_budget, max_num_seqs, policy_options or {})
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.policy, self.block_manager)
        self.runner = ModelRunner(model, num_blocks, block_size, backend=attention, cuda_graphs=cuda_graphs,
                                  graph_batch_sizes=graph_sizes(self.policy.max_num_seqs), compile=compile,
                                  kv_cache_dtype=kv_cache_dtype, verify_tokens=self.verify_tokens,
                                  verify_attention=self.verify_attention)
        shared = torch.Generator(device=self.device).manual_seed(seed)
        self.sampler = Sampler(eos_token_id=eos_token_id, generator=shared)
        self.records: list[IterationRecord] = []  # one per iteration run: composition and measured seconds
        self.num_preemptions = 0
        self.groups: dict[str, _Group] = {}
        self._lock = threading.RLock()  # steps and aborts from other threads (AsyncEngine) take turns
        self._t0 = time.perf_counter()
        self.max_model_len = self.config.max_seq_len
        self.idle = False
        if overlap not in (True, False, "auto"):
            raise ValueError(f"overlap={overlap!r}; choose True, False or 'auto'")
        self.overlap = overlap
        self._overlap = Overlap(self)
        self._needs_tokens: set[str] = set()  # live sequences whose token values decide something (no overlap)

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: str | Seq[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt given as a string or as token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt={prompt[:40]!r} is text but this model has no tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, prompt

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None, *,
                    arrival: float | None = None, priority: int = 0, prompt_ids: list[int] | None = None) -> None:
        """Queue a request (``n`` samples). Bad input raises ValueError naming the field and value, here,
        before anything is queued; requests already running are not touched."""
        group = self.make_group(request_id, prompt, params, arrival=arrival, priority=priority, prompt_ids=prompt_ids)
        with self._lock:
            self.enqueue(group)

    def make_group(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None, *,
                   arrival: float | None = None, priority: int = 0, prompt_ids: list[int] | None = None) -> _Group:
        """Tokenize and validate a request into its sequences (no engine state is touched; any thread)."""
        params = SamplingParams() if params is None else params
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r} must be a non-empty string")
        if prompt_ids is not None:
            text, ids = (prompt if isinstance(prompt, str) else None), prompt_ids
        else:
            text, ids = self.tokenize(prompt)
        ids = validate_request(ids, params, vocab_size=self.config.vocab_size, max_model_len=self.max_model_len,
                               max_seqs_for_n=self.policy.max_num_seqs)
        now = self.now() if arrival is None else arrival
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids) + 1)  # stop at the context length
        seqs = []
        for j in range(params.n):
            p = params.child(j) if params.n > 1 else params
            detok = IncrementalDetokenizer(self.tokenizer, p, prompt_ids=ids, eos_token_id=self.eos_token_id)
            seqs.append(Sequence(id=request_id if j == 0 else f"{request_id}#{j}", prompt_len=len(ids),
                                 max_tokens=max_tokens, arrival=now, priority=priority, token_ids=list(ids),
                                 params=p, group_id=request_id, index=j, generator=p.generator(self.device),
                                 detokenizer=detok, argmax_only=argmax_only(p)))
        for seq in seqs[:1]:  # the policy's own refusal (e.g. more KV blocks than the cache has), before queueing
            self.policy.check_request(seq, self.block_manager)
        return _Group(request_id, text, ids, seqs)

    def enqueue(self, group: _Group) -> None:
        """Hand a validated group to the scheduler (call with the engine's lock held)."""
        if group.request_id in self.groups:
            raise ValueError(f"request_id={group.request_id!r} is already in use; request ids must be unique")
        added = []
        try:
            for seq in group.seqs:
                self.scheduler.add(seq, seq.arrival)
                added.append(seq)
        except ValueError:
            for seq in added:
                self.scheduler.abort(seq.id)
            raise
        self.groups[group.request_id] = group
        self._needs_tokens.update(seq.id for seq in group.seqs if not ends_by_length_only(seq))

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now: its blocks are freed at once; returns its final output (None if unknown)."""
        with self._lock:
            group = self.groups.pop(request_id, None)
            if group is None:
                return None
            for seq in group.seqs:
                if seq.index not in group.finish:
                    self.scheduler.abort(seq.id)
                    seq.detokenizer.finish("abort")
                    group.finish[seq.index] = "abort"
                self.runner.forget(seq.id)
                self._needs_tokens.discard(seq.id)
            return self._output(group, {})

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._overlap.flight is not None

    def now(self) -> float:
        """Seconds since the engine started (the scheduler's clock)."""
        return time.perf_counter() - self._t0

    # ------------------------------------------------------------------ the loop

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one iteration; return the outputs of the requests that got tokens or finished in it (only the
        finished ones with ``finished_only``: offline generation skips building the running ones, and their
        text is decoded once at the end rather than token by token, unless stop strings need it now).

        With ``finished_only`` and ``overlap``, while no sequence needs its tokens' values to decide anything
        (:mod:`.overlap`), the step launches the next iteration before it waits for the previous one's tokens:
        outputs then come one call later."""
        with self._lock:
            if finished_only and self._overlapping():
                return self._overlap.step()
            landed = self._overlap.land()  # an overlapped iteration still in flight finishes first
            iteration = self.scheduler.schedule(self.now())
            self.idle = iteration.is_empty and not landed  # nothing runnable now (callers may wait for next_wakeup)
            if iteration.is_empty:
                return landed
            start = time.perf_counter()
            logits = self.runner.run(iteration, self.block_manager)  # (R, V)
            rows = [sl.request for sl in iteration.slices if sl.samples]
            new_tokens, logprobs = self._sample(logits, rows)
            self.block_manager.mark_computed()
            return landed + self.apply(self.scheduler, iteration, new_tokens, logprobs, time.perf_counter() - start,
                                       finished_only, rows=rows)

    def _overlapping(self) -> bool:
        """Whether this offline step may overlap (see ``overlap`` in the class docstring)."""
        if not self.overlap or self._needs_tokens:
            return False
        return self.overlap is True or self.device.type == "cuda"  # "auto": on CUDA

    def apply(self, scheduler: Scheduler, iteration, new_tokens: list[int], logprobs: list[dict | None],
              duration: float, finished_only: bool = False, done: list | None = None,
              rows: list[Sequence] | None = None) -> list[RequestOutput]:
        """After ``iteration`` ran (on ``scheduler``: the engine's, or a pipeline lane's): append each sampled
        row's token, detokenize, update the scheduler (``done``: it was updated already, these finished), record
        it, and build the outputs. ``rows``: the iteration's sampling sequences, when the caller has them. A
        sequence aborted while its iteration was in flight gets nothing. Call with the engine's lock held."""
        if rows is None:
            rows = [sl.request for sl in iteration.slices if sl.samples]
        ended: dict[str, str] = {}
        deltas: dict[str, dict[int, tuple[str, int]]] = {}
        groups = self.groups
        for seq, token, lp in zip(rows, new_tokens, logprobs):
            if seq.group_id not in groups:  # aborted while in flight
                continue
            seq.token_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            detok = seq.detokenizer
            if finished_only:
                detok.push(token)  # stop ids and length now; the text when it is read
            else:
                deltas.setdefault(seq.group_id, {})[seq.index] = (detok.add([token]), token)
            if detok.finished:
                ended[seq.id] = detok.finish_reason
        if done is None:
            done = scheduler.update(iteration, ended)
        elif any(ended.get(seq.id) not in (None, seq.finish_reason) for seq in done) or len(ended) > len(done):
            raise RuntimeError(f"sequences {sorted(ended)} ended by token value in an overlapped step; only "
                               "sequences that end by length may overlap")
        self.records.append(IterationRecord.from_iteration(iteration, duration))
        self.num_preemptions += len(iteration.preempted)
        for seq in done:
            self.runner.forget(seq.id)
            self._needs_tokens.discard(seq.id)
            if finished_only:  # nothing of it was reported yet: all of its text is new
                seq.detokenizer.finish(seq.finish_reason)
                deltas.setdefault(seq.group_id, {})[seq.index] = (seq.detokenizer.text, seq.token_ids[-1])
            elif not seq.detokenizer.finished:
                text = seq.detokenizer.finish(seq.finish_reason)
                old = deltas.setdefault(seq.group_id, {}).get(seq.index, ("", None))
                deltas[seq.group_id][seq.index] = (old[0] + text, old[1])
            groups[seq.group_id].finish[seq.index] = seq.finish_reason
        outputs = []
        for group_id, group_deltas in deltas.items():
            group = groups[group_id]
            if finished_only and not group.finished:
                continue
            outputs.append(self._output(group, group_deltas))
            if group.finished:
                del groups[group_id]
        return outputs

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> tuple[list[int], list[dict | None]]:
        if not rows:
            return [], []
        if all(s.argmax_only for s in rows):  # plain greedy rows: one argmax, one device->host copy
            return logits.argmax(dim=-1).tolist(), [None] * len(rows)
        return sample_rows(self.sampler, logits, rows)

    def _output(self, group: _Group, deltas: dict[int, tuple[str, int | None]]) -> RequestOutput:
        outputs = []
        for seq in group.seqs:
            d = seq.detokenizer
            outputs.append(CompletionOutput(
                index=seq.index, token_ids=list(d.token_ids), text=d.text, finish_reason=group.finish.get(seq.index),
                stop_reason=d.stop_reason, logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None))
        return RequestOutput(group.request_id, group.prompt, group.prompt_ids, outputs, finished=group.finished,
                             delta={j: t for j, (t, _) in deltas.items()},
                             delta_token_ids={j: [tok] for j, (_, tok) in deltas.items() if tok is not None},
                             queue_time=_queue_time(group.seqs[0]))

    # ------------------------------------------------------------------ measurements

    def latency_report(self, skip: int = 1) -> str:
        """Measured against predicted iteration latency: the batching simulator's cost model
        (``pipeloom.schedules.batching.fit_cost_model``) fitted on this run's iterations."""
        records = self.records[skip:] if len(self.records) > skip + 4 else self.records
        if len(records) < 2:
            return "iteration latency: too few iterations to fit a cost model"
        model = fit_cost_model(records, name="fitted")
        measured = sum(r.duration for r in records)
        predicted = sum(model.predict(r) for r in records)
        return (f"iteration latency over {len(records)} iterations: measured {measured * 1e3:.1f} ms, predicted "
                f"{predicted * 1e3:.1f} ms (mean relative error per iteration {fit_error(model, records):.1%}); "
                f"{model}")

    def stats(self) -> dict[str, float]:
        """Counters: iterations, tokens, preemptions, prefix-cache hit rate, KV usage."""
        bm = self.block_manager
        return {"iterations": len(self.records), "prefill_tokens": sum(r.num_prefill_tokens for r in self.records),
                "decode_tokens": sum(r.num_decode_seqs for r in self.records), "preemptions": self.num_preemptions,
                "prefix_cache_hit_rate": bm.hits / bm.queries if bm.queries else 0.0, "kv_usage": bm.usage(),
                "overlapped_iterations": self._overlap.overlapped}


def argmax_only(params: SamplingParams) -> bool:
    """Greedy with nothing that changes the argmax or needs more than the token: no penalties, min_tokens or
    logprobs (the Sampler would give exactly ``logits.argmax``)."""
    return (params.greedy and params.repetition_penalty == 1.0 and not params.presence_penalty
            and not params.frequency_penalty and not params.min_tokens and params.logprobs is None)


def ends_by_length_only(seq: Sequence) -> bool:
    """Sampled by one argmax, and no token value can end it (no stop strings, stop ids or EOS): nothing the
    scheduler decides depends on its tokens' values."""
    return seq.argmax_only and not seq.params.stop and not seq.detokenizer.stop_ids


def graph_sizes(max_num_seqs: int, sizes: tuple[int, ...] = DEFAULT_GRAPH_SIZES) -> tuple[int, ...]:
    """The decode graph sizes an engine of ``max_num_seqs`` seats can use: those below it and the first at or
    above it (every size is captured, so fewer sizes mean less capture time and memory)."""
    below = tuple(n for n in sizes if n < max_num_seqs)
    above = [n for n in sizes if n >= max_num_seqs]
    return below + (above[0],) if above else below


def sample_rows(sampler: Sampler, logits: torch.Tensor, rows) -> tuple[list[int], list[dict | None]]:
    """One token per row of ``logits`` (R, V) and, for rows whose params ask, ``{token id: logprob}`` of the
    sampled token and the top ones. ``rows``: anything with ``params``, ``generator``, ``prompt_ids`` and
    ``output_ids`` (the engine's sequences; a pipeline's last stage passes its own records of them)."""
    if not rows:
        return [], []
    params = [s.params for s in rows]
    # the histories only matter to penalties and min_tokens: skip copying them otherwise
    history = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.min_tokens
                  for p in params)
    out = sampler(logits, params, prompt_ids=[s.prompt_ids for s in rows] if history else None,
                  output_ids=[s.output_ids for s in rows] if history else None,
                  generators=[s.generator for s in rows])
    tokens = out.token_ids.tolist()
    logprobs: list[dict | None] = [None] * len(rows)
    if out.logprobs is not None:
        sampled = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else [[] for _ in rows]
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else [[] for _ in rows]
        for i, p in enumerate(params):
            if p.logprobs is not None:
                k = p.logprobs
                logprobs[i] = {**dict(zip(top_ids[i][:k], top_lps[i][:k])), tokens[i]: sampled[i]}
    return tokens, logprobs


def _queue_time(seq: Sequence) -> float | None:
    return None if seq.first_scheduled is None else seq.first_scheduled - seq.arrival


def _make_policy(name: str, token_budget: int | None, max_num_seqs: int | None, options: dict):
    """The batching policy ``name`` with ``token_budget`` (where it takes one) and ``max_num_seqs``."""
    from pipeloom.schedules.batching.policy import batching_class

    options = dict(options)
    if max_num_seqs is not None:
        options["max_num_seqs"] = max_num_seqs
    if token_budget is not None and "token_budget" in batching_class(name).options:
        options["token_budget"] = token_budget  # policies that run prompts whole take no budget
        if max_num_seqs is None:  # every running decode must fit the budget
            options.setdefault("max_num_seqs", min(token_budget, batching_class(name).common["max_num_seqs"]))
    return get_batching(name, **options)


__all__ = ["LLMEngine", "RequestStatus", "sample_rows"]
