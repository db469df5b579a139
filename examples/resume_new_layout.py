# Example: train under pp=2 x tp=2, stop, and continue the same run under tp=2 x dp=2 from its checkpoint.
"""``python examples/resume_new_layout.py`` (re-launches itself under torchrun with 4 CPU processes).

Checkpoints hold every tensor whole under its plain-model name, so a run saved under one (pp, tp, dp)
layout resumes under another: here 10 steps under pp=2 x tp=2, then 10 more under tp=2 x dp=2 from the
same checkpoint folder, and a third run that never stopped for comparison. The curves agree to float32
rounding (the layouts add the same numbers in different orders).
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _relaunch import ensure_ranks


def main() -> None:
    from hydra import compose, initialize_config_module
    from pipeloom.configs.train import register
    from pipeloom.launch.train import run

    ensure_ranks(4)
    rank = int(os.environ["RANK"])
    register()
    root = os.path.abspath("runs/example-resume")
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    common = ["model=gpt-tiny", "train.steps=20", "train.eval_every=0", "data.seq_len=64", "data.batch_size=8",
              "logger=none", "train.timeline=false", "optimizer.warmup_steps=5"]

    def train(name, *overrides):
        with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=common + list(overrides))
        return run(cfg, run_dir=os.path.join(root, name))  # each run builds its own mesh on the same ranks

    ck = f"checkpoint.dir={root}/checkpoints"
    first = train("first", "parallel.pp=2", "parallel.tp=2", ck, "train.stop_after=10", "checkpoint.every=10")
    second = train("second", "parallel.tp=2", "parallel.dp=2", ck, "checkpoint.resume=true")
    straight = train("straight", "parallel.pp=2", "parallel.tp=2", "checkpoint.save_final=false")
    if rank == 0:
        print("step  pp2xtp2 -> tp2xdp2   uninterrupted pp2xtp2")
        for step in range(1, 21):
            got = first.losses.get(step, second.losses.get(step))
            print(f"{step:4d}  {got:.6f}{'  (resumed)' if step == 11 else '           '}  {straight.losses[step]:.6f}")


if __name__ == "__main__":
    main()
