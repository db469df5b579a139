# Batch-1 quantized GEMV on the GPU: pipeloom's int8 / int4 kernels against the bf16 cuBLAS GEMV, weights/s.
"""The matmuls of one decode step of a 7B Llama at batch 1, as the engine runs them (q/k/v and gate/up fused),
each timed inside a CUDA graph of ``--calls`` back-to-back launches (as a captured decode step runs them), so
the figure is kernel time, not launch overhead::

    python bench/quant_gemv.py                       # 7B shapes, bf16 / int8 / int4 (g128)
    python bench/quant_gemv.py --smoke               # CPU: tiny shapes, Triton interpreter, correctness only

Prints, per shape and variant, microseconds per call, the weight bytes read per call over that time (GB/s),
the speed-up over bf16, the chosen autotune config and the largest error against the dequantized bf16
matmul. Batch-1 decode is bound by these bytes: the end-to-end int8 / int4 speed-ups can only approach the
GEMV speed-ups here.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

SHAPES_7B = {"qkv": (12288, 4096), "wo": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
SHAPES_SMOKE = {"qkv": (96, 128), "down": (64, 256)}


def graph_time(fn, calls: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` replayed ``calls`` times in one CUDA graph (eager on CPU)."""
    if not torch.cuda.is_available():
        import time

        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # autotune and compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def variants(x: torch.Tensor, w16: torch.Tensor, group_size: int) -> dict:
    """Variant -> (fn(), weight bytes it reads, the float reference output, its autotuner or None)."""
    from pipeloom.inference.quant.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
    from pipeloom.kernels import quant_matmul as qm

    q8, s8 = quantize_int8(w16)  # scales in the model's dtype, as quantize_model stores them
    q4, s4, z4 = quantize_int4(w16, group_size)
    return {
        "bf16": (lambda: F.linear(x, w16), w16.numel() * w16.element_size(), F.linear(x, w16), None),
        "int8": (lambda: qm.int8_matmul_triton(x, q8, s8), q8.numel() + s8.numel() * s8.element_size(),
                 F.linear(x, dequantize_int8(q8, s8).to(x.dtype)), qm._int8_tuned),
        "int4": (lambda: qm.int4_matmul_triton(x, q4, s4, z4, group_size),
                 q4.numel() + 2 * s4.numel() * s4.element_size(),
                 F.linear(x, dequantize_int4(q4, s4, z4, group_size).to(x.dtype)), qm._int4_tuned),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="launches per CUDA graph")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_7B
    calls, repeats = (2, 1) if args.smoke else (args.calls, args.repeats)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{'shape':8s} {'N x K':>12s} {'variant':6s} {'us/call':>8s} {'GB/s':>7s} {'vs bf16':>7s} "
          f"{'max err':>8s}  config")
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device, generator=gen, dtype=torch.float32).mul_(0.02)
        x = torch.randn(1, k, device=device, generator=gen, dtype=torch.float32).to(dtype)
        w16 = w.to(dtype)
        base = None
        for variant, (fn, nbytes, ref, tuner) in variants(x, w16, args.group_size).items():
            err = (fn().float() - ref.float()).abs().max().item()
            seconds = graph_time(fn, calls, repeats)
            base = seconds if variant == "bf16" else base
            config = getattr(tuner, "best_config", None) if tuner is not None and device.type == "cuda" else None
            row = {"shape": name, "n": n, "k": k, "variant": variant, "us": seconds * 1e6,
                   "gb_per_s": nbytes / seconds / 1e9, "speedup": base / seconds, "max_err": err,
                   "config": str(config) if config else ""}
            rows.append(row)
            print(f"{name:8s} {f'{n} x {k}':>12s} {variant:6s} {row['us']:8.2f} {row['gb_per_s']:7.0f} "
                  f"{row['speedup']:6.2f}x {err:8.1e}  {row['config']}")
    return rows


if __name__ == "__main__":
    main()
