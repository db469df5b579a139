# PipeDream-family training through pipeloom.training: dp reduction at every update, versions, exact resume.
import pytest
import torch
from hydra import compose, initialize_config_module
from pipeloom.launch.train import run
from pipeloom.models import get_model_config
from pipeloom.schedules import get_schedule
from pipeloom.training import PipelineStep, StageUpdate, build_parts, make_stepper, read_metrics

CONFIG = get_model_config("llama-tiny", n_layers=2, dim=32, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)


def _batch(step: int, rows: int):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randint(0, 64, (rows, 8), generator=g), torch.randint(0, 64, (rows, 8), generator=g)
    return x, y.masked_fill(torch.rand(y.shape, generator=g) < 0.3, -100)  # uneven valid counts


def _versioned_dp_worker():
    """2BW at pp=1 (update every 2 of 4 microbatches, so microbatches 2-3 run on the stashed version 0),
    dp=2: each update sums the replicas' shares. Reference: one process whose microbatch g holds both
    replicas' microbatch g, so its update groups see the same rows."""
    from pipeloom.parallel.mesh import Mesh

    mesh = Mesh.build(dp=2, pp=1, tp=1)
    plan = get_schedule("pipedream-2bw", pp=1, microbatches=4, update_every=2)

    def parts_and_optimizer():
        parts = build_parts(CONFIG, plan, seed=4)
        parts.model.double()
        opt = torch.optim.SGD([p for _, p in parts.named_parameters()], lr=0.5, momentum=0.9)
        return parts, opt

    parts, opt = parts_and_optimizer()
    stepper = make_stepper(parts, mesh, optimizer=opt, grad_clip=0.0)
    ref_parts, ref_opt = parts_and_optimizer()
    reference = PipelineStep(ref_parts, mesh, update=StageUpdate(ref_opt, ref_parts))  # no dp group
    held = []
    for step in range(2):
        x, y = _batch(step, 8)  # the global batch: replica r's microbatch g is row 4 r + g
        mine = slice(4 * mesh.dp_rank, 4 * mesh.dp_rank + 4)
        stepper.step(x[mine], y[mine])
        order = [4 * r + g for g in range(4) for r in range(2)]  # microbatch g = rows {g, 4 + g}
        reference.step(x[order], y[order])
        held.append(stepper.held_versions())
    ref = dict(ref_parts.named_parameters())
    diff = max((p - ref[n]).abs().max().item() for n, p in parts.named_parameters())
    return {"diff": diff, "held": held, "updates": len(stepper.update.norms)}


def test_versioned_training_with_dp_matches_one_process(pool2):
    for rank, r in enumerate(pool2.run(_versioned_dp_worker)):
        assert r["diff"] < 1e-13, (rank, r)
        assert r["updates"] == 2  # two UPDATEs per step, each after dp reduction inside the runtime
        assert r["held"] == [{0: [2]}, {0: [2]}], r  # between steps: one version (the live weights)


@pytest.fixture
def kernels_restored():
    """run() chooses the kernels' path for the process (pipeloom.kernels.set_kernels): put it back after."""
    from pipeloom.kernels import set_kernels

    previous = set_kernels("auto")
    set_kernels(previous)
    yield
    set_kernels(previous)


def _compose(*overrides):
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_2bw_through_the_launcher_resumes_exactly(tmp_path, tmp_path_factory, kernels_restored):
    common = ["model=llama-tiny", "model.n_layers=2", "model.dim=32", "data.seq_len=32", "data.batch_size=8",
              "train.eval_batches=1", "train.timeline=false", "optimizer.warmup_steps=1", "train.eval_every=0",
              "schedule.name=pipedream-2bw", "schedule.microbatches=4", "+schedule.options.update_every=2",
              "train.steps=4", "checkpoint.every=2", "model.dropout=0.1", "data.max_bytes=400000",
              f"data.cache_dir={tmp_path_factory.mktemp('token-cache')}"]
    full = run(_compose(*common), run_dir=str(tmp_path / "full"))
    ck = str(tmp_path / "ck")
    run(_compose(*common, f"checkpoint.dir={ck}", "train.stop_after=3"), run_dir=str(tmp_path / "stopped"))
    resumed = run(_compose(*common, f"checkpoint.dir={ck}", "checkpoint.resume=true"), run_dir=str(tmp_path / "res"))
    assert resumed.start_step == 2
    assert {s: resumed.losses[s] for s in (3, 4)} == {s: full.losses[s] for s in (3, 4)}  # bitwise
    assert full.losses[4] < full.losses[1]
    records = [r for r in read_metrics(str(tmp_path / "full" / "metrics.jsonl")) if "loss" in r]
    assert all(r["grad_norm"] > 0 for r in records)


def test_pipedream_refuses_a_model_tied_across_stages():
    from pipeloom.configs.train import ConfigError, check_config

    cfg = _compose("model=gpt-tiny", "schedule.name=pipedream", "parallel.pp=2")
    with pytest.raises(ConfigError, match="model.tie_embeddings=True"):
        check_config(cfg, 2)
    untied = _compose("model=gpt-tiny", "schedule.name=pipedream", "parallel.pp=2", "model.tie_embeddings=false")
    assert check_config(untied, 2)["model_config"].tie_embeddings is False
