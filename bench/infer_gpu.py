# Inference speed on one GPU: batch-1 decode vs the bandwidth floor, offline throughput and 8k TTFT vs HF.
"""Random-weight Llama models in bf16 through pipeloom's engine and, in the same run, Hugging Face transformers::

    python bench/infer_gpu.py                       # every variant, Llama 1.1B (+ 7B decode)
    python bench/infer_gpu.py --variants decode-1b,throughput,hf-throughput
    python bench/infer_gpu.py --quick               # tiny shapes, a few requests (CPU smoke; tests use it)

Variants (each runs on its own; a failing one prints its error and the others still report):

* ``decode-1b`` / ``decode-7b``: batch 1, prompt 128, 256 new tokens, greedy; ms per token (median decode
  iteration, and wall time over the whole generation) against the bandwidth floor = weight bytes / measured
  copy rate (read + write bytes of a device-to-device copy per second). ``decode-7b-int8`` /
  ``decode-7b-int4``: the same with ``LLM(quantization=...)`` (weight-only, int4 in groups of 128; the floor
  counts the quantized bytes).
* ``hf-decode-1b``: the same with Hugging Face ``generate`` (dynamic cache, sdpa).
* ``throughput``: the nano-vllm workload - 256 requests of random token ids, prompt and output lengths each
  uniform in 100-1024, ignore_eos - output tokens/s, and the workload's roofline: per iteration the larger of
  FLOPs / measured matmul rate and bytes / measured copy rate (weights once, the KV cache read by attention
  and the KV written), summed over the iterations the engine actually ran.
* ``hf-throughput``: Hugging Face continuous batching (``generate_batch``, attention ``paged|sdpa``) on the
  same prompts, ``--hf-requests`` of them, max_new_tokens = the workload's mean output length.
* ``ttft-8k`` / ``hf-ttft-8k``: time to the first token of one 8192-token prompt.
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import time

import torch

SIZES = {  # name -> (ModelConfig fields, HF LlamaConfig fields)
    "1b": dict(family="llama", vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632,
               norm_eps=1e-5),
    "7b": dict(family="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
               norm_eps=1e-5),
    "tiny": dict(family="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128),
}
VARIANTS = ["decode-1b", "hf-decode-1b", "decode-7b", "decode-7b-int8", "decode-7b-int4", "throughput",
            "hf-throughput", "ttft-8k", "hf-ttft-8k"]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_rate(device, nbytes: int) -> float:
    """Bytes moved (read + write) per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times[2:])


