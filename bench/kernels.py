# Micro-benchmark of the fused kernels against torch eager and torch.compile, as a share of copy bandwidth.
"""Times each kernel's forward and forward+backward and prints a markdown table.

    python bench/kernels.py                  # GPU, default (Llama-8B-like) shapes in bf16
    python bench/kernels.py --no-compile     # skip torch.compile
    python bench/kernels.py --smoke          # CPU, tiny shapes, eager only: checks the script runs

Rates: memory-bound kernels report GB/s of their minimal traffic (each input read once, each output written
once, forward + backward), and the ratio to a device-to-device copy (read + write) measured in the same run;
the fused linear + cross-entropy reports TFLOP/s of its three matmuls (6 N V D). Implementations: "fused"
(the pipeloom kernel: Triton on GPU, or under TRITON_INTERPRET=1), "torch path" (pipeloom's chunked torch
fallback, for the cross-entropies), "eager" (the torch reference), "compile" (torch.compile of it), "apex"
(NVIDIA apex's fused norms, when importable). Record results in bench/RESULTS.md with device, date, command.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from pipeloom import features
from pipeloom.kernels import torch_path, use_triton
from pipeloom.kernels.cross_entropy import CrossEntropyFunction, cross_entropy, cross_entropy_torch
from pipeloom.kernels.layernorm import LayerNormFunction, layernorm_torch
from pipeloom.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_torch
from pipeloom.kernels.rmsnorm import RMSNormFunction, rmsnorm_torch
from pipeloom.kernels.rotary import RotaryFunction, rotary_torch
from pipeloom.kernels.swiglu import SwiGLUFunction, swiglu_torch

GPU_SHAPES = {
    "rows": 16384,
    "hidden": 4096,
    "heads": 32,
    "head_dim": 128,
    "seq": 2048,
    "batch": 8,
    "ffn": 14336,
    "vocab": 128256,
    "tokens": 8192,
}  # Llama-3-8B-like widths
SMOKE_SHAPES = {
    "rows": 8,
    "hidden": 64,
    "heads": 2,
    "head_dim": 16,
    "seq": 4,
    "batch": 1,
    "ffn": 96,
    "vocab": 100,
    "tokens": 8,
}


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after warm-up (CUDA events on GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, reps)


def cases(s: dict, dtype: torch.dtype, device: torch.device):
    """Per kernel: (name, shape text, inputs, {impl: fn(*inputs)}, bytes or None, flops or None)."""
    g = {"dtype": dtype, "device": device}
    M, D = s["rows"], s["hidden"]
    x, w, b = torch.randn(M, D, **g), torch.randn(D, **g), torch.randn(D, **g)
    e = x.element_size()
    yield (
        "rmsnorm",
        f"({M}, {D})",
        [x, w],
        {
            "fused": lambda x, w: RMSNormFunction.apply(x, w, 1e-6),
            "eager": lambda x, w: rmsnorm_torch(x, w, 1e-6),
        },
        5 * M * D * e,
        None,
    )
    yield (
        "layernorm",
        f"({M}, {D})",
        [x, w, b],
        {
            "fused": lambda *a: LayerNormFunction.apply(*a, 1e-5),
            "eager": lambda *a: layernorm_torch(*a, 1e-5),
        },
        5 * M * D * e,
        None,
    )
    B, T, H, Dh = s["batch"], s["seq"], s["heads"], s["head_dim"]
    q = torch.randn(B, T, H, Dh, **g)
    angle = torch.rand(T, Dh // 2, device=device) * 6.3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    yield (
        "rotary",
        f"({B}, {T}, {H}, {Dh})",
        [q],
        {"fused": lambda q: RotaryFunction.apply(q, cos, sin), "eager": lambda q: rotary_torch(q, cos, sin)},
        4 * q.numel() * e,
        None,
    )
    a, u = torch.randn(M, s["ffn"], **g), torch.randn(M, s["ffn"], **g)
    yield (
        "swiglu",
        f"({M}, {s['ffn']})",
        [a, u],
        {"fused": SwiGLUFunction.apply, "eager": swiglu_torch},
        8 * a.numel() * e,
        None,
    )
    N, V = s["tokens"], s["vocab"]
    z, t = torch.randn(N, V, **g), torch.randint(0, V, (N,), device=device)

    def ce_torch_path(z):
        with torch_path():
            return cross_entropy(z, t)

    yield (
        "cross_entropy",
        f"({N}, {V})",
        [z],
        {
            "fused": lambda z: CrossEntropyFunction.apply(z, t, -100, 0.0, "mean"),
            "torch path": ce_torch_path,
            "eager": lambda z: cross_entropy_torch(z, t),
        },
        3 * N * V * e,
        None,
    )
    h, wh = torch.randn(N, D, **g), torch.randn(V, D, **g) / D**0.5

    def lce_torch_path(h, wh):
        with torch_path():
            return linear_cross_entropy(h, wh, t)

    yield (
        "linear_cross_entropy",
        f"N={N} D={D} V={V}",
        [h, wh],
        {
            "fused": lambda h, wh: linear_cross_entropy(h, wh, t),
            "torch path": lce_torch_path,
            "eager": lambda h, wh: linear_cross_entropy_torch(h, wh, t),
        },
        None,
        6 * N * V * D,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.smoke:
        device, shapes, reps, compile_ = torch.device("cpu"), SMOKE_SHAPES, 2, False
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on CPU")
        device, shapes, reps, compile_ = torch.device("cuda"), GPU_SHAPES, args.reps, not args.no_compile
    dtype = getattr(torch, args.dtype)
    copy_bytes = (1 << 20) if args.smoke else (1 << 30)
    copy = copy_bandwidth(device, copy_bytes, reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# pipeloom kernels, {name}, torch {torch.__version__}, {args.dtype}; copy {copy / 1e9:.1f} GB/s\n"
    )
    print("| kernel | shape | impl | fwd ms | fwd+bwd ms | fwd+bwd rate | of copy |")
    print("|---|---|---|---|---|---|---|")
    print(f"| copy | {copy_bytes} bytes | torch | | | {copy / 1e9:.1f} GB/s | 100% |")
    for kernel, shape, inputs, impls, nbytes, flops in cases(shapes, dtype, device):
        if compile_:
            impls["compile"] = torch.compile(impls["eager"])
        if features.has("apex") and device.type == "cuda" and kernel in ("rmsnorm", "layernorm"):
            from apex.normalization import FusedLayerNorm, FusedRMSNorm  # optional: comparison only

            mod = (FusedRMSNorm if kernel == "rmsnorm" else FusedLayerNorm)(shapes["hidden"]).to(
                device, dtype
            )
            impls["apex"] = lambda x, *rest, mod=mod: mod(x)
        for impl, fn in impls.items():
            if impl == "fused" and not use_triton(inputs[0]):
                print(
                    f"| {kernel} | {shape} | fused | n/a: needs triton and a GPU (or its interpreter) | | | |"
                )
                continue
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

            def fwd(fn=fn, leaves=leaves):
                with torch.no_grad():
                    return fn(*leaves)

            def fwd_bwd(fn=fn, leaves=leaves):
                out = fn(*leaves)
                out.backward(torch.ones_like(out))
                for leaf in leaves:
                    leaf.grad = None

            t_f, t_fb = timed(fwd, device, reps), timed(fwd_bwd, device, reps)
            if nbytes is not None:
                rate, share = f"{nbytes / t_fb / 1e9:.3g} GB/s", f"{100 * nbytes / t_fb / copy:.0f}%"
            else:
                rate, share = f"{flops / t_fb / 1e12:.3g} TFLOP/s", ""
            print(f"| {kernel} | {shape} | {impl} | {1e3 * t_f:.3f} | {1e3 * t_fb:.3f} | {rate} | {share} |")


if __name__ == "__main__":
    main()
