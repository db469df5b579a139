# bench/multigpu_infer.py end to end in smoke mode: the one-process baseline and pp=2 / tp=2 on gloo ranks, both
# policies, measured bubbles beside the plan's and the serving simulator's, the table and a timeline picture.
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
