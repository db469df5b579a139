# Multi-GPU schedule measurements (issue 7): pipeloom's schedules vs torch.distributed.pipelining, per layout.
"""Train one GPT through every synchronous schedule, layout and microbatch count; measure and predict.

    # 4 GPUs, NCCL (the measurement of issue 7):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc_per_node=4 bench/multigpu.py --model gpt-1.3b --out runs/multigpu
    # 4 CPU processes, gloo, tiny shapes (a functional check, not a measurement; the tests run this):
    torchrun --nproc_per_node=4 bench/multigpu.py --smoke --out runs/multigpu-smoke

The backend follows ``torch.cuda.is_available()``: NCCL with one GPU per rank (``LOCAL_RANK``) and bf16
autocast, or gloo on CPU in float32. NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``; set here with ``setdefault`` before the process group starts).

For each layout (``--layouts 4x1,2x2`` = pp x tp; dp = 1), each schedule (``--only``) and each
microbatch count (``--microbatches``), with ``--mbs`` rows of ``--seq`` tokens per microbatch:

* pipeloom: :func:`pipeloom.training.parts.build_parts` builds the model (same seed on every rank),
  applies tensor parallelism and keeps this rank's stages; :class:`PipelineRuntime` runs the plan and
  one AdamW per rank steps after it (inside the timed step). Per timed step the gathered timeline gives
  the measured bubble rate (Zero Bubble's r, arXiv 2401.10241 §5.3) and ``runtime.report`` the simulator's
  prediction from the per-chunk F/B/W costs and communication latency measured in that step; the gap
  is measured - predicted, in percentage points (flagged ``!`` above 3).
* the peer: the same stage modules (shared, so weights and optimizer state exist once) wrapped in
  ``torch.distributed.pipelining.PipelineStage`` (on the pipeline group) and driven by ScheduleGPipe,
  Schedule1F1B, ScheduleInterleaved1F1B or ScheduleZBVZeroBubble, as ``bench/peers_cpu.py`` does;
  zb-h1 and zb-h2 have no peer there. Peer and pipeloom steps alternate (A, B, A, B, ...) so drift
  hits both alike; the ratio is pipeloom tokens/s over the peer's.
* asynchronous (pp-only layouts): 1F1B, PipeDream (weight stashing) and PipeDream-2BW at the same
  microbatch size, each with its optimizer inside the plan (UPDATE actions), alternated step by step.
  Each ``step`` is one finite plan of m microbatches, so its fill and drain are included.

The model's embedding and output head are untied (``tie_embeddings=False``): versioned plans refuse tied
parameters, and the peer has no tied-gradient reduction, so all engines do the same work on the same
parameters. Peak memory is ``torch.cuda.max_memory_allocated`` per rank (reset before each engine's
steps); on CPU it is the process's max RSS from ``resource.getrusage`` - process-lifetime, so it only
grows from row to row. Rank 0 prints the tables and writes ``multigpu.md``, ``multigpu.json`` and, for
one microbatch count per schedule (``--picture-m``), ``timelines/<schedule>_<layout>_m<m>.png``
(measured above simulated from the measured costs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (device README)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch
import torch.distributed as dist

SYNC = ("gpipe", "1f1b", "zb-h1", "zb-h2", "interleaved-1f1b", "zb-v")  # same placement kept adjacent
ASYNC = ("1f1b", "pipedream", "pipedream-2bw")
PEER = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B",
        "zb-v": "ScheduleZBVZeroBubble"}
VPP = {"interleaved-1f1b": 2, "zb-v": 2}
SMOKE = {"model": "gpt-tiny", "overrides": {"n_layers": 6, "dim": 32, "n_heads": 4, "vocab_size": 64,
                                            "max_seq_len": 16}, "seq": 16, "mbs": 1}
GAP_FLAG = 3.0  # percentage points


@dataclass
class Built:
    """This rank's stage modules for one placement, the loss, and one AdamW over their parameters."""

    key: tuple
    modules: dict
    loss_fn: object
    optimizer: torch.optim.Optimizer
    params: list = field(default_factory=list)


