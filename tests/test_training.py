# pipeloom.training in one process: LR schedule, optimizer, clipping, microbatch step, checkpoints, exact resume.
import copy
import json
import math
import os

import pytest
import torch
from hydra import compose, initialize_config_module
from pipeloom.launch.train import run
from pipeloom.models import Transformer, get_model_config
from pipeloom.schedules import get_schedule
from pipeloom.training import (
    CheckpointError,
    LocalStep,
    build_optimizer,
    build_parts,
    clip_grad_norm,
    latest_checkpoint,
    load_checkpoint,
    load_dense,
    lr_at,
    read_metrics,
    save_checkpoint,
)

TINY = ["model=gpt-tiny", "model.n_layers=2", "data.seq_len=32", "data.batch_size=8", "train.eval_batches=1",
        "train.timeline=false", "optimizer.warmup_steps=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


def compose_train(*overrides):
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_train(run_dir, cache, *overrides):
    cfg = compose_train(*TINY, f"data.cache_dir={cache}", *overrides)
    return run(cfg, run_dir=str(run_dir))


def test_lr_warmup_then_cosine_to_min():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=10)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == 0.1
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(4, 20))


def test_adamw_groups_decay_matrices_only():
    model = Transformer(get_model_config("llama-tiny", n_layers=1))
    opt = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"]  # torch's fused AdamW runs on CPU too


def test_clip_matches_torch_and_skips_uncounted_copies():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn_like(p)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    norm = clip_grad_norm([(p, True) for p in ps], 0.5)
    assert norm == pytest.approx(float(expected))
    assert all(torch.allclose(p.grad, r.grad) for p, r in zip(ps, ref))
    only_first = clip_grad_norm([(ps[0], True), (ps[1], False)], 0.0)  # 0: measure only
    assert only_first == pytest.approx(float(ps[0].grad.norm()))


def test_local_step_accumulates_the_full_batch_gradient():
    config = get_model_config("gpt-tiny", n_layers=2)
    parts = build_parts(config, get_schedule("1f1b", pp=1, microbatches=4), seed=1)
    dense = copy.deepcopy(parts.model)
    x, y = torch.randint(0, 256, (8, 16)), torch.randint(0, 256, (8, 16))
    loss, timeline = LocalStep(parts).step(x, y)
    ref = dense.loss(dense(x), y)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-6)
    for (name, p), q in zip(parts.model.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert [str(iv.action) for iv in timeline.intervals][:3] == ["0F0", "0B0", "0F1"]


def _step_grads(config, plan, compile, mesh=None):
    """Loss and every local gradient of one step of a freshly built model (same seed each call)."""
    from pipeloom.training import PipelineStep

    parts = build_parts(config, plan, seed=3, mesh=mesh, compile=compile)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 256, (4, 12), generator=g), torch.randint(0, 256, (4, 12), generator=g)
    stepper = LocalStep(parts) if plan.pp == 1 else PipelineStep(parts, mesh)
    loss, _ = stepper.step(x, y)
    grads = {n: p.grad.clone() for m in parts.modules.values() for n, p in m.named_parameters() if p.grad is not None}
    compiled = sum(getattr(b, "_compiled_call_impl", None) is not None
                   for m in parts.modules.values() for b in m.modules())
    return loss, grads, compiled, sorted(k for m in parts.modules.values() for k in m.state_dict())


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_compiled_blocks_train_like_eager_blocks(name):
    """train.compile: every block compiled (Dynamo + AOTAutograd; aot_eager keeps the test off the C++
    compiler), same parameter names, same loss and gradients as eager."""
    torch._dynamo.reset()
    config = get_model_config(name, n_layers=3, dim=32, max_seq_len=16)
    plan = get_schedule("1f1b", pp=1, microbatches=2)
    loss, grads, compiled, keys = _step_grads(config, plan, "aot_eager")
    ref_loss, ref_grads, ref_compiled, ref_keys = _step_grads(config, plan, False)
    assert (compiled, ref_compiled) == (3, 0) and keys == ref_keys
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_compiled_blocks_change_no_process_wide_setting():
    """compile_blocks leaves torch._functorch.config.donated_buffer as it was; a plan that splits backward
    runs its steps inside ModelParts.step_context, where a graph-keeping backward works even after a
    use-once backward compiled the blocks' backward (outside it, AOTAutograd refuses)."""
    from pipeloom.training import PipelineStep

    def use_once_then_split(model):
        model.loss(model(x), x).backward()  # use-once: compiles the blocks' backward
        h = model.embed(x).detach().requires_grad_()
        out = model.blocks[1](model.blocks[0](h))
        (gx,) = torch.autograd.grad(out.square().sum(), [h], retain_graph=True)  # B keeps the graph for W
        return [gx, *torch.autograd.grad(out.square().sum(), list(model.blocks.parameters()))]

    import torch._functorch.config as functorch_config

    before = functorch_config.donated_buffer
    config = get_model_config("gpt-tiny", n_layers=2, dim=32, max_seq_len=16)
    plan = get_schedule("zb-h1", pp=1, microbatches=2)
    x = torch.randint(0, 256, (2, 8))
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="donated buffers"):  # the control: no context, no retained graph
        use_once_then_split(build_parts(config, plan, seed=3, compile="aot_eager").model)
    torch._dynamo.reset()
    parts = build_parts(config, plan, seed=3, compile="aot_eager")
    eager = copy.deepcopy(parts.model)
    for block in eager.blocks:
        block._compiled_call_impl = None
    assert functorch_config.donated_buffer == before
    with parts.step_context():
        grads = [use_once_then_split(parts.model)]
    assert functorch_config.donated_buffer == before
    grads.append(use_once_then_split(eager))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    loss, _ = PipelineStep(parts, None).step(x, x)  # the runtime's B/W split, inside the step context
    assert math.isfinite(loss) and functorch_config.donated_buffer == before


