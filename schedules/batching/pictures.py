# Pictures of simulated serving runs: per-iteration token composition over time, latency CDFs per policy.
"""Two figures (matplotlib, imported only when drawing):

- :func:`plot_composition`: one bar per iteration, as wide as it ran, stacked prefill (blue), decode (green)
  and padded (grey) tokens - prefill-first shows tall all-prefill spikes, chunked-prefill a flat top at its
  token budget. :func:`long_prompt_window` picks the seconds around the first long prompt.
- :func:`plot_latency_cdfs`: the cumulative distributions of TTFT, time between tokens and E2E latency, one
  line per run.
"""

from __future__ import annotations

from typing import Mapping

PREFILL, DECODE, PADDED = "#4c72b0", "#55a868", "#bbbbbb"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def long_prompt_window(result, seconds: float = 2.0) -> tuple[float, float]:
    """A time window of ``seconds`` starting just before the first long prompt (>= 3/4 of the longest) arrives:
    where policies differ most."""
    longest = max(r.prompt_len for r in result.requests)
    first = min(r.arrival for r in result.requests if r.prompt_len >= 0.75 * longest)
    start = max(0.0, first - 0.1 * seconds)
    return start, start + seconds


def plot_composition(result, path: str | None = None, title: str = "", ax=None, window=None):
    """Tokens per iteration over time (stacked prefill/decode/padded) of a ServingResult; returns ``path``.

    With ``ax`` it draws there and writes nothing; ``window`` (start, end) limits the time axis (seconds).
    """
    plt = _pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(10, 3.2))
    lo, hi = window if window is not None else (-float("inf"), float("inf"))
    rows = [i for i in result.iterations if i.end >= lo and i.start <= hi]
    left = [i.start for i in rows]
    width = [max(i.duration, 1e-9) for i in rows]
    prefill = [i.num_prefill_tokens for i in rows]
    decode = [i.num_decode_tokens for i in rows]
    padded = [i.padded_tokens for i in rows]
    kw = dict(align="edge", linewidth=0)
    ax.bar(left, prefill, width, color=PREFILL, label="prefill tokens", **kw)
    ax.bar(left, decode, width, bottom=prefill, color=DECODE, label="decode tokens", **kw)
    if any(padded):
        ax.bar(left, padded, width, bottom=[p + d for p, d in zip(prefill, decode)], color=PADDED,
               label="padding", **kw)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("tokens per iteration")
    ax.set_title(title or result.policy)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    if window is not None:
        ax.set_xlim(*window)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return path


def plot_latency_cdfs(results: Mapping[str, object], path: str) -> str:
    """CDFs of TTFT, time between tokens and E2E latency for each labelled ServingResult; returns ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("TTFT (s)", lambda res: [r.ttft for r in res.completed]),
        ("time between tokens (s)", lambda res: [g for r in res.completed for g in r.itl]),
        ("E2E latency (s)", lambda res: [r.e2e for r in res.completed]),
    ]
    styles = ["-", "--", "-.", ":"]
    for ax, (label, values) in zip(axes, panels):
        for k, (name, res) in enumerate(results.items()):
            xs = sorted(values(res))
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, linestyle=styles[k % len(styles)], label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests / gaps")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_compositions(results: Mapping[str, object], path: str, window=None) -> str:
    """One composition panel per labelled ServingResult, stacked, sharing the time axis (``window``: (start, end),
    "long-prompt" for :func:`long_prompt_window` of the first, None: the whole run)."""
    if window == "long-prompt":
        window = long_prompt_window(next(iter(results.values())))
    plt = _pyplot()
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), sharex=True, squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results.items()):
        plot_composition(res, title=name, ax=ax, window=window)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