# ----- setup -------------------------------------------------------------------------------------------
def device_and_backend() -> tuple[torch.device, str]:
    """This rank's GPU (``LOCAL_RANK``) and NCCL when CUDA is available, else the CPU and gloo."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "nccl"
    return torch.device("cpu"), "gloo"


def model_config(args):
    """The ``--model`` config (smoke: tiny overrides), with untied embeddings and no dropout."""
    from pipeloom.models import get_model_config

    overrides = dict(SMOKE["overrides"]) if args.smoke else {}
    overrides.update(tie_embeddings=False, dropout=0.0)
    return get_model_config(args.model, **overrides)


def adamw(params, device) -> torch.optim.Optimizer:
    """The optimizer of every engine: AdamW, fused on GPU, foreach on CPU."""
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda", foreach=device.type != "cuda")


def build(config, plan, mesh, device, split: str) -> Built:
    """This rank's stages of ``plan`` through the launcher's :func:`build_parts` (built on CPU, moved)."""
    from pipeloom.models.transformer import cross_entropy_loss
    from pipeloom.training.parts import build_parts

    parts = build_parts(config, plan, mesh=mesh, seed=0, device="cpu", split=split)
    loss_fn = parts.model.loss if mesh.tp > 1 else cross_entropy_loss  # vocab-parallel after apply_tp
    modules = {s: m.to(device) for s, m in parts.modules.items()}
    del parts  # drop the other stages' layers
    params = [p for m in modules.values() for p in m.parameters()]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Built((plan.num_stages, plan.stages_of(mesh.pp_rank)), modules, loss_fn, adamw(params, device), params)


AUTOCAST = {"on": True}  # set once from --autocast in main()


def autocast(device):
    """bf16 autocast on this device when enabled (default: on GPU only)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=AUTOCAST["on"])


def sync(device) -> None:
    """Wait for the GPU (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    """Start a new CUDA peak-memory window (CPU: max RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device) -> float:
    """Peak memory of this rank in MiB: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def timed(fn, device) -> float:
    """Seconds of one step from a barrier before it to a barrier after it (device synchronised)."""
    dist.barrier()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    dist.barrier()
    return time.perf_counter() - start


def gather(value) -> list:
    """``value`` of every rank, by global rank (collective)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


P2P_TIMEOUT = 600.0  # seconds a rank waits for a pipeline peer before naming the stall (--timeout)


# ----- the engines -------------------------------------------------------------------------------------
def pipeloom_engine(plan, built: Built, mesh, device, x, y):
    """A step function running ``plan`` through the runtime, then the shared AdamW; and the runtime."""
    from pipeloom.parallel.runtime import PipelineRuntime

    # Every step timed: its bubble rate goes into the table (the training default times every 10th).
    runtime = PipelineRuntime(plan, built.modules, built.loss_fn, mesh=mesh, timeout=P2P_TIMEOUT, timeline_every=1)

    def step():
        with autocast(device):
            runtime.step(x, y)
        built.optimizer.step()

    return step, runtime


def peer_engine(schedule: str, plan, built: Built, mesh, device, m: int, x, y):
    """The same stages through torch.distributed.pipelining's schedule ``PEER[schedule]``."""
    from torch.distributed import pipelining
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, PEER[schedule])
    mine = plan.stages_of(mesh.pp_rank)
    stages = [pipelining.PipelineStage(built.modules[s], s, plan.num_stages, device, group=mesh.pp_group)
              for s in mine]
    sched = cls(stages[0] if len(stages) == 1 else stages, m, loss_fn=built.loss_fn)
    first, last = 0 in mine, plan.num_stages - 1 in mine

    def step():
        built.optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            sched.step(*((x,) if first else ()), target=y if last else None)
        built.optimizer.step()

    return step


