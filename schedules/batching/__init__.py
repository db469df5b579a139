# pipeloom.schedules.batching: inference batching policies as data, and a serving simulator over them.
"""Which requests run each iteration and how many of their tokens - the inference counterpart of the plan IR.

>>> from pipeloom.schedules.batching import BlockCounter, Request, Scheduler, get_batching
>>> sched = Scheduler(get_batching("chunked-prefill", token_budget=8, max_num_seqs=4), BlockCounter(64, 4))
>>> sched.add(Request("r0", prompt_len=10, max_tokens=2))
>>> print(sched.schedule(now=0.0))
it 0  r0 P0+8
"""

from .capacity import BlockCounter, KVCapacity, blocks_for
from .policy import (
    BatchingError,
    BatchingPolicy,
    batching_class,
    get_batching,
    list_batching,
    register_batching,
)
from .request import Iteration, Rejected, Request, RequestStatus, Slice
from .scheduler import Scheduler, Step
from .request_level import ClosedBatch, Dynamic, Static  # noqa: I001  (registration order: built-ins as listed)
from .iteration_level import ChunkedPrefill, Continuous, PrefillFirst, SplitFuse
from .audit import Auditor, BatchingViolation
from .costs import (
    PRESETS,
    CostModel,
    IterationRecord,
    PipelineCost,
    fit_cost_model,
    fit_error,
    get_cost_model,
    pipeline_cycle,
)
from .metrics import SLO, Capacity, Dist, ServingMetrics, find_capacity, percentile, serving_metrics
from .pictures import long_prompt_window, plot_composition, plot_compositions, plot_latency_cdfs
from .simulator import IterationLog, RequestLog, ServingResult, simulate_serving
from .traces import TRACES, Trace, TraceItem, arrival_times, make_trace

__all__ = [
    "PRESETS",
    "SLO",
    "TRACES",
    "Auditor",
    "BatchingViolation",
    "Capacity",
    "CostModel",
    "Dist",
    "IterationLog",
    "IterationRecord",
    "PipelineCost",
    "RequestLog",
    "ServingMetrics",
    "ServingResult",
    "Trace",
    "TraceItem",
    "arrival_times",
    "find_capacity",
    "fit_cost_model",
    "fit_error",
    "get_cost_model",
    "long_prompt_window",
    "make_trace",
    "percentile",
    "pipeline_cycle",
    "plot_composition",
    "plot_compositions",
    "plot_latency_cdfs",
    "serving_metrics",
    "simulate_serving",
    "BatchingError",
    "BatchingPolicy",
    "BlockCounter",
    "ChunkedPrefill",
    "ClosedBatch",
    "Continuous",
    "Dynamic",
    "Iteration",
    "KVCapacity",
    "PrefillFirst",
    "Rejected",
    "Request",
    "RequestStatus",
    "Scheduler",
    "Slice",
    "SplitFuse",
    "Static",
    "Step",
    "batching_class",
    "blocks_for",
    "get_batching",
    "list_batching",
    "register_batching",
]
