# The pipeloom-batching Hydra app: one row, the policy table, a sweep with CSV, plot and capacities, bad values.
import csv
import json
import os
import subprocess
import sys

import pytest

APP = [sys.executable, "-m", "pipeloom.launch.batching"]
COLUMNS = ["policy", "token_budget", "rate", "throughput", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99", "e2e_p99",
           "goodput"]


def run_app(*args, cwd):
    return subprocess.run(APP + list(args), cwd=cwd, capture_output=True, text=True, timeout=240)


def test_one_policy_prints_one_row_of_metrics(tmp_path):
    out = run_app("policy=chunked-prefill", "token_budget=512", "rate=4", "trace=mixed", "num_requests=40",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("trace mixed: 40 requests at 4/s")
    assert lines[1].split()[:4] == ["policy", "budget", "rate", "out"] and len(lines) == 4
    row = lines[3].split()
    assert row[:3] == ["chunked-prefill", "512", "4"] and float(row[3]) > 0
    assert os.listdir(tmp_path) == []  # a single run leaves no files behind


def test_the_default_table_and_a_replayed_trace(tmp_path):
    items = [{"arrival": 0.1 * i, "prompt_len": 50 + 7 * i, "output_len": 5 + i} for i in range(12)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    out = run_app("trace=t.jsonl", "rate=2", "csv=rows.csv", "picture=c.png", "cdf=d.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert [r["policy"] for r in rows] == ["static", "dynamic", "continuous", "prefill-first", "chunked-prefill",
                                          "splitfuse"]
    assert list(rows[0]) == COLUMNS and rows[0]["token_budget"] == "" and rows[4]["token_budget"] == "512"
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "d.png").stat().st_size > 1000


def test_multirun_sweep_writes_the_csv_the_plot_and_prints_capacities(tmp_path):
    out = run_app("--multirun", "policy=prefill-first,chunked-prefill", "rate=2,8", "num_requests=40",
                  "capacity_duration=20", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    sweep = next((tmp_path / "multirun").iterdir())
    rows = list(csv.DictReader(open(sweep / "batching.csv")))
    assert len(rows) == 4 and list(rows[0]) == COLUMNS
    assert {(r["policy"], r["rate"]) for r in rows} == {(p, r) for p in ("prefill-first", "chunked-prefill")
                                                       for r in ("2.0", "8.0")}
    for r in rows:
        assert 0 < float(r["tbt_p50"]) <= float(r["tbt_p99"]) and 0 < float(r["ttft_p50"]) <= float(r["ttft_p99"])
        assert float(r["throughput"]) > 0 and float(r["goodput"]) <= float(r["rate"]) * 1.5
    assert (sweep / "batching.png").read_bytes()[:4] == b"\x89PNG"
    table = out.stdout[out.stdout.index("capacity (Sarathi-Serve)"):].splitlines()
    assert "20 s of arrivals per run" in table[0] and len(table) == 5  # one table, a row per policy
    caps = {line.split()[0]: float(line.split()[2]) for line in table[3:5]}
    assert set(caps) == {"prefill-first", "chunked-prefill"}
    assert caps["chunked-prefill"] > caps["prefill-first"] > 0  # Sarathi-Serve's headline, qualitatively


@pytest.mark.parametrize(
    "args, message",
    [
        (["policy=zz"], "unknown batching policy 'zz'; valid choices: static, dynamic"),
        (["policy=continuous", "rate=0"], "rate must be a positive number of requests/s (or inf), got 0.0"),
        (["policy=chunked-prefill", "token_budget=10"], "token_budget=10 is below max_num_seqs=256"),
        (["policy=continuous", "trace=zz"], "unknown trace 'zz'; valid choices: uniform, mixed, fixed"),
        (["policy=continuous", "cost=zz"], "unknown cost model 'zz'"),
        (["policy=continuous", "kv_blocks=0"], "kv_blocks must be an integer >= 1, got 0"),
        (["policy=continuous", "kv_blocks=10"], "kv_blocks=10 (10 per pipeline engine, 16 tokens each) cannot hold"),
        (["policy=dynamic", "+options.max_queue_delay=-1"], "max_queue_delay must be a number of seconds >= 0"),
    ],
)
def test_bad_values_name_the_key_and_the_value(args, message):
    from hydra import compose, initialize_config_module

    from pipeloom.launch.batching import run

    with initialize_config_module("pipeloom.configs", version_base="1.3"):
        cfg = compose("batching", overrides=args + ["num_requests=5"])
    with pytest.raises(ValueError) as err:
        run(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_value_exits_2_with_one_line(tmp_path):
    out = run_app("policy=zz", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == (
        "pipeloom-batching: error: unknown batching policy 'zz'; valid choices: static, dynamic, continuous, "
        "prefill-first, chunked-prefill, splitfuse"
    )
