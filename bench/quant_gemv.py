# Batch-1 quantized GEMVs inside CUDA graphs: bf16 cuBLAS, the int8 GEMV configs, the int4 GEMV configs, tinygemm.
"""The matmuls of one decode step of a 7B Llama at batch 1, as the engine runs them (q/k/v and gate/up fused),
each timed inside a CUDA graph of ``--calls`` back-to-back launches (as a captured decode step runs them), so
the figure is kernel time, not launch overhead::

    python bench/quant_gemv.py                             # 7B shapes, every variant below
    python bench/quant_gemv.py --best-int8 b8 --best-int4 b4   # also write the fastest int8 / int4 choice
    TRITON_INTERPRET=1 python bench/quant_gemv.py --smoke  # CPU: tiny shapes, correctness only

Variants: ``bf16`` (``F.linear``: cuBLAS), ``int8 <config>`` for each configuration of ``kernels/int8_gemv.py``
(fixed tiles, no autotuning; ``--int8-configs`` picks some), ``int8 aten`` (torch's own
``aten._weight_int8pack_mm`` where this torch has it), ``int4 <config>`` for each configuration of
``kernels/int4_gemv.py`` (``--int4-configs``; its (s, m) pairs built once, as a layer holds them) and ``int4
tinygemm`` (``aten._weight_int4pack_mm`` over our int4 weights converted by ``kernels/int4_tinygemm.py``, CUDA
only), and where the ``gemlite`` package is installed ``int4 gemlite`` (GemLite's Triton kernel of its own choice,
autotuned on first use) and ``int4 gemlite KIND`` for each ``--gemlite-kinds`` (measured on an H200,
``bench/RESULTS.md``: its split-K GEMV passes and streams 0.94 TB/s; its GEMV and reverse split-K GEMV miss the
tolerance, relative errors 0.02-0.04, cause not investigated). Each is first checked against the float32 matmul of
its own dequantized weight (relative error over the output's largest magnitude at most ``--tolerance``); a failing
variant prints WRONG and is not timed. Rows print as they are measured; the summary at the end (also on Ctrl-C /
SIGINT) adds up one decoder layer's four GEMVs per variant: microseconds, weight bytes over that time, and the
speed-up over bf16, which bounds what the variant can give a bandwidth-bound batch-1 decode. ``--head`` also times
the output head's GEMV (32000 x 4096, outside the layer sums): what ``quant_head`` would read."""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES_7B = {"qkv": (12288, 4096), "wo": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
SHAPES_SMOKE = {"qkv": (96, 256), "down": (40, 320)}  # ragged against the int8 tiles; int4 in groups of 64
HEAD_7B, HEAD_SMOKE = (32000, 4096), (72, 256)  # the output head (--head): not part of a layer's sums


def graph_time(fn, calls: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` replayed ``calls`` times in one CUDA graph (eager on CPU)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile and autotune outside the capture
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


def gemlite_layer(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int):
    """Our int4 weight (``q * s + m`` per group) as a GemLite layer (github.com/dropbox/gemlite, Triton kernels).

    GemLite's "fma mode" computes ``fma(q, s, z)`` per weight with z a per-group offset, our format exactly:
    it derives z as ``-zero * scale`` from a zero point, so our offsets are written over its (G, N) ones after
    packing. Importing gemlite queries CUDA device 0, hence only here, on a GPU.
    """
    from gemlite.core import DType, GemLiteLinearTriton
    from pipeloom.inference.quant.formats import unpack_int4

    n, k = packed.size(0), 2 * packed.size(1)
    layer = GemLiteLinearTriton(4, group_size=group_size, in_features=k, out_features=n, input_dtype=DType.BF16,
                                output_dtype=DType.BF16)
    with torch.no_grad():
        zero = (-(offset.float() / scale.float())).to(scale.dtype)
        layer.pack(unpack_int4(packed).contiguous(), scale, zero, bias=None, fma_mode=True)
        if layer.W_group_mode != 4 or tuple(layer.zeros.shape) != (k // group_size, n):
            raise RuntimeError(f"gemlite packed W_group_mode={layer.W_group_mode}, offsets {tuple(layer.zeros.shape)}: "
                               "not the fma mode (q * s + m) this conversion was written for")
        layer.zeros.copy_(offset.t())  # (G, N)
    return layer


def variants(x: torch.Tensor, w: torch.Tensor, group_size: int, int8_configs: list[str],
             int4_configs: list[str], gemlite_kinds: list[str] = ()) -> list[tuple]:
    """(name, fn(), weight bytes it reads, float32 reference output) per variant runnable here."""
    from pipeloom.inference.quant.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
    from pipeloom.kernels import int4_tinygemm
    from pipeloom.kernels.int4_gemv import int4_gemv, scales_offsets
    from pipeloom.kernels.int8_gemv import int8_gemv

    xf = x.float()
    q8, s8 = quantize_int8(w)  # scales in the model's dtype, as quantize_model stores them
    q4, s4, z4 = quantize_int4(w, group_size)
    pairs = scales_offsets(s4, z4)  # built once, as QuantizedLinear.prepare_kernels does
    ref8 = xf @ dequantize_int8(q8, s8).t()
    ref4 = xf @ dequantize_int4(q4, s4, z4, group_size).t()
    bytes8 = q8.numel() + s8.numel() * s8.element_size()
    bytes4 = q4.numel() + pairs.numel() * pairs.element_size()
    out = [("bf16", lambda: F.linear(x, w), w.numel() * w.element_size(), xf @ w.float().t())]
    out += [(f"int8 {name}", lambda name=name: int8_gemv(x, q8, s8, config=name), bytes8, ref8)
            for name in int8_configs]
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        out.append(("int8 aten", lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8), bytes8, ref8))
    out += [(f"int4 {name}", lambda name=name: int4_gemv(x, q4, pairs, group_size, config=name), bytes4, ref4)
            for name in int4_configs]
    n, k = w.shape
    if x.is_cuda and importlib.util.find_spec("gemlite") is not None and x.dtype == torch.bfloat16:
        layer = gemlite_layer(q4, s4, z4, group_size)
        nbytes = sum(t.numel() * t.element_size() for t in (layer.W_q, layer.scales, layer.zeros))
        out.append(("int4 gemlite", lambda: layer(x), nbytes, ref4))
        out += [(f"int4 gemlite {kind}", lambda kind=kind: layer.forward_manual(x, matmul_type=kind), nbytes, ref4)
                for kind in gemlite_kinds]
    if int4_tinygemm.available(x.device) and x.dtype == torch.bfloat16:
        if int4_tinygemm.unsupported(n, k, group_size) is None:
            tw, tsz = int4_tinygemm.pack(q4, s4, z4, group_size)
            out.append(("int4 tinygemm", lambda: int4_tinygemm.int4_matmul_tinygemm(x, tw, tsz, group_size),
                        tw.numel() * tw.element_size() + tsz.numel() * tsz.element_size(), ref4))
    return out


def summary(rows: list[dict], shapes: dict) -> dict[str, str]:
    """Print one layer's four GEMVs added up per variant; return the fastest complete int8 config and int4 choice
    (an int4 GEMV config, or ``tinygemm``) by name, ``{"int8": ..., "int4": ..., "int4 gemv": ...}``."""
    base = {r["shape"]: r["us"] for r in rows if r["variant"] == "bf16"}
    totals = {}
    for r in rows:
        if r.get("us") is not None and r["shape"] in shapes:
            totals.setdefault(r["variant"], {})[r["shape"]] = r
    print("\nsummary: one decoder layer's GEMVs (" + ", ".join(shapes) + ")", flush=True)
    print(f"{'variant':26s} {'us':>9s} {'GB/s':>7s} {'vs bf16':>8s}  shapes")
    best: dict[str, tuple[str, float]] = {}
    for variant, per in totals.items():
        us = sum(r["us"] for r in per.values())
        nbytes = sum(r["bytes"] for r in per.values())
        same = [s for s in per if s in base]
        speedup = sum(base[s] for s in same) / sum(per[s]["us"] for s in same) if same else float("nan")
        complete = len(per) == len(shapes)
        print(f"{variant:26s} {us:9.2f} {nbytes / us / 1e3:7.0f} {speedup:7.2f}x  {len(per)}/{len(shapes)}"
              f"{'' if complete else ' (incomplete)'}")
        mode, _, name = variant.partition(" ")
        if not complete or mode not in ("int8", "int4") or name == "aten":
            continue
        keys = [mode] + (["int4 gemv"] if mode == "int4" and name != "tinygemm" else [])
        for key in keys:
            if key not in best or us < best[key][1]:
                best[key] = (name, us)
    for key, (name, us) in best.items():
        print(f"fastest {key} over the layer: {name} ({us:.2f} us)")
    return {key: name for key, (name, _) in best.items()}


def main(argv=None) -> list[dict]:
    from pipeloom.kernels.int4_gemv import CONFIGS as INT4_CONFIGS
    from pipeloom.kernels.int8_gemv import CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="launches per CUDA graph")
    parser.add_argument("--repeats", type=int, default=10, help="graph replays timed (median)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--int8-configs", default=",".join(CONFIGS), help="int8 GEMV configs to time")
    parser.add_argument("--int4-configs", default=",".join(INT4_CONFIGS), help="int4 GEMV configs to time")
    parser.add_argument("--gemlite-kinds", default="",
                        help="GemLite kernels to time by name besides its own choice (int4 gemlite), e.g. "
                             "GEMV_REVSPLITK,GEMV,GEMV_SPLITK (CUDA and the gemlite package only)")
    parser.add_argument("--head", action="store_true", help="also time the output head's GEMV (not in the sums)")
    parser.add_argument("--tolerance", type=float, default=1e-2, help="max |y - ref| / max |ref| to pass")
    parser.add_argument("--best-int8", help="write the fastest int8 config's name to this file")
    parser.add_argument("--best-int4", help="write the fastest int4 choice (a GEMV config or tinygemm) to this file, "
                                            "and the fastest GEMV config on its second line")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    configs = [c for c in args.int8_configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--int8-configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    configs4 = [c for c in args.int4_configs.split(",") if c]
    unknown = [c for c in configs4 if c not in INT4_CONFIGS]
    if unknown:
        raise SystemExit(f"--int4-configs: unknown {unknown}; choose from {','.join(INT4_CONFIGS)}")
    gemlite_kinds = [c for c in args.gemlite_kinds.split(",") if c]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_7B
    timed = {**shapes, **({"head": HEAD_SMOKE if args.smoke else HEAD_7B} if args.head else {})}
    calls, repeats = (1, 1) if args.smoke else (args.calls, args.repeats)
    group_size = 64 if args.smoke else args.group_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {dtype}, {calls} calls per graph, median of {repeats}",
          flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []
    print(f"{'shape':8s} {'N x K':>12s} {'variant':26s} {'us/call':>8s} {'GB/s':>7s} {'vs bf16':>7s} "
          f"{'rel err':>8s}", flush=True)
    try:
        for shape, (n, k) in timed.items():
            w = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(dtype)
            x = torch.randn(1, k, device=device, generator=gen).to(dtype)
            base = None
            for variant, fn, nbytes, ref in variants(x, w, group_size, configs, configs4, gemlite_kinds):
                row = {"shape": shape, "n": n, "k": k, "variant": variant, "bytes": nbytes, "us": None}
                try:
                    rel = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                    row["rel_err"] = rel
                    if not rel <= args.tolerance:
                        print(f"{shape:8s} {f'{n} x {k}':>12s} {variant:26s} WRONG: relative error {rel:.3g} > "
                              f"{args.tolerance}", flush=True)
                        rows.append(row)
                        continue
                    seconds = graph_time(fn, calls, repeats)
                except (RuntimeError, ValueError, NotImplementedError) as err:  # one variant must not stop the rest
                    print(f"{shape:8s} {f'{n} x {k}':>12s} {variant:26s} error: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:150]}", flush=True)
                    rows.append(row)
                    continue
                base = seconds if variant == "bf16" else base
                row.update(us=seconds * 1e6, gb_per_s=nbytes / seconds / 1e9,
                           speedup=base / seconds if base else float("nan"))
                rows.append(row)
                print(f"{shape:8s} {f'{n} x {k}':>12s} {variant:26s} {row['us']:8.2f} {row['gb_per_s']:7.0f} "
                      f"{row['speedup']:6.2f}x {rel:8.1e}", flush=True)
            del w, x
    except KeyboardInterrupt:  # the device script's timeout sends SIGINT: still summarise what was measured
        print("interrupted", flush=True)
    best = summary(rows, shapes)
    if args.best_int8 and "int8" in best:
        with open(args.best_int8, "w") as f:
            f.write(best["int8"] + "\n")
    if args.best_int4 and "int4" in best:
        with open(args.best_int4, "w") as f:
            f.write(best["int4"] + "\n" + best.get("int4 gemv", "") + "\n")
    return rows


if __name__ == "__main__":
    main()
