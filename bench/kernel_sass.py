# Compile a Triton kernel for a GPU architecture on a machine without one; count its global loads and spills.
"""What a kernel turns into on the GPU can be read without the GPU: Triton's NVIDIA backend and its bundled
``ptxas`` compile for a given architecture from the same arguments a launch would specialise on (pointer
alignment, integers divisible by 16, constexprs). This prints, per kernel variant, the global loads in the PTX
by width (``ld.global.u8`` one byte per instruction; ``ld.global.v4.b32`` sixteen), whether the loop streams
through ``cp.async`` (software-pipelined copies into shared memory), the instructions of one iteration of the
key loop, and ptxas's registers and spill bytes::

    python bench/kernel_sass.py                 # decode and prefill kernels, 7B shape, bf16 and fp8 caches

Used to find why the fp8 KV cache decoded 3.5x slower than bf16 (bench/RESULTS.md) and to check the fix.
Needs triton's NVIDIA backend (the ``triton`` wheel ships it and ptxas) and no TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch


def compile_for(jitfn, *args, arch: int = 90, num_warps: int = 4, num_stages: int = 3, **kwargs):
    """``jitfn[grid](*args, **kwargs)``'s compiled kernel for ``sm_{arch}``, specialised as a launch would be
    (args may be CPU tensors: only their dtype and alignment matter)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench/kernel_sass.py compiles real kernels: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, num_warps=num_warps, num_stages=num_stages)
    binder = create_function_from_signature(jitfn.signature, jitfn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jitfn._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(jitfn, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptx_stats(compiled) -> dict:
    """Global load instructions of the PTX by type, ``cp.async`` copies by size, the instructions of the innermost
    loop's body (inline assembly included: per thread and iteration), and ptxas's registers and spills."""
    ptx = compiled.asm["ptx"]
    loads = collections.Counter(re.findall(r"\bld\.global(?:\.\w+)*?\.((?:v\d\.)?[bsuf]\d+)\b", ptx))
    copies = collections.Counter(int(n, 0) for n in re.findall(
        r"\bcp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)", ptx))
    stats = {"loads": dict(loads), "cp_async": {f"{k}B": v for k, v in sorted(copies.items())},
             "loop_instructions": loop_instructions(ptx)}
    stats.update(_ptxas(ptx, compiled.metadata.target.arch))
    return stats


def loop_instructions(ptx: str) -> int | None:
    """Instructions between the innermost loop's header label and its backward branch (LLVM marks the header)."""
    lines = ptx.splitlines()
    heads = [i for i, line in enumerate(lines) if "Inner Loop Header" in line]
    if not heads:
        return None
    ends = [i for i, line in enumerate(lines) if i > heads[0] and re.search(r"\bbra(?:\.uni)?\s+\$L__BB", line)]
    body = (line.strip() for line in lines[heads[0] : ends[0] + 1] if ends)
    return sum(1 for line in body if line and not line.startswith(("//", ".", "{", "}", "$")))


def _ptxas(ptx: str, arch) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(int(arch))  # Triton 3.9
    except TypeError:
        ptxas = get_ptxas()  # older Triton
    ptxas = getattr(ptxas, "path", ptxas)
    suffix = "a" if int(arch) >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None}


def recorded_launch(module, names: tuple[str, ...], launch) -> tuple[tuple, dict]:
    """The (args, kwargs) the first of ``module``'s kernels ``names`` is launched with when ``launch()`` runs (the
    kernels are replaced by recorders meanwhile: nothing runs)."""
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((a, k))

    kernels = {name: getattr(module, name) for name in names}
    for name in names:
        setattr(module, name, Recorder())
    try:
        launch()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    args, kwargs = calls[0]
    kwargs["UPCAST"] = False  # a launch on CPU asks for the interpreter's float32 dots
    return args, kwargs


def decode_kernel_args(kv_cache_dtype: str, heads: int = 32, kv_heads: int = 32, hd: int = 128, block_size: int = 16,
                       batch: int = 1, splits: int = 8, rotary: bool = True) -> tuple[tuple, dict]:
    """The arguments ``paged_decode_triton`` launches ``_decode_split_kernel`` with (small CPU tensors of the real
    strides and dtypes), for the 7B shape by default."""
    from pipeloom.kernels import paged_decode as pd

    k_cache = new_cache(4, block_size, kv_heads, hd, kv_cache_dtype)
    tables = torch.zeros(batch, 4, dtype=torch.int32)
    q = torch.zeros(batch, heads, hd, dtype=torch.bfloat16)
    kv = torch.zeros(batch, kv_heads, hd, dtype=torch.bfloat16)
    rope = dict(cos=torch.zeros(64, hd, dtype=torch.bfloat16), sin=torch.zeros(64, hd, dtype=torch.bfloat16)) \
        if rotary else {}
    return recorded_launch(pd, ("_decode_split_kernel", "_decode_merge_kernel"), lambda: pd.paged_decode_triton(
        q, kv, kv.clone(), k_cache, k_cache.clone(), torch.zeros(batch, dtype=torch.long),
        torch.ones(batch, dtype=torch.int32), tables, splits, **rope))


def prefill_kernel_args(kv_cache_dtype: str, heads: int = 32, kv_heads: int = 32, hd: int = 128,
                        block_size: int = 16, tokens: int = 64) -> tuple[tuple, dict]:
    """The arguments ``paged_attention_triton`` launches ``_paged_attention_kernel`` with, one sequence of
    ``tokens`` new tokens, for the 7B shape by default."""
    from pipeloom.kernels import paged_attention as pa

    k_cache = new_cache(8, block_size, kv_heads, hd, kv_cache_dtype)
    q = torch.zeros(tokens, heads, hd, dtype=torch.bfloat16)
    starts = torch.tensor([0, tokens], dtype=torch.int32)
    lens = torch.tensor([tokens], dtype=torch.int32)
    tables = torch.zeros(1, 8, dtype=torch.int32)
    return recorded_launch(pa, ("_paged_attention_kernel",), lambda: pa.paged_attention_triton(
        q, k_cache, k_cache.clone(), starts, lens, tables, max_query_len=tokens))


def new_cache(num_blocks: int, block_size: int, kv_heads: int, hd: int, kv_cache_dtype: str) -> torch.Tensor:
    """An empty cache of one layer as the runner allocates it."""
    from pipeloom.kernels.kv_fp8 import cache_dtype, row_width

    shape = (num_blocks, block_size, kv_heads, row_width(hd, kv_cache_dtype))
    return torch.zeros(shape, dtype=cache_dtype(torch.bfloat16, kv_cache_dtype))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kernels", default="decode,prefill")
    args = parser.parse_args(argv)
    from pipeloom.kernels.paged_attention import _paged_attention_kernel
    from pipeloom.kernels.paged_decode import _decode_split_kernel

    report = {}
    for kernel in args.kernels.split(","):
        for kv in ("auto", "fp8"):
            if kernel == "decode":
                jitfn, (kargs, kwargs) = _decode_split_kernel, decode_kernel_args(kv, batch=args.batch)
            else:
                jitfn, (kargs, kwargs) = _paged_attention_kernel, prefill_kernel_args(kv)
            report[f"{kernel}-{kv}"] = stats = ptx_stats(compile_for(jitfn, *kargs, arch=args.arch, **kwargs))
            name = "bf16" if kv == "auto" else "fp8"
            print(f"{kernel} kernel, {name} cache, sm_{args.arch}: {stats['loop_instructions']} instructions per "
                  f"thread per {kwargs['BLOCK_N']}-key step, global loads {stats['loads']}, cp.async "
                  f"{stats['cp_async']}, {stats['registers']} registers, spills {stats['spill_store_bytes']} B "
                  f"stored / {stats['spill_load_bytes']} B loaded", flush=True)
    return report


if __name__ == "__main__":
    main()