def peer_problem(schedule: str, plan, mesh) -> str | None:
    """Why the peer cannot run this configuration, or None."""
    from torch.distributed.pipelining import schedules

    if schedule not in PEER:
        return "no such schedule in torch.distributed.pipelining"
    if not hasattr(schedules, PEER[schedule]):
        return f"torch {torch.__version__} has no {PEER[schedule]}"
    if schedule == "interleaved-1f1b":  # torch: looped placement, rank r holds r, r+p
        expected = (mesh.pp_rank, mesh.pp_rank + mesh.pp)
    elif schedule == "zb-v":  # torch: V placement, rank r holds r, 2p-1-r
        expected = (mesh.pp_rank, 2 * mesh.pp - 1 - mesh.pp_rank)
    else:
        expected = (mesh.pp_rank,)
    if plan.stages_of(mesh.pp_rank) != expected:
        return f"placement differs: pipeloom {plan.stages_of(mesh.pp_rank)}, torch {expected}"
    return None


# ----- one configuration -------------------------------------------------------------------------------
def measure_sync(schedule, plan, built, mesh, device, args, x, y, tokens) -> tuple[dict, object]:
    """pipeloom and (where it can) the peer, alternated; returns the row and the last gathered timeline."""
    from pipeloom.schedules import Costs, simulate
    from pipeloom.schedules.timeline import Timeline

    m = plan.microbatches
    ours, runtime = pipeloom_engine(plan, built, mesh, device, x, y)
    problem = peer_problem(schedule, plan, mesh) if not args.no_peer else "--no-peer"
    theirs = None if problem else peer_engine(schedule, plan, built, mesh, device, m, x, y)
    for _ in range(args.warmup):
        ours()
        if theirs:
            theirs()
    times = {"pipeloom": [], "peer": []}
    peaks = {"pipeloom": 0.0, "peer": 0.0}
    measured, predicted, last = [], [], None
    for _ in range(args.steps):
        reset_peak(device)
        times["pipeloom"].append(timed(ours, device))
        peaks["pipeloom"] = max(peaks["pipeloom"], peak_mib(device))
        last = runtime.gather_timeline()  # collective over the pipeline group; untimed
        report = runtime.report(timeline=last)
        measured.append(report["measured"])
        predicted.append(report["predicted"])
        if theirs:
            reset_peak(device)
            times["peer"].append(timed(theirs, device))
            peaks["peer"] = max(peaks["peer"], peak_mib(device))
    peak_ranks = gather(peaks)
    ours_tps = tokens / statistics.median(times["pipeloom"])
    peer_tps = tokens / statistics.median(times["peer"]) if theirs else None
    r_meas, r_pred = statistics.median(measured), statistics.median(predicted)
    costs = report["costs"]
    sim = simulate(runtime.plan, Costs(F=list(costs["F"]), B=list(costs["B"]), W=list(costs["W"]), comm=report["comm"]))
    row = {"schedule": schedule, "microbatches": m, "vpp": plan.vpp, "tokens_per_step": tokens,
           "step_s": times["pipeloom"], "tokens_per_s": ours_tps,
           "peak_mib_per_rank": [p["pipeloom"] for p in peak_ranks],
           "bubble_measured": r_meas, "bubble_predicted": r_pred, "gap_pp": 100 * (r_meas - r_pred),
           "bubble_measured_per_step": measured, "bubble_predicted_per_step": predicted,
           "measured_makespan_s": report["measured_makespan"], "predicted_makespan_s": report["predicted_makespan"],
           "comm_s": report["comm"], "costs_s": {k: list(v) for k, v in costs.items()},
           "peer": PEER.get(schedule), "peer_problem": problem, "peer_step_s": times["peer"],
           "peer_tokens_per_s": peer_tps, "peer_peak_mib_per_rank": [p["peer"] for p in peak_ranks] if theirs else None,
           "ratio_vs_peer": ours_tps / peer_tps if peer_tps else None}
    simulated = Timeline(sim.timeline.intervals, sim.timeline.pp, unit="s")
    return row, (last, simulated)


