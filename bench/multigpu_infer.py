# Multi-GPU inference (issue 17): pp and tp layouts on the engine benchmark's offline workload, chunked-prefill
# against prefill-first, and the measured pipeline bubble beside the plan simulator's and the serving simulator's.
"""One torchrun per layout (world = pp x tp), then one table::

    # 4 GPUs, NCCL (NVLink multicast stays off: set here with setdefault before any process group starts)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python bench/multigpu_infer.py --out runs/multigpu-infer
    # CPU ranks, gloo, a tiny model (a functional check, not a measurement; the tests run it)
    python bench/multigpu_infer.py --smoke --layouts 1x1,2x1,1x2 --out runs/multigpu-infer-smoke

The workload is ``bench/infer_gpu.py``'s offline one (``--requests`` prompts of random token ids, prompt and output
lengths each uniform in ``--lengths``, ignore_eos, greedy), all queued at once, on its random-weight Llama
(``--size 1b``: 22 layers, d 2048, GQA 32/4; bf16 on GPU); ``--workload mixed`` takes the lengths of the batching
simulator's mixed long/short trace instead (times ``--scale``). Per layout and policy (``--policies``):

* output tokens/s (and the ratio to the one-GPU engine, layout 1x1, with CUDA graphs), TTFT p50/p99, TPOT p50 and
  E2E p50 measured from the moment everything was queued;
* for pp > 1 (``record_timeline``): the measured per-stage forwards give the measured pipeline bubble - the serving
  simulator's metric (idle share of all stages while every lane has work) and Zero Bubble's bubble rate r - beside
  (a) the forward-only plan of the same microbatches and lanes simulated with the measured durations and
  communication latency (``pipeloom.schedules.inference``), and (b) the serving simulator run on the same requests
  with a cost model fitted to this run's per-microbatch stage times (``simulate_serving`` with a ``PipelineCost``);
* the prefill-first / chunked-prefill bubble ratio of each, printed next to Sarathi's "up to 6.29x" (arXiv
  2308.16369). One picture per pp layout and policy: the first ``--picture-mb`` microbatches measured above
  predicted (``timelines/``).

The parent process runs layout 1x1 itself and starts ``torchrun ... bench/multigpu_infer.py --layout PxT`` for the
others; each child's rank 0 writes ``rows_PxT.json``; the parent writes ``multigpu_infer.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (device README)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch

HERE = Path(__file__).resolve().parent
SARATHI = 6.29  # pipeline bubbles reduced up to 6.29x by chunked prefills (Sarathi, arXiv 2308.16369)


def _infer_gpu():
    """bench/infer_gpu.py as a module (its model sizes and workload)."""
    spec = importlib.util.spec_from_file_location("pipeloom_bench_infer_gpu", HERE / "infer_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="1x1,2x1,4x1,1x2,1x4", help="pp x tp, comma separated")
    p.add_argument("--layout", default=None, help=argparse.SUPPRESS)  # a child: run this one layout
    p.add_argument("--policies", default="chunked-prefill,prefill-first")
    p.add_argument("--size", default="1b", help="bench/infer_gpu.py's model size, or cpu-small")
    p.add_argument("--workload", default="offline", choices=["offline", "mixed"],
                   help="offline: infer_gpu's uniform lengths; mixed: the batching simulator's long/short mix "
                        "(all queued at once), lengths times --scale")
    p.add_argument("--scale", type=float, default=1.0, help="mixed workload: length multiplier")
    p.add_argument("--requests", type=int, default=None, help="requests queued at once (256; --smoke: 8)")
    p.add_argument("--lengths", type=int, nargs=2, default=[100, 1024], help="uniform prompt and output lengths")
    p.add_argument("--token-budget", type=int, default=512, help="chunked-prefill's tokens per microbatch")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-fraction", type=float, default=0.9)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: what memory holds)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for another")
    p.add_argument("--picture-mb", type=int, default=48, help="microbatches drawn per timeline picture (0: none)")
    p.add_argument("--smoke", action="store_true", help="tiny model and workload on CPU ranks (gloo)")
    p.add_argument("--out", default="runs/multigpu-infer")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.lengths = "tiny", [8, 24]
        args.token_budget, args.max_num_seqs, args.num_blocks = 16, 16, 256
    if args.requests is None:
        args.requests = 8 if args.smoke else 256
    if args.requests < 1 or args.scale <= 0:
        p.error(f"--requests must be >= 1 and --scale > 0, got --requests {args.requests} --scale {args.scale}")
    return args


# ----------------------------------------------------------------------------- one run


CPU_SMALL = dict(family="llama", vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=704)


def _size(name: str) -> dict:
    return dict(CPU_SMALL) if name == "cpu-small" else dict(_infer_gpu().SIZES[name])


def workload(args) -> tuple[list[list[int]], list[int]]:
    """(prompts of random token ids, output lengths): infer_gpu's offline workload, or the mixed long/short trace."""
    vocab = _size(args.size)["vocab_size"]
    if args.workload == "offline":
        return _infer_gpu().workload(args, vocab)
    import math
    import random

    from pipeloom.schedules.batching import make_trace

    rng = random.Random(0)
    items = make_trace("mixed", args.requests, rate=math.inf, seed=0).items
    prompts = [[rng.randrange(1, vocab) for _ in range(max(1, round(it.prompt_len * args.scale)))] for it in items]
    return prompts, [max(2, round(it.output_len * args.scale)) for it in items]


