# launch/report.py: exactly one error line from ranks that all hit the error, before any of them returns.
import threading
import time

import pytest
import torch.distributed as dist

from pipeloom.launch.report import hydra_error_line, report_once

LINE = "pipeloom-train: error: parallel.pp=3: pp=3 * tp=1 does not divide the world size 4"


class SlowStream:
    """stderr that takes a while to write a line, and remembers when each line was flushed."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.lines, self.flushed_at, self._lock = delay, [], [], threading.Lock()

    def write(self, text: str) -> None:
        time.sleep(self.delay)
        with self._lock:
            self.lines.append(text)

    def flush(self) -> None:
        self.flushed_at.append(time.monotonic())


def _ranks(world: int, target, *args) -> dict:
    out: dict = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, target(r, *args))) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(out) == world, "a rank did not return"
    return out


@pytest.fixture
def agent_store():
    """A TCPStore server standing in for torchrun's agent store."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.mark.parametrize("first", [0, 2])
def test_one_rank_prints_and_no_rank_returns_before_the_line_is_out(agent_store, first):
    stream = SlowStream(delay=0.3)  # the printer is slow to write: the others must wait for it

    def rank(r):
        client = dist.TCPStore("127.0.0.1", agent_store.port, is_master=False, wait_for_workers=False)
        time.sleep(0 if r == first else 0.1)  # rank `first` reaches the error first (rank 0 may be late)
        printed = report_once(LINE, rank=r, world_size=4, store=client, stream=stream, wait_s=10)
        return printed, time.monotonic()

    out = _ranks(4, rank)
    assert stream.lines == [LINE + "\n"]
    assert [r for r, (printed, _) in out.items() if printed] == [first]
    assert all(returned >= stream.flushed_at[0] for _, returned in out.values())


def test_waiting_for_a_printer_that_died_is_bounded(agent_store):
    agent_store.add("pipeloom/error-report/0/claim", 1)  # a printer claimed, then was killed before printing
    stream, start = SlowStream(), time.monotonic()
    assert report_once(LINE, rank=1, world_size=4, store=agent_store, stream=stream, wait_s=0.3) is False
    assert stream.lines == [] and 0.25 < time.monotonic() - start < 5


def test_restart_gets_fresh_keys(agent_store, monkeypatch):
    stream = SlowStream()
    assert report_once(LINE, rank=0, world_size=2, store=agent_store, stream=stream)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the workers: report again
    assert report_once(LINE, rank=1, world_size=2, store=agent_store, stream=stream)
    assert len(stream.lines) == 2


def test_one_process_and_launchers_without_an_agent_store(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    stream = SlowStream()
    assert report_once(LINE, rank=0, world_size=1, stream=stream)
    start = time.monotonic()
    out = _ranks(3, lambda r: report_once(LINE, rank=r, world_size=3, stream=stream, grace_s=0.3))
    assert out == {0: True, 1: False, 2: False} and len(stream.lines) == 2  # rank 0 prints, the others linger
    assert time.monotonic() - start >= 0.3


# What Hydra 1.3 writes when it refuses an override (its compact errors), and the line made of it.
HYDRA = {
    "parallel.bogus=1": ("Could not override 'parallel.bogus'.\nTo append to your config use +parallel.bogus=1\n"
                         "Key 'bogus' not in 'ParallelSection'\n    full_key: parallel.bogus\n"
                         "    reference_type=ParallelSection\n    object_type=ParallelSection\n\n"
                         "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n",
                         "parallel.bogus=1: Could not override 'parallel.bogus'; To append to your config use "
                         "+parallel.bogus=1; Key 'bogus' not in 'ParallelSection'"),
    "train.steps=abc": ("Error merging override train.steps=abc\nValue 'abc' of type 'str' could not be converted "
                        "to Integer\n    full_key: train.steps\n    reference_type=TrainSection\n\n"
                        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n",
                        "train.steps=abc: Error merging override train.steps=abc; Value 'abc' of type 'str' could "
                        "not be converted to Integer"),
    "logger=xyz": ("In 'train': Could not find 'logger/xyz'\n\nAvailable options in 'logger':\n\tjsonl\n\tnone\n"
                   "\twandb\nConfig search path:\n\tprovider=hydra, path=pkg://hydra.conf\n\n"
                   "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n",
                   "logger=xyz: In 'train': Could not find 'logger/xyz'; available options in 'logger': jsonl, "
                   "none, wandb"),
}


@pytest.mark.parametrize("override", list(HYDRA))
def test_hydra_refusal_becomes_one_line_led_by_the_override(override):
    text, line = HYDRA[override]
    command_line = ["model=gpt-tiny", "logger=jsonl", "train.steps=3", override, "hydra.run.dir=x"]
    assert hydra_error_line(text, command_line) == line  # the override Hydra used: the last of its key


def test_hydra_traceback_keeps_the_exception_line():
    text = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
            "ValueError: bad thing\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n")
    assert hydra_error_line(text, ["train.steps=2"]) == "ValueError: bad thing"
