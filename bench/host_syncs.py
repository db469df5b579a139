# Benchmark: how often a pipeline step makes the host wait - timed p2p waits, tensor reads, device syncs.
"""Count, per training step and rank, what makes the host wait for the device (or, on CPU, what would).

    python bench/host_syncs.py                                     # CPU: starts 2 gloo ranks itself
    torchrun --nproc_per_node=2 bench/host_syncs.py --device cuda  # GPU: NCCL, plus the CUDA profiler's counts

The runtime trains a small GPT (integer targets with ignored positions, so the valid-target count is
read; the optimizer step inside the runtime) for ``--warmup`` steps, then counts over ``--steps`` steps,
reading the loss once at the end as a logging loop does every few steps. Counted, by patching the
calls (the same on any pipeloom version, so a checkout before a change measures its "before"):

* ``timed waits``: ``Work.wait(timeout)`` calls (a process group's, or a shared-memory link's on one CPU
  host). On NCCL each one makes the host poll until the transfer
  is done (an asynchronous receive turned into a host sync); ``untimed waits`` only order the stream.
* ``tensor reads``: ``Tensor.item/tolist/__float__/__int__/__bool__`` calls inside the step, by the
  tensor's device and the function that made them. A read of a device tensor is a host sync on a GPU; on
  CPU the count shows what would be one where the tensor lives on the device there (targets, losses,
  headers; not AdamW's step counters, which torch keeps on the CPU: ``_get_value``).
* ``cuda.synchronize``: calls of ``torch.cuda.synchronize`` (the measured timeline used one per step).
* on a GPU, the CUDA profiler's ``cudaDeviceSynchronize``, ``cudaStreamSynchronize``,
  ``cudaEventSynchronize`` and ``cudaMemcpyAsync`` host calls per step.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
import torch.distributed as dist

READS = ("item", "tolist", "__float__", "__int__", "__bool__")
CUDA_SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


class Counting:
    """Patches the calls that block the host and counts them while ``active``."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.active = False
        self._undo = []

    def _patch(self, owner, name, make):
        original = getattr(owner, name)
        setattr(owner, name, make(original))
        self._undo.append((owner, name, original))

    def install(self) -> Counting:
        def wait(original):
            def counted(work, *args, **kwargs):
                if self.active:
                    self.counts["timed waits" if (args or kwargs) else "untimed waits"] += 1
                return original(work, *args, **kwargs)
            return counted

        def read(name):
            def make(original):
                def counted(tensor, *args, **kwargs):
                    if self.active:
                        where = f"{tensor.device.type} tensor, in {sys._getframe(1).f_code.co_name}"
                        self.counts[f"tensor reads ({where})"] += 1
                    return original(tensor, *args, **kwargs)
                return counted
            return make

        def synchronize(original):
            def counted(*args, **kwargs):
                if self.active:
                    self.counts["cuda.synchronize"] += 1
                return original(*args, **kwargs)
            return counted

        self._patch(dist.Work, "wait", wait)
        try:  # on one CPU host the runtime's p2p runs over shared-memory links, whose works are not dist.Work
            from pipeloom.parallel import shm_link
        except ImportError:  # a pipeloom from before them
            shm_link = None
        for cls in (shm_link._SendWork, shm_link._RecvWork) if shm_link is not None else ():
            self._patch(cls, "wait", wait)
        for name in READS:
            self._patch(torch.Tensor, name, read(name))
        self._patch(torch.cuda, "synchronize", synchronize)
        return self

    def remove(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def run_rank(cfg: dict) -> dict:
    """Build, warm up, count; returns this rank's counts per step."""
    from pipeloom.models.config import ModelConfig
    from pipeloom.models.transformer import Transformer
    from pipeloom.parallel.runtime import PipelineRuntime
    from pipeloom.parallel.stage import split_stages
    from pipeloom.schedules import get_schedule

    torch.set_num_threads(1)
    rank, pp = dist.get_rank(), dist.get_world_size()
    device = torch.device(cfg["device"], rank % max(torch.cuda.device_count(), 1)) if cfg["device"] == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt", vocab_size=64, dim=32, n_layers=2 * pp, n_heads=2, max_seq_len=64))
    plan = get_schedule(cfg["schedule"], pp=pp, microbatches=cfg["microbatches"])
    split = split_stages(model, plan.num_stages)
    modules = {s: m.to(device) for s, m in split.for_rank(plan, rank).items()}
    runtime = PipelineRuntime(plan, modules, model.loss, tied=split.tied, timeout=120,
                              optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2 * cfg["microbatches"], 33), generator=g)
    tokens[0, 20:] = -100  # ignored targets: the runtime counts valid targets per microbatch
    inputs, targets = tokens[:, :-1].clamp(min=0).to(device), tokens[:, 1:].to(device)
    for _ in range(cfg["warmup"]):
        _ = runtime.step(inputs, targets).loss
    counting = Counting().install()
    profile = None
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        profile = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        profile.__enter__()
    dist.barrier()
    counting.active = True
    results = [runtime.step(inputs, targets) for _ in range(cfg["steps"])]
    counting.active = False
    loss = results[-1].loss  # read once, as a logging step would
    if profile is not None:
        torch.cuda.synchronize()
        profile.__exit__(None, None, None)
        for event in profile.key_averages():
            if event.key in CUDA_SYNCS:
                counting.counts[f"profiler: {event.key}"] += event.count
    counting.remove()
    return {"per_step": {k: v / cfg["steps"] for k, v in sorted(counting.counts.items())}, "loss": loss}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2, help="ranks to start on CPU (under torchrun: the world)")
    cfg = vars(parser.parse_args(argv))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cfg["device"] == "cuda" else "gloo")
        try:
            results = [None] * dist.get_world_size()
            dist.all_gather_object(results, run_rank(cfg))
        finally:
            dist.destroy_process_group()
        if int(os.environ.get("RANK", 0)) != 0:
            return
    else:
        from pipeloom.parallel.spawn import run_ranks

        results = run_ranks(run_rank, cfg["ranks"], cfg, timeout=1200)
    keys = sorted({k for r in results for k in r["per_step"]})
    print(f"{cfg['schedule']}, {len(results)} ranks on {cfg['device']}, {cfg['microbatches']} microbatches; per step "
          f"(mean of {cfg['steps']}), by rank; the loss read once after the last step ({results[0]['loss']:.4f})\n")
    print("| count | " + " | ".join(f"rank {r}" for r in range(len(results))) + " |")
    print("|---|" + "---|" * len(results))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{r['per_step'].get(key, 0):g}" for r in results) + " |")


if __name__ == "__main__":
    main()