def measure_async(plans: dict, built: Built, mesh, device, args, x, y, tokens) -> dict:
    """1F1B, PipeDream and PipeDream-2BW with their optimizers inside the plan, alternated step by step."""
    from pipeloom.parallel.runtime import PipelineRuntime

    steps = {}
    for name, plan in plans.items():
        runtime = PipelineRuntime(plan, built.modules, built.loss_fn, mesh=mesh,
                                  optimizer_factory=lambda ps: adamw(ps, device), timeout=P2P_TIMEOUT)

        def step(runtime=runtime):
            with autocast(device):
                runtime.step(x, y)

        steps[name] = step
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    return {"microbatches": next(iter(plans.values())).microbatches, "step_s": times, "tokens_per_s": tps,
            "vs_1f1b": {name: v / tps["1f1b"] for name, v in tps.items() if "1f1b" in tps}}


def run_layout(layout: str, args, config, device, out: dict) -> None:
    """Every schedule and microbatch count on one pp x tp layout (collective over all ranks)."""
    from pipeloom.parallel.mesh import Mesh
    from pipeloom.schedules import ScheduleError, get_schedule

    pp, tp = (int(v) for v in layout.split("x"))
    world, rank = dist.get_world_size(), dist.get_rank()
    if pp * tp != world:
        return skip(out, layout, "*", "*", f"pp*tp = {pp * tp} != world size {world} (dp=1 only)")
    if tp > 1 and (config.n_heads % tp or config.dim % tp):
        return skip(out, layout, "*", "*", f"tp={tp} does not divide n_heads={config.n_heads} / dim={config.dim}")
    mesh = Mesh.build(dp=1, pp=pp, tp=tp, device_type=device.type)
    gen = torch.Generator().manual_seed(1)
    n_layers = config.n_layers + 2  # embedding, blocks, head
    built = None
    for schedule in args.only:
        for m in args.microbatches:
            vpp = VPP.get(schedule)
            try:
                plan = get_schedule(schedule, pp=pp, microbatches=m, vpp=vpp)
            except ScheduleError as error:
                skip(out, layout, schedule, m, str(error))
                continue
            if plan.num_stages > n_layers:
                skip(out, layout, schedule, m, f"{plan.num_stages} stages (pp*vpp) > {n_layers} layers")
                continue
            if built is None or built.key != (plan.num_stages, plan.stages_of(mesh.pp_rank)):
                built = None  # free the previous placement first
                built = build(config, plan, mesh, device, args.split)
            batch = torch.randint(0, config.vocab_size, (args.mbs * m, args.seq + 1), generator=gen).to(device)
            x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
            if dist.get_rank() == 0:  # so a stall shows which configuration it is in
                print(f"running {layout} {schedule} m={m} ...", flush=True)
            row, (measured, simulated) = measure_sync(schedule, plan, built, mesh, device, args, x, y, x.numel())
            row["layout"] = layout
            out["rows"].append(row)
            if rank == 0:
                print(format_row(row), flush=True)
                if m == picture_m(args) and not any(p["schedule"] == schedule for p in out["pictures"]):
                    out["pictures"].append(picture(schedule, layout, m, measured, simulated, args.out))
    if tp == 1 and not args.no_async:
        for m in args.microbatches:
            plans = {}
            try:
                for name in ASYNC:
                    plans[name] = get_schedule(name, pp=pp, microbatches=m)
            except ScheduleError as error:
                skip(out, layout, "async", m, str(error))
                continue
            if built is None or built.key != (pp, (mesh.pp_rank,)):
                built = None
                built = build(config, plans["1f1b"], mesh, device, args.split)
            batch = torch.randint(0, config.vocab_size, (args.mbs * m, args.seq + 1), generator=gen).to(device)
            row = measure_async(plans, built, mesh, device, args, batch[:, :-1], batch[:, 1:], args.mbs * m * args.seq)
            row["layout"] = layout
            out["async"].append(row)
            if rank == 0:
                rates = ", ".join(f"{k} {v:.0f} tok/s" for k, v in row["tokens_per_s"].items())
                print(f"async {layout} m={m}: {rates}", flush=True)
    del built
    dist.barrier()


