# Example: measured against simulated bubble rates of several schedules and microbatch counts, on 4 ranks.
"""``python examples/bubble_sweep.py`` (re-launches itself under torchrun with 4 CPU processes).

For each schedule and microbatch count, trains a tiny GPT for a few steps under pp=4 and prints the
bubble rate measured on the real pipeline (last step), the simulator's prediction from that step's
measured per-stage F/B/W times, and the closed form for uniform stages without communication. The
prediction sits below the closed form when stages are unbalanced (r counts the busiest rank's idle time
only); the measurement sits above both on CPU, where 4 processes share the cores (a rank waiting for a
core looks idle) and every cross-stage send costs real time. On one GPU per rank the gap is the
communication the simulator leaves out. Without training, ``pipeloom-bubbles --multirun
schedule=gpipe,1f1b,zb-h1 pp=4 microbatches=4,8,16`` sweeps the simulator alone.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _relaunch import ensure_ranks


def main() -> None:
    from hydra import compose, initialize_config_module
    from pipeloom.configs.train import register
    from pipeloom.launch.train import run
    from pipeloom.schedules import closed_form

    ensure_ranks(4)
    rank = int(os.environ["RANK"])
    register()
    rows = []
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        for m in (4, 8):
            with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
                cfg = compose(config_name="train", overrides=[
                    "model=gpt-tiny", "parallel.pp=4", f"schedule.name={schedule}", f"schedule.microbatches={m}",
                    "train.steps=4", "train.eval_every=0", "train.eval_batches=1", "data.seq_len=64",
                    "data.batch_size=16", "logger=none", "checkpoint.save_final=false", "train.timeline=false"])
            result = run(cfg, run_dir=os.path.abspath(f"runs/example-bubbles/{schedule}-m{m}"))
            formula = closed_form(schedule, 4, m)
            rows.append((schedule, m, result.bubble_rate_measured, result.bubble_rate_predicted,
                         formula["bubble_rate"] if formula else float("nan")))
    if rank == 0:
        print(f"{'schedule':10s} {'m':>3s} {'measured':>9s} {'predicted':>9s} {'closed form':>11s}")
        for schedule, m, measured, predicted, formula in rows:
            print(f"{schedule:10s} {m:3d} {measured:9.3f} {predicted:9.3f} {formula:11.3f}")


if __name__ == "__main__":
    main()