def _model(args, device, dtype):
    from pipeloom.models import ModelConfig, Transformer

    sizes = _size(args.size)
    if args.smoke:
        sizes.update(n_layers=4)  # room for pp=4 (embed, 4 blocks, head)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelConfig(**sizes, max_seq_len=_context(args)))
    model = model.to(dtype)
    model.init_buffers()
    return model


def _context(args) -> int:
    if args.workload == "mixed":  # the mixed trace's longest: 4096 + 128 tokens
        return int(4096 * args.scale + 128 * args.scale) + 16
    return 2 * args.lengths[1] + 16


def drive(engine, prompts, outs) -> dict:
    """Queue every request at once, step the engine to the end; latency from the moment they were queued."""
    from pipeloom.inference import SamplingParams

    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, outs)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    first, done = {}, {}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - start
        if engine.idle and not outputs:
            raise RuntimeError("the engine idles with requests left (the KV cache cannot hold one?)")
        for out in outputs:
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
    ids = [f"r{i}" for i in range(len(prompts))]
    ttft = sorted(first[i] for i in ids)
    tpot = sorted((done[i] - first[i]) / (n - 1) for i, n in zip(ids, outs) if n > 1)
    e2e = sorted(done[i] for i in ids)
    seconds = max(e2e)

    def q(values, p):
        return values[min(len(values) - 1, int(p * len(values)))] * 1e3

    return {"output tok/s": sum(outs) / seconds, "seconds": seconds, "TTFT p50 ms": q(ttft, 0.5),
            "TTFT p99 ms": q(ttft, 0.99), "TPOT p50 ms": q(tpot, 0.5) if tpot else 0.0, "E2E p50 ms": q(e2e, 0.5)}


