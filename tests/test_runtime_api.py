# The runtime's contracts beyond exactness: plan facts once, owned link groups, extras chunk specs, dp, host syncs.
import copy
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pipeloom.parallel.mesh import Mesh
from pipeloom.parallel.microbatch import check_chunk_specs, split_extras
from pipeloom.parallel.p2p import P2P, PipelineTimeout, TensorSpec, Transfer, check_rendezvous
from pipeloom.parallel.runtime import PipelineRuntime
from pipeloom.parallel.stage import split_stages
from pipeloom.schedules import get_schedule
from pipeloom.schedules.ir import Action, Kind, Plan
from torch import nn

EXACT = 1e-12
D = 6


class Block(nn.Module):
    """A residual block that mixes positions through an optional (T, T) mask and a per-row (B, T) mask."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x, mix=None, keep=None):  # (B, T, D), mix (T, T), keep (B, T) -> (B, T, D)
        h = torch.tanh(self.fc(x))
        if mix is not None:
            h = torch.einsum("ts,bsd->btd", mix, h)
        if keep is not None:
            h = h * keep[..., None]
        return x + h


def build(blocks: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [Block().double() for _ in range(blocks)]


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def mse(out, target):
    return F.mse_loss(out, target)


def one_process(layers, x, y, extras):
    ref = copy.deepcopy(nn.Sequential(*layers))
    h = x
    for layer in ref:
        h = layer(h, **extras)
    loss = mse(h, y)
    loss.backward()
    return ref, loss.item()


def max_grad_diff(runtime, ref) -> float:
    ref_params = dict(ref.named_parameters())
    return max((p.grad - ref_params[n].grad).abs().max().item() for m in runtime.modules.values()
               for n, p in m.named_parameters())


# ----- plan facts: computed once per plan, read once by the runtime ---------------------------------------------
def test_plan_facts_are_computed_once_per_plan(monkeypatch):
    plan = get_schedule("1f1b", pp=4, microbatches=8)
    scans = []
    actions = Plan.actions
    monkeypatch.setattr(Plan, "actions", lambda self: scans.append(1) or actions(self))
    for _ in range(50):
        assert not plan.is_forward_only and not plan.is_versioned and not plan.has_comm
    assert len(scans) == 3  # one scan per fact, not one per read
    assert plan == get_schedule("1f1b", pp=4, microbatches=8) and hash(plan) == hash(plan.replace())


def test_a_step_scans_no_plan(monkeypatch):
    layers = build(3)
    plan = get_schedule("zb-h1", pp=1, microbatches=4)
    runtime = PipelineRuntime(plan, split_stages(layers, 1).for_rank(plan, 0), mse)
    g = torch.Generator().manual_seed(0)
    x, y = randn(g, 8, 3, D), randn(g, 8, 3, D)
    scans = []
    actions = Plan.actions
    monkeypatch.setattr(Plan, "actions", lambda self: scans.append(1) or actions(self))
    for _ in range(3):
        runtime.step(x, y)
    assert scans == []  # every fact of the plan was read when the runtime was built


# ----- extras: an explicit chunk spec per extra, whole by default, ambiguity refused ----------------------------
def test_extras_with_batch_equal_to_sequence_length():
    B = T = 6  # a (T, T) mixing matrix has the batch's size in dim 0
    layers = build(2, seed=1)
    plan = get_schedule("1f1b", pp=1, microbatches=3)
    g = torch.Generator().manual_seed(2)
    x, y = randn(g, B, T, D), randn(g, B, T, D)
    mix = torch.tril(torch.rand(T, T, generator=g, dtype=torch.float64))  # (T, T): every microbatch needs all of it
    keep = (torch.rand(B, T, generator=g) > 0.3).double()  # (B, T): one row per sample

    runtime = PipelineRuntime(plan, split_stages(layers, 1).for_rank(plan, 0), mse)
    with pytest.raises(ValueError, match=r"extra 'mix' has shape \(6, 6\).*extras_chunks=\{'mix': 'split'\}"):
        runtime.step(x, y, extras={"mix": mix})

    specs = {"mix": "replicate", "keep": "split"}
    runtime = PipelineRuntime(plan, split_stages(layers, 1).for_rank(plan, 0), mse, extras_chunks=specs)
    result = runtime.step(x, y, extras={"mix": mix, "keep": keep})
    ref, ref_loss = one_process(layers, x, y, {"mix": mix, "keep": keep})
    assert abs(result.loss - ref_loss) < EXACT and max_grad_diff(runtime, ref) < EXACT

    # a spec along another dim: a (T, B) layout is cut along dim 1 into the same microbatches
    pieces = split_extras({"keep_t": keep.T}, 3, B, check_chunk_specs({"keep_t": 1}))
    assert [tuple(p["keep_t"].shape) for p in pieces] == [(T, 2)] * 3
    assert torch.equal(torch.cat([p["keep_t"] for p in pieces], dim=1), keep.T)
    with pytest.raises(ValueError, match="extras_chunks\\['keep'\\]='rows'"):
        PipelineRuntime(plan, split_stages(layers, 1).for_rank(plan, 0), mse, extras_chunks={"keep": "rows"})


# ----- zero_grad: optional, for accumulation over several steps ---------------------------------------------
def test_step_can_keep_earlier_gradients():
    layers = build(2, seed=3)
    plan = get_schedule("gpipe", pp=1, microbatches=2)
    runtime = PipelineRuntime(plan, split_stages(layers, 1).for_rank(plan, 0), mse)
    g = torch.Generator().manual_seed(4)
    x, y = randn(g, 8, 2, D), randn(g, 8, 2, D)
    runtime.step(x[:4], y[:4])
    runtime.step(x[4:], y[4:], zero_grad=False)  # the two halves' mean-loss gradients, summed
    ref, _ = one_process(layers, x, y, {})  # the whole batch's mean loss: half of that sum
    ref_params = dict(ref.named_parameters())
    for module in runtime.modules.values():
        for n, p in module.named_parameters():
            assert (p.grad - 2 * ref_params[n].grad).abs().max() < EXACT
    runtime.step(x[:4], y[:4])  # the default zeroes first
    first, _ = one_process(layers, x[:4], y[:4], {})
    assert max_grad_diff(runtime, first) < EXACT


# ----- multi-rank workers ---------------------------------------------------------------------------------
def dp_worker(steps: int) -> dict:
    """README's pattern (optimizer inside the runtime) on dp=2 x pp=2: replicas stay bitwise equal and
    follow one process on the global batch; without the mesh the runtime refuses instead of drifting."""
    mesh = Mesh.build(dp=2, pp=2)
    layers = build(4, seed=5)
    reference = copy.deepcopy(nn.Sequential(*layers))
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    split = split_stages(layers, plan.num_stages)
    factory = lambda ps: torch.optim.AdamW(ps, lr=1e-2)  # noqa: E731
    try:
        PipelineRuntime(plan, split, mse, optimizer_factory=factory, pp_group=mesh.pp_group, pp_ranks=mesh.pp_peers)
        refused = "no error"
    except ValueError as error:
        refused = str(error)
    runtime = PipelineRuntime(plan, split, mse, optimizer_factory=factory, mesh=mesh)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(6)
    for _ in range(steps):
        x = torch.randn(2, 4, 3, D, generator=g, dtype=torch.float64)  # (dp, B, T, D): each replica its rows
        y = torch.randn(2, 4, 3, D, generator=g, dtype=torch.float64)
        runtime.step(x[mesh.dp_rank], y[mesh.dp_rank])
        ref_opt.zero_grad()
        mse(reference(x.flatten(0, 1)), y.flatten(0, 1)).backward()
        ref_opt.step()
    mine = torch.cat([p.detach().reshape(-1) for m in runtime.modules.values() for p in m.parameters()])
    replicas = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(replicas, mine, group=mesh.dp_group)
    ref_params = dict(reference.named_parameters())
    diff = max((p - ref_params[n]).abs().max().item() for m in runtime.modules.values()
               for n, p in m.named_parameters())
    return {"bitwise": torch.equal(replicas[0], replicas[1]), "diff": diff, "refused": refused,
            "links": len(mesh.links)}


def reinit_worker(path: str) -> list[float]:
    """A runtime, then torch.distributed torn down and started again in the same processes, then new
    runtimes: they must get live link groups (owned by the runtime or the mesh; no stale module cache)."""
    rank, losses = dist.get_rank(), []
    layers = build(2, seed=7)
    g = torch.Generator().manual_seed(8)
    x, y = randn(g, 4, 2, D), randn(g, 4, 2, D)
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    for attempt in range(2):
        losses.append(PipelineRuntime(plan, split_stages(layers, 2), mse, timeout=30).step(x, y).loss)
        if attempt == 0:
            dist.destroy_process_group()
            dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2,
                                    timeout=timedelta(seconds=120))
    mesh = Mesh.build(pp=2)
    runtime = PipelineRuntime(plan, split_stages(layers, 2), mse, mesh=mesh, timeout=30)
    made = len(mesh.links)
    again = PipelineRuntime(plan, split_stages(layers, 2), mse, mesh=mesh, timeout=30)  # reuses the mesh's links
    assert runtime.p2p.links == again.p2p.links and len(mesh.links) == made > 0, (runtime.p2p.links, made)
    losses.append(again.step(x, y).loss)
    return losses


def host_sync_worker() -> dict:
    """Waits pass no timeout on the runtime's own link groups (a caller's shared group keeps timed ones);
    the loss stays on the device until read; only every timeline_every-th step is timed."""
    layers = build(4, seed=9)
    plan = get_schedule("1f1b", pp=2, microbatches=4)
    g = torch.Generator().manual_seed(10)
    x, y = randn(g, 8, 2, D), randn(g, 8, 2, D)
    out = {}
    for links in ("auto", "gloo", "directional", "shared"):
        runtime = PipelineRuntime(plan, split_stages(layers, 2), mse, links=links, timeline_every=3, timeout=30)
        results = [runtime.step(x, y) for _ in range(5)]
        groups = runtime.p2p.links or {}
        out[links] = {"waits": runtime.p2p.counts["waits"], "timed": runtime.p2p.counts["timed_waits"],
                      "groups": len({id(g) for g in groups.values()}), "pairs": len(groups),
                      "own": all(g is not runtime.pp_group for g in groups.values()), "transport": runtime.transport}
    ref, ref_loss = one_process(layers, x, y, {})
    out["timed"] = [r.timed for r in results]
    out["shared_timeline"] = results[1].timeline is results[0].timeline and results[4].timeline is results[3].timeline
    tensor = results[2].loss_tensor
    out["loss_on_device"] = torch.is_tensor(tensor) and tensor.dtype == torch.float64
    out["loss"] = abs(results[2].loss - ref_loss)
    return out


def hang_watch_worker(group_timeout: float, deadline: float):
    """Rank 0 never sends. Rank 1 waits without a timeout on a group whose own timeout is longer than the
    P2P deadline (as the runtime's NCCL links are): the HangWatch must name rank, action and peer before
    the group gives up, and the wait must still end in a named PipelineTimeout."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=group_timeout))
    if dist.get_rank() == 0:
        return None
    p2p = P2P(group, [0, 1], 1, torch.device("cpu"), deadline, timed_waits=False, watch=True)
    action = Action(1, Kind.RECV_F, 0)
    start = time.monotonic()
    try:
        p2p.exchange([Transfer(action, False, 0, 7, specs=[TensorSpec((3,), torch.float32)])])
        raised = "no error"
    except PipelineTimeout as error:
        raised = str(error)
    p2p.watch.close()
    return {"hang": p2p.watch.hang, "raised": raised, "waited": time.monotonic() - start}


def early_receives_worker(names: list) -> dict:
    """Each schedule with receives posted at their action and a run early (NCCL-style ordered matching):
    the same losses and gradients, bitwise; the early run's recorded calls, for NCCL's rules."""
    out = {}
    g = torch.Generator().manual_seed(11)
    x, y = randn(g, 9, 2, D), randn(g, 9, 2, D)
    for name in names:
        plan = get_schedule(name, pp=4, microbatches=8)
        runs = {}
        for early in (False, True):
            layers = build(8, seed=12)
            runtime = PipelineRuntime(plan, split_stages(layers, plan.num_stages), mse, timeout=60,
                                      optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1),
                                      ordered_messages=True, early_receives=early, links="directional")
            runtime.p2p.log = [] if early else None
            losses = [runtime.step(x[: 8 + step], y[: 8 + step]).loss for step in range(2)]
            grads = [p.grad.clone() for m in runtime.modules.values() for p in m.parameters()]
            runs[early] = (losses, grads, runtime.p2p.counts["early_receives"], runtime.p2p.log)
        (late_losses, late_grads, none, _), (losses, grads, early, log) = runs[False], runs[True]
        out[name] = {"same": late_losses == losses and all(torch.equal(a, b) for a, b in zip(late_grads, grads)),
                     "early": early, "late": none, "log": log}
    return out


