# pipeloom.inference.parallel: pipeline- and tensor-parallel inference over a Mesh (one driver, p lanes in flight).
"""Inference across ranks with the training side's machinery (``Mesh``, ``split_stages``, ``apply_tp``)::

    llm = ParallelLLM("llama-tiny", pp=2, tp=2)          # every rank (torchrun --nproc_per_node=4)
    outs = llm.generate(prompts, params)                  # the driver gets the outputs, the others []
    llm.shutdown()

``links`` (who talks to whom; one process group per link), ``health`` (heartbeats on the store; naming the rank
that died or stalled), ``stage`` (a rank's stage, its KV caches, the sampler's mirror; the messages), ``worker``
(the loop of the non-driver ranks), ``driver`` (``PipelineEngine``: lanes of schedulers, microbatches in flight),
``llm`` (``ParallelLLM``). The plans these runs follow, their simulation and bubble metrics:
:mod:`pipeloom.schedules.inference`.
"""

from .driver import LaneSchedulers, PipelineEngine
from .health import RankFailure
from .links import LinkError, Topology
from .llm import ParallelLLM
from .stage import SamplingMirror, StageRunner

__all__ = ["LaneSchedulers", "LinkError", "ParallelLLM", "PipelineEngine", "RankFailure", "SamplingMirror",
           "StageRunner", "Topology"]