def compiled_pipeline_worker(schedules):
    """On 2 gloo ranks: per schedule, one step with compiled blocks and one without; their differences."""
    from pipeloom.parallel.mesh import Mesh

    torch._dynamo.reset()
    mesh = Mesh.build(dp=1, pp=2, tp=1)
    config = get_model_config("gpt-tiny", n_layers=4, dim=32, max_seq_len=16)
    out = {}
    for name in schedules:
        plan = get_schedule(name, pp=2, microbatches=4)
        loss, grads, compiled, _ = _step_grads(config, plan, "aot_eager", mesh)
        ref_loss, ref_grads, _, _ = _step_grads(config, plan, False, mesh)
        out[name] = (abs(loss - ref_loss), max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
                     compiled, grads.keys() == ref_grads.keys())
    return out


def test_compiled_blocks_in_a_pipeline_with_split_backward(pool2):
    # zb-h1 splits each backward into B (input gradient) and W (weights) around the compiled blocks.
    for rank, per_rank in enumerate(pool2.run(compiled_pipeline_worker, ["1f1b", "zb-h1", "zb-v"])):
        for name, (loss_diff, grad_diff, compiled, same_keys) in per_rank.items():
            assert same_keys and compiled >= 1, (rank, name, compiled)
            assert loss_diff < 1e-6 and grad_diff < 1e-6, (rank, name, loss_diff, grad_diff)


def _checkpoint_fixture(tmp_path, dim=64):
    config = get_model_config("gpt-tiny", n_layers=1, dim=dim)
    parts = build_parts(config, get_schedule("1f1b", pp=1, microbatches=1), seed=0)
    opt = build_optimizer(parts.named_parameters(), lr=1e-2)
    LocalStep(parts).step(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    opt.step()
    meta = {"model_config": config.to_dict(), "tokenizer": {"kind": "byte", "vocab_size": 256}}
    return config, parts, opt, meta


def test_checkpoint_round_trip_restores_weights_and_adam_state(tmp_path):
    config, parts, opt, meta = _checkpoint_fixture(tmp_path)
    path = save_checkpoint(str(tmp_path), 3, specs=parts.specs, optimizer=opt, meta=meta)
    assert os.path.basename(path) == "step_3" and latest_checkpoint(str(tmp_path)) == path
    manifest = json.load(open(os.path.join(path, "pipeloom.json")))
    assert manifest["step"] == 3 and ".metadata" in manifest["files"]
    _, fresh, fresh_opt, _ = _checkpoint_fixture(tmp_path)
    with torch.no_grad():
        for s in fresh.specs:
            s.param.add_(1.0)
    load_checkpoint(path, specs=fresh.specs, optimizer=fresh_opt, model_config=meta["model_config"],
                    tokenizer=meta["tokenizer"])
    for a, b in zip(parts.specs, fresh.specs):
        assert a.name == b.name and torch.equal(a.param, b.param)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a.param][key], fresh_opt.state[b.param][key])
    dense, _ = load_dense(str(tmp_path))  # the newest checkpoint in a folder, into one plain model
    assert torch.equal(dense.head.out.weight, parts.model.embed.tok.weight)


