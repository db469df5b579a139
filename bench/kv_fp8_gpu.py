# The fp8 KV cache on the GPU: the decode kernel alone (bf16 vs fp8 cache), tokens held, engine decode at 8k.
"""One process, one GPU, random weights (a 7B Llama by default)::

    python bench/kv_fp8_gpu.py --model llama-7b --context 8192      # kernel, then engine: bf16 cache, fp8 cache
    python bench/kv_fp8_gpu.py --parts kernel                       # the decode kernel only (seconds)
    python bench/kv_fp8_gpu.py --quick                              # CPU smoke run, tiny shapes (tests)

``kernel``: the split-K decode attention kernel (``kernels/paged_decode.py``, as a decode step launches it: the
new token's write, rotary, ``splits`` chosen by batch size) alone, over one layer's cache of ``--context`` tokens
per sequence at the model's shape (7B: 32 heads, 32 kv heads, head size 128; blocks of 16, shuffled block tables),
timed inside a CUDA graph of ``--calls`` back-to-back launches for batch sizes ``--batches``; prints us/call, the
KV bytes read per call over that time (GB/s: codes and scales for fp8) and the largest difference between the
two caches' outputs. A device-to-device copy gives the card's streaming rate in the same process.

``engine``: for each ``kv_cache_dtype`` (auto = the model's bfloat16, fp8 = e4m3 with a scale per token and head)
an ``LLMEngine`` is sized from ``--memory-fraction`` of the device, one request of ``--context`` prompt tokens is
prefilled, and ``--tokens`` greedy tokens are decoded at batch 1 (CUDA graphs): prints the blocks and tokens the
pool holds, the decode ms/token (the engine's recorded decode iterations) and the greedy tokens' agreement with
the bf16 cache. Also ``--speculative`` runs prompt lookup through the engine on a repetitive prompt.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

# graph_time: the CUDA-graph timer of the GEMV bench beside this file (bench/ is scripts, not a package)
_spec = importlib.util.spec_from_file_location("quant_gemv", Path(__file__).resolve().parent / "quant_gemv.py")
quant_gemv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant_gemv)
graph_time = quant_gemv.graph_time


def build_model(args, device, dtype):
    from pipeloom.models import Transformer

    config = model_config(args)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights()
    model = model.to(dtype).eval()
    model.init_buffers()
    return model


def copy_rate(device, calls: int, repeats: int) -> float | None:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + written), the card's streaming rate."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 29, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    seconds = graph_time(lambda: dst.copy_(src), calls, repeats)
    return 2 * (1 << 30) / seconds / 1e9


def kernel_case(config, batch: int, context: int, kv_cache_dtype: str, device, dtype, seed: int = 0) -> dict:
    """One layer's decode inputs: caches of ``context`` tokens per sequence (shuffled blocks of 16), the new
    token at position ``context - 1``, rotary tables; the KV bytes a call reads."""
    from pipeloom.kernels.kv_fp8 import bytes_per_token_head, quantize_cache

    heads, kv_heads, hd, bs = config.n_heads, config.n_kv_heads, config.head_dim, 16
    g = torch.Generator(device=device).manual_seed(seed)
    width = -(-context // bs)
    num_blocks = batch * width + 1
    caches = []
    fp8 = kv_cache_dtype == "fp8"
    for kind in ("key", "value"):  # the same float32 draws for either cache, 4096 blocks at a time
        cache = torch.empty(num_blocks, bs, kv_heads, hd + 4 if fp8 else hd, dtype=torch.uint8 if fp8 else dtype,
                            device=device)
        for b in range(0, num_blocks, 4096):
            part = torch.randn(min(4096, num_blocks - b), bs, kv_heads, hd, generator=g, device=device)
            cache[b : b + part.size(0)] = quantize_cache(part, kind) if fp8 else part.to(dtype)
        caches.append(cache)
    tables = torch.randperm(num_blocks - 1, generator=g, device=device)[: batch * width].view(batch, width).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    last = torch.arange(batch, device=device)
    slots = tables[last, (context - 1) // bs].long() * bs + (context - 1) % bs
    q = torch.randn(batch, heads, hd, generator=g, device=device).to(dtype)
    k, v = (torch.randn(batch, kv_heads, hd, generator=g, device=device).to(dtype) for _ in range(2))
    angles = torch.arange(context, device=device)[:, None] / 10000 ** (torch.arange(0, hd, 2, device=device) / hd)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    read = 2 * batch * context * kv_heads * bytes_per_token_head(hd, dtype, kv_cache_dtype)
    return dict(q=q, k=k, v=v, k_cache=caches[0], v_cache=caches[1], slot_mapping=slots, seq_lens=lens,
                block_tables=tables, cos=cos, sin=sin, bytes=read)


def cache_name(kv_cache_dtype: str, dtype: torch.dtype) -> str:
    """"fp8 " or the float cache's dtype, for the printed rows."""
    return "fp8 " if kv_cache_dtype == "fp8" else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def kernel_cases(args, config, device, dtype):
    """``(batch, cache dtype, kernel arguments, KV bytes read)`` for each batch size of ``args.batches``, the
    float cache first, then fp8; each case's tensors are freed (and CUDA's cache emptied) before the next."""
    for batch in args.batches:
        for kv in ("auto", "fp8"):
            case = kernel_case(config, batch, args.context, kv, device, dtype)
            read = case.pop("bytes")
            yield batch, kv, case, read
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()


