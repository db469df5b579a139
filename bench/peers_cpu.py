# Benchmark: pipeloom's pipeline runtime against torch.distributed.pipelining and DeepSpeed on 4 CPU ranks.
"""The same model, batch, loss, optimizer and schedule through three pipeline engines; step-time medians.

    torchrun --nproc_per_node=4 bench/peers_cpu.py                 # the full run (several minutes)
    python bench/peers_cpu.py                                      # the same; starts its own 4 ranks
    python bench/peers_cpu.py --shapes overhead --frameworks pipeloom,torch   # one shape, two engines
    python bench/peers_cpu.py --smoke                              # tiny sizes, one timed step: it runs

Model: ``layers`` identical pre-norm residual MLP blocks (LayerNorm, Linear D->4D, GELU, Linear 4D->D)
on a (B, T, D) float32 tensor, MSE loss against a fixed random target, SGD with momentum (the optimizer
step is inside the timed step). Every stage holds the same number of blocks (``layers / stages``).

Shapes (``--shapes``, both by default; ``--layers`` etc. override a size in every shape):

* ``default``: 16 blocks, D=128, a batch of 32x16 rows in 8 microbatches of 4 - compute-bound enough
  that the engines' per-message and per-action costs are a few percent of the step.
* ``overhead``: 8 blocks, D=32, a batch of 64x8 rows in 32 microbatches of 2 - each action is tens of
  microseconds of compute, so the step time is mostly the engine's own host work per action and per
  message (p2p calls, waits, Python): the regime of a GPU, where a microbatch's kernels are short and
  every host microsecond between them shows up as bubble.

Schedules, matched by name (pipeloom | torch.distributed.pipelining | DeepSpeed):

* ``gpipe``: ``gpipe`` | ``ScheduleGPipe`` | a 40-line GPipe ``PipeSchedule`` given to DeepSpeed's
  engine through its ``_train_schedule`` hook (all forwards, then all backwards, the engine's own
  instructions; DeepSpeed ships no GPipe schedule).
* ``1f1b``: ``1f1b`` | ``Schedule1F1B`` | DeepSpeed's fixed ``TrainSchedule``, mapped to 1F1B: it is
  PipeDream-Flush (at most p-s microbatches in flight on stage s), and its per-rank order of forwards and
  backwards, once its idle "steps" are dropped, equals pipeloom's 1f1b plan (checked for p=4, m=8).
* ``interleaved-1f1b`` (2 chunks per rank, looped placement): pipeloom vpp=2 | ``ScheduleInterleaved1F1B``
  | DeepSpeed has none.
* ``zb-v`` (2 chunks per rank, V placement): ``zb-v`` | ``ScheduleZBVZeroBubble`` | DeepSpeed has none.

Method: every rank builds the full model from one seed, each engine keeps its stages; all three must
give the same first-step loss and the same weights after the first SGD step as one process running the
whole model on the whole batch (max differences printed: this shows they do the same work, including
the 1/microbatches loss normalisation). Then per schedule: ``--warmup`` steps on each engine, and
``--repeats`` rounds in which each engine in turn (A, B, C, A, B, C, ...) runs ``--steps`` steps, so
slow drift of the machine hits all of them alike. Each step is timed alone between two barriers on
rank 0; the table gives per-step medians over all rounds and the ratios pipeloom / peer (below 1:
pipeloom is faster). ``torch.set_num_threads(1)`` on every rank.

DeepSpeed on CPU (deepspeed 0.19.8, torch 2.13.0+cpu): installed with
``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed torch==2.13.0`` (no ops are built: the
engine uses the torch optimizer we pass). ``DS_ACCELERATOR=cpu`` (set here before the import) selects
its CPU accelerator without its probe of other devices; without oneCCL (``oneccl_bindings_for_pytorch``)
that accelerator's communication backend is gloo. The process group is the one we start
(``deepspeed.init_distributed`` finds it initialised); ``PipelineModule(partition_method="uniform")``
over the same block objects, fp32, ZeRO stage 0, ``gradient_accumulation_steps`` = microbatches.
On its first ``init_distributed`` DeepSpeed's CPU accelerator JIT-compiles its ``deepspeed_shm_comm``
op with ninja and the system C++ compiler (about 2 minutes on the 2-core box; cached in
``~/.cache/torch_extensions``; the pipeline engine does not use it), so the first run is slow. Without
deepspeed installed (the ``[deepspeed]`` extra) its column is skipped with a message.

Reading the numbers: 4 ranks on 2 cores means a waiting rank's core runs another rank, so pipeline
bubbles are mostly filled and the step time follows the CPU work of all ranks (compute plus each
engine's overhead per message and per action) rather than the schedule's bubble; on a shared box the
CPU-time table (summed over the ranks, barriers excluded) is the steadier of the two. ``--profile``
splits one step of each pipeloom engine per rank (compute, communication wait, bookkeeping) from its
timeline, with the context switches of all the rank's threads in it;
``--frameworks pipeloom,pipeloom-gloo,torch`` puts pipeloom's default p2p transport on one host (shared
memory, :mod:`pipeloom.parallel.shm_link`) beside its gloo one (``links="gloo"``), both against torch;
``--frameworks pipeloom,pipeloom-per-message,torch`` measures what the shape-header cache saves (the
runtime's ``shapes="per-message"`` mode sends a header with every activation, as pipeloom did before);
``--frameworks pipeloom,pipeloom-directional,torch`` what per-direction p2p groups (NCCL's layout) cost on
gloo, ``pipeloom-shared`` what one group for every link does;
``--frameworks pipeloom,pipeloom-early-receives,torch`` what posting receives a run early changes.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

PP = 4
FRAMEWORKS = ("pipeloom", "torch", "deepspeed")  # the default comparison
DIAGNOSTIC = ("pipeloom-gloo", "pipeloom-per-message", "pipeloom-shared", "pipeloom-directional",
              "pipeloom-early-receives")
LABELS = {"pipeloom": "pipeloom", "torch": "torch.pipelining", "deepspeed": "DeepSpeed",
          "pipeloom-gloo": "pipeloom on gloo",
          "pipeloom-per-message": "pipeloom, header per message", "pipeloom-shared": "pipeloom, one p2p group",
          "pipeloom-directional": "pipeloom, a p2p group per direction", "pipeloom-early-receives":
          "pipeloom, receives a run early"}
# schedule -> (chunks per rank, torch.distributed.pipelining class, DeepSpeed schedule or None)
SCHEDULES = {
    "gpipe": (1, "ScheduleGPipe", "gpipe"),
    "1f1b": (1, "Schedule1F1B", "TrainSchedule"),
    "interleaved-1f1b": (2, "ScheduleInterleaved1F1B", None),
    "zb-v": (2, "ScheduleZBVZeroBubble", None),
}
SIZES = ("layers", "dim", "batch", "seq", "microbatches")
SHAPES = {  # name -> sizes; see the module docstring
    "default": {"layers": 16, "dim": 128, "batch": 32, "seq": 16, "microbatches": 8},
    "overhead": {"layers": 8, "dim": 32, "batch": 64, "seq": 8, "microbatches": 32},
}
SMOKE_SHAPES = {  # --smoke: tiny sizes of each shape, one timed step
    "default": {"layers": 8, "dim": 16, "batch": 8, "seq": 4, "microbatches": 8},
    "overhead": {"layers": 8, "dim": 8, "batch": 32, "seq": 2, "microbatches": 16},
}
SMOKE = {"steps": 1, "repeats": 1, "warmup": 0}


# ----- the model, the batch, the loss, the optimizer: identical for every engine -----------------------
class Block(nn.Module):
    """Pre-norm residual MLP: x + W2 gelu(W1 LayerNorm(x))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        return x + self.down(F.gelu(self.up(self.norm(x))))