def test_crash_mid_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    _, parts, opt, meta = _checkpoint_fixture(tmp_path)
    good = save_checkpoint(str(tmp_path), 1, specs=parts.specs, optimizer=opt, meta=meta)

    def crash(state, checkpoint_id):
        open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"half a tensor")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, specs=parts.specs, optimizer=opt, meta=meta)
    assert os.path.isdir(tmp_path / "step_2.tmp") and not os.path.exists(tmp_path / "step_2")
    assert latest_checkpoint(str(tmp_path)) == good


def test_corrupted_or_incompatible_checkpoints_are_refused(tmp_path):
    config, parts, opt, meta = _checkpoint_fixture(tmp_path)
    path = save_checkpoint(str(tmp_path / "a"), 1, specs=parts.specs, optimizer=opt, meta=meta)
    kw = dict(specs=parts.specs, optimizer=opt, model_config=meta["model_config"], tokenizer=meta["tokenizer"])
    other = get_model_config("gpt-tiny", n_layers=1, dim=32).to_dict()
    with pytest.raises(CheckpointError, match=r"dim: checkpoint 64, this run 32"):
        load_checkpoint(path, **{**kw, "model_config": other})
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(path, **{**kw, "tokenizer": {"kind": "tokenizer.json", "vocab_size": 256}})
    blob = os.path.join(path, "__0_0.distcp")
    data = bytearray(open(blob, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the tensors
    open(blob, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 of __0_0.distcp"):
        load_checkpoint(path, **kw)
    open(blob, "ab").write(b"x")
    with pytest.raises(CheckpointError, match="bytes, the manifest says"):
        load_checkpoint(path, **kw)
    os.remove(os.path.join(path, "pipeloom.json"))
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path, **kw)


def test_keep_prunes_old_checkpoints(tmp_path):
    _, parts, opt, meta = _checkpoint_fixture(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, specs=parts.specs, optimizer=opt, meta=meta, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_2", "step_3"]


def test_single_process_training_learns_and_logs(tmp_path, cache):
    result = run_train(tmp_path, cache, "train.steps=12", "train.eval_every=6")
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("step", "loss", "lr", "tokens_per_s", "bubble_rate_measured", "bubble_rate_predicted"):
        assert key in steps[0]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # byte-level GPT on the stdlib learns fast
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert result.checkpoint.endswith("step_12")


def test_launcher_trains_with_compiled_blocks(tmp_path, cache):
    """train.compile=true through the launcher (Inductor, C++ on this CPU): it trains and checkpoints."""
    torch._dynamo.reset()
    result = run_train(tmp_path, cache, "train.steps=4", "train.compile=true", "model.n_layers=2")
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert result.checkpoint.endswith("step_4")


def test_exact_resume_single_process_with_dropout(tmp_path, cache):
    common = ["train.steps=8", "checkpoint.every=3", "model.dropout=0.1", "train.eval_every=0"]
    full = run_train(tmp_path / "full", cache, *common)
    ck = str(tmp_path / "ck")
    killed = run_train(tmp_path / "killed", cache, *common, f"checkpoint.dir={ck}", "train.stop_after=5")
    assert killed.end_step == 5 and latest_checkpoint(ck).endswith("step_3")
    resumed = run_train(tmp_path / "resumed", cache, *common, f"checkpoint.dir={ck}", "checkpoint.resume=true")
    assert resumed.start_step == 3
    assert {s: resumed.losses[s] for s in range(4, 9)} == {s: full.losses[s] for s in range(4, 9)}  # bitwise
    assert resumed.val_losses[8] == full.val_losses[8]
