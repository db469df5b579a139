# Batching policies by name: the BatchingPolicy base class, its common options, and the registry.
"""A batching policy decides, every iteration, which requests run and how many of their tokens.

Users pick one by name, like a training schedule::

    policy = get_batching("chunked-prefill", token_budget=512, max_num_seqs=128)

and add their own by subclassing (a class attribute ``name`` registers it)::

    class Shortest(BatchingPolicy):
        name = "shortest-first"
        def schedule(self, step): ...

or by decorating a function ``(step, **options)``, whose keyword defaults become its options::

    @register_batching("decode-only-first")
    def decode_only_first(step, limit=4): ...

A policy only *asks* for things through the :class:`~pipeloom.schedules.batching.scheduler.Step` it is given
(schedule a running request, admit a waiting one, pad); the Scheduler owns the queues and the KV capacity,
so the limits (seats, token budget, KV blocks) hold for user policies too.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar

from .capacity import KVCapacity, blocks_for
from .request import Request

if TYPE_CHECKING:
    from .scheduler import Scheduler, Step

_REGISTRY: dict[str, type["BatchingPolicy"]] = {}
_ALIASES: dict[str, str] = {}

ORDERS = ("fcfs", "priority")
VICTIMS = ("last-arrived", "fewest-computed")


class BatchingError(ValueError):
    """A policy was asked for by a wrong name, with an unknown option, or with a value it cannot take."""


def check_int(owner: str, key: str, value, minimum: int = 1, allow_none: bool = False):
    """``value`` if it is an integer >= minimum (or None when allowed), else a BatchingError naming it."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BatchingError(f"{owner}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


class BatchingPolicy(ABC):
    """Base class: holds and checks the options; :meth:`schedule` fills one iteration.

    Common options (every policy): ``max_num_seqs`` (requests per iteration and running at once),
    ``max_num_batched_tokens`` (tokens per iteration, padding included; None: no limit), ``order``
    (``"fcfs"`` or ``"priority"``: the waiting queue's order, lower priority value first as in vLLM) and
    ``preemption`` (the victim when KV blocks run out: ``"last-arrived"`` as vLLM v1, or
    ``"fewest-computed"``). Subclasses add their own in ``options``.
    """

    name: ClassVar[str | None] = None
    aliases: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, object]] = {}
    common: ClassVar[dict[str, object]] = {
        "max_num_seqs": 256,
        "max_num_batched_tokens": None,
        "order": "fcfs",
        "preemption": "last-arrived",
    }
    chunks_prompts: ClassVar[bool] = False  # False: a prompt (and a recompute) runs whole in one iteration
    stall_free: ClassVar[bool] = False  # True: every decoding request decodes in every iteration it is not preempted
    max_queue_size: int | None = None  # a bound on the waiting queue; add() beyond it raises Rejected

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            _register(cls.name, cls, cls.aliases)

    def __init__(self, **options) -> None:
        valid = {**self.common, **self.options}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise BatchingError(f"{self.name}: unknown option(s) {unknown}; valid options: {sorted(valid)}")
        self.opts: dict[str, object] = {**valid, **options}
        self.max_num_seqs = check_int(self.name, "max_num_seqs", self.opts["max_num_seqs"])
        self.max_num_batched_tokens = check_int(
            self.name, "max_num_batched_tokens", self.opts["max_num_batched_tokens"], allow_none=True
        )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise BatchingError(  # vLLM's SchedulerConfig rule: every running request's decode must fit
                f"{self.name}: max_num_batched_tokens={self.max_num_batched_tokens} is below "
                f"max_num_seqs={self.max_num_seqs}; raise it or lower max_num_seqs"
            )
        self.order = self.opts["order"]
        if self.order not in ORDERS:
            raise BatchingError(f"{self.name}: order must be one of {list(ORDERS)}, got {self.order!r}")
        self.preemption = self.opts["preemption"]
        if self.preemption not in VICTIMS:
            raise BatchingError(f"{self.name}: preemption must be one of {list(VICTIMS)}, got {self.preemption!r}")
        self.check()

    # -- what subclasses implement -------------------------------------------------------------------------
    def check(self) -> None:
        """Reject option values this policy cannot take (raise BatchingError naming the option and value)."""
        return None

    @abstractmethod
    def schedule(self, step: "Step") -> None:
        """Fill ``step`` (one iteration) through its methods: ``schedule``, ``admit``, ``pad``."""

    def next_wakeup(self, scheduler: "Scheduler", now: float) -> float | None:
        """When an empty schedule() may change without a new request or update (None: it will not)."""
        return None

    # -- shared behaviour ----------------------------------------------------------------------------------
    @property
    def token_limit(self) -> float:
        """Tokens one iteration may carry (padding included); ``math.inf`` without a limit."""
        return math.inf if self.max_num_batched_tokens is None else self.max_num_batched_tokens

    def check_request(self, request: Request, capacity: KVCapacity) -> None:
        """Refuse a request this policy could never finish (a ValueError naming it and what to change)."""
        longest = request.prompt_len + request.max_tokens - 1  # tokens whose KV it may ever need
        need = blocks_for(longest, capacity.block_size)
        if need > capacity.num_total_blocks():
            raise BatchingError(
                f"request {request.id!r}: prompt_len={request.prompt_len} + max_tokens={request.max_tokens} needs "
                f"{need} KV blocks of {capacity.block_size} tokens, the cache holds {capacity.num_total_blocks()}; "
                f"lower max_tokens or give the cache more blocks"
            )
        if not self.chunks_prompts and longest > self.token_limit:
            raise BatchingError(  # vLLM v0 without chunked prefill requires max_num_batched_tokens >= max_model_len
                f"request {request.id!r}: prompt_len={request.prompt_len} + max_tokens={request.max_tokens} - 1 "
                f"tokens exceed max_num_batched_tokens={self.max_num_batched_tokens} of {self.name}, which runs "
                f"(re)computed prompts whole; raise max_num_batched_tokens or use chunked-prefill"
            )

    def fresh(self) -> "BatchingPolicy":
        """A new instance with the same options (a policy instance serves one Scheduler)."""
        return type(self)(**{k: v for k, v in self.opts.items()})

    def changed_options(self) -> dict[str, object]:
        valid = {**self.common, **self.options}
        return {k: v for k, v in self.opts.items() if v != valid[k]}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.changed_options().items())
        return f"{self.name}({args})"


