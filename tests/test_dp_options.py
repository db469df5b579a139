# parallel.dp_overlap and optimizer.zero=1 through the launcher: dp's losses, checkpoints resumed under other layouts.
import shutil

import pytest
import torch
from hydra import compose, initialize_config_module

from pipeloom.configs.train import ConfigError, check_config
from pipeloom.launch.train import run
from pipeloom.models import get_model_config
from pipeloom.schedules import get_schedule
from pipeloom.training import build_parts, make_stepper

COMMON = ["model=gpt-tiny", "model.n_layers=2", "model.dim=32", "data.seq_len=32", "data.batch_size=8",
          "train.eval_batches=1", "train.eval_every=0", "train.timeline=false", "optimizer.warmup_steps=1",
          "optimizer.decay_steps=4", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5",
          "data.max_bytes=400000", "schedule.microbatches=2"]


def _compose(*overrides):
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _run(run_dir, cache, *overrides):
    """One launcher run on this pool rank (every rank calls it); the losses by step."""
    from pipeloom.kernels import set_kernels

    previous = set_kernels("auto")
    set_kernels(previous)
    try:
        result = run(_compose(*COMMON, f"data.cache_dir={cache}", *overrides), run_dir=run_dir)
    finally:
        set_kernels(previous)
    return {"losses": result.losses, "start": result.start_step, "checkpoint": result.checkpoint}


def _layout(dp, pp, tp):
    return [f"parallel.dp={dp}", f"parallel.pp={pp}", f"parallel.tp={tp}"]


OPTIONS = ["parallel.dp_overlap=true", "parallel.dp_bucket_mb=0.01", "optimizer.zero=1"]  # several buckets


def test_overlap_and_zero1_train_like_plain_dp_and_resume_under_other_layouts(pool4, tmp_path):
    cache = str(tmp_path / "cache")
    plain = pool4.run(_run, str(tmp_path / "plain"), cache, *_layout(2, 2, 1), timeout=240)[0]["losses"]
    both = pool4.run(_run, str(tmp_path / "both"), cache, *_layout(2, 2, 1), *OPTIONS, timeout=240)[0]
    assert sorted(both["losses"]) == [1, 2, 3, 4] and plain[4] < plain[1]
    for step, loss in both["losses"].items():  # the same sums in other buckets: float rounding apart
        assert loss == pytest.approx(plain[step], abs=1e-5), (step, loss, plain[step])
    flat = pool4.run(_run, str(tmp_path / "dp4"), cache, *_layout(4, 1, 1), *OPTIONS, timeout=240)[0]["losses"]
    for step, loss in flat.items():  # LocalStep's path: dp=4, every rank owns a quarter of the AdamW state
        assert loss == pytest.approx(plain[step], abs=2e-4), (step, loss, plain[step])
    saved = str(tmp_path / "both" / "checkpoints")  # step 2: ZeRO-1 over dp=2 with pp=2
    for layout, options in ((_layout(4, 1, 1), OPTIONS), (_layout(1, 2, 2), [])):  # ZeRO over 4; plain AdamW, tp
        name = "x".join(o.split("=")[1] for o in layout)
        ck = tmp_path / f"ck-{name}"
        shutil.copytree(f"{saved}/step_2", ck / "step_2")
        resumed = pool4.run(_run, str(tmp_path / f"resumed-{name}"), cache, *layout, *options, f"checkpoint.dir={ck}",
                            "checkpoint.resume=true", "checkpoint.save_final=false", timeout=240)[0]
        assert resumed["start"] == 2 and sorted(resumed["losses"]) == [3, 4], (layout, resumed)
        for step in (3, 4):  # the AdamW moments came back whole, whoever owned them
            assert resumed["losses"][step] == pytest.approx(plain[step], abs=2e-4), (layout, step)


def _overlap_worker(schedule, pp):
    """One step with and without overlap on the same weights: the buckets launch during backward, and the
    summed gradients agree."""
    from pipeloom.parallel.mesh import Mesh

    mesh = Mesh.build(dp=4 // pp, pp=pp, tp=1)
    config = get_model_config("llama-tiny", n_layers=3, dim=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                              max_seq_len=16)
    plan = get_schedule(schedule, pp=pp, microbatches=2)
    g = torch.Generator().manual_seed(mesh.dp_rank)
    x, y = torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)
    grads, launched = [], []
    for overlap in (False, True):
        parts = build_parts(config, plan, mesh=mesh, seed=1)
        stepper = make_stepper(parts, mesh, dp_overlap=overlap, bucket_mb=0.005)
        stepper.step(x, y)
        stepper.reduce_gradients()
        grads.append([s.param.grad.clone() for s in parts.specs])
        launched.append(stepper.grads.launched_before_finish)
        stepper.grads.sync is not None and stepper.grads.sync.remove()
    diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    return {"diff": diff, "launched": launched[1], "buckets": len(stepper.grads.sync.buckets)}


@pytest.mark.parametrize("schedule, pp", [("1f1b", 1), ("zb-h1", 2), ("interleaved-1f1b", 2)])
def test_overlapped_buckets_launch_during_the_step_and_sum_the_same(pool4, schedule, pp):
    for r in pool4.run(_overlap_worker, schedule, pp, timeout=180):
        assert r["diff"] < 1e-6, r
        assert r["buckets"] > 2 and r["launched"] == r["buckets"], r  # all launched before finish()


@pytest.mark.parametrize("overrides, key, value", [
    (["optimizer.zero=2"], "optimizer.zero", 2),
    (["optimizer.zero=-1"], "optimizer.zero", -1),
    (["parallel.dp_bucket_mb=0"], "parallel.dp_bucket_mb", 0.0),
    (["schedule.name=pipedream", "parallel.dp_overlap=true", "model=llama-tiny"], "parallel.dp_overlap", True),
    (["schedule.name=pipedream-2bw", "optimizer.zero=1", "model=llama-tiny"], "optimizer.zero", 1),
])
def test_bad_dp_options_name_the_key_and_value(overrides, key, value):
    with pytest.raises(ConfigError) as info:
        check_config(_compose(*overrides), 2)
    assert (info.value.key, info.value.value) == (key, value)
    assert str(info.value).startswith(f"{key}={value!r}: ") and "\n" not in str(info.value)

