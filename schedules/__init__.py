# pipeloom.schedules: WHO runs WHAT and WHEN - the plan IR, every schedule, lowering, validation, simulation.
"""Schedules as data. Pure Python over small immutable values; no torch.distributed.

>>> from pipeloom.schedules import get_schedule, simulate, Costs
>>> plan = get_schedule("1f1b", pp=4, microbatches=8)
>>> round(simulate(plan, Costs(F=1, B=2)).bubble_rate, 4)
0.2727
"""

from .builtin import (
    GPipe,
    Interleaved1F1B,
    OneFOneB,
    PipeDream,
    PipeDream2BW,
    ZeroBubbleH1,
    ZeroBubbleH2,
    ZeroBubbleV,
    ForwardOnly,
    fill_weight_gradients,
    greedy_list_schedule,
    one_f_one_b_order,
)
from .ir import Action, Kind, Plan, PlanError, from_torch_csv, plan_from_lists
from .lowering import (
    add_comm,
    add_optimizer_step,
    add_tied_sync,
    add_weight_versions,
    lower,
    merge_backward,
    split_backward,
)
from .registry import (
    Schedule,
    ScheduleError,
    closed_form,
    get_schedule,
    list_schedules,
    register_schedule,
    schedule_class,
)
from .simulate import Costs, Deadlock, SimResult, execute, simulate
from .timeline import Interval, Timeline
from .validate import validate
from .batching import (
    BatchingPolicy,
    BlockCounter,
    CostModel,
    Iteration,
    IterationRecord,
    KVCapacity,
    Rejected,
    Request,
    RequestStatus,
    Scheduler,
    Slice,
    fit_cost_model,
    get_batching,
    list_batching,
    make_trace,
    register_batching,
    simulate_serving,
)

__all__ = [
    "Action",
    "Kind",
    "Plan",
    "PlanError",
    "from_torch_csv",
    "plan_from_lists",
    "Schedule",
    "ScheduleError",
    "closed_form",
    "get_schedule",
    "list_schedules",
    "register_schedule",
    "schedule_class",
    "GPipe",
    "OneFOneB",
    "Interleaved1F1B",
    "ZeroBubbleH1",
    "ZeroBubbleH2",
    "ZeroBubbleV",
    "ForwardOnly",
    "PipeDream",
    "PipeDream2BW",
    "fill_weight_gradients",
    "greedy_list_schedule",
    "one_f_one_b_order",
    "add_comm",
    "add_optimizer_step",
    "add_tied_sync",
    "add_weight_versions",
    "lower",
    "merge_backward",
    "split_backward",
    "Costs",
    "Deadlock",
    "SimResult",
    "execute",
    "simulate",
    "Interval",
    "Timeline",
    "validate",
    "BatchingPolicy",
    "BlockCounter",
    "Iteration",
    "KVCapacity",
    "Rejected",
    "Request",
    "RequestStatus",
    "Scheduler",
    "Slice",
    "get_batching",
    "list_batching",
    "register_batching",
    "CostModel",
    "IterationRecord",
    "fit_cost_model",
    "make_trace",
    "simulate_serving",
]