def kernel_rows(args, config, device, dtype) -> list[dict]:
    """The decode kernel alone for each batch size and cache: us/call, KV GB/s, output difference fp8 vs bf16."""
    from pipeloom.kernels.paged_decode import paged_decode

    rows = []
    print(f"decode attention kernel alone, one layer ({config.n_heads} heads, {config.n_kv_heads} kv heads, head size "
          f"{config.head_dim}), context {args.context}, {args.calls} calls per CUDA graph, median of {args.repeats}:",
          flush=True)
    outs = {}
    for batch, kv, case, read in kernel_cases(args, config, device, dtype):
        def call(case=case):
            return paged_decode(**case, backend="auto")

        outs[kv] = call().float()  # the float cache's case comes first for each batch size
        seconds = graph_time(call, args.calls, args.repeats)
        row = {"batch": batch, "kv_cache_dtype": kv, "us_per_call": seconds * 1e6, "kv_bytes": read,
               "gb_per_s": read / seconds / 1e9}
        if kv == "fp8":
            base = rows[-1]
            row["speedup_vs_bf16"] = base["us_per_call"] / row["us_per_call"]
            # same random draws: the fp8 cache holds the bf16 cache's values quantized (within e4m3's bound)
            row["max_abs_diff_vs_bf16"] = float((outs["fp8"] - outs["auto"]).abs().max())
        rows.append(row)
        name = cache_name(kv, dtype)
        extra = (f"  {row['speedup_vs_bf16']:.2f}x the float cache, max |out fp8 - out float| "
                 f"{row['max_abs_diff_vs_bf16']:.3g}"
                 if kv == "fp8" else "")
        print(f"  batch {batch:3d} {name} cache: {row['us_per_call']:9.2f} us/call  {read / 1e6:9.1f} MB KV  "
              f"{row['gb_per_s']:8.1f} GB/s{extra}", flush=True)
    return rows


# (keys per iteration, warps, pipeline stages, splits: 0 by batch size) of the split kernel; the first is the default
SWEEP = [(64, 4, 3, 0), (32, 4, 3, 0), (128, 4, 3, 0), (64, 8, 3, 0), (128, 8, 3, 0), (64, 4, 2, 0), (64, 4, 4, 0),
         (64, 4, 3, 16)]


