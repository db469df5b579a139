# Schedules by name: the Schedule base class, the registry, and get_schedule().
"""Every schedule is a :class:`Schedule` subclass (or a registered function) that builds a :class:`Plan`.

Users pick one by name::

    plan = get_schedule("1f1b", pp=4, microbatches=8)

and add their own either by subclassing (a class attribute ``name`` registers it)::

    class Reverse(Schedule):
        name = "reverse-gpipe"
        def build(self) -> Plan: ...

or by decorating a function ``(pp, microbatches, vpp, **options) -> Plan``::

    @register_schedule("from-file")
    def from_file(pp, microbatches, vpp=None, path="plan.csv"):
        return Plan.from_csv(path)

A registered schedule then works everywhere a built-in one does: the simulator, the pictures, the
``pipeloom-bubbles`` sweep, the runtime and the training launcher.
"""

from __future__ import annotations

import inspect
from typing import Callable, ClassVar

from .ir import Plan, PlanError

_REGISTRY: dict[str, type["Schedule"]] = {}
_ALIASES: dict[str, str] = {}


class ScheduleError(ValueError):
    """A schedule was asked for by a wrong name or with sizes/options it cannot take."""


class Schedule:
    """Base class: holds the sizes, checks them, and builds the plan.

    Subclasses set ``name`` (registers the class), optionally ``aliases``, ``default_vpp`` and
    ``options`` (the accepted keyword options with their defaults), and implement :meth:`build`.
    ``check()`` runs before ``build()``; raise :class:`ScheduleError` there with a message naming the
    bad value and the valid choices.
    """

    name: ClassVar[str | None] = None
    aliases: ClassVar[tuple[str, ...]] = ()
    default_vpp: ClassVar[int] = 1
    options: ClassVar[dict[str, object]] = {}
    closed_form: ClassVar[str | None] = None  # a one-line description of the known bubble formula

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            _register(cls.name, cls, cls.aliases)

    def __init__(self, pp: int, microbatches: int, vpp: int | None = None, **options) -> None:
        for label, value in (("pp", pp), ("microbatches", microbatches)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ScheduleError(f"{self.name}: {label} must be a positive integer, got {value!r}")
        if vpp is not None and (not isinstance(vpp, int) or vpp < 1):
            raise ScheduleError(f"{self.name}: vpp must be a positive integer, got {vpp!r}")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ScheduleError(
                f"{self.name}: unknown option(s) {unknown}; valid options: {sorted(self.options) or 'none'}"
            )
        self.pp = pp
        self.microbatches = microbatches
        self.vpp = self.default_vpp if vpp is None else vpp
        self.opts = {**self.options, **options}
        self.check()

    def check(self) -> None:
        """Reject sizes this schedule cannot take. The default accepts vpp == default_vpp only."""
        if self.vpp != self.default_vpp:
            raise ScheduleError(
                f"{self.name}: vpp={self.vpp} is not supported; this schedule uses vpp={self.default_vpp} "
                f"(use interleaved-1f1b for several chunks per rank)"
            )

    def closed_form_beta(self, costs) -> float | None:
        """Megatron's beta from the schedule's known formula for ``costs``, or None where none holds."""
        return None

    def build(self) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self) -> Plan:
        plan = self.build()
        if plan.pp != self.pp:
            raise PlanError(f"schedule {self.name!r} built a plan for {plan.pp} ranks, asked for pp={self.pp}")
        return plan


def _register(name: str, cls: type[Schedule], aliases: tuple[str, ...] = ()) -> None:
    key = name.lower()
    _REGISTRY[key] = cls
    for alias in aliases:
        _ALIASES[alias.lower()] = key


def register_schedule(name: str, aliases: tuple[str, ...] = (), default_vpp: int = 1) -> Callable:
    """Register a Schedule subclass or a plan-building function under ``name``.

    A function is called as ``fn(pp, microbatches, vpp, **options)``; its keyword parameters with
    defaults become the schedule's options.
    """

    def decorate(obj):
        if isinstance(obj, type) and issubclass(obj, Schedule):
            obj.name = name
            _register(name, obj, aliases)
            return obj
        if not callable(obj):
            raise TypeError(f"register_schedule({name!r}) needs a Schedule subclass or a function, got {obj!r}")
        params = inspect.signature(obj).parameters
        opts = {
            k: p.default
            for k, p in params.items()
            if k not in ("pp", "microbatches", "vpp") and p.default is not inspect.Parameter.empty
        }
        fn = obj

        class _FunctionSchedule(Schedule):
            options = opts

            def check(self) -> None:
                pass

            def build(self) -> Plan:
                plan = fn(self.pp, self.microbatches, self.vpp, **self.opts)
                return plan if plan.name != "custom" else plan.replace(name=name)

        _FunctionSchedule.name = name
        _FunctionSchedule.default_vpp = default_vpp
        _FunctionSchedule.__doc__ = fn.__doc__
        _FunctionSchedule.__qualname__ = f"FunctionSchedule[{name}]"
        _register(name, _FunctionSchedule, aliases)
        return obj

    return decorate


def schedule_class(name: str) -> type[Schedule]:
    """The Schedule class registered as ``name`` (or one of its aliases)."""
    _load_builtins()
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ScheduleError(f"unknown schedule {name!r}; valid choices: {', '.join(list_schedules())}")
    return _REGISTRY[key]


def get_schedule(name: str, pp: int, microbatches: int, vpp: int | None = None, **options) -> Plan:
    """Build the plan of schedule ``name`` for ``pp`` ranks and ``microbatches`` microbatches."""
    return schedule_class(name)(pp, microbatches, vpp, **options).plan()


def closed_form(name: str, pp: int, microbatches: int, vpp: int | None = None, costs=None, **options) -> dict | None:
    """The closed-form bubble of a schedule, ``{"bubble_time_ratio": beta, "bubble_rate": r}``, or None.

    Formulas hold for uniform stage costs without communication latency; r = beta / (1 + beta).
    """
    from .simulate import Costs

    costs = costs or Costs()
    if not costs.uniform or costs.comm:
        return None
    beta = schedule_class(name)(pp, microbatches, vpp, **options).closed_form_beta(costs)
    if beta is None:
        return None
    return {"bubble_time_ratio": beta, "bubble_rate": beta / (1 + beta)}


def list_schedules(include_aliases: bool = False) -> list[str]:
    """Registered schedule names, built-ins first."""
    _load_builtins()
    names = list(_REGISTRY)
    return names + sorted(_ALIASES) if include_aliases else names


def _load_builtins() -> None:
    from . import builtin  # noqa: F401  (registers the built-in schedules on import)
