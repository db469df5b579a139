# Float8 training (torchao): which linears convert, inside pipeline stages and with tp, and runs through the launcher.
import types

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

pytest.importorskip("torchao")

from pipeloom.configs.train import ConfigError, check_config, register  # noqa: E402 - after importorskip
from pipeloom.models import Transformer, get_model_config  # noqa: E402
from pipeloom.schedules import get_schedule  # noqa: E402
from pipeloom.training import build_parts  # noqa: E402
from pipeloom.training.float8 import apply_float8, too_small  # noqa: E402

register()  # the train config's groups in Hydra's ConfigStore (this file may run alone)
LINEARS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.fc", "mlp.proj")


def _float8_names(module: nn.Module, prefix=""):
    from torchao.float8.float8_linear import Float8Linear

    return {prefix + n for n, m in module.named_modules() if isinstance(m, Float8Linear)}


@pytest.mark.parametrize("recipe, min_dim, converted", [
    ("tensorwise", None, LINEARS),  # GPT 1.3B: every block GEMM is past the tensorwise thresholds
    ("rowwise", None, ("mlp.fc",)),  # only the 2048 -> 8192 GEMM is past the rowwise ones
    ("rowwise", 2048, LINEARS),  # one measured threshold instead of the table
    ("tensorwise", 4096, ()),  # every GEMM has a 2048 side
])
def test_which_linears_of_a_1p3b_model_convert(recipe, min_dim, converted):
    with torch.device("meta"):
        model = Transformer(get_model_config("gpt-1.3b", n_layers=2))
    report = apply_float8({0: model}, recipe, min_dim=min_dim)
    expected = {f"blocks.{i}.{n}" for i in range(2) for n in converted}
    assert set(report.converted) == expected == _float8_names(model)
    assert report.skipped["head.out"] == "skipped by name"  # the output head stays in high precision
    assert set(report.skipped) == {f"blocks.{i}.{n}" for i in range(2) for n in LINEARS} - expected | {"head.out"}
    assert type(model.head.out) is nn.Linear


def test_the_size_rule():
    assert too_small("tensorwise", 4096, 1024) and not too_small("tensorwise", 4096, 1040)
    assert too_small("rowwise", 4096, 4096) is None and too_small("rowwise", 2048, 4096)
    assert "multiples of 16" in too_small("tensorwise", 8200, 8192)
    assert too_small("rowwise", 64, 64, min_dim=64) is None and too_small("rowwise", 64, 48, min_dim=64)


def test_each_pipeline_rank_converts_only_its_stages_linears():
    config = get_model_config("llama-tiny", n_layers=4, dim=32, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    seen = set()
    for rank in range(2):
        parts = build_parts(config, plan, mesh=types.SimpleNamespace(pp_rank=rank, tp=1, tp_rank=0),
                            float8="tensorwise", float8_min_dim=16)
        mine = {f"blocks.{i - 1}" for m in parts.modules.values() for i in m.layer_ids if 1 <= i <= 4}
        expected = {f"{b}.{n}" for b in mine for n in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1",
                                                        "mlp.w2", "mlp.w3")}
        assert set(parts.float8.converted) == expected and expected == _float8_names(parts.model)
        assert ("head.out" in parts.float8.skipped) == (rank == 1)
        seen |= expected
        names = {s.name for s in parts.specs}  # parameters keep their names (checkpoints are unchanged)
        assert {f"{b}.attn.wq.weight" for b in mine} <= names
    assert len(seen) == 4 * 7


def test_float8_head_and_fast_accum_reach_the_layers_and_a_compiled_float8_head():
    """``float8_head`` converts the output head too (and ``compile`` then compiles the head, so its casts fuse);
    ``float8_fast_accum`` gives the backward GEMMs fast accumulation, the forward keeps torchao's choice."""
    config = get_model_config("gpt-tiny", n_layers=2, dim=32, n_heads=4, vocab_size=64, max_seq_len=16)
    plan = get_schedule("1f1b", pp=1, microbatches=1)
    plain = build_parts(config, plan, float8="tensorwise", float8_min_dim=16)
    assert "head.out" in plain.float8.skipped and type(plain.model.head.out) is nn.Linear
    fast = build_parts(config, plan, float8="tensorwise", float8_min_dim=16, float8_head=True, float8_fast_accum=True,
                       compile=True)
    assert "head.out" in fast.float8.converted and "head.out" in _float8_names(fast.model)
    assert fast.model.head._compiled_call_impl is not None  # compiled (lazily: nothing ran here)
    assert plain.model.head._compiled_call_impl is None
    for parts, fast_backward in ((plain, False), (fast, True)):
        layer = parts.model.blocks[0].mlp.fc
        assert layer.config.gemm_config_output.use_fast_accum  # torchao's tensorwise recipe: fast forward
        assert layer.config.gemm_config_grad_input.use_fast_accum is fast_backward
        assert layer.config.gemm_config_grad_weight.use_fast_accum is fast_backward