# ----- tests ------------------------------------------------------------------------------------------------
def test_dp_replicas_stay_bitwise_equal_with_the_optimizer_in_the_runtime(pool4):
    results = pool4.run(dp_worker, 3, timeout=240)
    for r in results:
        assert r["bitwise"], r
        assert r["diff"] < 1e-10, r  # the mean gradient of both replicas' rows: one process on the global batch
        assert "cannot see whether" in r["refused"] and "mesh=Mesh.build" in r["refused"], r["refused"]


def test_link_groups_are_owned_and_survive_a_reinit(pool2, tmp_path):
    path = os.path.join(tmp_path, "store")
    first, second = pool2.run(reinit_worker, path, timeout=240)
    assert first == second and first[0] == first[1] == first[2], (first, second)  # the same model and batch


def test_hot_path_waits_untimed_loss_lazy_timeline_sampled(pool2):
    out = pool2.run(host_sync_worker)
    for r in out:
        for own in ("auto", "gloo", "directional"):
            assert r[own]["waits"] > 0 and r[own]["timed"] == 0 and r[own]["own"], r
        assert r["directional"]["groups"] == r["directional"]["pairs"] == 2, r  # a group per direction
        assert r["gloo"]["groups"] == 1 and r["gloo"]["pairs"] == 2, r  # gloo: one group for the pipeline
        assert r["auto"]["groups"] == r["auto"]["pairs"] == 2 and r["auto"]["transport"] == "shm", r  # one host
        assert r["gloo"]["transport"] == r["directional"]["transport"] == "gloo", r
        assert r["shared"]["timed"] == r["shared"]["waits"] > 0, r
        assert r["timed"] == [True, False, False, True, False] and r["shared_timeline"], r
        assert r["loss_on_device"] and r["loss"] < EXACT, r


def test_hang_watch_names_the_receive_without_a_timed_wait(pool2):
    result = pool2.run(hang_watch_worker, 6.0, 1.0, timeout=120)[1]
    assert result["hang"] is not None and "pipeline rank 1" in result["hang"] and "1RECV_F0" in result["hang"], result
    assert "pipeline rank 0" in result["hang"], result
    assert "1RECV_F0" in result["raised"] and result["waited"] >= 5.0, result  # the group's own deadline ended it


def test_early_receives_change_nothing_but_when_receives_are_posted(pool4):
    names = ["1f1b", "interleaved-1f1b", "zb-v"]
    results = pool4.run(early_receives_worker, names, timeout=240)
    for name in names:
        for rank, r in enumerate(results):
            assert r[name]["same"] and r[name]["late"] == 0, (name, rank)
        assert sum(r[name]["early"] for r in results) > 0, name
        check_rendezvous({rank: r[name]["log"] for rank, r in enumerate(results)})  # NCCL's rules still hold