def sweep_rows(args, config, device, dtype) -> list[dict]:
    """The decode kernel under each tiling of ``SWEEP``, per batch size and cache: us/call and KV GB/s."""
    from pipeloom.kernels.paged_decode import paged_decode_triton

    rows = []
    print("decode kernel tilings (block_n, warps, stages, splits; 0 = by batch size):", flush=True)
    for batch, kv, case, read in kernel_cases(args, config, device, dtype):
        for block_n, warps, stages, splits in SWEEP:
            def call(case=case, block_n=block_n, warps=warps, stages=stages, splits=splits):
                return paged_decode_triton(**case, splits=splits, block_n=block_n, num_warps=warps,
                                           num_stages=stages)

            try:
                seconds = graph_time(call, args.calls, args.repeats)
            except Exception as error:  # a tiling the compiler rejects (shared memory): report it, go on
                print(f"  batch {batch:3d} {kv:4s} {(block_n, warps, stages, splits)}: failed: "
                      f"{type(error).__name__}: {str(error)[:120]}", flush=True)
                continue
            rows.append({"batch": batch, "kv_cache_dtype": kv, "block_n": block_n, "num_warps": warps,
                         "num_stages": stages, "splits": splits, "us_per_call": seconds * 1e6,
                         "gb_per_s": read / seconds / 1e9})
            print(f"  batch {batch:3d} {cache_name(kv, dtype)} {(block_n, warps, stages, splits)}: "
                  f"{seconds * 1e6:9.2f} us/call {read / seconds / 1e9:8.1f} GB/s", flush=True)
    return rows


