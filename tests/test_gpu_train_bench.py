# bench/gpu_train.py's float8 variants and its bf16 vs float8 curve mode, at tiny sizes on CPU (the GPU runs them big).
import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("torchao")
BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_float8_variant_names():
    gpu_train = _load("gpu_train")
    assert gpu_train.float8_of("pipeloom-compile-float8-tensorwise") == ("tensorwise", None)
    assert gpu_train.float8_of("pipeloom-compile-float8-rowwise-min1024") == ("rowwise", 1024)
    with pytest.raises(ValueError, match="float8-tensorwise or -float8-rowwise"):
        gpu_train.float8_of("pipeloom-compile-float8-blockwise")


def test_a_float8_variant_trains_a_step(capsys):
    r = _load("gpu_train").run_variant("pipeloom-eager-float8-tensorwise-min16", "tiny", 1, 0, "cpu")
    assert r["loss"] > 0 and r["tokens_per_s"] > 0
    assert "float8 tensorwise: 12 linears converted" in capsys.readouterr().out


@pytest.fixture
def kernels_restored():
    """run() chooses the kernels' path for the process (pipeloom.kernels.set_kernels): put it back after."""
    from pipeloom.kernels import set_kernels

    previous = set_kernels("auto")
    set_kernels(previous)
    yield
    set_kernels(previous)


def test_curve_mode_runs_both_and_plots(tmp_path, kernels_restored):
    sys.path.insert(0, BENCH)
    try:
        curve = _load("train_curve")
        out = str(tmp_path / "curve")
        curves = curve.run_curves(out, size=(2, 32, 4, 4, 32), steps=3, recipes=["tensorwise"], compile=False,
                                  min_dim=16, max_bytes=400_000)
    finally:
        sys.path.remove(BENCH)
    assert set(curves) == {"bf16", "float8-tensorwise"}
    data = json.load(open(os.path.join(out, "curve.json")))
    for c in data["curves"].values():
        assert len(c["loss"]) == 3 and c["final_loss"] == c["loss"][-1]
    assert curves["bf16"]["loss"][0] == pytest.approx(curves["float8-tensorwise"]["loss"][0], rel=0.01)  # same init
    assert curves["bf16"]["loss"] != curves["float8-tensorwise"]["loss"]  # float8 did something
    assert os.path.getsize(os.path.join(out, "curve.png")) > 10_000
    assert "float8-tensorwise" in curve.summary(curves) and "vs bf16" in curve.summary(curves)
