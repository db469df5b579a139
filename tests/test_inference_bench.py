# bench/infer_gpu.py in its --quick mode on CPU: every pipeloom variant and the HF peers it can run here report.
import importlib.util
import os
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "infer_gpu.py"


def _bench(name: str):
    """bench/NAME.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_run_reports_every_variant(capsys):
    pytest.importorskip("transformers")
    bench = _bench("infer_gpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # HF generate / generate_batch are left to the GPU run: on CPU they cost half a minute here
        results = bench.main(["--quick", "--device", "cpu", "--variants", "decode-1b,throughput,ttft-8k,hf-ttft-8k"])
    finally:
        torch.set_num_threads(threads)
    for name, numbers in results.items():
        assert "error" not in numbers, (name, numbers)
    assert results["decode-1b"]["ms/token (median step)"] > 0 and results["decode-1b"]["floor ms"] > 0
    assert results["throughput"]["output tok/s"] > 0 and 0 < results["throughput"]["of roofline"] < 1
    assert results["ttft-8k"]["TTFT ms"] > 0 and results["hf-ttft-8k"]["TTFT ms"] > 0
    printed = capsys.readouterr().out
    assert "copy" in printed and "throughput" in printed


def test_engine_speed_quick_run_prints_the_table(capsys):
    """bench/engine_speed.py (the decode paths with overlap on/off, offline throughput) on CPU, tiny shapes; the
    compiled path and HF generate_batch are left to the GPU run (minutes of compilation / CPU time here)."""
    bench = _bench("engine_speed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench.main(["--quick", "--device", "cpu", "--paths", "graphs", "--parts", "decode-1b,throughput"])
    finally:
        torch.set_num_threads(threads)
    assert [r[:2] for r in rows[:2]] == [("decode tiny graphs", "overlap on"), ("decode tiny graphs", "overlap off")]
    throughput = [r[1] for r in rows[2:] if r[0] == "throughput tiny graphs"]
    assert sorted(set(throughput)) == ["overlap off", "overlap on"] and len(throughput) == len(rows) - 2
    assert all("error" not in r[1] and float(r[2].split()[0].replace(",", "")) > 0 for r in rows)
    assert "| what | setting |" in capsys.readouterr().out


def test_engine_speed_quantized_decode_rows(capsys):
    """--quant runs the decode part for each weight quantization in the same process and prints each one's
    speed-up over the unquantized model (CPU: the torch paths; the GPU run takes the kernels)."""
    bench = _bench("engine_speed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench.main(["--quick", "--device", "cpu", "--paths", "graphs", "--parts", "decode-1b",
                           "--quant", "none,int8,int4,int8+head"])
        with pytest.raises(ValueError, match="int8\\+tail"):
            bench.main(["--quick", "--device", "cpu", "--parts", "decode-1b", "--quant", "int8+tail"])
    finally:
        torch.set_num_threads(threads)
    assert [r[0] for r in rows] == ["decode tiny graphs"] * 2 + ["decode tiny graphs int8"] * 2 + \
        ["decode tiny graphs int4"] * 2 + ["decode tiny graphs int8+head"] * 2
    assert all(float(r[2].split()[0]) > 0 for r in rows)
    assert all("x unquantized" in r[4] for r in rows[2:]) and "x unquantized" not in rows[0][4]
    floor = {r[0]: float(r[3].split()[1]) for r in rows}  # "floor X ms (...)": weight bytes / copy rate, four
    # significant digits (three decimals once printed 0.003 for both rows below)
    assert floor["decode tiny graphs int8+head"] < floor["decode tiny graphs int8"]  # +head: the head in int8 too
    # the floor counts a quantized model's codes and scales: fewer bytes than its float weights
    from pipeloom.inference.quant import quantize_model
    from pipeloom.models import ModelConfig, Transformer

    model = Transformer(ModelConfig(**bench.infer_gpu.SIZES["tiny"], max_seq_len=32))
    before = bench.infer_gpu.weight_bytes(model)
    quantize_model(model, "int8")
    assert 0.3 * before < bench.infer_gpu.weight_bytes(model) < 0.7 * before


def test_spec_trained_quick_run_trains_both_models_and_decodes_exactly(tmp_path, capsys):
    """bench/spec_trained.py --quick: pipeloom-train trains a tiny target and draft on the stdlib corpus, the engine
    loads both runs, and plain, prompt-lookup and draft-model decoding of validation-split code give the same greedy
    tokens (the bench exits non-zero otherwise); a second call reuses the checkpoints instead of training again."""
    bench = _bench("spec_trained")
    runs = str(tmp_path / "runs")
    report = bench.main(["--quick", "--runs", runs, "--out", str(tmp_path / "report.json")])
    rows = report["rows"]
    assert set(rows) == {"plain", "prompt lookup", "lookup, split-K verification", "lookup, eager verification",
                         "draft model"}
    assert all(r["same_tokens"] for r in rows.values())
    assert rows["draft model"]["proposed"] > 0 and 0 <= rows["prompt lookup"]["acceptance"] <= 1
    assert report["target"]["steps"] == report["draft"]["steps"] == 30
    from pipeloom.data.corpus import in_validation

    assert len(report["prompt_files"]) == 2  # --quick prompts two files, each one the training split left out
    assert all(in_validation(open(path, "rb").read(), 0.05) for path in report["prompt_files"])
    printed = capsys.readouterr().out
    assert "validation split: not trained on" in printed and "prompt lookup" in printed
    metrics = [os.path.join(runs, role, "metrics.jsonl") for role in ("target", "draft")]
    written = [os.stat(m).st_mtime_ns for m in metrics]
    again = bench.main(["--quick", "--runs", runs])  # the checkpoints are there: loaded, not trained again
    assert [os.stat(m).st_mtime_ns for m in metrics] == written and again["rows"]["plain"]["same_tokens"]