def build_layers(layers: int, dim: int, seed: int = 0) -> list[nn.Module]:
    """The full model as a list of blocks; every rank and every engine gets the same initial weights."""
    torch.manual_seed(seed)
    return [Block(dim) for _ in range(layers)]


def make_batch(batch: int, seq: int, dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=g), torch.randn(batch, seq, dim, generator=g)  # (B, T, D) x2


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=True)


def stage_layers(stage: int, layers: int, num_stages: int) -> range:
    per = layers // num_stages
    return range(stage * per, (stage + 1) * per)


def stages_of(schedule: str, rank: int) -> tuple[int, ...]:
    """Stage indices on ``rank``: looped for interleaved (r, r+p), V-shaped for zb-v (r, 2p-1-r)."""
    chunks = SCHEDULES[schedule][0]
    if chunks == 1:
        return (rank,)
    return (rank, rank + PP) if schedule == "interleaved-1f1b" else (rank, 2 * PP - 1 - rank)


@dataclass
class Engine:
    """One engine running one schedule on this rank: ``step(x, y)`` trains one batch and returns the
    full-batch loss where the engine has it (else None); ``local`` lists the layer indices it trains."""

    step: Callable
    layers: list[nn.Module]
    local: list[int]


# ----- the three engines -------------------------------------------------------------------------------
def build_pipeloom(schedule: str, cfg: dict, rank: int, shapes: str = "cached", links: str = "auto",
                   early_receives: bool = False) -> Engine:
    from pipeloom.parallel import PipelineRuntime, split_stages
    from pipeloom.schedules import get_schedule

    chunks = SCHEDULES[schedule][0]
    plan = get_schedule(schedule, pp=PP, microbatches=cfg["microbatches"], vpp=chunks if chunks > 1 else None)
    if plan.stages_of(rank) != stages_of(schedule, rank):
        raise RuntimeError(f"pipeloom {schedule} places stages {plan.stages_of(rank)} on rank {rank}; the peers "
                           f"use {stages_of(schedule, rank)}")
    layers = build_layers(cfg["layers"], cfg["dim"])
    split = split_stages(nn.Sequential(*layers), plan.num_stages, method="uniform")
    # Only options that differ from the defaults are passed, so the bench also runs against an older pipeloom
    # (PYTHONPATH at another checkout) for a before/after comparison.
    options = {k: v for k, v in (("shapes", shapes), ("links", links), ("early_receives", early_receives))
               if v != {"shapes": "cached", "links": "auto", "early_receives": False}[k]}
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, optimizer_factory=make_optimizer, **options)

    def step(x, y):
        return runtime.step(x, y).loss

    step.runtime = runtime
    local = [i for s in plan.stages_of(rank) for i in stage_layers(s, cfg["layers"], plan.num_stages)]
    return Engine(step, layers, local)


