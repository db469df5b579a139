# Helper for the examples: re-run a script under torchrun with N CPU processes when started as plain python.
"""``ensure_ranks(4)`` at the top of an example: under ``torchrun`` it returns; started as
``python examples/x.py`` it re-executes the same file with ``torchrun --standalone --nproc_per_node=4``
and exits with its status, so every example is one command.
"""

from __future__ import annotations

import os
import subprocess
import sys


def ensure_ranks(nproc: int) -> None:
    if "RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           sys.argv[0], *sys.argv[1:]]
    sys.exit(subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)
