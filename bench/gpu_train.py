# Single-GPU training throughput: a nanoGPT-style baseline (eager, compiled) against pipeloom's model.
"""Train the same GPT shapes through a plain PyTorch baseline and through pipeloom, in one process.

    python bench/gpu_train.py --size 124m            # B16 T1024, 12 layers, d=768
    python bench/gpu_train.py --size 1.3b            # B8 T2048, 24 layers, d=2048
    python bench/gpu_train.py --size tiny --steps 3  # CPU smoke run (tests use it)

Variants: ``baseline-eager``, ``baseline-compile``, ``pipeloom-eager``, ``pipeloom-compile``; pipeloom's model
runs its fused Triton kernels (LayerNorm, cross-entropy) on the GPU, as the training launcher does by
default; ``-torchkernels`` in a pipeloom variant's name switches them off (``set_kernels("torch")``),
``-fused`` uses the chunked linear + cross-entropy head, ``-cudnn`` asks SDPA for cuDNN attention,
``-float8-tensorwise`` / ``-float8-rowwise`` converts the linears to torchao's float8 training layers
(``pipeloom.training.float8``: torchao's per-recipe size thresholds, or ``-minN`` for one threshold N),
``-blocks`` compiles each transformer block on its own (as ``train.compile`` does: one graph the blocks share, far
less compile time than the whole unrolled model) with the embedding, head and loss eager; ``-headc`` with
``-blocks`` compiles the final norm, head and loss as one more graph (Inductor fuses the float32 upcast into the
cross-entropy instead of materialising float32 logits), ``-headm`` compiles only the head module (norm and output
linear, the loss eager: what ``train.compile`` does with ``train.float8_head``); ``-f8head`` converts the output
head to float8 too (by default it stays in bf16, as torchtitan keeps its ``output`` layer); ``-fastacc`` gives the
float8 backward GEMMs fast accumulation as well; ``-cdt`` turns on Inductor's coordinate-descent tuning of its
generated kernels (the float8 casts among them) for that variant's compile.

    python bench/gpu_train.py --size 1.3b --variants baseline-compile,pipeloom-compile,\
        pipeloom-compile-float8-tensorwise,pipeloom-compile-float8-rowwise

``--curve STEPS`` trains the same model twice through ``pipeloom-train`` (``launch.train.run``) on the
Python standard library corpus (byte tokens), bf16 then float8 (``--curve-float8``), from the same init on
the same batches, and writes both loss curves (``curve.json``, ``curve.png`` when matplotlib is there; else
``--plot-from DIR`` draws it later) and the final losses (mean of the last 10% of steps) compared:

    python bench/gpu_train.py --curve 300 --curve-size 1.3b --curve-float8 tensorwise --out runs/f8curve

Every variant: bf16 autocast, fused AdamW, random tokens (vocab 50304), warm-up steps then the median
step time of the timed steps (CUDA events). MFU = (6 N + 12 L D T) tokens/s over the 989 TFLOP/s bf16
datasheet peak, and over the bf16 matmul rate measured in the same run. The baseline is written here,
nanoGPT style (fused qkv, tied embeddings, SDPA), so the comparison does not depend on pipeloom's code.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PEAK_BF16 = 989e12  # H100 SXM dense bf16 datasheet
SIZES = {  # layers, dim, heads, batch, seq
    "tiny": (2, 64, 4, 2, 64),
    "124m": (12, 768, 12, 16, 1024),
    "1.3b": (24, 2048, 16, 8, 2048),
}
VOCAB = 50304


# ----- the baseline: nanoGPT-style, written independently of pipeloom ------------------------------
class BaseAttention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class BaseBlock(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = BaseAttention(d, h)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class BaseGPT(nn.Module):
    def __init__(self, layers: int, d: int, h: int, seq: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(BaseBlock(d, h) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))


# ----- pipeloom -------------------------------------------------------------------------------------
class PipeloomLoss(nn.Module):
    """pipeloom's Transformer with the model's own loss, or the fused chunked head + cross-entropy."""

    def __init__(self, model, fused_head: bool):
        super().__init__()
        self.model, self.fused_head = model, fused_head
        self.head_loss = None  # -headc: a compiled (hidden, targets) -> loss of the final norm, head and loss

    def trunk(self, idx):
        x = self.model.embed(idx)
        for block in self.model.blocks:
            x = block(x)
        return self.model.head.norm(x)  # (B, T, D)

    def forward(self, idx, targets):
        if self.head_loss is not None:
            x = self.model.embed(idx)
            for block in self.model.blocks:
                x = block(x)
            return self.head_loss(x, targets)
        if not self.fused_head:
            return self.model.loss(self.model(idx), targets)
        from pipeloom.kernels.linear_cross_entropy import linear_cross_entropy

        h = self._trunk(idx)
        return linear_cross_entropy(h.flatten(0, 1), self.model.head.out.weight, targets.flatten())


def build(variant: str, size: str, device: str):
    layers, d, h, B, T = SIZES[size]
    if variant.startswith("baseline"):
        model = BaseGPT(layers, d, h, T).to(device)
    else:
        from pipeloom.models import Transformer, get_model_config

        config = get_model_config("gpt-small", n_layers=layers, dim=d, n_heads=h, max_seq_len=T, vocab_size=VOCAB,
                                  dropout=0.0)
        model = PipeloomLoss(Transformer(config).to(device), fused_head="fused" in variant)
        if "float8" in variant:
            from pipeloom.training.float8 import DEFAULT_SKIP, apply_float8

            recipe, min_dim = float8_of(variant)
            skip = () if "f8head" in variant else DEFAULT_SKIP
            report = apply_float8({0: model.model}, recipe, min_dim=min_dim, skip=skip, fast_accum="fastacc" in variant)
            print(f"  {variant}: {report.summary()}", flush=True)
    compiled = "compile" in variant or "best" in variant
    if compiled and "blocks" in variant and isinstance(model, PipeloomLoss):
        from pipeloom.training.parts import compile_blocks  # per block, as the launcher's train.compile does

        compile_blocks([model.model])  # one graph shared by the blocks; embedding, head and loss stay eager
        model._trunk = model.trunk
        if "headm" in variant:  # the launcher's way with a float8 head: the Head module compiled, the loss eager
            model.model.head.compile()
        if "headc" in variant and not model.fused_head:
            inner = model.model
            model.head_loss = torch.compile(lambda h, t: inner.loss(inner.head(h), t))
        return model, model, sum(p.numel() for p in model.parameters()), (layers, d, B, T)
    if isinstance(model, PipeloomLoss):
        model._trunk = torch.compile(model.trunk) if compiled else model.trunk
        step_fn = model if model.fused_head else (torch.compile(model) if compiled else model)
    else:
        step_fn = torch.compile(model) if compiled else model
    n_params = sum(p.numel() for p in model.parameters())
    return model, step_fn, n_params, (layers, d, B, T)


def float8_of(variant: str) -> tuple[str, int | None]:
    """``(recipe, min_dim)`` of a variant name like ``pipeloom-compile-float8-rowwise-min1024``."""
    words = variant.split("float8-", 1)[1].split("-")
    if words[0] not in ("tensorwise", "rowwise"):
        raise ValueError(f"variant {variant!r}: float8 needs -float8-tensorwise or -float8-rowwise")
    minimum = next((int(w[3:]) for w in words[1:] if w.startswith("min") and w[3:].isdigit()), None)
    return words[0], minimum


def run_variant(variant: str, size: str, steps: int, warmup: int, device: str, profile: bool = False) -> dict:
    from pipeloom.kernels import set_kernels

    previous = set_kernels("torch" if "torchkernels" in variant else "auto")
    try:
        return _run_variant(variant, size, steps, warmup, device, profile)
    finally:
        set_kernels(previous)


def _run_variant(variant: str, size: str, steps: int, warmup: int, device: str, profile: bool) -> dict:
    import torch._inductor.config as inductor_config

    with inductor_config.patch(coordinate_descent_tuning="cdt" in variant.split("-")):
        return _measure_variant(variant, size, steps, warmup, device, profile)


def _measure_variant(variant: str, size: str, steps: int, warmup: int, device: str, profile: bool) -> dict:
    torch.manual_seed(0)
    model, step_fn, n_params, (layers, d, B, T) = build(variant, size, device)
    fused = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    gen = torch.Generator(device=device).manual_seed(1)
    idx = torch.randint(0, VOCAB, (B, T), device=device, generator=gen)
    tgt = torch.randint(0, VOCAB, (B, T), device=device, generator=gen)
    backends = None
    if "cudnn" in variant and device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    times, losses = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        start = time.perf_counter()
        if device == "cuda":
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if backends is not None:
                with sdpa_kernel(backends):
                    loss = step_fn(idx, tgt)
            else:
                loss = step_fn(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            ev1.record()
            torch.cuda.synchronize()
            elapsed = ev0.elapsed_time(ev1) / 1e3
        else:
            elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            losses.append(loss.item())
    if profile and device == "cuda":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = step_fn(idx, tgt)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        print(f"--- {variant}: CUDA time by kernel over 2 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    step = statistics.median(times)
    tokens = B * T
    non_emb = n_params - VOCAB * d - (T * d)  # nanoGPT's N: no token (tied) or position table
    flops = 6 * non_emb + 6 * VOCAB * d + 12 * layers * d * T  # per token, head matmul included
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, step_fn, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant, "step_s": step, "tokens_per_s": tokens / step, "flops_per_token": flops,
            "mfu": tokens / step * flops / PEAK_BF16, "peak_gib": peak_mem, "loss": losses[-1],
            "spread": (max(times) - min(times)) / step}


def matmul_rate(device: str) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(20):
        a @ b
    ev1.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (ev0.elapsed_time(ev1) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="124m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", default="", help="comma-separated variants to profile (top CUDA kernels)")
    parser.add_argument("--variants", default="baseline-eager,baseline-compile,pipeloom-eager,pipeloom-compile,"
                                              "pipeloom-compile-fused,pipeloom-best-fused-cudnn")
    parser.add_argument("--curve", type=int, default=0, help="STEPS: the bf16 vs float8 loss-curve run instead")
    parser.add_argument("--curve-size", choices=sorted(SIZES), default="1.3b")
    parser.add_argument("--curve-float8", default="tensorwise", help="tensorwise | rowwise (comma: both)")
    parser.add_argument("--curve-seq", type=int, default=0, help="sequence length of the curve run (0: the size's)")
    parser.add_argument("--curve-batch", type=int, default=0, help="sequences per step of the curve run (0: size)")
    parser.add_argument("--curve-min-dim", type=int, default=None, help="train.float8_min_dim (default: table)")
    parser.add_argument("--curve-fast-accum", action="store_true", help="train.float8_fast_accum=true (float8 run)")
    parser.add_argument("--no-compile", action="store_true", help="curve run without torch.compile (CPU smoke)")
    parser.add_argument("--out", default="runs/gpu_train_curve", help="folder of the curve run")
    parser.add_argument("--plot-from", default="", help="draw curve.png from DIR/curve.json and exit")
    args = parser.parse_args()
    if args.plot_from or args.curve:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from train_curve import plot_curves, run_curves  # bench/train_curve.py, beside this file

        if args.plot_from:
            print(plot_curves(args.plot_from))
            return
        run_curves(args.out, size=SIZES[args.curve_size], steps=args.curve, recipes=args.curve_float8.split(","),
                   seq=args.curve_seq, batch=args.curve_batch, compile=not args.no_compile,
                   min_dim=args.curve_min_dim, fast_accum=args.curve_fast_accum)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rate = matmul_rate(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}  torch {torch.__version__}  size {args.size}  measured bf16 matmul "
          f"{rate / 1e12:.0f} TFLOP/s")
    rows = []
    for v in args.variants.split(","):
        try:
            rows.append(run_variant(v, args.size, args.steps, args.warmup, device, v in args.profile.split(",")))
        except Exception as err:  # one broken variant must not lose the others' numbers
            print(f"  {v}: FAILED: {type(err).__name__}: {str(err)[:1500]}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        r = rows[-1]
        print(f"  {v}: {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_gib']:.2f} GiB",
              flush=True)
    if not rows:
        raise SystemExit("every variant failed")
    base = next((r for r in rows if r["variant"] == "baseline-compile"), rows[0])
    print(f"{'variant':<28} {'step ms':>8} {'tok/s':>10} {'vs base-compile':>15} {'MFU(989)':>9} "
          f"{'MFU(meas)':>9} {'peak GiB':>8} {'spread':>7} {'loss':>7}")
    for r in rows:
        print(f"{r['variant']:<28} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:10.0f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:15.3f} {r['mfu']:9.3f} "
              f"{r['tokens_per_s'] * r['flops_per_token'] / rate if not math.isnan(rate) else float('nan'):9.3f} "
              f"{r['peak_gib']:8.2f} {r['spread']:7.3f} {r['loss']:7.3f}")


if __name__ == "__main__":
    main()