def build_pipeloom_gloo(schedule: str, cfg: dict, rank: int) -> Engine:
    """pipeloom with its p2p on gloo (``links="gloo"``: one process group for the pipeline's links) instead of
    the shared-memory links it uses by default when every rank is on this host."""
    return build_pipeloom(schedule, cfg, rank, links="gloo")


def build_pipeloom_per_message(schedule: str, cfg: dict, rank: int) -> Engine:
    """Diagnostic: pipeloom with a shape header on every activation (``shapes="per-message"``).

    Before the header cache this was pipeloom's only mode: the receiver waits for the header, then for
    the payload. The difference to plain ``pipeloom`` (cached shapes) is the cost of that second wait.
    """
    return build_pipeloom(schedule, cfg, rank, shapes="per-message")


def build_pipeloom_shared(schedule: str, cfg: dict, rank: int) -> Engine:
    """Diagnostic: pipeloom with every transfer on the one pipeline group (``links="shared"``, gloo only).

    Before the per-direction links (which NCCL needs) this was pipeloom's only layout: a batch of
    transfers went out as one call; now it goes out as one call per link direction.
    """
    return build_pipeloom(schedule, cfg, rank, links="shared")


def build_pipeloom_directional(schedule: str, cfg: dict, rank: int) -> Engine:
    """Diagnostic: pipeloom with a p2p group per direction of each link (``links="directional"``), the
    layout NCCL needs, instead of one group for the pipeline's p2p (the default on gloo)."""
    return build_pipeloom(schedule, cfg, rank, links="directional")


def build_pipeloom_early_receives(schedule: str, cfg: dict, rank: int) -> Engine:
    """Diagnostic: pipeloom also posting the receives of the next run of transfers with each run
    (``early_receives=True``) instead of each receive at its own action."""
    return build_pipeloom(schedule, cfg, rank, early_receives=True)


