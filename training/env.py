# Process setup for training: torch.distributed from torchrun's environment, the device, mixed precision.
"""Small helpers the launcher calls before building anything:

* :func:`init_distributed` - join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``...), gloo on CPU and NCCL on GPU; a single process without those variables stays
  undistributed (no process group: pp = tp = dp = 1).
* :func:`resolve_device` - ``auto`` is ``cuda:<LOCAL_RANK>`` when a GPU is visible, else ``cpu``.
* :func:`autocast_for` - bf16 autocast on GPU (``auto``), nothing on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun sets them (0, 1, 0 for a plain process)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str = "auto") -> torch.device:
    """The device this process trains on."""
    _, _, local_rank = world_from_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no GPU is visible; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> bool:
    """Initialise the default process group when launched with several processes; True if distributed."""
    _, world, _ = world_from_env()
    if world == 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return True


def autocast_for(device: torch.device, mixed_precision: str = "auto"):
    """A context-manager factory: bf16 autocast on GPU (``auto`` or ``bf16``), a no-op otherwise."""
    if mixed_precision == "none" or (mixed_precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (identity without a process group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
