# The fp8 KV cache on the GPU: tokens the pool holds against bf16, and engine decode speed at a long context.
"""One process, one GPU, random weights (a 7B Llama by default), through the inference engine::

    python bench/kv_fp8_gpu.py --model llama-7b --context 8192      # bf16 cache, then fp8 cache
    python bench/kv_fp8_gpu.py --quick                              # CPU smoke run, tiny model (tests)

For each ``kv_cache_dtype`` (auto = the model's bfloat16, fp8 = e4m3 rows with a scale per token and head) an
``LLMEngine`` is sized from ``--memory-fraction`` of the device, one request of ``--context`` prompt tokens is
prefilled, and ``--tokens`` greedy tokens are decoded at batch 1 (CUDA graphs): prints the blocks and tokens the
pool holds, the decode ms/token (the engine's recorded decode iterations, median) and the greedy tokens' agreement
with the bf16 cache. Also ``--speculative`` runs prompt lookup through the engine on a repetitive prompt.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def build_model(args, device, dtype):
    from pipeloom.models import ModelConfig, Transformer, get_model_config

    length = max(args.context, 640) + args.tokens + 16  # 640: the code prompt of --speculative
    if args.quick:
        config = ModelConfig(family="llama", vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_hidden=256, max_seq_len=length)
    else:
        config = get_model_config(args.model, max_seq_len=length)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights()
    model = model.to(dtype).eval()
    model.init_buffers()
    return model


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
    engine.add_request("warm", prompt[:64], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    first = len(engine.records)
    engine.add_request("r", prompt, params)
    out = None
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out = o if o.finished else out
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    records = engine.records[first:]
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
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens before the timed decode")
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens decoded")
    parser.add_argument("--budget", type=int, default=2048, help="chunked-prefill token budget")
    parser.add_argument("--memory-fraction", type=float, default=0.85)
    parser.add_argument("--speculative", action="store_true", help="also prompt lookup through the engine")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.tokens, args.budget, args.memory_fraction = 96, 12, 64, 0.01
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, device, dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=g).tolist()
    rows = [decode_at_context(model, args, kv, prompt) for kv in ("auto", "fp8")]
    base = rows[0]
    print(f"{'kv cache':9s} {'blocks':>8s} {'tokens held':>12s} {'x bf16':>7s} {'decode ms/token':>16s} "
          f"{'same tokens':>12s}   (context {args.context}, {args.tokens} tokens, {device})")
    for row in rows:
        same = sum(a == b for a, b in zip(row["token_ids"], base["token_ids"])) / len(base["token_ids"])
        row["agreement"] = same
        print(f"{row['kv_cache_dtype']:9s} {row['blocks']:8d} {row['tokens_held']:12,d} "
              f"{row['tokens_held'] / base['tokens_held']:6.2f}x {row['ms_per_token']:16.3f} {same:12.2f}")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": "tiny" if args.quick else args.model, "context": args.context, "rows": rows}
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
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