def skip(out: dict, layout, schedule, m, reason: str) -> None:
    """Record (and print on rank 0) a combination that cannot run, with the reason."""
    out["skipped"].append({"layout": layout, "schedule": schedule, "microbatches": m, "reason": reason})
    if dist.get_rank() == 0:
        print(f"skip {layout} {schedule} m={m}: {reason}", flush=True)


def picture_m(args) -> int:
    """The microbatch count whose timelines are drawn: ``--picture-m`` if swept, else the first."""
    return args.picture_m if args.picture_m in args.microbatches else args.microbatches[0]


def picture(schedule, layout, m, measured, simulated, out_dir) -> dict:
    """Draw the measured timeline above the simulated one into ``out_dir/timelines``."""
    from pipeloom.schedules.render import render_side_by_side

    path = os.path.join(out_dir, "timelines", f"{schedule}_{layout}_m{m}.png")
    render_side_by_side([(f"{schedule} {layout} m={m}: measured (r={measured.bubble_rate():.3f})", measured),
                         (f"simulated from the measured costs (r={simulated.bubble_rate():.3f})", simulated)], path)
    return {"schedule": schedule, "layout": layout, "microbatches": m, "path": path}


# ----- output ------------------------------------------------------------------------------------------
def format_row(row: dict) -> str:
    """One progress line for a finished configuration."""
    peer = f"{row['peer_tokens_per_s']:.0f} tok/s" if row["peer_tokens_per_s"] else f"no peer ({row['peer_problem']})"
    return (f"{row['layout']} {row['schedule']} m={row['microbatches']}: {row['tokens_per_s']:.0f} tok/s, r measured "
            f"{row['bubble_measured']:.3f} predicted {row['bubble_predicted']:.3f}; peer {peer}")


