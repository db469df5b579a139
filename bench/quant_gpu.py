# Batch-1 decode of a Llama (7B / 1.1B shapes) in bf16 / int8 / int4 / fp8, ours vs torchao, + prompt lookup.
"""One process, one GPU, random weights, all variants in the same run so the speed-ups share a baseline::

    python bench/quant_gpu.py --model llama-7b                      # every variant, 256 new tokens
    python bench/quant_gpu.py --model llama-1b --variants bf16,int8,int4 --tokens 128
    python bench/quant_gpu.py --quick                               # CPU smoke run, tiny model (tests)

The decode loop is gpt-fast's (a static KV cache, one ``torch.compile(mode="reduce-overhead")`` step that
embeds one token, runs every block and takes the argmax) written here over a pipeloom ``Transformer``'s own
modules, so quantized layers are exercised exactly as the engine will call them. Variants:

=============  =======================================================================================
bf16           the float model
int8 / int4    ``quantize_model(..., kernels="auto")``: pipeloom's Triton GEMV kernels (kernels/quant_matmul.py)
int8-torch     the same buffers, torch path (dequantize inside the matmul; Inductor fuses it, as gpt-fast)
int4-torch
int8-torchao   torchao's ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig(group_size, tile-packed)``
int4-torchao
fp8            e4m3 weights and per-token e4m3 activations, rowwise ``torch._scaled_mm`` (W8A8)
fp8-wo         e4m3 weights only (converted to bf16 inside the matmul)
fp8-torchao    torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())``
=============  =======================================================================================

Each prints ms/token (median of ``--repeats`` timed runs of ``--tokens`` tokens), tokens/s, the speed-up
over bf16 and the bytes of weights read per token / time (GB/s). ``--spec`` adds prompt-lookup speculative
decoding (greedy, k drafts verified in one compiled forward of k+1 tokens) on a prompt of code with
repeated identifiers: tokens/s, acceptance rate and tokens per target step, against plain decoding of the
same variant. With random weights the acceptance rate says little about a trained model; the speed of a
verification step against a decode step is what this measures. It prints how many tokens were proposed and
where the speculative tokens first differ from plain decoding: a random model's logits are nearly tied, so in
bfloat16 the k+1-token verification and the 1-token decode (GEMMs of other shapes, rounded differently) can
pick different argmaxes, after which the two continuations part and a random continuation rarely repeats the
prompt (on CPU, a random 1.1B Llama in bf16: first difference at token 22 of 48, acceptance 0.125; smaller
random models, in bf16 and float32, reproduce plain decoding exactly, with acceptance 0.3-1.0).
``bench/kv_fp8_gpu.py --speculative`` runs prompt lookup through the engine instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("bf16", "int8", "int8-torch", "int8-torchao", "int4", "int4-torch", "int4-torchao", "fp8", "fp8-wo",
            "fp8-torchao")
PROMPT = '''def parse_config(config_path, config_values, config_defaults):
    config_file = open(config_path)
    config_values = load_config_values(config_file, config_defaults)
    for config_key, config_value in config_values.items():
        if config_key not in config_defaults:
            raise KeyError(f"unknown config_key {config_key} in {config_path}")
        config_values[config_key] = convert_config_value(config_value, config_defaults[config_key])
    return config_values
'''


class StaticDecoder(nn.Module):
    """gpt-fast's decode over a pipeloom Llama: KV caches (L, B, Hkv, S, hd) and positions as a tensor."""

    def __init__(self, model: nn.Module, max_len: int, dtype: torch.dtype):
        super().__init__()
        c = model.config
        if c.family != "llama":
            raise ValueError(f"the benchmark decodes Llama-family models (rotary), got family={c.family!r}")
        self.model, self.max_len = model, max_len
        shape = (c.n_layers, 1, c.n_kv_heads, max_len, c.head_dim)
        device = model.embed.tok.weight.device
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (1, T) at positions ``pos`` (T,) -> logits (1, T, V); writes their K/V into the caches."""
        from pipeloom.models.layers import apply_rotary

        m, (B, T) = self.model, tokens.shape
        x = m.embed.tok(tokens)  # (1, T, D)
        mask = torch.arange(self.max_len, device=tokens.device).unsqueeze(0) <= pos.unsqueeze(1)  # (T, S)
        for i, block in enumerate(m.blocks):
            a = block.attn
            h = block.attn_norm(x)
            cos, sin = a.rope_cos[pos], a.rope_sin[pos]  # (T, hd)
            q = apply_rotary(a.wq(h).view(B, T, -1, a.head_dim), cos, sin).transpose(1, 2)  # (1, Hq, T, hd)
            k = apply_rotary(a.wk(h).view(B, T, -1, a.head_dim), cos, sin).transpose(1, 2)  # (1, Hkv, T, hd)
            v = a.wv(h).view(B, T, -1, a.head_dim).transpose(1, 2)
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask,
                                               enable_gqa=True)  # (1, Hq, T, hd)
            x = x + a.wo(y.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.mlp_norm(x))
        return m.head(x)  # (1, T, V)


def build_variant(base: nn.Module, variant: str, group_size: int) -> nn.Module:
    """A quantized copy of ``base`` (or ``base`` itself for bf16)."""
    from pipeloom.inference.quant import quantize_model

    if variant == "bf16":
        return base
    mode, _, how = variant.partition("-")
    model = copy.deepcopy(base)
    if how == "torchao":  # with set_inductor_config left on, torchao would change Inductor for later variants
        import torch._inductor.config as inductor

        saved = inductor.save_config()
        try:
            return quantize_model(model, mode, group_size, backend="torchao")
        finally:
            inductor.load_config(saved)
    return quantize_model(model, mode, group_size, fp8_activations=how != "wo",
                          kernels="torch" if how == "torch" else "auto")


def make_steps(decoder: StaticDecoder, compile_mode: str, k: int):
    """(decode_one(token (1,1), pos (1,)) -> next (1,1), verify(tokens (1,k+1), pos (k+1,)) -> argmax (1,k+1))."""
    def decode_one(token, pos):
        return decoder(token, pos)[:, -1].argmax(-1, keepdim=True)

    def verify(tokens, pos):
        return decoder(tokens, pos).argmax(-1)

    if compile_mode == "none":
        return decode_one, verify
    return (torch.compile(decode_one, mode=compile_mode, fullgraph=True),
            torch.compile(verify, mode=compile_mode, fullgraph=True))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(decoder, decode_one, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    """Greedy: prefill eagerly, then ``n`` compiled steps; (tokens, seconds of the n steps)."""
    dev = prompt.device
    P = prompt.size(1)
    nxt = decoder(prompt, torch.arange(P, device=dev))[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    out = []
    _sync(dev)
    start = time.perf_counter()
    for i in range(n):
        out.append(nxt)
        # a CUDA-graph output is overwritten by the next replay: keep a copy (gpt-fast clones it too)
        nxt = decode_one(nxt, torch.tensor([P + i], device=dev)).clone()
    _sync(dev)
    return [int(t) for t in torch.cat(out, 1)[0]], time.perf_counter() - start


@torch.no_grad()
def decode_lookup(decoder, verify, prompt: torch.Tensor, n: int, k: int, max_n: int = 3):
    """Greedy prompt-lookup speculative decoding; (tokens, seconds, SpecStats)."""
    from pipeloom.inference.spec_decode import SpecStats
    from pipeloom.inference.spec_proposers import NgramProposer

    dev, P = prompt.device, prompt.size(1)
    proposer, stats = NgramProposer(1, max_n), SpecStats()
    context = prompt[0].tolist()
    last = int(decoder(prompt, torch.arange(P, device=dev))[:, -1].argmax())
    context.append(last)
    pos = P  # the position of `last`, whose K/V is not cached yet
    _sync(dev)
    start = time.perf_counter()
    while len(context) - P < n:
        draft = proposer.find(context, k)
        tokens = torch.tensor([[last] + draft + [0] * (k - len(draft))], device=dev)  # (1, k+1), padded
        best = verify(tokens, torch.arange(pos, pos + k + 1, device=dev))[0].tolist()  # argmax per row
        accepted = 0
        while accepted < len(draft) and draft[accepted] == best[accepted]:
            accepted += 1
        new = draft[:accepted] + [best[accepted]]
        stats.add(len(draft), accepted)
        context += new
        pos += len(new)
        last = new[-1]
    _sync(dev)
    return context[P : P + n], time.perf_counter() - start, stats


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers a decode step reads, the embedding table excepted (one row per token)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name.startswith("embed.") or "rope_" in name or "tinygemm_" in name:  # a copy
            continue
        seen.add(id(t))
        inner = getattr(t, "qdata", None)  # torchao subclasses: count their packed data
        total += (inner.numel() * inner.element_size()) if inner is not None else t.numel() * t.element_size()
    return total


def run(args) -> dict:
    from pipeloom.models import ModelConfig, Transformer, get_model_config

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    max_len = args.prompt_len + args.tokens + args.k + 8
    if args.quick:
        config = ModelConfig(family="llama", vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_hidden=256, max_seq_len=max_len)
    else:
        config = get_model_config(args.model, max_seq_len=max(max_len, 256))
    torch.manual_seed(0)
    with torch.device("meta"):
        base = Transformer(config)
    base.to_empty(device=device)
    base.init_weights()
    base = base.to(dtype).eval()
    prompt_ids = torch.tensor([list(PROMPT.encode())[: args.prompt_len]], device=device) % config.vocab_size
    if args.compile != "none":  # one Inductor setting for every variant: gpt-fast's (torchao sets these too)
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True
        inductor.triton.unique_kernel_names = True
        inductor.fx_graph_cache = True
    print(f"model {args.model if not args.quick else 'tiny'}: {base.num_params() / 1e9:.2f}B parameters, {dtype}, "
          f"{device}; prompt {prompt_ids.size(1)} tokens, {args.tokens} new tokens, compile={args.compile}")
    results, bf16_ms = {}, None
    print(f"{'variant':14s} {'ms/token':>9s} {'tok/s':>8s} {'speed-up':>8s} {'weights MB':>10s} {'GB/s':>7s}")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; choose from {','.join(VARIANTS)}")
        try:
            model = build_variant(base, variant, args.group_size)
        except (ValueError, ImportError, RuntimeError, AssertionError) as err:  # torchao off-GPU, missing deps
            print(f"{variant:14s} skipped: {str(err).splitlines()[0][:110]}")
            results[variant] = {"skipped": str(err).splitlines()[0]}
            continue
        decoder = StaticDecoder(model, max_len, dtype)
        decode_one, verify = make_steps(decoder, args.compile, args.k)
        for _ in range(args.warmup):
            decode(decoder, decode_one, prompt_ids, min(args.tokens, 16))
        times, tokens = [], None
        for _ in range(args.repeats):
            tokens, seconds = decode(decoder, decode_one, prompt_ids, args.tokens)
            times.append(seconds / args.tokens * 1e3)
        ms = statistics.median(times)
        bf16_ms = ms if variant == "bf16" else bf16_ms
        nbytes = weight_bytes(model)
        row = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms, "speedup_vs_bf16": bf16_ms / ms if bf16_ms else None,
               "weight_bytes": nbytes, "gb_per_s": nbytes / ms / 1e6, "first_tokens": tokens[:8]}
        speedup = f"{row['speedup_vs_bf16']:.2f}x" if bf16_ms else "-"
        print(f"{variant:14s} {ms:9.3f} {1e3 / ms:8.1f} {speedup:>8s} {nbytes / 1e6:10.1f} {row['gb_per_s']:7.1f}")
        if args.spec and variant in args.spec_variants.split(","):
            for _ in range(args.warmup):
                decode_lookup(decoder, verify, prompt_ids, min(args.tokens, 16), args.k)
            spec_times = []
            for _ in range(args.repeats):
                spec_tokens, seconds, stats = decode_lookup(decoder, verify, prompt_ids, args.tokens, args.k)
                spec_times.append(seconds)
            spec_ms = statistics.median(spec_times) / args.tokens * 1e3
            row["prompt_lookup"] = {"k": args.k, "ms_per_token": spec_ms, "tokens_per_s": 1e3 / spec_ms,
                                    "speedup_vs_plain": ms / spec_ms, "acceptance_rate": stats.acceptance_rate,
                                    "proposed": stats.proposed, "accepted": stats.accepted,
                                    "first_difference": next((i for i, (a, b) in enumerate(zip(spec_tokens, tokens))
                                                              if a != b), None),
                                    "tokens_per_step": stats.tokens_per_step,
                                    "same_tokens_as_plain": spec_tokens == tokens}
            print(f"  + prompt lookup k={args.k}: {spec_ms:.3f} ms/token, {1e3 / spec_ms:.1f} tok/s, "
                  f"{ms / spec_ms:.2f}x plain; acceptance {stats.acceptance_rate:.3f}, "
                  f"{stats.tokens_per_step:.2f} tokens/step ({stats.proposed} proposed); same tokens as plain: "
                  f"{spec_tokens == tokens} (first difference at {row['prompt_lookup']['first_difference']})")
        results[variant] = row
        del decoder, decode_one, verify
        if model is not base:
            del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": "tiny" if args.quick else args.model, "dtype": args.dtype,
            "tokens": args.tokens, "prompt_len": int(prompt_ids.size(1)), "compile": args.compile,
            "date": time.strftime("%Y-%m-%d"), "results": results}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-7b", help="a pipeloom config name (llama-7b, llama-1b)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per timed run")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", default="reduce-overhead", help="torch.compile mode, or 'none'")
    parser.add_argument("--spec", action=argparse.BooleanOptionalAction, default=True, help="prompt lookup too")
    parser.add_argument("--spec-variants", default="bf16,int8,int4", help="variants also run with prompt lookup")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per verification step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens, no compile (CPU smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.prompt_len, args.repeats, args.warmup = 12, 48, 1, 1
        if args.compile == "reduce-overhead":
            args.compile = "none"
    report = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
