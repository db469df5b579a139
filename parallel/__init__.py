# pipeloom.parallel: HOW a model runs across devices - pipeline stages and runtime, meshes, TP, DP.
"""Parallelism applied to plain models.

Pipeline parallelism (``stage``, ``runtime`` with ``runtime_setup`` and the compiled ``program``, ``p2p`` and
its ``links`` - process groups, or shared memory between ranks of one host: ``shm_link``, ``shm_connect`` -,
``backward``, ``versions``, ``tied``, ``microbatch``, ``measure``)::

    from pipeloom.parallel import PipelineRuntime, split_stages
    plan = get_schedule("1f1b", pp=4, microbatches=8)
    split = split_stages(model, plan.num_stages, method="parameters")
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, tied=split.tied,
                              optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=3e-4))
    loss = runtime.step(inputs, targets).loss

Meshes (``mesh``), tensor parallelism (``tensor_parallel``, ``apply``; per-rank dropout streams in
``rng``) and data parallelism (``data_parallel``) are imported from their modules.
"""

from .measure import estimate_comm
from .p2p import PipelineCommError, PipelineTimeout
from .runtime import PipelineRuntime, StepResult
from .stage import Stage, StageSplit, balanced_partition, model_layers, profile_layers, split_stages

__all__ = [
    "PipelineCommError",
    "PipelineRuntime",
    "PipelineTimeout",
    "Stage",
    "StageSplit",
    "StepResult",
    "balanced_partition",
    "estimate_comm",
    "model_layers",
    "profile_layers",
    "split_stages",
]