def tables(out: dict) -> str:
    """Markdown: the synchronous table, the asynchronous one, and the skipped combinations."""
    mem = "peak MiB/rank (max RSS)" if out["device"] == "cpu" else "peak MiB/rank"
    head = ["layout", "schedule", "m", "tok/s", mem, "r measured", "r predicted", "gap pp", "peer", "peer tok/s",
            "pipeloom/peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in out["rows"]:
        gap = f"{r['gap_pp']:+.1f}" + (" !" if abs(r["gap_pp"]) > GAP_FLAG else "")
        peer = r["peer"] or "none"
        if r["peer_problem"]:
            peer = f"n/a: {r['peer_problem']}"
        cells = [r["layout"], r["schedule"], str(r["microbatches"]), f"{r['tokens_per_s']:.0f}",
                 "/".join(f"{p:.0f}" for p in r["peak_mib_per_rank"]), f"{r['bubble_measured']:.3f}",
                 f"{r['bubble_predicted']:.3f}", gap, peer,
                 f"{r['peer_tokens_per_s']:.0f}" if r["peer_tokens_per_s"] else "n/a",
                 f"{r['ratio_vs_peer']:.2f}" if r["ratio_vs_peer"] else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    if out["async"]:
        lines += ["", "| layout | m | 1f1b tok/s | pipedream tok/s | pipedream-2bw tok/s | pipedream/1f1b | 2bw/1f1b |",
                  "|---|---|---|---|---|---|---|"]
        for a in out["async"]:
            t, v = a["tokens_per_s"], a["vs_1f1b"]
            lines.append(f"| {a['layout']} | {a['microbatches']} | {t['1f1b']:.0f} | {t['pipedream']:.0f} | "
                         f"{t['pipedream-2bw']:.0f} | {v['pipedream']:.2f} | {v['pipedream-2bw']:.2f} |")
    if out["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['layout']} {s['schedule']} m={s['microbatches']}: {s['reason']}"
                                     for s in out["skipped"]]
    return "\n".join(lines)


def header(out: dict) -> str:
    """One line: date, device, torch, model, precision, batch shape, steps and the command."""
    a = out["args"]
    return (f"{out['date']}, {out['device_name']} x{out['world_size']} ({out['backend']}), torch {out['torch']}, "
            f"model {a['model']}{' (smoke shapes)' if a['smoke'] else ''}, {out['precision']}, "
            f"{a['mbs']}x{a['seq']} tokens per microbatch, "
            f"median of {a['steps']} timed steps after {a['warmup']} warm-up; r = Zero Bubble bubble rate; "
            f"command: {out['command']}")


# ----- entry point -------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    """Command-line options (see ``--help``), checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=None, help="comma list of PPxTP; default for 4 ranks: 4x1,2x2")
    p.add_argument("--only", default=",".join(SYNC), help=f"comma list of schedules among {list(SYNC)}")
    p.add_argument("--microbatches", default="4,8,16", help="comma list of microbatch counts")
    p.add_argument("--model", default="gpt-1.3b", help="a get_model_config name (embeddings are untied here)")
    p.add_argument("--mbs", type=int, default=1, help="sequences per microbatch")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps per engine (alternated)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per engine first")
    p.add_argument("--autocast", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast: auto = on GPU only; bf16 on CPU checks that path slowly")
    p.add_argument("--split", default="uniform", help="split_stages method: uniform or parameters")
    p.add_argument("--picture-m", type=int, default=8, help="microbatch count of the timeline pictures")
    p.add_argument("--no-peer", action="store_true", help="skip torch.distributed.pipelining")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a pipeline rank waits for a peer before raising an error that names the stall")
    p.add_argument("--no-async", action="store_true", help="skip the PipeDream / 2BW comparison")
    p.add_argument("--smoke", action="store_true", help=f"tiny shapes for CPU: {SMOKE}")
    p.add_argument("--out", default="runs/multigpu", help="directory for multigpu.md, multigpu.json, timelines/")
    args = p.parse_args(argv)
    global P2P_TIMEOUT
    P2P_TIMEOUT = args.timeout
    args.only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(args.only) - set(SYNC))
    if unknown:
        p.error(f"unknown schedule(s) {unknown}; choose among {list(SYNC)}")
    args.microbatches = [int(v) for v in args.microbatches.split(",") if v]
    if args.steps < 1 or args.warmup < 0 or not args.microbatches:
        p.error(f"need --steps >= 1, --warmup >= 0 and a microbatch count (got {args.steps}, {args.warmup}, "
                f"{args.microbatches})")
    if args.smoke:
        args.model, args.seq, args.mbs = SMOKE["model"], SMOKE["seq"], SMOKE["mbs"]
    return args


def main(argv=None) -> None:
    """Every layout on every rank; rank 0 prints and writes the results."""
    args = parse(argv)
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc_per_node=4 bench/multigpu.py --smoke")
    device, backend = device_and_backend()
    AUTOCAST["on"] = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    dist.init_process_group(backend)
    try:
        world = dist.get_world_size()
        layouts = args.layouts.split(",") if args.layouts else ([f"{world}x1", f"{world // 2}x2"] if world % 2 == 0
                                                                 else [f"{world}x1"])
        torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
        config = model_config(args)
        if args.seq > config.max_seq_len:
            raise SystemExit(f"--seq {args.seq} exceeds {args.model}'s max_seq_len={config.max_seq_len}")
        out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device.type,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "backend": backend, "world_size": world, "torch": torch.__version__, "layouts": layouts,
               "command": f"torchrun --nproc_per_node={world} bench/multigpu.py {' '.join(sys.argv[1:])}",
               "args": vars(args), "model_config": vars(config) if hasattr(config, "__dict__") else str(config),
               "precision": "bf16 autocast" if AUTOCAST["on"] else "float32",
               "memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                          else "max RSS (getrusage), process lifetime"),
               "rows": [], "async": [], "skipped": [], "pictures": []}
        for layout in layouts:
            run_layout(layout, args, config, device, out)
        if dist.get_rank() == 0:
            text = header(out) + "\n\n" + tables(out)
            print("\n" + text, flush=True)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "multigpu.md"), "w") as f:
                f.write(text + "\n")
            with open(os.path.join(args.out, "multigpu.json"), "w") as f:
                json.dump(out, f, indent=1, default=str)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