def _register(name: str, cls: type[BatchingPolicy], aliases: tuple[str, ...] = ()) -> None:
    key = name.lower()
    _REGISTRY[key] = cls
    for alias in aliases:
        _ALIASES[alias.lower()] = key


def register_batching(name: str, aliases: tuple[str, ...] = ()) -> Callable:
    """Register a BatchingPolicy subclass, or a function ``fn(step, **options)``, under ``name``."""

    def decorate(obj):
        if isinstance(obj, type) and issubclass(obj, BatchingPolicy):
            obj.name = name
            _register(name, obj, aliases)
            return obj
        if not callable(obj):
            raise TypeError(f"register_batching({name!r}) needs a BatchingPolicy subclass or a function, got {obj!r}")
        params = inspect.signature(obj).parameters
        opts = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        fn = obj

        class _FunctionPolicy(BatchingPolicy):
            options = opts
            chunks_prompts = True  # a function policy decides its own chunking

            def schedule(self, step: "Step") -> None:
                own = {k: self.opts[k] for k in opts}
                fn(step, **own)

        _FunctionPolicy.name = name
        _FunctionPolicy.__doc__ = fn.__doc__
        _FunctionPolicy.__qualname__ = f"FunctionPolicy[{name}]"
        _register(name, _FunctionPolicy, aliases)
        return obj

    return decorate


def batching_class(name: str) -> type[BatchingPolicy]:
    """The policy class registered as ``name`` (or an alias)."""
    _load_builtins()
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise BatchingError(f"unknown batching policy {name!r}; valid choices: {', '.join(list_batching())}")
    return _REGISTRY[key]


def get_batching(name: str, **options) -> BatchingPolicy:
    """A new policy ``name`` with ``options`` (a BatchingError names a bad name, option or value)."""
    return batching_class(name)(**options)


def list_batching(include_aliases: bool = False) -> list[str]:
    """Registered policy names, built-ins first."""
    _load_builtins()
    names = list(_REGISTRY)
    return names + sorted(_ALIASES) if include_aliases else names


def _load_builtins() -> None:
    from . import iteration_level, request_level  # noqa: F401  (register the built-in policies on import)
