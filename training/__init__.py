# pipeloom.training: the training loop, optimizer and LR schedule, checkpoints, metrics, and text sampling.
"""What ``pipeloom-train`` calls after building the mesh, data and model (see ``launch/train.py``):

* :func:`build_parts` - this rank's model share; :func:`make_stepper` (:class:`LocalStep` /
  :class:`PipelineStep`) - one step of it, under one loss convention for every layout;
* :func:`build_optimizer`, :func:`lr_at`, :func:`clip_grad_norm` - AdamW, warmup + cosine, global norm;
* :func:`train` - the loop (dp reduction, clipping, evaluation, metrics, checkpoints, timeline picture);
* :func:`save_checkpoint` / :func:`load_checkpoint` - sharded, layout-independent, atomic (DCP);
* :func:`load_dense` / :func:`generate` - any checkpoint in one process, and text from it.
"""

from .checkpoint import (
    CheckpointError,
    ParamSpec,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from .loop import TrainResult, bubble_rates, train
from .metrics import MetricsLogger, peak_flops, read_metrics
from .optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from .parts import ModelParts, build_parts
from .sample import generate, load_dense
from .steps import LocalStep, PipelineStep, StageUpdate, make_stepper

__all__ = [
    "CheckpointError", "LocalStep", "MetricsLogger", "ModelParts", "ParamSpec", "PipelineStep", "StageUpdate",
    "TrainResult", "bubble_rates", "build_optimizer", "build_parts", "checkpoint_steps", "clip_grad_norm",
    "generate", "latest_checkpoint", "load_checkpoint", "load_dense", "lr_at", "make_stepper", "peak_flops",
    "read_manifest", "read_metrics", "save_checkpoint", "set_lr", "train",
]