def build_torch(schedule: str, cfg: dict, rank: int) -> Engine:
    from torch.distributed import pipelining
    from torch.distributed.pipelining import schedules

    chunks, cls_name, _ = SCHEDULES[schedule]
    num_stages = PP * chunks
    layers = build_layers(cfg["layers"], cfg["dim"])
    mine = stages_of(schedule, rank)
    stages = [pipelining.PipelineStage(nn.Sequential(*(layers[i] for i in stage_layers(s, cfg["layers"], num_stages))),
                                       s, num_stages, torch.device("cpu")) for s in mine]
    cls = getattr(schedules, cls_name)
    sched = cls(stages[0] if chunks == 1 else stages, cfg["microbatches"], loss_fn=loss_fn)
    optimizer = make_optimizer([p for st in stages for p in st.submod.parameters()])
    first, last = 0 in mine, num_stages - 1 in mine

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        losses = [] if last else None
        args = (x,) if first else ()
        sched.step(*args, target=y if last else None, losses=losses)
        optimizer.step()
        return float(torch.stack(losses).detach().mean()) if last else None

    local = [i for s in mine for i in stage_layers(s, cfg["layers"], num_stages)]
    return Engine(step, layers, local)


def build_deepspeed(schedule: str, cfg: dict, rank: int) -> Engine:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    layers = build_layers(cfg["layers"], cfg["dim"])
    module = PipelineModule(layers=layers, num_stages=PP, loss_fn=loss_fn, partition_method="uniform",
                            activation_checkpoint_interval=0)
    m, mb = cfg["microbatches"], cfg["batch"] // cfg["microbatches"]
    config = {"train_batch_size": mb * m, "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": m,
              "steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=module, optimizer=make_optimizer(module.parameters()), config=config)
    if SCHEDULES[schedule][2] == "gpipe":
        _use_deepspeed_gpipe(engine)

    def step(x, y):
        pairs = list(zip(torch.tensor_split(x, m), torch.tensor_split(y, m)))  # (inputs, labels) per microbatch
        return float(engine.train_batch(iter(pairs)))

    local = list(stage_layers(rank, cfg["layers"], PP))
    return Engine(step, layers, local)


def _use_deepspeed_gpipe(engine) -> None:
    """Make DeepSpeed's engine run GPipe: all forwards, then all backwards, one buffer per microbatch.

    The engine keeps only the latest microbatch's loss (``engine.loss``: 1F1B runs B(b) right after F(b)
    on the last stage), so the forwards here stash each loss by buffer and the backwards restore it.
    """
    from deepspeed.runtime.pipe import schedule as ds

    class GPipeSchedule(ds.PipeSchedule):
        def num_pipe_buffers(self):
            return self.micro_batches

        def steps(self):
            m = self.micro_batches
            for b in range(m):
                cmds = [] if self.is_first_stage else [ds.RecvActivation(b)]
                if self.is_first_stage or self.is_last_stage:
                    cmds.append(ds.LoadMicroBatch(b))
                cmds.append(ds.ForwardPass(b))
                if not self.is_last_stage:
                    cmds.append(ds.SendActivation(b))
                yield cmds
            for b in range(m):
                cmds = [] if self.is_last_stage else [ds.RecvGrad(b)]
                cmds.append(ds.BackwardPass(b))
                if not self.is_first_stage:
                    cmds.append(ds.SendGrad(b))
                if b == m - 1:
                    cmds += [ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]
                yield cmds

    cls = type(engine)
    forward, backward = cls._INSTRUCTION_MAP[ds.ForwardPass], cls._INSTRUCTION_MAP[ds.BackwardPass]
    losses: dict = {}

    def forward_keep_loss(self, buffer_id):
        forward(self, buffer_id)
        if self.is_last_stage():
            losses[buffer_id] = self.loss

    def backward_with_loss(self, buffer_id):
        if self.is_last_stage():
            self.loss = losses.pop(buffer_id)
        backward(self, buffer_id)

    engine._INSTRUCTION_MAP = {**cls._INSTRUCTION_MAP, ds.ForwardPass: forward_keep_loss,
                               ds.BackwardPass: backward_with_loss}
    engine._train_schedule = lambda: GPipeSchedule(micro_batches=engine.micro_batches, stages=engine.num_stages,
                                                   stage_id=engine.stage_id)


BUILDERS = {"pipeloom": build_pipeloom, "torch": build_torch, "deepspeed": build_deepspeed,
            "pipeloom-gloo": build_pipeloom_gloo,
            "pipeloom-per-message": build_pipeloom_per_message, "pipeloom-shared": build_pipeloom_shared,
            "pipeloom-directional": build_pipeloom_directional,
            "pipeloom-early-receives": build_pipeloom_early_receives}


# ----- checks and timing -------------------------------------------------------------------------------
def reference_step(cfg: dict, x, y) -> tuple[float, list[nn.Module]]:
    """One process, the whole model on the whole batch: (loss, blocks after one optimizer step)."""
    layers = build_layers(cfg["layers"], cfg["dim"])
    model = nn.Sequential(*layers)
    optimizer = make_optimizer(model.parameters())
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item(), layers


def weight_diff(engine: Engine, reference: list[nn.Module]) -> float:
    """Largest |weight - reference weight| over the blocks this rank trains."""
    worst = 0.0
    for i in engine.local:
        for p, q in zip(engine.layers[i].parameters(), reference[i].parameters()):
            worst = max(worst, (p.detach() - q.detach()).abs().max().item())
    return worst


def timed_step(engine: Engine, x, y) -> tuple[float, float]:
    """(wall seconds from a barrier before the step to a barrier after it, this process's CPU seconds in
    the step itself, gloo's threads included)."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    engine.step(x, y)
    cpu = time.process_time() - cpu
    dist.barrier()
    return time.perf_counter() - start, cpu


def run_rank(cfg: dict) -> dict | None:
    """Everything one rank does; the process group is up. Returns the results on rank 0."""
    torch.set_num_threads(1)
    rank = dist.get_rank()
    if dist.get_world_size() != PP:
        raise SystemExit(f"peers_cpu.py compares 4-stage pipelines: run it on 4 ranks "
                         f"(torchrun --nproc_per_node=4), not {dist.get_world_size()}")
    results: dict = {"ref_loss": {}, "rows": []}
    for shape, sizes in cfg["shapes"].items():
        scfg = {**cfg, **sizes}
        x, y = make_batch(scfg["batch"], scfg["seq"], scfg["dim"])
        ref_loss, ref_layers = reference_step(scfg, x, y)
        results["ref_loss"][shape] = ref_loss
        for schedule in cfg["schedules"]:
            row = run_schedule(shape, schedule, scfg, x, y, ref_loss, ref_layers)
            results["rows"].append(row)
            if rank == 0:
                print(format_row(row), flush=True)
    return results if rank == 0 else None


def run_schedule(shape: str, schedule: str, cfg: dict, x, y, ref_loss: float, ref_layers) -> dict:
    """One table row: every engine checked against one process, then timed in alternating rounds."""
    rank = dist.get_rank()
    names = [f for f in cfg["frameworks"] if f != "deepspeed" or SCHEDULES[schedule][2] is not None]
    engines, checks = {}, {}
    for name in names:
        engines[name] = BUILDERS[name](schedule, cfg, rank)
        loss = engines[name].step(x, y)  # the check step, from the initial weights
        losses = [None] * PP
        dist.all_gather_object(losses, loss)
        diff = torch.tensor(weight_diff(engines[name], ref_layers))
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        first = next(v for v in losses if v is not None)
        checks[name] = (first, abs(first - ref_loss), diff.item())
    for name in names:
        for _ in range(cfg["warmup"]):
            engines[name].step(x, y)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(cfg["repeats"]):
        for name in names:  # A, B, C, A, B, C, ...: drift hits every engine alike
            for _ in range(cfg["steps"]):
                wall, seconds = timed_step(engines[name], x, y)
                times[name].append(wall)
                cpu[name].append(seconds)
    for name in names:  # CPU seconds of each step summed over the ranks
        per_rank = [None] * PP
        dist.all_gather_object(per_rank, cpu[name])
        cpu[name] = [sum(step) for step in zip(*per_rank)]
    profile = {name: pipeloom_profile(engines[name], x, y) for name in names
               if cfg["profile"] and name.startswith("pipeloom")}
    return {"shape": shape, "schedule": schedule, "checks": checks, "times": times, "cpu": cpu, "profile": profile}


def pipeloom_profile(engine: Engine, x, y) -> list[dict] | None:
    """Per rank, one more pipeloom step split into compute, communication and the time between actions."""
    runtime = engine.step.runtime
    every, runtime.timeline_every = runtime.timeline_every, 1  # this step measured, whatever the sampling period
    try:
        dist.barrier()
        switches = context_switches()
        start = time.perf_counter()
        result = runtime.step(x, y)
        after_actions = time.perf_counter()
        switches = context_switches() - switches
        dist.barrier()
        wall = time.perf_counter() - start
    finally:
        runtime.timeline_every = every
    ivs = sorted(result.timeline.intervals, key=lambda iv: iv.start)
    compute = sum(iv.duration for iv in ivs if iv.action.kind.is_compute)
    other = sum(iv.duration for iv in ivs if not iv.action.kind.is_comm and not iv.action.kind.is_compute)
    comm, end = 0.0, None  # union of the communication intervals (one batched exchange spans several)
    for iv in (iv for iv in ivs if iv.action.kind.is_comm):
        lo = iv.start if end is None else max(iv.start, end)
        if iv.end > lo:
            comm += iv.end - lo
            end = iv.end
    last = max(iv.end for iv in ivs)
    mine = {"rank": dist.get_rank(), "wall": wall, "actions": last - start, "compute": compute, "comm": comm,
            "update": other, "tail": after_actions - last, "gaps": (last - start) - compute - comm - other,
            "switches": switches}
    gathered = [None] * PP
    dist.all_gather_object(gathered, mine)
    return gathered


def context_switches() -> int:
    """Context switches (voluntary and not) of every thread of this process so far, gloo's included; 0 without
    /proc."""
    total = 0
    for status in glob.glob("/proc/self/task/*/status"):
        try:
            with open(status) as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:  # the thread ended meanwhile
            continue
    return total


# ----- output ------------------------------------------------------------------------------------------
def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def format_row(row: dict) -> str:
    parts = [f"{row['shape']} {row['schedule']}:"]
    for name, (loss, ldiff, wdiff) in row["checks"].items():
        parts.append(f"{LABELS[name]} {median_ms(row['times'][name]):.1f} ms (loss {loss:.6f}, |diff| {ldiff:.1e}, "
                     f"weights |diff| {wdiff:.1e})")
    return "  ".join(parts)


def table(results: dict, frameworks: list[str]) -> str:
    """Markdown: per shape and schedule, the median step time (wall, barrier to barrier) and the median CPU
    time of the step summed over the 4 ranks (gloo's threads included), in ms, by engine, each followed by
    the ratios first engine / each other (below 1: the first, pipeloom by default, is faster), then those of
    every other pipeloom variant / torch.pipelining when both ran (e.g. ``pipeloom-gloo``)."""
    first, others = frameworks[0], frameworks[1:]
    pairs = [(first, f) for f in others] + [(f, "torch") for f in others
                                            if f.startswith("pipeloom") and "torch" in frameworks]
    head = ["shape", "schedule"]
    for what in ("wall", "CPU"):
        head += [f"{what}: {LABELS[f]}" for f in frameworks] + [f"{what}: {LABELS[a]} / {LABELS[b]}" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        cells = [row["shape"], row["schedule"]]
        for key in ("times", "cpu"):
            t = {f: median_ms(v) for f, v in row[key].items()}
            cells += [f"{t[f]:.1f}" if f in t else "n/a" for f in frameworks]
            cells += [f"{t[a] / t[b]:.2f}" if a in t and b in t else "n/a" for a, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def same_work(results: dict) -> str:
    worst_loss = max(c[1] for row in results["rows"] for c in row["checks"].values())
    worst_weight = max(c[2] for row in results["rows"] for c in row["checks"].values())
    refs = ", ".join(f"{shape} {loss:.6f}" for shape, loss in results["ref_loss"].items())
    return (f"Same work: first-step loss in one process {refs}; max |loss diff| over all engines, shapes and "
            f"schedules {worst_loss:.1e}, max |weight diff| after the first step {worst_weight:.1e}.")


def profile_text(results: dict) -> str:
    lines = []
    for name in dict.fromkeys(name for row in results["rows"] for name in row["profile"] or {}):
        lines.append(f"{LABELS[name]} per rank, one step (ms): wall | actions span | compute | comm wait | update "
                     f"| between actions | after the last action (loss broadcast, drain) | context switches (all "
                     f"threads)")
        for row in results["rows"]:
            for p in (row["profile"] or {}).get(name) or []:
                lines.append(f"  {row['shape']:<8} {row['schedule']:<17} rank {p['rank']}: {p['wall'] * 1e3:7.1f} "
                             f"| {p['actions'] * 1e3:7.1f} "
                             f"| {p['compute'] * 1e3:7.1f} | {p['comm'] * 1e3:7.1f} | {p['update'] * 1e3:5.1f} "
                             f"| {p['gaps'] * 1e3:6.1f} | {p['tail'] * 1e3:5.1f} | {p['switches']:5d}")
    return "\n".join(lines)


# ----- entry point -------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--layers", type=int, help="blocks, in every shape; a multiple of 8 (8 chunks for vpp=2)")
    parser.add_argument("--dim", type=int, help="model width, in every shape")
    parser.add_argument("--batch", type=int, help="rows per step, split into microbatches, in every shape")
    parser.add_argument("--seq", type=int, help="positions per row, in every shape")
    parser.add_argument("--microbatches", type=int, help="microbatches per step, in every shape")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per engine per round")
    parser.add_argument("--repeats", type=int, default=6, help="rounds A, B, C")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per engine after the check step")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma list of {list(SCHEDULES)}")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help=f"comma list of {list(FRAMEWORKS + DIAGNOSTIC)}; the first is the numerator of the ratios")
    parser.add_argument("--profile", action="store_true", help="split one step of each pipeloom engine per rank")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes, one timed step: {SMOKE_SHAPES}")
    return parser.parse_args(argv)


def config(args: argparse.Namespace) -> dict:
    """The run's settings as a plain dict (it travels to spawned ranks); drops DeepSpeed if absent."""
    cfg = {k: getattr(args, k) for k in ("steps", "repeats", "warmup", "profile")}
    if args.smoke:
        cfg.update(SMOKE)
    names = [s for s in args.shapes.split(",") if s]
    cfg["schedules"] = [s for s in args.schedules.split(",") if s]
    cfg["frameworks"] = [f for f in args.frameworks.split(",") if f]
    unknown = (sorted(set(names) - set(SHAPES)) + sorted(set(cfg["schedules"]) - set(SCHEDULES))
               + sorted(set(cfg["frameworks"]) - set(FRAMEWORKS + DIAGNOSTIC)))
    if unknown:
        raise SystemExit(f"unknown shape, schedule or framework {unknown}; shapes: {list(SHAPES)}, schedules: "
                         f"{list(SCHEDULES)}, frameworks: {list(FRAMEWORKS + DIAGNOSTIC)}")
    overrides = {k: getattr(args, k) for k in SIZES if getattr(args, k) is not None}
    cfg["shapes"] = {name: {**(SMOKE_SHAPES if args.smoke else SHAPES)[name], **overrides} for name in names}
    for name, sizes in cfg["shapes"].items():
        if sizes["layers"] % (2 * PP) or sizes["batch"] % sizes["microbatches"]:
            raise SystemExit(f"shape {name}: --layers must be a multiple of {2 * PP} (got {sizes['layers']}) and "
                             f"--batch a multiple of --microbatches (got {sizes['batch']} and {sizes['microbatches']})")
    from pipeloom import features

    if "deepspeed" in cfg["frameworks"] and not features.has("deepspeed"):
        print("DeepSpeed is not installed: skipping its column (install: DS_BUILD_OPS=0 pip install "
              "--no-build-isolation 'pipeloom[deepspeed]' torch==2.13.0)", flush=True)
        cfg["frameworks"].remove("deepspeed")
    return cfg


def main(argv=None) -> None:
    args = parse(argv)
    cfg = config(args)
    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            results = run_rank(cfg)
        finally:
            dist.destroy_process_group()
    else:  # start the 4 ranks here
        from pipeloom.parallel.spawn import run_ranks

        results = run_ranks(run_rank, PP, cfg, timeout=3600.0)[0]
    if results is not None:
        shapes = "; ".join(f"{name}: layers={c['layers']} dim={c['dim']} batch={c['batch']}x{c['seq']} "
                           f"microbatches={c['microbatches']}" for name, c in cfg["shapes"].items())
        print(f"\n{PP} gloo ranks, torch {torch.__version__}; {shapes}; median of {cfg['repeats']}x{cfg['steps']} "
              f"steps per cell, engines alternating\n")
        print(table(results, cfg["frameworks"]))
        print("\n" + same_work(results))
        if cfg["profile"]:
            print("\n" + profile_text(results))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
