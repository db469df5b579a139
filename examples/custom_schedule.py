# Example: define a pipeline schedule in Python, check it in the simulator, and train a GPT with it on 2 ranks.
"""``python examples/custom_schedule.py`` (re-launches itself under torchrun with 2 CPU processes).

The schedule "eager-1f1b" is 1F1B with one more warm-up forward on every stage but the last: a stage
holds one more microbatch's activations, and in exchange the next forward is already computed when a
gradient arrives (Megatron's "eager" 1F1B hides the send/receive latency this way). Registered with
``@register_schedule``, it works everywhere a built-in one does: the simulator, ``pipeloom-bubbles``, the
runtime and ``pipeloom-train`` (``schedule.name=eager-1f1b``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _relaunch import ensure_ranks
from pipeloom.schedules import Costs, Schedule, ScheduleError, one_f_one_b_order, simulate
from pipeloom.schedules.ir import Action, Plan


class EagerOneFOneB(Schedule):
    """1F1B with ``min(p - s, m)`` warm-up forwards on stage s (one more than 1F1B's ``p - 1 - s``) but the last."""

    name = "eager-1f1b"
    closed_form = "same bubble as 1F1B; one more microbatch in flight per stage"

    def check(self) -> None:
        if self.vpp != 1:
            raise ScheduleError(f"{self.name}: vpp={self.vpp} is not supported; use vpp=1")

    def build(self) -> Plan:
        p, m = self.pp, self.microbatches
        orders = [one_f_one_b_order(m, p - s if s < p - 1 else 0) for s in range(p)]
        ranks = [[Action(s, kind, mb) for kind, mb in order] for s, order in enumerate(orders)]
        return Plan(ranks=ranks, stage_to_rank=list(range(p)), microbatches=m, name=self.name)


def main() -> None:
    from hydra import compose, initialize_config_module
    from pipeloom.configs.train import register
    from pipeloom.launch.train import run
    from pipeloom.schedules import get_schedule

    ensure_ranks(2)
    rank = int(os.environ["RANK"])
    plan = get_schedule("eager-1f1b", pp=2, microbatches=4)
    if rank == 0:
        print(plan.grid())
        for name in ("1f1b", "eager-1f1b"):
            sim = simulate(get_schedule(name, pp=2, microbatches=4), Costs(F=1, B=2, comm=0.5))
            print(f"{name:11s} simulated with comm=0.5: makespan {sim.makespan:g}, bubble rate {sim.bubble_rate:.3f}, "
                  f"peak activations {list(sim.peak_activations)}")
    register()
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=gpt-tiny", "parallel.pp=2", "schedule.name=eager-1f1b", "schedule.microbatches=4",
            "train.steps=30", "train.eval_every=10", "data.seq_len=64", "data.batch_size=8", "logger=none",
            "checkpoint.save_final=false"])
    result = run(cfg, run_dir=os.path.abspath("runs/example-custom-schedule"))
    if rank == 0:
        print(f"trained with {plan.name}: loss {result.losses[1]:.3f} -> {result.losses[result.end_step]:.3f}, "
              f"measured bubble rate {result.bubble_rate_measured:.3f} (predicted {result.bubble_rate_predicted:.3f})")


if __name__ == "__main__":
    main()
