# The pipeloom-bubbles Hydra app: the default table, one schedule, a multirun sweep, and bad values.
import csv
import os
import subprocess
import sys

import pytest

APP = [sys.executable, "-m", "pipeloom.launch.bubbles"]


def run_app(*args, cwd):
    return subprocess.run(APP + list(args), cwd=cwd, capture_output=True, text=True, timeout=240)


def test_default_table_lists_every_schedule_with_both_metrics(tmp_path):
    out = run_app(cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "pp=4 microbatches=8" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    for name in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "pipedream", "pipedream-2bw"):
        assert name in rows
    # F=B=W=1: 1F1B r = 3/11, beta = 3/8; ZB-H1 makespan 27; the closed form column agrees
    assert rows["1f1b"][4:8] == ["33", "0.2727", "0.3750", "0.2727"]
    assert rows["zb-h1"][4] == "27" and rows["zb-h2"][5] == "0.0000"
    assert rows["pipedream-2bw"][-1] == "2"  # two weight versions per stage
    assert os.listdir(tmp_path) == []  # a table leaves no files behind


def test_one_schedule_prints_ascii_and_writes_a_picture(tmp_path):
    out = run_app("schedule=zb-h1", "pp=2", "microbatches=4", "picture=zb.png", "csv=rows.csv", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rank 1  |" in out.stdout and (tmp_path / "zb.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert rows[0]["schedule"] == "zb-h1" and float(rows[0]["makespan"]) == 4 * 3 + 1 * (1 + 1 - 1)


def test_multirun_sweep_writes_one_csv_and_a_plot(tmp_path):
    out = run_app("--multirun", "schedule=gpipe,zb-h1", "pp=2,4", "microbatches=4,8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    sweep = next((tmp_path / "multirun").iterdir())
    rows = list(csv.DictReader(open(sweep / "bubbles.csv")))
    assert len(rows) == 8
    assert set(rows[0]) >= {
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
    }
    gpipe_4_8 = next(r for r in rows if r["schedule"] == "gpipe" and r["pp"] == "4" and r["microbatches"] == "8")
    assert float(gpipe_4_8["bubble_rate"]) == pytest.approx(3 / 11, abs=1e-6)
    assert float(gpipe_4_8["closed_form"]) == pytest.approx(3 / 11, abs=1e-6)
    assert (sweep / "bubbles.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["schedule=zz"], "unknown schedule 'zz'; valid choices: gpipe, 1f1b"),
        (["schedule=1f1b", "pp=0"], "pp must be a positive integer, got 0"),
        (["schedule=interleaved-1f1b", "vpp=1"], "vpp=1; interleaving needs vpp >= 2"),
        (["schedule=1f1b", "vpp=3"], "vpp=3 is not supported"),
    ],
)
def test_bad_values_give_one_clear_line(tmp_path, args, message):
    out = run_app(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