def timed_request(engine, prompt: list[int], params, on_warm=None) -> tuple:
    """Warm ``engine`` up with a request of the same length (other tokens: nothing of it is in the prefix cache
    afterwards, and every kernel and graph the timed request needs has run once), then run ``prompt`` alone under
    ``params``: (its finished output, wall seconds from adding it to its end, the engine's step records of that
    request). ``on_warm(engine)`` runs between the two (to reset counters)."""
    from pipeloom.inference import SamplingParams

    vocab = engine.config.vocab_size
    warm = [(t + 1) % vocab for t in prompt]
    engine.add_request("warm", warm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    first = len(engine.records)
    if on_warm is not None:
        on_warm(engine)
    engine.add_request("r", prompt, params)
    out = None
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out = o if o.finished else out
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, engine.records[first:]


def decode_at_context(model, args, kv_cache_dtype: str, prompt: list[int], speculative: bool = False) -> dict:
    """One engine with ``kv_cache_dtype``: pool size, prefill of ``prompt``, then batch-1 decode timing."""
    from pipeloom.inference import LLMEngine, SamplingParams, SpeculativeEngine

    options = dict(policy="chunked-prefill", token_budget=args.budget, max_num_seqs=1, block_size=16,
                   gpu_memory_fraction=args.memory_fraction, kv_cache_dtype=kv_cache_dtype,
                   cuda_graphs=not args.quick)
    engine = SpeculativeEngine(model, num_speculative_tokens=args.k, **options) if speculative else \
        LLMEngine(model, **options)
    blocks = engine.block_manager.num_blocks
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    out, seconds, records = timed_request(engine, prompt, params)
    # decode iterations: no prompt chunk (a verification step counts its 1 + k tokens as prefill tokens)
    decode = [r.duration for r in records if r.num_prefill_tokens <= (1 + args.k if speculative else 0)]
    tokens = out.outputs[0].token_ids
    row = {"kv_cache_dtype": kv_cache_dtype, "blocks": blocks, "tokens_held": blocks * 16,
           "decode_ms_per_step": 1e3 * statistics.median(decode) if decode else None,
           "ms_per_token": 1e3 * sum(decode) / max(len(tokens) - 1, 1), "seconds": seconds, "token_ids": tokens}
    if speculative:
        row["spec"] = str(engine.spec_stats)
    del engine
    gc.collect()  # the engine's parts refer to each other: free its pool now, before the next engine sizes its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--context", type=int, default=8192, help="tokens in the cache when decoding")
    parser.add_argument("--parts", default="kernel,engine", help="comma-separated: kernel, engine, sweep")
    parser.add_argument("--batches", default="1,16", help="batch sizes of the kernel part")
    parser.add_argument("--calls", type=int, default=20, help="kernel calls per CUDA graph")
    parser.add_argument("--repeats", type=int, default=10, help="graph replays timed (median)")
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens decoded")
    parser.add_argument("--budget", type=int, default=2048, help="chunked-prefill token budget")
    parser.add_argument("--memory-fraction", type=float, default=0.85)
    parser.add_argument("--speculative", action="store_true", help="also prompt lookup through the engine")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU (tests)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - {"kernel", "engine", "sweep"}
    if unknown:
        parser.error(f"--parts: unknown part(s) {sorted(unknown)}; choose from kernel, engine, sweep")
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.context, args.tokens, args.budget, args.memory_fraction = 96, 12, 64, 0.01
        args.calls, args.repeats, args.batches = 2, 1, [1, 3]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": "tiny" if args.quick else args.model, "context": args.context}
    config = model_config(args)
    if "kernel" in parts:
        rate = copy_rate(device, args.calls, args.repeats)
        if rate:
            print(f"device-to-device copy: {rate:,.0f} GB/s (read + written)", flush=True)
        report["copy_gb_per_s"] = rate
        report["kernel"] = kernel_rows(args, config, device, dtype)
    if "sweep" in parts:
        report["sweep"] = sweep_rows(args, config, device, dtype)
    if "engine" in parts:
        engine_part(args, device, dtype, report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def model_config(args):
    """The benchmarked model's configuration (a tiny Llama with --quick)."""
    from pipeloom.models import ModelConfig, get_model_config

    length = max(args.context, 640) + args.tokens + 16  # 640: the code prompt of --speculative
    if args.quick:
        return ModelConfig(family="llama", vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_hidden=256, max_seq_len=length)
    return get_model_config(args.model, max_seq_len=length)


def engine_part(args, device, dtype, report) -> None:
    """Engine decode at ``--context`` for the bf16 and the fp8 cache (and prompt lookup with --speculative)."""
    model = build_model(args, device, dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=g).tolist()
    rows = []
    for kv in ("auto", "fp8"):
        rows.append(decode_at_context(model, args, kv, prompt))
        print(f"engine, {kv} cache: {rows[-1]['ms_per_token']:.3f} ms/token", flush=True)
    base = rows[0]
    print(f"{'kv cache':9s} {'blocks':>8s} {'tokens held':>12s} {'x bf16':>7s} {'decode ms/token':>16s} "
          f"{'same tokens':>12s}   (context {args.context}, {args.tokens} tokens, {device})")
    for row in rows:
        same = sum(a == b for a, b in zip(row["token_ids"], base["token_ids"])) / len(base["token_ids"])
        row["agreement"] = same
        print(f"{row['kv_cache_dtype']:9s} {row['blocks']:8d} {row['tokens_held']:12,d} "
              f"{row['tokens_held'] / base['tokens_held']:6.2f}x {row['ms_per_token']:16.3f} {same:12.2f}")
    report["rows"] = rows
    if args.speculative:
        from quant_gpu import PROMPT  # code with repeated identifiers (bench/quant_gpu.py)

        code = [b % model.config.vocab_size for b in PROMPT.encode()]
        plain = decode_at_context(model, args, "auto", code)
        spec = decode_at_context(model, args, "auto", code, speculative=True)
        same = spec["token_ids"] == plain["token_ids"]
        print(f"prompt lookup through the engine (k={args.k}, {len(code)}-token code prompt): plain "
              f"{plain['ms_per_token']:.2f} ms/token, speculative {spec['ms_per_token']:.2f} ms/token "
              f"({plain['ms_per_token'] / spec['ms_per_token']:.2f}x); {spec['spec']}; same tokens: {same}")
        report["prompt_lookup"] = {"plain_ms_per_token": plain["ms_per_token"], "ms_per_token": spec["ms_per_token"],
                                   "stats": spec["spec"], "same_tokens": same}


if __name__ == "__main__":
    main()
