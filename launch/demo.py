# `make demo`: train a small byte-level GPT on 4 CPU processes (pp=2 x tp=2, 1F1B), then sample text from it.
"""What ``make demo`` runs (``python -m pipeloom.launch.demo``). Needs nothing from outside the machine:

1. ``torchrun --nproc_per_node=4 -m pipeloom.launch.train`` with a 1.2M-parameter byte-level GPT
   (``model=gpt-demo``: d=128, 6 blocks, T=128) split into 2 pipeline stages of 2 tensor-parallel shards,
   scheduled by 1F1B, on the Python standard library's own sources;
2. prints the loss falling (and the validation loss), the measured against the predicted bubble rate, the
   path of the timeline picture (measured step above simulated one) and of the checkpoint;
3. loads that checkpoint - saved sharded under pp=2 x tp=2 - into one plain model in this process and
   samples a few lines of Python from it;
4. generates from the same run through the inference engine (``pipeloom.inference.LLM``) and prints tokens/s;
5. prints the trained model's validation loss in float and under int8 / int4 weight-only quantization.

Options: ``--steps`` (default 240: about 3-4 minutes of training on a 2-core machine), ``--out`` (the run
directory; default ``runs/demo-<time>``), ``--extra`` (more Hydra overrides).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeloom.launch.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps (batch 16 x 128 tokens)")
    parser.add_argument("--out", default=os.path.join("runs", time.strftime("demo-%Y-%m-%d_%H-%M-%S")))
    parser.add_argument("--nproc", type=int, default=4, help="processes: pp=2 x tp=2 needs 4")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for pipeloom-train")
    args = parser.parse_args(argv)
    run_dir = os.path.abspath(args.out)
    os.makedirs(run_dir, exist_ok=True)
    overrides = ["model=gpt-demo", "parallel.pp=2", "parallel.tp=2", "schedule.name=1f1b", "schedule.microbatches=4",
                 "data.seq_len=128", "data.batch_size=16", f"train.steps={args.steps}",
                 f"train.eval_every={max(args.steps // 6, 1)}", "train.eval_batches=2", "optimizer.lr=3e-3",
                 "optimizer.warmup_steps=20", "checkpoint.every=0", f"hydra.run.dir={run_dir}", *args.extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m",
           "pipeloom.launch.train", *overrides]
    print("pipeloom demo: a byte-level GPT (1.2M parameters) on 4 CPU processes, pp=2 x tp=2, schedule 1F1B,\n"
          "trained on this machine's Python standard library sources.\n$ " + " ".join(cmd[2:]) + "\n", flush=True)
    start = time.perf_counter()
    log_path = os.path.join(run_dir, "train.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        for line in proc.stdout:
            print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    train_seconds = time.perf_counter() - start
    if code != 0:
        print(f"training failed (exit {code}); its log: {log_path}\n" + open(log_path).read()[-3000:])
        return code
    return summarize(run_dir, train_seconds, start)


def summarize(run_dir: str, train_seconds: float, start: float) -> int:
    """Print the loss curve, bubble rates, file paths and a text sample of a finished demo run."""
    from pipeloom.data import ByteTokenizer
    from pipeloom.training import generate, latest_checkpoint, load_dense, read_metrics

    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    print("\nloss (train, every ~10% of the run):")
    stride = max(len(steps) // 10, 1)
    for r in steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else []):
        bar = "#" * int(round(r["loss"] * 8))
        print(f"  step {r['step']:4d}  {r['loss']:.3f}  {bar}")
    print("validation loss: " + ", ".join(f"step {r['step']}: {r['val_loss']:.3f}" for r in vals))
    tail = steps[-min(20, len(steps)):]
    measured = sum(r["bubble_rate_measured"] for r in tail) / len(tail)
    predicted = sum(r["bubble_rate_predicted"] for r in tail) / len(tail)
    tps = sum(r["tokens_per_s"] for r in tail) / len(tail)
    print(f"bubble rate (Zero Bubble's r, mean of the last {len(tail)} steps): measured {measured:.3f}, predicted "
          f"{predicted:.3f} (simulator fed with the measured per-stage F/B times; closed form for 1F1B with "
          f"p=2, m=4: {1 / 5:.3f})")
    print(f"throughput: {tps:,.0f} tokens/s on 4 CPU processes; training took {train_seconds:.0f} s")
    print(f"timeline picture (measured step above the simulated one): {os.path.join(run_dir, 'timeline.png')}")
    checkpoint = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    print(f"checkpoint (sharded under pp=2 x tp=2, loadable under any layout): {checkpoint}")
    model, manifest = load_dense(checkpoint)
    prompt = "import os\n\n\ndef "
    print(f"\nsampled from the trained model (loaded into one process), prompt {prompt!r}:\n{'-' * 60}")
    text = generate(model, ByteTokenizer(), prompt, max_new_tokens=300, temperature=0.7, seed=0)
    print("\n".join(text.splitlines()[:10]))
    print("-" * 60)
    generate_with_engine(run_dir)
    quantized_validation_loss(model)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is in {run_dir}")
    return 0


def generate_with_engine(run_dir: str, max_tokens: int = 64) -> float:
    """Generate from the trained run through the inference engine (paged KV cache, chunked-prefill continuous
    batching, as ``pipeloom-generate model=RUN_DIR`` does); print one completion and the tokens/s."""
    from pipeloom.inference import LLM, SamplingParams

    llm = LLM(model=run_dir, device="cpu", dtype="float32", token_budget=256, block_size=16)
    prompts = ["import os\n\n\ndef ", "class ", "    for i in range(", "# ", "    return ", "from . import "] * 2
    params = SamplingParams(temperature=0.7, top_k=40, max_tokens=max_tokens, seed=0)
    results = llm.generate(prompts, params, use_tqdm=False)
    run = llm.last_run
    print(f"through the inference engine ({len(prompts)} prompts batched, chunked-prefill, paged KV cache), "
          f"prompt {prompts[0]!r}:\n{prompts[0]}{results[0].outputs[0].text}")
    print(f"engine: {run['output_tokens']} tokens in {run['seconds']:.2f} s = {run['tokens_per_s']:,.0f} tokens/s "
          f"on CPU ({run['iterations']} iterations)\n{llm.engine.latency_report()}")
    return run["tokens_per_s"]


def quantized_validation_loss(model, seq_len: int = 128, batch_size: int = 16, count: int = 2,
                              data_options: dict | None = None) -> dict[str, float]:
    """The validation loss of ``model`` (the demo's trained GPT) in float and under int8 / int4 (g=64) weight-only
    quantization, on the demo's own validation batches; printed against the allowed margins."""
    from pipeloom.data import eval_batches, prepare_data
    from pipeloom.inference.quant import quantized_validation, validation_report

    data = prepare_data(**(data_options or {}))
    val = eval_batches(data.val, seq_len, batch_size, count)
    losses = quantized_validation(model.float(), val, ("int8", "int4"), group_size=64)
    print(validation_report(losses, group_size=64))
    return losses


if __name__ == "__main__":
    sys.exit(main())
