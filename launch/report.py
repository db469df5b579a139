# One error line per job from ranks that all refuse the same command line, whichever rank exits first.
"""Every rank checks the same command line and config without communicating, so a bad value fails on every
rank at about the same moment. torchrun stops the whole job when the first of them exits (SIGTERM to the
rest): printing from every rank gives one line per rank, and printing only from rank 0 loses the line
whenever another rank exits before rank 0 has printed. :func:`report_once` picks the printer so that
exactly one line appears and the job's first exit comes after it:

* Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the elastic agent hosts a TCPStore at
  ``MASTER_ADDR:MASTER_PORT`` that lives as long as the job, whichever workers die. Each rank adds 1 to
  a claim counter there; the one rank that reads 1 is the printer - the first to reach the error, not a
  fixed rank, so a slow or killed rank 0 cannot take the line with it. The printer writes and flushes the
  line, then sets a ``printed`` key and returns; every other rank blocks on that key (at most ``wait_s``)
  before it returns. Exactly one rank prints (across nodes too), and no rank exits before the line is out.
  The keys carry torchrun's restart count, since the agent's store outlives a restart. The store client
  is a bounded connection to a server that is already up - no process group, no collective.
* One process prints the line.
* Several processes without an agent store (another launcher, or
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): rank 0 prints; the others wait ``grace_s`` before returning,
  so a launcher that stops the job at the first exit normally sees rank 0's exit first.

:func:`hydra_error_line` turns Hydra's multi-line refusal (unknown key, wrong type, missing option) into
such a line, naming the override that caused it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

_KEY = "pipeloom/error-report"


def agent_store(timeout_s: float) -> Any:
    """A client of torchrun's agent TCPStore, or None outside torchrun (or where it cannot be reached)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    import torch.distributed as dist

    try:
        return dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except RuntimeError:  # DistNetworkError/DistStoreError: the agent is gone; fall back to rank 0 printing
        return None


def report_once(line: str, *, rank: int | None = None, world_size: int | None = None, store: Any = None,
                stream: TextIO | None = None, wait_s: float = 30.0, grace_s: float = 5.0) -> bool:
    """Write ``line`` to stderr from exactly one of the ranks that call this, before any of them returns.

    Every rank that hit the error calls it (``rank``/``world_size``: torchrun's ``RANK``/``WORLD_SIZE`` by
    default; ``store``: torchrun's agent store by default). Returns True on the rank that printed.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    stream = stream or sys.__stderr__
    if world_size > 1 and store is None:
        store = agent_store(wait_s)
    if world_size == 1 or (store is None and rank == 0):
        _write(stream, line)
        return True
    if store is None:  # another launcher: let rank 0 print and exit first
        time.sleep(grace_s)
        return False
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    claim, printed = f"{_KEY}/{attempt}/claim", f"{_KEY}/{attempt}/printed"
    if store.add(claim, 1) == 1:
        _write(stream, line)
        store.set(printed, "1")  # only now may the others exit
        return True
    try:
        store.wait([printed], timedelta(seconds=wait_s))
    except RuntimeError:  # the printer died before printing (killed from outside): exit after the bound
        pass
    return False


def _write(stream: TextIO, line: str) -> None:
    stream.write(line.rstrip("\n") + "\n")
    stream.flush()


def hydra_error_line(text: str, overrides: list[str]) -> str:
    """One line from what Hydra wrote when it refused the command line, led by the override it names.

    ``"Error merging override train.steps=abc\\nValue 'abc' ... Integer\\n    full_key: train.steps ..."``
    -> ``"train.steps=abc: Error merging override train.steps=abc; Value 'abc' ... Integer"``.
    """
    lines = [ln.rstrip() for ln in text.splitlines()]
    if any(ln.startswith("Traceback") for ln in lines):  # not a compact error: keep the exception's last line
        summary = [next((ln for ln in reversed(lines) if ln and not ln.startswith((" ", "Set the environment"))),
                        "Hydra failed")]
    else:
        summary = []
        for ln in lines:
            if not ln.strip() or ln.startswith("Set the environment variable HYDRA_FULL_ERROR"):
                if summary:
                    break
                continue
            if not ln[0].isspace():
                summary.append(ln.strip().rstrip("."))
    options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
    if options:
        summary.append(f"available options in '{options.group(1)}': "
                       + ", ".join(o.strip() for o in options.group(2).splitlines()))
    message = "; ".join(summary) or "Hydra refused the command line"
    full_key = re.search(r"full_key: (\S+)", text)
    args = [a for a in reversed(overrides) if "=" in a and not a.startswith("-")]  # Hydra: the last one wins
    for arg in args:
        key, value = arg.split("=", 1)
        if f"'{arg}'" in text or f" {arg}\n" in text + "\n" or f"'{key.lstrip('+~')}/{value}'" in text:
            return f"{arg}: {message}"
    for arg in args:
        if full_key and arg.split("=", 1)[0].lstrip("+~") == full_key.group(1):
            return f"{arg}: {message}"
    return message
