# bf16 against float8 loss curves: the same pipeloom-train run twice on the stdlib corpus, plotted together.
"""Used by ``bench/gpu_train.py --curve STEPS`` (see there). Each variant is one in-process ``pipeloom-train``
run (``pipeloom.launch.train.run``): same seed, so the same initial weights and the same batches; only
``train.float8`` differs. Writes ``OUT/<variant>/metrics.jsonl`` (the launcher's), ``OUT/curve.json`` (every
variant's per-step losses, final loss, validation loss, tokens/s) and ``OUT/curve.png``.
"""

from __future__ import annotations

import json
import os
import statistics


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def curve_overrides(size, steps: int, float8: str, cache: str, *, seq: int = 0, batch: int = 0,
                    compile: bool = True, min_dim: int | None = None, max_bytes: int = 64_000_000,
                    fast_accum: bool = False) -> list[str]:
    """The launcher overrides of one curve run: GPT shapes ``size = (layers, dim, heads, batch, seq)``."""
    layers, dim, heads, B, T = size
    B, T = batch or B, seq or T
    return ["model=gpt-small", f"model.n_layers={layers}", f"model.dim={dim}", f"model.n_heads={heads}",
            f"model.max_seq_len={T}", f"data.seq_len={T}", f"data.batch_size={B}", f"data.cache_dir={cache}",
            f"data.max_bytes={max_bytes}", f"train.steps={steps}", f"train.compile={str(compile).lower()}",
            f"train.float8={float8}", "optimizer.lr=3e-4", "optimizer.min_lr=3e-5",
            f"optimizer.warmup_steps={max(1, steps // 10)}", "train.eval_every=0", "train.eval_batches=4",
            "train.timeline=false", "checkpoint.save_final=false", "logger.kind=jsonl", "train.log_every=1",
            "schedule.microbatches=1"] + ([f"train.float8_min_dim={min_dim}"] if min_dim else []) + (
            ["train.float8_fast_accum=true"] if fast_accum and float8 != "off" else [])


def final_loss(losses: list[float]) -> float:
    """The mean training loss over the last 10% of the steps (at least one): less noisy than the last step."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def run_curves(out: str, *, size, steps: int, recipes=("tensorwise",), seq: int = 0, batch: int = 0,
               compile: bool = True, min_dim: int | None = None, max_bytes: int = 64_000_000,
               fast_accum: bool = False) -> dict:
    """Run bf16, then float8 with each recipe; write curve.json (+ curve.png); print the comparison."""
    from pipeloom.launch.train import run
    from pipeloom.training import read_metrics

    os.makedirs(out, exist_ok=True)
    cache = os.path.join(out, "cache")
    curves = {}
    for float8 in ("off", *recipes):
        name = "bf16" if float8 == "off" else f"float8-{float8}"
        run_dir = os.path.join(out, name)
        run(_compose(curve_overrides(size, steps, float8, cache, seq=seq, batch=batch, compile=compile,
                                     min_dim=min_dim, max_bytes=max_bytes, fast_accum=fast_accum)), run_dir=run_dir)
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        losses = [r["loss"] for r in sorted((r for r in records if "loss" in r), key=lambda r: r["step"])]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][len(losses) // 2:]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        curves[name] = {"loss": losses, "final_loss": final_loss(losses), "val_loss": val[-1] if val else None,
                        "tokens_per_s": statistics.median(speeds) if speeds else None}
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump({"size": list(size), "steps": steps, "seq": seq, "batch": batch, "curves": curves}, f)
    print(summary(curves))
    print(plot_curves(out))
    return curves


def summary(curves: dict) -> str:
    """The comparison table: final loss, its difference from bf16, validation loss, tokens/s."""
    base = curves["bf16"]
    lines = [f"{'run':<20} {'final loss':>10} {'vs bf16':>8} {'val loss':>9} {'tokens/s':>10} {'speed':>6}"]
    for name, c in curves.items():
        rel = (c["final_loss"] - base["final_loss"]) / base["final_loss"]
        speed = c["tokens_per_s"] / base["tokens_per_s"] if c["tokens_per_s"] and base["tokens_per_s"] else float("nan")
        val = f"{c['val_loss']:9.4f}" if c["val_loss"] is not None else f"{'-':>9}"
        lines.append(f"{name:<20} {c['final_loss']:10.4f} {rel:+8.2%} {val} {c['tokens_per_s'] or 0:10.0f} "
                     f"{speed:6.3f}")
    return "\n".join(lines)


def plot_curves(out: str) -> str:
    """Draw ``out/curve.png`` from ``out/curve.json``; returns what it did (matplotlib may be missing)."""
    with open(os.path.join(out, "curve.json")) as f:
        data = json.load(f)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: curves left in {out}/curve.json (draw them with --plot-from {out})"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, c in data["curves"].items():
        ax.plot(range(1, len(c["loss"]) + 1), c["loss"], label=f"{name} (final {c['final_loss']:.4f})",
                linewidth=1)
    layers, dim = data["size"][0], data["size"][1]
    ax.set(xlabel="step", ylabel="training loss", title=f"GPT {layers} layers, d={dim}: bf16 vs float8, "
                                                        f"{data['steps']} steps, stdlib corpus")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out, "curve.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"curves: {path}"
