# Typed config of the pipeloom-bubbles app (schedule, sizes, costs), registered in Hydra's ConfigStore.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BubblesConfig:
    """One simulated configuration; with ``schedule`` unset the app tabulates every schedule."""

    schedule: Optional[str] = None  # a registered schedule name; None: every built-in schedule
    pp: int = 4  # pipeline ranks
    microbatches: int = 8  # microbatches per step
    vpp: Optional[int] = None  # chunks per rank (interleaved-1f1b, zb-v); None: the schedule's default
    F: float = 1.0  # forward time of one full stage for one microbatch
    B: float = 1.0  # backward (input-gradient) time; a schedule that does not split runs B+W at once
    W: float = 1.0  # weight-gradient time
    comm: float = 0.0  # latency added on every cross-rank forward and backward edge
    options: dict[str, Any] = field(default_factory=dict)  # schedule options, e.g. {vertical_sync: true}
    csv: Optional[str] = None  # CSV to append rows to; multirun default: <sweep dir>/bubbles.csv
    picture: Optional[str] = None  # PNG/SVG path for the timeline of a single schedule
    ascii: bool = True  # print the ASCII timeline of a single schedule


def register() -> None:
    ConfigStore.instance().store(name="bubbles_schema", node=BubblesConfig)
