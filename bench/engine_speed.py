# The engine's speed paths side by side on one GPU: eager vs compiled decode graphs, overlapped steps on/off.
"""One process, one table (``bench/infer_gpu.py`` holds the workload, the peers and the roofline)::

    python bench/engine_speed.py                 # 1.1B and 7B decode, offline throughput, HF generate_batch
    python bench/engine_speed.py --quick         # tiny shapes on CPU (tests use it)
    python bench/engine_speed.py --paths graphs,unfused --parts decode-1b,decode-7b   # the decode fusion's effect

* decode, batch 1 (prompt 128, greedy, ignore_eos): per-token wall time as the slope between a 32- and a
  288-token generation (so prefill and start-up cancel), for each engine path: ``graphs`` (the decode step's
  CUDA graph over the eager forward, the path before ``compile``) and ``compiled`` (``torch.compile``'d decode
  forward inside the graph), each with ``overlap`` on and off (one LLM per path; overlap toggled between
  alternating repeats, medians); ``unfused`` is ``graphs`` with the runner's ``fuse_decode`` off (the eager
  composites below the fusion threshold: the path before the decode fusion). ``--quant none,int8,int4`` runs
  each path with weight-only quantized models too (``LLM(quantization=...)``; int8: the Triton GEMV,
  ``PIPELOOM_INT8_GEMV`` picks its config; int4: ``PIPELOOM_INT4_KERNEL``'s kernel on the GPU (pipeloom's GEMV
  unless it says tinygemm), ``int4:triton`` / ``int4:tinygemm`` insist on one; ``+head`` quantizes the output
  head too) and prints each one's speed-up over the unquantized model of the same path. Also the GPU time of one batch-1
  graph replay (CUDA events) and the kernels it launches (torch.profiler), against the bandwidth floor = weight
  bytes / measured copy rate, and on any device the kernels of one batch-1 decode step counted from Python
  (``counted kernels/token``: aten ops that launch one plus Triton launches, inference/launch_count.py).
* throughput: the nano-vllm workload of ``infer_gpu.py`` (256 requests, lengths uniform in 100-1024) for
  ``graphs`` with overlap on/off and ``compiled`` with overlap on; its roofline fraction; and Hugging Face
  ``generate_batch`` (paged|sdpa) on ``--hf-requests`` of the prompts as the baseline.

Each measurement runs on its own: a failing one prints its error and the others still report.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("infer_gpu", Path(__file__).resolve().parent / "infer_gpu.py")
infer_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(infer_gpu)

PATHS = {"graphs": dict(compile=False), "compiled": dict(compile=True), "unfused": dict(compile=False)}
UNFUSED = ("unfused",)  # paths whose runner keeps fuse_decode off


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def per_token(llm, prompt: list[int], short: int, long: int) -> float:
    """Wall seconds per decode token: (time of a ``long``-token run - a ``short`` one) / (long - short)."""
    from pipeloom.inference import SamplingParams

    times = []
    for n in (short, long):
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        times.append(llm.last_run["seconds"])
    return (times[1] - times[0]) / (long - short)


def replay_profile(llm, device) -> dict:
    """GPU ms of one batch-1 decode graph replay (CUDA events, 50 replays) and its kernel count (profiler); the
    kernels of one batch-1 decode step counted from Python (any device; not for a compiled forward)."""
    from pipeloom.inference.launch_count import decode_step_launches

    runner = llm.engine.runner
    graphs = runner.decode_graphs
    counted = {}
    if not runner.compiled:
        try:
            counted["counted kernels/token"] = decode_step_launches(runner).total
        except Exception as err:  # a diagnostic: its failure must not lose the timing
            counted["counted kernels/token"] = f"n/a ({type(err).__name__})"
    if device.type != "cuda" or 1 not in graphs.graphs or graphs.emulate:
        return counted
    graph = graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        graph.replay()
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    end.synchronize()
    out = {"replay ms": start.elapsed_time(end) / 50}
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        out["kernels/token"] = len(kernels) / 10
    except Exception as err:  # the profiler is a diagnostic: its failure must not lose the timing
        out["kernels/token"] = f"n/a ({type(err).__name__})"
    return {**out, **counted}


def decode_paths(size: str, args, env, rows: list) -> None:
    prompt = infer_gpu.prompt_ids(args.prompt, infer_gpu.SIZES[size]["vocab_size"])
    base: dict[tuple, float] = {}  # (path, overlap) -> ms/token of the unquantized model, for the speed-ups
    for path, quant in [(p, q) for p in args.paths.split(",") for q in args.quant.split(",")]:
        if args.budget and time.perf_counter() - args.started > args.budget:
            rows.append((f"decode {size} {path} {quant}", "skipped", f"--budget {args.budget:.0f} s spent", "", ""))
            print(" | ".join(rows[-1]), flush=True)
            continue
        spec, _, suffix = quant.partition("+")
        mode, _, kernels = spec.partition(":")
        label = f"decode {size} {path}" + ("" if mode == "none" else f" {quant}")
        try:
            start = time.perf_counter()
            llm = infer_gpu.our_llm(size, args, max_seq_len=args.prompt + args.long + 16, token_budget=None,
                                    policy="continuous", max_num_seqs=args.decode_seqs, quantization=mode,
                                    quant_kernels=kernels or "auto", quant_head=suffix == "head", **PATHS[path])
            if path in UNFUSED:
                llm.engine.runner.fuse_decode = False  # read when the graphs are captured, in the warm-up
            per_token(llm, prompt, 2, 8)  # warm up: captures (and compiles) the graphs
            setup = time.perf_counter() - start
            got = {True: [], False: []}
            for _ in range(args.repeats):
                for overlap in (True, False):
                    llm.engine.overlap = overlap
                    got[overlap].append(per_token(llm, prompt, args.short, args.long))
            floor = infer_gpu.weight_bytes(llm.model) / env["copy_rate"]
            extra = replay_profile(llm, args.device)
            for overlap in (True, False):
                ms = statistics.median(got[overlap]) * 1e3
                if mode == "none":
                    base[path, overlap] = ms
                ratio = [f"{base[path, overlap] / ms:.2f}x unquantized"] if mode != "none" and (path, overlap) in base \
                    else []
                rows.append((label, f"overlap {'on' if overlap else 'off'}", f"{ms:.3f} ms/token",
                             f"floor {floor * 1e3:.4g} ms ({floor * 1e3 / ms:.0%})",
                             "; ".join(ratio + [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in extra.items()] + [f"setup {setup:.0f} s"])))
                print(" | ".join(rows[-1]), flush=True)
            del llm
        except Exception as err:
            rows.append((label, "error", f"{type(err).__name__}: {err}"[:300], "", ""))
            print(" | ".join(rows[-1]), flush=True)
        release()


def throughput_paths(size: str, args, env, rows: list, paths: list[str]) -> float | None:
    """Ours on the workload after one untimed pass: ``graphs`` with overlap off, on, off, on (alternating),
    ``compiled`` with it on; returns the best output tokens/s."""
    from pipeloom.inference import SamplingParams

    prompts, outs = infer_gpu.workload(args, infer_gpu.SIZES[size]["vocab_size"])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outs]
    best = None
    for path, overlaps in (("graphs", (False, True, False, True)), ("compiled", (True,))):
        if path not in paths:
            continue
        label = f"throughput {size} {path}"
        try:
            llm = infer_gpu.our_llm(size, args, max_seq_len=2 * args.lengths[1] + 16, token_budget=args.token_budget,
                                    policy=args.policy, max_num_seqs=args.max_num_seqs, **PATHS[path])
            # warm-up: the whole workload once, untimed. Its batch sizes and prefill shapes compile Triton kernels
            # and capture decode graphs the first time they occur; a short warm-up leaves that inside the first
            # timed run (seen on the H200: 22.5 s first vs 7.4 s second for the same 1.1B workload)
            llm.generate(prompts, params, use_tqdm=False)
            for overlap in overlaps:
                llm.engine.overlap = overlap
                first = len(llm.engine.records)
                llm.generate(prompts, params, use_tqdm=False)
                run, records = llm.last_run, llm.engine.records[first:]
                ideal = infer_gpu.roofline(records, llm.model, env)
                rate = run["output_tokens"] / run["seconds"]
                best = rate if best is None else max(best, rate)
                rows.append((label, f"overlap {'on' if overlap else 'off'}", f"{rate:,.0f} output tok/s",
                             f"{run['seconds']:.2f} s, roofline {ideal:.2f} s ({ideal / run['seconds']:.1%})",
                             f"{len(records)} iterations, {1e3 * run['seconds'] / len(records):.2f} ms each, "
                             f"{llm.engine.num_preemptions} preemptions"))
                print(" | ".join(rows[-1]), flush=True)
            del llm
        except Exception as err:
            rows.append((label, "error", f"{type(err).__name__}: {err}"[:300], "", ""))
            print(" | ".join(rows[-1]), flush=True)
        release()
    return best


def hf_baseline(size: str, args, env, rows: list) -> float | None:
    try:
        got = infer_gpu.hf_throughput(size, args, env)
    except Exception as err:
        rows.append((f"HF generate_batch {size}", "error", f"{type(err).__name__}: {err}"[:300], "", ""))
        print(" | ".join(rows[-1]), flush=True)
        return None
    rows.append((f"HF generate_batch {size}", "paged|sdpa", f"{got['output tok/s']:,.0f} output tok/s",
                 f"{got['seconds']:.2f} s", f"{got['requests']} requests x {got['max_new_tokens']} new tokens"))
    print(" | ".join(rows[-1]), flush=True)
    release()
    return got["output tok/s"]


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="decode-1b,throughput,hf,decode-7b,throughput-compiled",
                        help="any of decode-1b, decode-7b, throughput (graphs path), throughput-compiled, hf")
    parser.add_argument("--budget", type=float, default=0, help="seconds: start no part after this (0: no limit)")
    parser.add_argument("--paths", default="graphs,compiled",
                        help="engine paths: graphs (eager forward, fused kernels), compiled, unfused (decode only)")
    parser.add_argument("--quick", action="store_true", help="tiny model and workload (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--short", type=int, default=32, help="decode: tokens of the shorter generation")
    parser.add_argument("--long", type=int, default=288, help="decode: tokens of the longer generation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", default="none",
                        help="decode parts: weight quantizations to run, comma-separated: none, int8, int4, fp8; "
                             "MODE:KERNELS picks the quantized layers' kernels (e.g. int4:triton, int4:tinygemm); "
                             "a +head suffix quantizes the output head too (e.g. int4:triton+head)")
    parser.add_argument("--decode-seqs", type=int, default=1,
                        help="decode: max_num_seqs (1: one graph, one compilation)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--policy", default="chunked-prefill")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-fraction", type=float, default=0.9)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    if args.quick:
        args.requests, args.hf_requests, args.lengths, args.repeats = 6, 3, [8, 24], 1
        args.prompt, args.short, args.long, args.token_budget, args.max_num_seqs = 8, 2, 6, 64, 16
    big = args.device.type == "cuda" and not args.quick
    env = {"copy_rate": infer_gpu.copy_rate(args.device, (1 << 30) if big else (1 << 24)),
           "matmul_rate": infer_gpu.matmul_rate(args.device, 8192 if big else 256)}
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"device {name}: copy {env['copy_rate'] / 1e9:,.1f} GB/s (read+write), matmul "
          f"{env['matmul_rate'] / 1e12:.2f} TFLOP/s", flush=True)
    rows: list[tuple] = []
    ours, theirs, start = [], None, time.perf_counter()
    args.started = start
    parts = args.parts.split(",")
    for quant in args.quant.split(","):
        spec, plus, suffix = quant.partition("+")
        if plus and suffix != "head" or spec.partition(":")[0] not in ("none", "int8", "int4", "fp8"):
            raise ValueError(f"--quant: {quant!r} is not MODE[:KERNELS][+head] with MODE none, int8, int4 or fp8")
    for part in parts:
        if part not in ("decode-1b", "decode-7b", "throughput", "throughput-compiled", "hf"):
            raise ValueError(f"--parts: unknown part {part!r}; choose from decode-1b, decode-7b, throughput, "
                             "throughput-compiled, hf")
    try:
        for part in parts:
            if args.budget and time.perf_counter() - start > args.budget:
                rows.append((part, "skipped", f"--budget {args.budget:.0f} s spent", "", ""))
                continue
            size = "tiny" if args.quick else ("7b" if part.endswith("7b") else "1b")
            if part.startswith("decode"):
                decode_paths(size, args, env, rows)
            elif part.startswith("throughput"):
                paths = ["compiled"] if part == "throughput-compiled" else ["graphs"]
                ours.append(throughput_paths(size, args, env, rows, [p for p in paths if p in args.paths.split(",")]))
            else:
                theirs = hf_baseline(size, args, env, rows)
    except KeyboardInterrupt:  # the wrapper's timeout sends SIGINT: still print what was measured
        rows.append(("interrupted", "", f"after {time.perf_counter() - start:.0f} s", "", ""))
    print("\n| what | setting | result | against | notes |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    best = max((x for x in ours if x), default=None)
    if best and theirs:
        print(f"\nthroughput: pipeloom (best path) / HF generate_batch = {best / theirs:.1f}x")
    return rows


if __name__ == "__main__":
    main()