def bubbles(engine, timeline, lanes, first_record: int, prompts, outs) -> dict:
    """Measured bubbles beside the plan's prediction and the serving simulator's (cost model fitted here)."""
    from pipeloom.parallel.measure import estimate_comm
    from pipeloom.schedules.batching import IterationRecord, PipelineCost, fit_cost_model, simulate_serving
    from pipeloom.schedules.batching.traces import Trace, TraceItem
    from pipeloom.schedules.inference import forward_durations, inference_plan, inference_report

    pp = timeline.pp
    comm = estimate_comm(timeline)
    report = inference_report(inference_plan(pp, lanes), timeline, comm)
    forwards = forward_durations(timeline)
    records = engine.records[first_record:first_record + len(lanes)]
    fitted = [IterationRecord(r.num_prefill_tokens, r.num_decode_seqs, r.kv_tokens_read, r.padded_tokens,
                              sum(forwards.get((s, k), 0.0) for s in range(pp))) for k, r in enumerate(records)]
    model = fit_cost_model(fitted, name="fitted")
    weights = [max(sum(v for (s, _), v in forwards.items() if s == stage), 1e-12) for stage in range(pp)]
    cost = PipelineCost(model, tuple(weights), comm=comm, microbatches=len(engine.scheduler.lanes))
    trace = Trace(tuple(TraceItem(0.0, len(p), n) for p, n in zip(prompts, outs)), "offline")
    bm = engine.block_manager
    sim = simulate_serving(engine.policy.name, trace, cost, kv_blocks=bm.num_blocks, block_size=bm.block_size,
                           options=dict(engine.policy.opts))
    return {"microbatches": len(lanes), "comm ms": comm * 1e3,
            "bubble measured": report["measured_pipeline_bubble"],
            "bubble plan": report["predicted_pipeline_bubble"], "bubble serving-sim": sim.pipeline_bubble,
            "r measured": report["measured_bubble_rate"], "r plan": report["predicted_bubble_rate"],
            "_predicted": report["predicted"]}


def picture(timeline, predicted, path: str, title: str, window: int) -> None:
    """The first ``window`` microbatches: measured above the plan's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pipeloom.schedules.render import render_timeline
    from pipeloom.schedules.timeline import Timeline

    def first(tl):
        return Timeline(tuple(iv for iv in tl.intervals if iv.action.kind.is_compute
                              and iv.action.microbatch < window), tl.pp, tl.unit)

    fig, axes = plt.subplots(2, 1, figsize=(14, 1.2 * timeline.pp + 3.5))
    render_timeline(first(timeline), "", title=f"{title}: measured", ax=axes[0])
    render_timeline(Timeline(first(predicted).intervals, timeline.pp, "s"), "", title="predicted (plan, measured "
                    "forwards)", ax=axes[1])
    right = max(axes[0].get_xlim()[1], axes[1].get_xlim()[1])
    for ax in axes:  # one time scale for both
        ax.set_xlim(0, right)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_layout(layout: str, args) -> list[dict]:
    """Every policy on this layout (every rank calls it); the driver's rows (others: [])."""
    import torch.distributed as dist

    from pipeloom.inference import LLM

    pp, tp = (int(x) for x in layout.split("x"))
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    prompts, outs = workload(args)
    rows = []
    for policy in args.policies.split(","):
        options = dict(policy=policy, token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
                       num_blocks=args.num_blocks, gpu_memory_fraction=args.kv_fraction)
        warm = prompts[:4], [4] * 4
        if pp * tp == 1:
            llm = LLM(_model(args, device, dtype), **options)
            drive(llm.engine, *warm)
            row = drive(llm.engine, prompts, outs)
            rows.append({"layout": layout, "policy": policy, **row, "preemptions": llm.engine.num_preemptions})
            del llm
            continue
        from pipeloom.inference.parallel import ParallelLLM

        llm = ParallelLLM(_model(args, device, dtype), pp=pp, tp=tp, timeout=args.timeout, record_timeline=pp > 1,
                          **options)
        if llm.is_driver:
            drive(llm.engine, *warm)
            llm.engine.end()
            if pp > 1:
                llm.timeline()  # drop the warm-up's intervals
            first_record = len(llm.engine.records)
            row = drive(llm.engine, prompts, outs)
            llm.engine.end()
            row.update(layout=layout, policy=policy, preemptions=llm.engine.num_preemptions,
                       lanes=len(llm.engine.scheduler.lanes), stage_layout=list(llm.layout))
            if pp > 1:
                timeline, lanes = llm.timeline()
                row.update(bubbles(llm.engine, timeline, lanes, first_record, prompts, outs))
                predicted = row.pop("_predicted")
                if args.picture_mb > 0:
                    picture(timeline, predicted.timeline, os.path.join(args.out, "timelines", f"{layout}_{policy}.png"),
                            f"{layout} {policy}", args.picture_mb)
            rows.append(row)
        else:
            llm.generate(None)  # the warm-up
            if pp > 1:
                llm.timeline()
            llm.generate(None)  # the measured run
            if pp > 1:
                llm.timeline()
        llm.shutdown()
        del llm
        if cuda:
            torch.cuda.empty_cache()
        dist.barrier()
    return rows


