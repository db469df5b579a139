# bench/quant_gpu.py --quick: the GPU decode benchmark end to end on CPU (tiny Llama, no compile).
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "quant_gpu.py"


def _run(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_quick_run_prints_and_writes_every_variant(tmp_path):
    out = tmp_path / "quant.json"
    variants = "bf16,int8,int4-torch,fp8,int4-torchao"
    done = _run("--quick", "--variants", variants, "--spec-variants", "bf16,int8", "--out", str(out))
    print(done.stdout[-4000:], done.stderr[-2000:])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == variants.split(",")
    assert results["bf16"]["speedup_vs_bf16"] == 1.0
    for name in ("int8", "int4-torch", "fp8"):
        row = results[name]
        assert row["ms_per_token"] > 0 and row["speedup_vs_bf16"] > 0
        assert row["weight_bytes"] < results["bf16"]["weight_bytes"], f"{name} must read fewer bytes than bf16"
    assert results["int4-torch"]["weight_bytes"] < results["int8"]["weight_bytes"]
    assert "skipped" in results["int4-torchao"] and "CUDA" in results["int4-torchao"]["skipped"]  # CPU here
    for name in ("bf16", "int8"):
        lookup = results[name]["prompt_lookup"]
        assert 0.0 <= lookup["acceptance_rate"] <= 1.0 and lookup["tokens_per_step"] >= 1.0
        assert lookup["same_tokens_as_plain"], "greedy prompt lookup must reproduce plain greedy decoding"
    assert "ms/token" in done.stdout and "prompt lookup k=4" in done.stdout


def test_unknown_variant_is_named():
    done = _run("--quick", "--variants", "int3", "--no-spec")
    assert done.returncode != 0 and "unknown variant 'int3'" in done.stderr


def test_kv_fp8_bench_quick_run(tmp_path):
    """bench/kv_fp8_gpu.py --quick: the decode kernel part times both caches at each batch size and the fp8 cache
    reads fewer bytes with outputs near the float cache's; the fp8 pool holds more tokens than the float one;
    prompt lookup through the engine reproduces plain greedy decoding."""
    out = tmp_path / "kv.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "kv_fp8_gpu.py"), "--quick", "--speculative", "--out",
                           str(out)], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240, check=False)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    auto, fp8 = report["rows"]
    assert fp8["tokens_held"] > 1.5 * auto["tokens_held"] and fp8["ms_per_token"] > 0
    kernel = report["kernel"]
    assert [(r["batch"], r["kv_cache_dtype"]) for r in kernel] == [(1, "auto"), (1, "fp8"), (3, "auto"), (3, "fp8")]
    for plain, eight in (kernel[:2], kernel[2:]):
        assert plain["us_per_call"] > 0 and eight["us_per_call"] > 0 and eight["kv_bytes"] < plain["kv_bytes"]
        assert 0 < eight["max_abs_diff_vs_bf16"] < 0.1  # the same draws, quantized to e4m3
    assert "us/call" in done.stdout
    assert report["prompt_lookup"]["same_tokens"] and "tokens held" in done.stdout


def test_gemv_bench_smoke_checks_every_variant(tmp_path):
    """bench/quant_gemv.py --smoke (tiny shapes, Triton interpreter): the int8 and int4 GEMV configs asked for
    (every one is checked in tests/test_quant_kernels.py and tests/test_quant_int4_gemv.py), torch's int8 kernel
    where it exists and the head's GEMV pass the check against the float32 reference, and the summary names the
    fastest int8 config and int4 choice (the device script reads them)."""
    configs, configs4 = ["n4k512w1s3"], ["n8k2048w2s1", "n16k1024w2s3"]
    best, best4 = tmp_path / "best.txt", tmp_path / "best4.txt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "quant_gemv.py"), "--smoke", "--head",
                           "--best-int8", str(best), "--best-int4", str(best4), "--int8-configs", ",".join(configs),
                           "--int4-configs", ",".join(configs4)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WRONG" not in done.stdout and "error:" not in done.stdout
    for name in [f"int8 {c}" for c in configs] + [f"int4 {c}" for c in configs4]:
        assert done.stdout.count(f"{name} ") == 4, name  # two shapes, the head and the summary
    assert "summary" in done.stdout and "head " in done.stdout
    assert best.read_text().strip() == configs[0]
    choice, gemv_choice = best4.read_text().splitlines()
    assert choice in configs4 and gemv_choice == choice  # no tinygemm on CPU
    for flag, name in (("--int8-configs", "n1"), ("--int4-configs", "n2")):
        unknown = subprocess.run([sys.executable, str(REPO / "bench" / "quant_gemv.py"), "--smoke", flag, name],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert unknown.returncode != 0 and f"unknown ['{name}']" in unknown.stderr
