# bench/multigpu.py end to end in smoke mode: 4 gloo ranks via torchrun, pp-only and pp x tp, peer included.
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pipeloom.parallel.spawn import free_port

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "multigpu.py"
SCHEDULES = ("1f1b", "zb-v")
MICROBATCHES = (4, 8)
LAYOUTS = ("4x1", "2x2")
TIMEOUT = 180  # seconds; the run takes about 20 s on a loaded 2-core machine


def _has_peer(schedule: str) -> bool:
    """torch.distributed.pipelining has the peer schedule of ``schedule`` in this torch."""
    from torch.distributed.pipelining import schedules

    return hasattr(schedules, {"1f1b": "Schedule1F1B", "zb-v": "ScheduleZBVZeroBubble"}[schedule])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (tiny GPT, one timed step per engine); its stdout and the JSON it wrote."""
    out = tmp_path_factory.mktemp("multigpu")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=4", f"--master_port={free_port()}", str(BENCH), "--smoke", "--steps", "1",
           "--warmup", "0", "--only", ",".join(SCHEDULES), "--microbatches", ",".join(map(str, MICROBATCHES)),
           "--layouts", ",".join(LAYOUTS), "--picture-m", "8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own session, so a hang is ended by killing torchrun's whole process group (the ranks included).
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"smoke run exceeded {TIMEOUT} s:\n{(stdout + stderr)[-6000:]}")
    assert proc.returncode == 0, (stdout + stderr)[-6000:]
    with open(out / "multigpu.json") as f:
        data = json.load(f)
    return stdout, data, out


@pytest.mark.slow
def test_every_layout_schedule_and_microbatch_count_has_a_row(smoke):
    stdout, data, out = smoke
    got = {(r["layout"], r["schedule"], r["microbatches"]) for r in data["rows"]}
    assert got == {(lay, s, m) for lay in LAYOUTS for s in SCHEDULES for m in MICROBATCHES}, got
    table = (out / "multigpu.md").read_text()
    assert table.strip() in stdout  # rank 0 printed what it wrote
    for layout in LAYOUTS:
        for schedule in SCHEDULES:
            for m in MICROBATCHES:
                assert f"| {layout} | {schedule} | {m} |" in table, table
    assert data["device"] == "cpu" and data["memory"].startswith("max RSS")


@pytest.mark.slow
def test_bubbles_are_rates_and_prediction_fields_are_present(smoke):
    _, data, _ = smoke
    for r in data["rows"]:
        for key in ("bubble_measured", "bubble_predicted"):
            assert 0.0 <= r[key] < 1.0, (key, r)
        assert r["gap_pp"] == pytest.approx(100 * (r["bubble_measured"] - r["bubble_predicted"]))
        for key in ("measured_makespan_s", "predicted_makespan_s", "comm_s"):
            assert r[key] >= 0.0, (key, r)
        stages = 4 * r["vpp"] if r["layout"] == "4x1" else 2 * r["vpp"]
        assert all(len(r["costs_s"][k]) == stages for k in "FBW"), r["costs_s"]
        assert min(r["costs_s"]["F"]) > 0.0
        assert len(r["peak_mib_per_rank"]) == 4 and min(r["peak_mib_per_rank"]) > 0


@pytest.mark.slow
def test_peer_runs_where_torch_has_the_schedule(smoke):
    _, data, _ = smoke
    for r in data["rows"]:
        if _has_peer(r["schedule"]):
            assert r["peer_problem"] is None and r["peer_tokens_per_s"] > 0, r
            assert r["ratio_vs_peer"] == pytest.approx(r["tokens_per_s"] / r["peer_tokens_per_s"])
        else:
            assert r["peer_tokens_per_s"] is None and r["peer_problem"], r


@pytest.mark.slow
def test_async_rows_on_the_pp_only_layout_and_pictures_exist(smoke):
    _, data, _ = smoke
    assert [(a["layout"], a["microbatches"]) for a in data["async"]] == [("4x1", m) for m in MICROBATCHES]
    for a in data["async"]:
        assert set(a["tokens_per_s"]) == {"1f1b", "pipedream", "pipedream-2bw"}
        assert a["vs_1f1b"]["1f1b"] == pytest.approx(1.0)
    assert sorted(p["schedule"] for p in data["pictures"]) == sorted(SCHEDULES)
    for p in data["pictures"]:
        assert p["microbatches"] == 8 and Path(p["path"]).stat().st_size > 10_000, p


def test_bad_schedule_names_are_refused():
    """--only names outside the synchronous schedules stop the parser with the valid choices."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multigpu_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # @dataclass looks its module up there
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse(["--only", "1f1b,dualpipe"])
    args = bench.parse(["--smoke", "--microbatches", "4,16"])
    assert args.model == "gpt-tiny" and args.microbatches == [4, 16]