def matmul_rate(device, n: int) -> float:
    """bf16 (float32 on CPU) FLOP/s of an n x n x n matmul."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(8):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times[2:])


def our_llm(size: str, args, max_seq_len: int, quantization: str = "none", quant_kernels: str = "auto",
            quant_head: bool = False, **options):
    """pipeloom's LLM over a random-weight model of ``size``; ``quantization`` none | int8 | int4 | fp8 is applied
    as ``LLM(quantization=...)`` does (groups of 128), with ``quant_kernels`` (auto | triton | torch | tinygemm) and
    the output head too when ``quant_head`` (``LLM(quant_head=True)``)."""
    from pipeloom.inference import LLM
    from pipeloom.inference.quant import quantize_model
    from pipeloom.models import ModelConfig, Transformer

    torch.manual_seed(0)
    with torch.device(args.device):
        model = Transformer(ModelConfig(**SIZES[size], max_seq_len=max_seq_len))
    model = model.to(args.dtype)
    model.init_buffers()
    quantize_model(model, quantization, 128, kernels=quant_kernels, skip_head=not quant_head)
    return LLM(model, dtype=str(args.dtype).removeprefix("torch."), device=str(args.device),
               gpu_memory_fraction=args.kv_fraction, **options)


def hf_model(size: str, args, max_seq_len: int, attn: str = "sdpa"):
    import transformers

    c = SIZES[size]
    config = transformers.LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["dim"],
                                      intermediate_size=c["ffn_hidden"], num_hidden_layers=c["n_layers"],
                                      num_attention_heads=c["n_heads"],
                                      num_key_value_heads=c["n_kv_heads"], max_position_embeddings=max_seq_len,
                                      rms_norm_eps=c.get("norm_eps", 1e-6), attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(config).to(args.dtype).eval()
    return model


def weight_bytes(model) -> int:
    """Bytes of the parameters and, in a quantized model, of its quantized layers' saved buffers (codes,
    scales, offsets): the weights a forward reads (the embedding counted whole, as for bf16)."""
    from pipeloom.inference.quant import QuantizedLinear

    params = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return params + sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, vocab) for _ in range(n)]


# ----------------------------------------------------------------------------- variants


def decode(size: str, args, env, quantization: str = "none") -> dict:
    from pipeloom.inference import SamplingParams

    llm = our_llm(size, args, max_seq_len=args.prompt + args.new_tokens + 16, token_budget=None,
                  policy="continuous", quantization=quantization)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompt = prompt_ids(args.prompt, SIZES[size]["vocab_size"])
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm up
    first = len(llm.engine.records)
    llm.generate([prompt], params, use_tqdm=False)
    records = llm.engine.records[first:]
    step = statistics.median(r.duration for r in records if r.num_decode_seqs)
    wall = (llm.last_run["seconds"] - records[0].duration) / max(len(records) - 1, 1)
    floor = weight_bytes(llm.model) / env["copy_rate"]
    return {"ms/token (median step)": step * 1e3, "ms/token (wall)": wall * 1e3, "floor ms": floor * 1e3,
            "of floor": floor / step}


def hf_decode(size: str, args, env) -> dict:
    model = hf_model(size, args, max_seq_len=args.prompt + args.new_tokens + 16)
    ids = torch.tensor([prompt_ids(args.prompt, SIZES[size]["vocab_size"])], device=args.device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(args.device)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        sync(args.device)
    seconds = time.perf_counter() - t
    floor = weight_bytes(model) / env["copy_rate"]
    per = seconds / (out.shape[1] - ids.shape[1])
    return {"ms/token (wall)": per * 1e3, "floor ms": floor * 1e3, "of floor": floor / per}


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    lo, hi = args.lengths
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(args.requests)]
    return prompts, [rng.randint(lo, hi) for _ in range(args.requests)]


def roofline(records, model, env) -> float:
    """Sum over iterations of max(FLOPs / matmul rate, bytes / copy rate)."""
    c = model.config
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - c.vocab_size * c.dim
    w_bytes = weight_bytes(model)
    elem = next(model.parameters()).element_size()
    kv_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * elem  # K and V bytes of one token, all layers
    total = 0.0
    for r in records:
        tokens = r.num_prefill_tokens + r.num_decode_seqs
        flops = 2 * n_params * tokens + 4 * c.n_layers * c.n_heads * c.head_dim * r.kv_tokens_read
        nbytes = w_bytes + kv_token * (r.kv_tokens_read + tokens)
        total += max(flops / env["matmul_rate"], nbytes / env["copy_rate"])
    return total


def throughput(size: str, args, env) -> dict:
    from pipeloom.inference import SamplingParams

    prompts, outs = workload(args, SIZES[size]["vocab_size"])
    llm = our_llm(size, args, max_seq_len=2 * args.lengths[1] + 16, token_budget=args.token_budget,
                  policy=args.policy, max_num_seqs=args.max_num_seqs)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outs]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: every shape the timed run meets, compiled untimed
    first = len(llm.engine.records)
    llm.generate(prompts, params, use_tqdm=args.progress)
    run, records = llm.last_run, llm.engine.records[first:]
    ideal = roofline(records, llm.model, env)
    return {"output tok/s": run["output_tokens"] / run["seconds"], "seconds": run["seconds"], "roofline s": ideal,
            "of roofline": ideal / run["seconds"], "iterations": len(records),
            "preemptions": llm.engine.num_preemptions}


def hf_throughput(size: str, args, env) -> dict:
    from transformers import GenerationConfig

    prompts, outs = workload(args, SIZES[size]["vocab_size"])
    prompts = prompts[: args.hf_requests]
    new = round(statistics.mean(outs))
    model = hf_model(size, args, max_seq_len=2 * args.lengths[1] + 16, attn="paged|sdpa")
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=args.progress)
        sync(args.device)
    seconds = time.perf_counter() - t
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return {"output tok/s": tokens / seconds, "seconds": seconds, "requests": len(prompts), "max_new_tokens": new}


def ttft(size: str, args, env) -> dict:
    from pipeloom.inference import SamplingParams

    llm = our_llm(size, args, max_seq_len=args.long_prompt + 16, token_budget=args.long_prompt,
                  policy="chunked-prefill")
    prompt = prompt_ids(args.long_prompt, SIZES[size]["vocab_size"])
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([prompt[: args.long_prompt // 2]], one, use_tqdm=False)  # warm up (kernels compile)
    times = []
    for i in range(3):
        llm.generate([[i + 1] + prompt[1:]], one, use_tqdm=False)  # a fresh first block: no prefix-cache hit
        times.append(llm.last_run["seconds"])
    return {"TTFT ms": statistics.median(times) * 1e3, "prompt": args.long_prompt}


def hf_ttft(size: str, args, env) -> dict:
    model = hf_model(size, args, max_seq_len=args.long_prompt + 16)
    ids = torch.tensor([prompt_ids(args.long_prompt, SIZES[size]["vocab_size"])], device=args.device)
    times = []
    with torch.no_grad():
        for _ in range(4):
            sync(args.device)
            t = time.perf_counter()
            model(ids, logits_to_keep=1).logits.argmax(-1).tolist()
            times.append(time.perf_counter() - t)
    return {"TTFT ms": statistics.median(times[1:]) * 1e3, "prompt": args.long_prompt}


RUNNERS = {"decode-1b": (decode, "1b"), "hf-decode-1b": (hf_decode, "1b"), "decode-7b": (decode, "7b"),
           "decode-7b-int8": (functools.partial(decode, quantization="int8"), "7b"),
           "decode-7b-int4": (functools.partial(decode, quantization="int4"), "7b"),
           "throughput": (throughput, "1b"), "hf-throughput": (hf_throughput, "1b"), "ttft-8k": (ttft, "1b"),
           "hf-ttft-8k": (hf_ttft, "1b")}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny model and workload (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs=2, default=[100, 1024], help="uniform prompt/output lengths")
    parser.add_argument("--prompt", type=int, default=128, help="decode variants: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="decode variants: generated tokens")
    parser.add_argument("--long-prompt", type=int, default=8192)
    parser.add_argument("--policy", default="chunked-prefill")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-fraction", type=float, default=0.9)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    if args.quick:
        args.requests, args.hf_requests, args.lengths = 6, 3, [8, 24]
        args.prompt, args.new_tokens, args.long_prompt, args.token_budget, args.max_num_seqs = 8, 8, 64, 64, 16
    big = args.device.type == "cuda" and not args.quick
    env = {"copy_rate": copy_rate(args.device, (1 << 30) if big else (1 << 24)),
           "matmul_rate": matmul_rate(args.device, 8192 if big else 256)}
    print(f"device {torch.cuda.get_device_name(args.device) if args.device.type == 'cuda' else 'cpu'}: copy "
          f"{env['copy_rate'] / 1e9:,.1f} GB/s (read+write), matmul {env['matmul_rate'] / 1e12:.2f} TFLOP/s")
    results: dict[str, dict] = {}
    for name in args.variants.split(","):
        fn, size = RUNNERS[name]
        size = "tiny" if args.quick else size
        try:
            results[name] = fn(size, args, env)
        except Exception as err:  # one failing variant must not lose the others' numbers
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(f"{name:>14}  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in results[name].items()), flush=True)
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    ours, hf = results.get("throughput", {}), results.get("hf-throughput", {})
    if "output tok/s" in ours and "output tok/s" in hf:
        print(f"throughput: pipeloom / HF continuous batching = {ours['output tok/s'] / hf['output tok/s']:.1f}x")
    return results


if __name__ == "__main__":
    main()
