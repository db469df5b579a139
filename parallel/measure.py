# Measuring a pipeline run: action clocks (perf_counter / CUDA events) and the comm latency estimate.
"""The runtime times every action into a :class:`~pipeloom.schedules.timeline.Timeline` (seconds):
``time.perf_counter`` on CPU, CUDA events on GPU (read once after the step, so timing never syncs the
device mid-step). :func:`estimate_comm` reads a gathered timeline's transfers to give the simulator a
communication latency when measured costs are fed back into it (as the Zero Bubble paper's
simulation does, arXiv 2401.10241 §5.3: ``comm`` on every cross-stage F and B edge).
"""

from __future__ import annotations

import time

import torch
from pipeloom.schedules.ir import Kind
from pipeloom.schedules.timeline import Timeline


def estimate_comm(timeline: Timeline) -> float:
    """Median latency of the run's transfers: receive end minus the later of send post and receive post."""
    sends = {(iv.action.kind, iv.action.stage, iv.action.microbatch): iv for iv in timeline.intervals
             if iv.action.kind in (Kind.SEND_F, Kind.SEND_B)}
    latencies = []
    for iv in timeline.intervals:
        a = iv.action
        if a.kind is Kind.RECV_F:
            send = sends.get((Kind.SEND_F, a.stage - 1, a.microbatch))
        elif a.kind is Kind.RECV_B:
            send = sends.get((Kind.SEND_B, a.stage + 1, a.microbatch))
        else:
            continue
        if send is not None:
            latencies.append(max(0.0, iv.end - max(iv.start, send.start)))
    latencies.sort()
    return latencies[len(latencies) // 2] if latencies else 0.0


class ActionClock:
    """Action start/end marks: ``time.perf_counter`` on CPU, CUDA events on GPU (converted after the step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.base = torch.cuda.Event(enable_timing=True)
            self.base.record()
        self.base_host = time.perf_counter()
        self.synced = False

    def host(self) -> float:
        return time.perf_counter()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def times(self, start, end, host: bool) -> tuple[float, float]:
        if not self.cuda or host:
            return start, end
        if not self.synced:
            torch.cuda.synchronize()
            self.synced = True
        base = self.base_host
        return base + self.base.elapsed_time(start) / 1e3, base + self.base.elapsed_time(end) / 1e3
