# bench/peers_cpu.py end to end in smoke mode on 4 CPU ranks (DeepSpeed skipped when absent); bench/host_syncs.py runs.
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "peers_cpu.py"


def _load_bench():
    """The benchmark script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("peers_cpu_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_runs_all_engines_and_they_do_the_same_work():
    """Smoke mode starts its own 4 ranks, times every schedule, and the engines agree with one process.

    About 30 s on the 2-core box (two shapes); the first run with deepspeed installed also JIT-builds its CPU shm op
    (about 2 minutes, cached afterwards), hence the generous timeout.
    """
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--profile"], cwd=REPO, capture_output=True,
                          text=True, timeout=280, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in done.stdout.splitlines()
            if line.startswith("| ")}
    for shape in ("default", "overhead"):  # today's shape and the overhead-bound one (many small microbatches)
        for schedule in ("gpipe", "1f1b", "interleaved-1f1b", "zb-v"):
            assert (shape, schedule) in rows, done.stdout
    assert "wall: pipeloom / torch.pipelining" in done.stdout and "CPU: pipeloom / torch.pipelining" in done.stdout
    deepspeed = "DeepSpeed is not installed" not in done.stdout
    assert ("wall: DeepSpeed" in done.stdout) == deepspeed, done.stdout
    if deepspeed:  # DeepSpeed runs GPipe and 1F1B only
        assert "n/a" not in rows[("default", "1f1b")] and "n/a" in rows[("default", "zb-v")], done.stdout
    same = re.search(r"max \|loss diff\| .* ([0-9.e+-]+), max \|weight diff\| after the first step ([0-9.e+-]+)\.",
                     done.stdout)
    assert same, done.stdout
    assert float(same.group(1)) < 1e-5 and float(same.group(2)) < 1e-5, same.group(0)
    # --profile: one more step per rank split into parts, measured even where the runtime samples its timelines
    profiles = [line for line in done.stdout.splitlines() if re.match(r"\s+\S+\s+\S+\s+rank \d:", line)]
    assert len(profiles) == 2 * 4 * 4, done.stdout  # shapes x schedules x ranks
    for line in profiles:
        wall, span, *parts = (float(v) for v in line.split(":", 1)[1].split("|"))
        assert 0 < span <= wall and min(parts) > -0.05, line  # this step only: no part from an older timeline


def test_missing_deepspeed_is_skipped_with_a_message(monkeypatch, capsys):
    """Without deepspeed the configuration drops its column and says how to install it."""
    bench = _load_bench()
    from pipeloom import features

    monkeypatch.setattr(features, "has", lambda name: name != "deepspeed")
    cfg = bench.config(bench.parse(["--smoke"]))
    assert cfg["frameworks"] == ["pipeloom", "torch"]
    assert "DeepSpeed is not installed" in capsys.readouterr().out
    assert cfg["shapes"] == bench.SMOKE_SHAPES and cfg["steps"] == 1


def test_unknown_names_and_bad_sizes_are_refused():
    bench = _load_bench()
    with pytest.raises(SystemExit, match="unknown shape, schedule or framework"):
        bench.config(bench.parse(["--schedules", "1f1b,dualpipe"]))
    with pytest.raises(SystemExit, match=r"\['huge'\]"):
        bench.config(bench.parse(["--shapes", "huge"]))
    with pytest.raises(SystemExit, match="multiple of 8"):
        bench.config(bench.parse(["--layers", "12"]))


@pytest.mark.slow
def test_host_sync_count_runs_and_finds_no_timed_waits():
    """bench/host_syncs.py on 2 CPU ranks: the runtime's p2p waits pass no timeout (NCCL would poll)."""
    script = REPO / "bench" / "host_syncs.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "2", "--warmup", "1", "--microbatches", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "untimed waits" in rows and "timed waits" not in rows, done.stdout
    assert "tensor reads (cpu tensor, in _loss_weights)" in rows, done.stdout  # one read of the target counts
