# Pictures of timelines: the classic pipeline figure (matplotlib), an ASCII one for terminals.
"""Draw a :class:`~pipeloom.schedules.timeline.Timeline`, simulated or measured.

Ranks are rows, time runs across; forward, backward and weight-gradient boxes have distinct colours
and carry their microbatch number; idle time is left blank (light grey).
"""

from __future__ import annotations

import os

from .ir import Kind
from .timeline import COLOURS, Timeline

_ASCII = {Kind.F: "F", Kind.B: "B", Kind.W: "W"}


def render_timeline(timeline: Timeline, path: str, title: str = "", ax=None) -> str:
    """Draw ``timeline`` to ``path`` (PNG, SVG or PDF by suffix) and return the path.

    With ``ax`` given, draws into that matplotlib axes instead (for side-by-side figures) and writes
    nothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tl = timeline.shifted()
    compute = tl.compute()
    makespan = max((iv.end for iv in compute), default=1.0)
    own = ax is None
    if own:
        width = min(max(8.0, 0.35 * len(compute) / max(tl.pp, 1)), 22.0)
        fig, ax = plt.subplots(figsize=(width, 0.55 * tl.pp + 1.3))
    ax.add_patch(matplotlib.patches.Rectangle((0, -0.5), makespan, tl.pp, color="#eeeeee", zorder=0))
    small = makespan / max(len(compute) / max(tl.pp, 1), 1)
    chunk_of = {}  # a rank's later chunks are drawn lighter
    for iv in compute:
        chunk_of.setdefault(iv.rank, sorted({x.action.stage for x in compute if x.rank == iv.rank}))
    for iv in compute:
        a = iv.action
        y = iv.rank
        colour = _lighter(COLOURS[a.kind], 0.45 * chunk_of[y].index(a.stage) / max(len(chunk_of[y]) - 1, 1))
        ax.barh(y, iv.duration, left=iv.start, height=0.8, color=colour, edgecolor="white", linewidth=0.6)
        if iv.duration >= 0.45 * small:
            label = str(a.microbatch) if a.version is None else f"{a.microbatch}@{a.version}"
            ax.text(
                iv.start + iv.duration / 2,
                y,
                label,
                ha="center",
                va="center",
                color="white",
                fontsize=7 if iv.duration > 0.8 * small else 5.5,
            )
    ax.set_yticks(range(tl.pp))
    ax.set_yticklabels([f"rank {r}" for r in range(tl.pp)])
    ax.set_ylim(tl.pp - 0.5, -0.5)
    ax.set_xlim(0, makespan)
    ax.set_xlabel("time (s)" if tl.unit == "s" else "time (units of F)")
    if any(len(c) > 1 for c in chunk_of.values()):
        title = (title + "  " if title else "") + "(lighter: a rank's later chunk)"
    if title:
        ax.set_title(title, fontsize=10)
    kinds = sorted({iv.action.kind for iv in compute}, key=lambda k: "FBW".index(k.value))
    names = {Kind.F: "forward", Kind.B: "backward", Kind.W: "weight grad"}
    handles = [Patch(color=COLOURS[k], label=names[k]) for k in kinds] + [Patch(color="#eeeeee", label="idle")]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.28 if tl.pp < 4 else -0.18),
        ncol=len(handles),
        frameon=False,
        fontsize=8,
    )
    if own:
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=130)
        plt.close(fig)
    return path


def _lighter(colour: str, amount: float) -> str:
    """``colour`` mixed with white by ``amount`` (0: unchanged)."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


def render_side_by_side(timelines: list[tuple[str, Timeline]], path: str) -> str:
    """Several timelines stacked in one figure (e.g. measured above simulated); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pp = max(tl.pp for _, tl in timelines)
    fig, axes = plt.subplots(len(timelines), 1, figsize=(14, (0.55 * pp + 1.4) * len(timelines)), squeeze=False)
    for ax, (title, tl) in zip(axes[:, 0], timelines):
        render_timeline(tl, path, title=title, ax=ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def ascii_timeline(timeline: Timeline, width: int = 100) -> str:
    """The timeline as text: one row per rank, ``F``/``B``/``W`` cells with microbatch digits, ``.`` idle.

    Each column is ``makespan / width`` long; a box shows its kind letter followed by its microbatch
    number where it fits.
    """
    tl = timeline.shifted()
    compute = tl.compute()
    if not compute:
        return ""
    makespan = max(iv.end for iv in compute)
    smallest = min(iv.duration for iv in compute if iv.duration > 0)
    cols = int(min(width, round(makespan / smallest * 2))) or 1
    scale = cols / makespan
    rows = []
    for rank in range(tl.pp):
        row = ["."] * cols
        for iv in tl.compute(rank):
            a, b = int(round(iv.start * scale)), max(int(round(iv.end * scale)), int(round(iv.start * scale)) + 1)
            text = (_ASCII[iv.action.kind] + str(iv.action.microbatch)).ljust(b - a, _ASCII[iv.action.kind].lower())
            for i, ch in enumerate(text[: b - a]):
                if a + i < cols:
                    row[a + i] = ch
        rows.append(f"rank {rank:<2} |" + "".join(row) + "|")
    return "\n".join(rows)