def _compose(*overrides):
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


COMMON = ["model=gpt-tiny", "model.n_layers=2", "model.dim=32", "data.seq_len=32", "data.batch_size=8",
          "train.eval_batches=1", "train.eval_every=0", "train.timeline=false", "optimizer.warmup_steps=1",
          "train.steps=3", "checkpoint.save_final=false", "data.max_bytes=400000", "schedule.microbatches=2",
          "train.float8_min_dim=16"]


def _launch(run_dir, cache, *overrides):
    from pipeloom.kernels import set_kernels
    from pipeloom.launch.train import run

    previous = set_kernels("auto")
    set_kernels(previous)
    try:
        return run(_compose(*COMMON, f"data.cache_dir={cache}", *overrides), run_dir=run_dir).losses
    finally:
        set_kernels(previous)


def _tp_report():
    from pipeloom.parallel.mesh import Mesh

    mesh = Mesh.build(dp=1, pp=1, tp=2)
    config = get_model_config("gpt-tiny", n_layers=1, dim=32, n_heads=4, vocab_size=64, max_seq_len=16)
    parts = build_parts(config, get_schedule("1f1b", pp=1, microbatches=1), mesh=mesh, float8="rowwise",
                        float8_min_dim=16)
    return parts.float8.converted, parts.float8.skipped, parts.float8.summary()


def test_float8_on_cpu_trains_like_bf16_in_pipeline_stages_and_leaves_tp_shards_alone(pool2, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    off = _launch(str(tmp_path / "off"), cache)
    on = _launch(str(tmp_path / "on"), cache, "train.float8=tensorwise")
    assert "float8 tensorwise: 12 linears converted, 1 kept in high precision: head.out" in capsys.readouterr().out
    assert on[3] < on[1] - 0.1 and on != off  # float8 runs here (torch emulates the scaled matmuls) and learns
    assert all(abs(on[s] - off[s]) < 0.02 * off[s] for s in off), (on, off)
    head = _launch(str(tmp_path / "head"), cache, "train.float8=tensorwise", "train.float8_head=true",
                   "train.float8_fast_accum=true")  # the launcher's keys reach the build
    assert "float8 tensorwise: 13 linears converted" in capsys.readouterr().out
    assert all(abs(head[s] - off[s]) < 0.02 * off[s] for s in off), (head, off)
    staged = pool2.run(_launch, str(tmp_path / "pp2"), cache, "train.float8=rowwise", "parallel.pp=2",
                       timeout=180)[0]
    assert all(abs(staged[s] - off[s]) < 0.02 * off[s] for s in off), (staged, off)
    converted, skipped, summary = pool2.run(_tp_report)[0]
    assert converted == [] and {n for n, why in skipped.items() if why.startswith("tensor-parallel")} == {
        "blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.0.attn.wv", "blocks.0.attn.wo", "blocks.0.mlp.fc",
        "blocks.0.mlp.proj", "head.out"}
    assert "7 tensor-parallel linears left in bf16" in summary


@pytest.mark.parametrize("overrides, key, value", [(["train.float8=fp8"], "train.float8", "fp8"),
                                                   (["train.float8_min_dim=0"], "train.float8_min_dim", 0),
                                                   (["train.float8_head=true"], "train.float8_head", True),
                                                   (["train.float8_fast_accum=true"], "train.float8_fast_accum", True)])
def test_bad_float8_values_name_the_key(overrides, key, value):
    with pytest.raises(ConfigError) as info:
        check_config(_compose(*overrides), 1)
    assert (info.value.key, info.value.value) == (key, value) and str(info.value).startswith(f"{key}={value!r}: ")


def test_a_gpu_without_float8_matmuls_is_refused(monkeypatch):
    from pipeloom.training.float8 import check_float8_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    why = check_float8_device(torch.device("cuda"))
    assert "compute capability 8.9" in why and "A100" in why and "train.float8=off" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert check_float8_device(torch.device("cuda")) is None and check_float8_device(torch.device("cpu")) is None
