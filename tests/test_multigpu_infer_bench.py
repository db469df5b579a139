# bench/multigpu_infer.py end to end in smoke mode: the one-process baseline and pp=2 / tp=2 on gloo ranks, both
# policies, measured bubbles beside the plan's and the serving simulator's, the table and a timeline picture; and
# its pp=2 layout on the mixed long/short trace in a rank pool (the bubble comparison the issue asks for).
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds; about 4 minutes on a loaded 2-core machine


@pytest.mark.slow
def test_smoke_run_has_every_row_and_the_bubble_columns(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "multigpu_infer.py"), "--smoke", "--layouts", "1x1,2x1,1x2",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    rows = json.loads((tmp_path / "multigpu_infer.json").read_text())["rows"]
    assert {(r["layout"], r["policy"]) for r in rows} == {
        (layout, policy) for layout in ("1x1", "2x1", "1x2") for policy in ("chunked-prefill", "prefill-first")}
    for r in rows:
        assert r["output tok/s"] > 0 and r["TTFT p50 ms"] <= r["E2E p50 ms"]
        if r["layout"] == "2x1":
            assert r["lanes"] == 2 and r["microbatches"] > 0
            for key in ("bubble measured", "bubble plan", "bubble serving-sim", "r measured", "r plan"):
                assert 0.0 <= r[key] < 1.0, (key, r[key])
            assert (tmp_path / "timelines" / f"2x1_{r['policy']}.png").stat().st_size > 0
    table = (tmp_path / "multigpu_infer.md").read_text()
    assert "prefill-first / chunked-prefill pipeline bubble" in table and "Sarathi: up to 6.29x" in table
    assert table.strip().splitlines()[-1] in done.stdout


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeloom_bench_multigpu_infer", REPO / "bench" / "multigpu_infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mixed_rows(out: str):
    """On every rank of a pool: the bench's pp=2 layout on the mixed long/short trace, both policies."""
    bench = _bench()
    args = bench.parse(["--smoke", "--workload", "mixed", "--scale", "0.03", "--requests", "12",
                        "--picture-mb", "0", "--out", out])
    return bench.run_layout("2x1", args), bench.workload(args)


@pytest.mark.slow
def test_mixed_trace_bubbles_measured_beside_the_plan_and_the_serving_simulator(pool2, tmp_path):
    """p = 2 stages, 2 microbatches in flight, the batching simulator's mixed long/short trace (one long prompt
    among chat-sized ones, lengths x 0.03): per policy the measured pipeline bubble, the plan's prediction from the
    measured forwards and the serving simulator's with a cost model fitted on the run; their prefill-first /
    chunked-prefill ratios printed beside Sarathi's."""
    bench = _bench()
    (rows, (prompts, outs)), _ = pool2.run(_mixed_rows, str(tmp_path), timeout=600)
    lengths = sorted(len(p) for p in prompts)
    assert lengths[-1] > 8 * lengths[len(lengths) // 2], lengths  # a long prompt among short ones
    assert lengths[-1] > 16 * 4  # longer than the token budget: chunked-prefill splits it
    assert {r["policy"] for r in rows} == {"chunked-prefill", "prefill-first"}
    for r in rows:
        assert r["layout"] == "2x1" and r["lanes"] == 2 and r["microbatches"] > 0
        for key in ("bubble measured", "bubble plan", "bubble serving-sim", "r measured", "r plan"):
            assert 0.0 <= r[key] < 1.0, (r["policy"], key, r[key])
    ratio = [line for line in bench.table(rows).splitlines() if line.startswith("2x1: prefill-first")]
    assert len(ratio) == 1 and "measured" in ratio[0] and "serving-sim" in ratio[0] and "6.29x" in ratio[0], ratio