# ----------------------------------------------------------------------------- the parent


def table(rows: list[dict]) -> str:
    base = {r["policy"]: r["output tok/s"] for r in rows if r["layout"] == "1x1"}
    cols = ["layout", "policy", "output tok/s", "vs 1x1", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "E2E p50 ms",
            "microbatches", "bubble measured", "bubble plan", "bubble serving-sim", "r measured", "r plan"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        r = dict(r, **{"vs 1x1": r["output tok/s"] / base[r["policy"]] if r["policy"] in base else None})
        cells = [r.get(c) for c in cols]
        lines.append("| " + " | ".join("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                                       for v in cells) + " |")
    ratios = []
    for layout in sorted({r["layout"] for r in rows if "bubble measured" in r}):
        by = {r["policy"]: r for r in rows if r["layout"] == layout}
        if {"prefill-first", "chunked-prefill"} <= set(by):
            pf, cp = by["prefill-first"], by["chunked-prefill"]
            parts = [f"{k.split(' ')[1]} {pf[k] / cp[k]:.2f}x" if cp[k] > 0 else f"{k.split(' ')[1]} -"
                     for k in ("bubble measured", "bubble plan", "bubble serving-sim")]
            ratios.append(f"{layout}: prefill-first / chunked-prefill pipeline bubble: {', '.join(parts)} "
                          f"(Sarathi: up to {SARATHI}x)")
    return "\n".join(lines + [""] + ratios)


def launch(layout: str, args, argv: list[str]) -> list[dict]:
    from pipeloom.parallel.spawn import free_port

    pp, tp = (int(x) for x in layout.split("x"))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), f"--nproc_per_node={pp * tp}", f"--master_port={free_port()}", str(Path(__file__)),
           *argv, "--layout", layout]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, env=env, timeout=args.timeout * 4 + 600)
    if done.returncode != 0:
        raise SystemExit(f"layout {layout} failed (exit {done.returncode}): {' '.join(cmd)}")
    with open(os.path.join(args.out, f"rows_{layout}.json")) as f:
        return json.load(f)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.layout is not None:  # a child under torchrun
        import torch.distributed as dist

        cuda = torch.cuda.is_available() and not args.smoke
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            torch.set_num_threads(1)
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            rows = run_layout(args.layout, args)
            if dist.get_rank() == 0:
                with open(os.path.join(args.out, f"rows_{args.layout}.json"), "w") as f:
                    json.dump(rows, f, indent=1, default=str)
        finally:
            dist.destroy_process_group()
        return rows
    os.makedirs(args.out, exist_ok=True)
    if args.smoke or not torch.cuda.is_available():
        torch.set_num_threads(1)  # like the children: one thread per process (a 1x1 row then uses one core)
    rows = []
    for layout in args.layouts.split(","):
        rows += run_layout(layout, args) if layout == "1x1" else launch(layout, args, argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU (gloo)"
    lengths = f"lengths {args.lengths}" if args.workload == "offline" else f"mixed long/short x {args.scale:g}"
    text = (f"multigpu_infer {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}, torch "
            f"{torch.__version__}, model {args.size}, {args.requests} requests, {lengths}, token budget "
            f"{args.token_budget}\ncommand: python bench/multigpu_infer.py {' '.join(argv)}\n\n" + table(rows))
    print(text, flush=True)
    with open(os.path.join(args.out, "multigpu_infer.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "multigpu_infer.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
