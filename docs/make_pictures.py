# Regenerates the README's pictures from the simulator: `python docs/make_pictures.py`.
import os

from pipeloom.schedules import Costs, get_schedule, simulate
from pipeloom.schedules.render import render_side_by_side

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    costs = Costs(F=1, B=1, W=1)
    panels = []
    for name, kw in [("1f1b", {}), ("interleaved-1f1b", {"vpp": 2}), ("zb-h1", {}), ("zb-v", {})]:
        result = simulate(get_schedule(name, pp=4, microbatches=8, **kw), costs)
        panels.append(
            (
                f"{name}: makespan {result.makespan:g}, bubble rate {result.bubble_rate:.3f}, "
                f"peak activations {max(result.peak_activations):g}",
                result.timeline,
            )
        )
    path = render_side_by_side(panels, os.path.join(HERE, "schedules.png"))
    print(path)
    print(batching_picture())


def batching_picture() -> str:
    """Tokens per iteration under prefill-first and chunked-prefill, around the first long prompt."""
    from pipeloom.schedules.batching import make_trace, plot_compositions, simulate_serving

    trace = make_trace("mixed", 200, rate=8.0, seed=0)
    runs = {
        f"{name}: P99 time between tokens {1e3 * res.metrics().itl.p99:.0f} ms": res
        for name, res in ((p, simulate_serving(p, trace)) for p in ("prefill-first", "chunked-prefill"))
    }
    return plot_compositions(runs, os.path.join(HERE, "batching.png"), window="long-prompt")


if __name__ == "__main__":
    main()
