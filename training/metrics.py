# Where training metrics go: a rank-0 progress bar, a JSONL file in the run directory, optionally wandb.
"""* :class:`MetricsLogger` - one JSON object per logging step appended to ``<run dir>/metrics.jsonl``
  (flushed each line, so a killed run keeps what it logged), and to Weights & Biases when
  ``kind="wandb"`` (offline by default; wandb is imported only then, with an error saying how to
  install it).
* :func:`peak_flops` - the datasheet bf16 dense peak of a known GPU, for MFU; None on CPU.
"""

from __future__ import annotations

import json
import os

from pipeloom import features

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU = achieved / peak.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device) -> float | None:
    """The bf16 peak of ``device`` if it is a GPU we know, else None (no MFU is shown)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


class MetricsLogger:
    """Metrics sink of rank 0. ``kind``: none | jsonl | wandb (which also writes the JSONL)."""

    def __init__(self, run_dir: str, *, kind: str = "jsonl", file: str = "metrics.jsonl", project: str = "pipeloom",
                 mode: str = "offline", config: dict | None = None):
        self.kind = kind
        self.path = None
        self._file = None
        self._wandb = None
        if kind == "none":
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, file)
        self._file = open(self.path, "a")
        if kind == "wandb":
            features.require("wandb", "logger=wandb")
            import wandb

            self._wandb = wandb.init(project=project, mode=mode, dir=run_dir, config=config or {},
                                     resume="allow")

    def log(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])

    def rewind(self, step: int) -> None:
        """A run resumed at ``step`` into the same run directory: drop the records logged after it."""
        if self._file is not None:
            self._file.close()
            _truncate_after(self.path, step)
            self._file = open(self.path, "a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _truncate_after(path: str, step: int) -> None:
    """Drop lines whose step is beyond ``step`` (they were logged after the checkpoint we resume from)."""
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
