# pipeloom-bubbles: simulate schedules by name and compare bubble rates, one config or a Hydra sweep.
"""Compare pipeline schedules without running a model.

    pipeloom-bubbles                                   # every schedule at pp=4, microbatches=8
    pipeloom-bubbles schedule=zb-v pp=8 microbatches=32 picture=zbv.png
    pipeloom-bubbles --multirun schedule=gpipe,1f1b,zb-h1 pp=2,4,8 microbatches=4,8,16

A sweep appends one CSV row per configuration to ``<sweep dir>/bubbles.csv`` and, when it ends, draws
``bubbles.png`` (bubble rate against microbatches, one panel per pp) beside it.
"""

from __future__ import annotations

import csv
import os
import sys

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeloom.configs.bubbles import register
from pipeloom.schedules import Costs, PlanError, ScheduleError, closed_form, get_schedule, simulate

COLUMNS = [
    "schedule",
    "pp",
    "vpp",
    "microbatches",
    "F",
    "B",
    "W",
    "comm",
    "makespan",
    "bubble_rate",
    "bubble_time_ratio",
    "closed_form",
    "peak_activations_max",
    "weight_versions_max",
]
TABLE = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "pipedream", "pipedream-2bw", "forward-only"]

register()


def evaluate(schedule: str, pp: int, microbatches: int, vpp: int | None, costs: Costs, **options) -> dict:
    """Simulate one configuration and return its CSV row (closed_form: the formula's r, or blank)."""
    plan = get_schedule(schedule, pp=pp, microbatches=microbatches, vpp=vpp, **options)
    result = simulate(plan, costs)
    formula = closed_form(schedule, pp, microbatches, vpp, costs, **options)
    return {
        "schedule": plan.name,
        "pp": pp,
        "vpp": plan.vpp,
        "microbatches": microbatches,
        "F": costs.F,
        "B": costs.B,
        "W": costs.W,
        "comm": costs.comm,
        "makespan": round(result.makespan, 6),
        "bubble_rate": round(result.bubble_rate, 6),
        "bubble_time_ratio": round(result.bubble_time_ratio, 6),
        "closed_form": "" if formula is None else round(formula["bubble_rate"], 6),
        "peak_activations_max": max(result.peak_activations),
        "weight_versions_max": "" if result.weight_versions is None else max(result.weight_versions),
        "_result": result,
    }


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table (both bubble metrics, the closed form, peak memory)."""
    head = ["schedule", "pp", "vpp", "m", "makespan", "bubble r", "beta", "closed-form r", "peak act", "versions"]
    body = [
        [
            r["schedule"],
            r["pp"],
            r["vpp"],
            r["microbatches"],
            f"{r['makespan']:g}",
            f"{r['bubble_rate']:.4f}",
            f"{r['bubble_time_ratio']:.4f}",
            "-" if r["closed_form"] == "" else f"{r['closed_form']:.4f}",
            f"{r['peak_activations_max']:g}",
            r["weight_versions_max"] or "-",
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _sweep_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None


def run(cfg: DictConfig) -> list[dict]:
    """The app's work, callable without Hydra's entry point (tests call it with a composed config)."""
    costs = Costs(F=cfg.F, B=cfg.B, W=cfg.W, comm=cfg.comm)
    sweep_dir = _sweep_dir()
    options = OmegaConf.to_container(cfg.options) if cfg.options else {}
    if cfg.schedule is None:
        rows = [
            evaluate(name, cfg.pp, cfg.microbatches, cfg.vpp if name == "interleaved-1f1b" else None, costs)
            for name in TABLE
        ]
        print(
            f"pp={cfg.pp} microbatches={cfg.microbatches} F={costs.F:g} B={costs.B:g} W={costs.W:g} "
            f"comm={costs.comm:g}  (bubble r: Zero Bubble's rate; beta: Megatron's bubble/ideal time)"
        )
        print(format_table(rows))
    else:
        row = evaluate(cfg.schedule, cfg.pp, cfg.microbatches, cfg.vpp, costs, **options)
        rows = [row]
        print(format_table(rows))
        if cfg.ascii and sweep_dir is None:
            print(row["_result"].ascii(width=110))
        if cfg.picture:
            print(f"picture: {row['_result'].render(cfg.picture)}")
    target = cfg.csv or (os.path.join(sweep_dir, "bubbles.csv") if sweep_dir else None)
    if target:
        for row in rows:
            append_csv(target, row)
    return rows


def plot_sweep(csv_path: str, out_path: str) -> str:
    """Bubble rate against microbatches, one line per (schedule, vpp), one panel per pp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    pps = sorted({int(r["pp"]) for r in rows})
    fig, axes = plt.subplots(1, len(pps), figsize=(4.2 * len(pps), 3.6), squeeze=False, sharey=True)
    for ax, pp in zip(axes[0], pps):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if int(r["pp"]) == pp:
                label = r["schedule"] + (f" v={r['vpp']}" if int(r["vpp"]) > 1 else "")
                series.setdefault(label, []).append((int(r["microbatches"]), float(r["bubble_rate"])))
        styles = ["-", "--", "-.", ":"]
        for i, (label, points) in enumerate(sorted(series.items())):
            points.sort()
            ax.plot(
                [m for m, _ in points],
                [b for _, b in points],
                marker="os^vD<>"[i % 7],
                linestyle=styles[i % len(styles)],
                label=label,
            )
        ax.set_title(f"pp={pp}")
        ax.set_xlabel("microbatches")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("bubble rate (Zero Bubble's r)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


class SweepSummary(Callback):
    """Hydra callback: after a multirun, draw the sweep's comparison plot beside its CSV."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        csv_path = os.path.join(config.hydra.sweep.dir, "bubbles.csv")
        if os.path.exists(csv_path):
            png = plot_sweep(csv_path, os.path.join(config.hydra.sweep.dir, "bubbles.png"))
            print(f"sweep: {csv_path}\nplot:  {png}")


@hydra.main(config_path="pkg://pipeloom.configs", config_name="bubbles", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ScheduleError, PlanError, ValueError) as err:
        print(f"pipeloom-bubbles: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
