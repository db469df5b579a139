# bench/infer_gpu.py in its --quick mode on CPU: every pipeloom variant and the HF peers it can run here report.
import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "infer_gpu.py"


def test_quick_run_reports_every_variant(capsys):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("infer_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
