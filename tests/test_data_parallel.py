# Data parallelism: bucketed (overlapped) gradient averaging and ZeRO-1 equal one process on the whole batch.
import copy

import pytest
import torch
import torch.distributed as dist
from pipeloom.models.config import ModelConfig
from pipeloom.models.transformer import Transformer
from pipeloom.parallel.data_parallel import GradSync, allreduce_gradients, zero1_optimizer
from pipeloom.parallel.mesh import Mesh
from torch import nn

EXACT = 1e-12


def _setup(dp, dp_rank, micro=1):
    """Identical float64 model on every rank; each dp rank's own (B=2, T=8) microbatches; the whole batch."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt", vocab_size=37, dim=16, n_layers=2, n_heads=2, max_seq_len=16))
    model = model.double()
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 37, (dp, micro, 2, 9), generator=g)  # (dp, microbatches, B, T+1)
    return model, data[dp_rank], data


def _loss(model, batch):
    return model.loss(model(batch[:, :-1]), batch[:, 1:])


def _reference_grads(model, data):
    """One process: mean loss over all dp ranks and microbatches (equal sizes: mean of the means)."""
    ref = copy.deepcopy(model)
    loss = sum(_loss(ref, b) for rank_data in data for b in rank_data) / data.shape[0]
    loss.backward()
    return ref


def _grad_sync_worker(mode, bucket_mb, micro, mesh_shape):
    mesh = Mesh.build(*mesh_shape)
    model, mine, data = _setup(mesh.dp, mesh.dp_rank, micro)
    model.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))  # never gets a gradient
    if mode == "overlap":
        sync = GradSync(model.parameters(), mesh.dp_group, bucket_mb=bucket_mb)
        for i, batch in enumerate(mine):
            if i < len(mine) - 1:
                with sync.no_sync():
                    _loss(model, batch).backward()
            else:
                _loss(model, batch).backward()
        launched, n_buckets = sync.launched_during_backward, len(sync.buckets)
        sync.finish()
    else:
        for batch in mine:
            _loss(model, batch).backward()
        n_buckets = allreduce_gradients(model.parameters(), mesh.dp_group, bucket_mb=bucket_mb)
        launched = None
    ref = _reference_grads(model, data)
    ref_grads = dict(ref.named_parameters())
    diff = max((p.grad - ref_grads[n].grad).abs().max().item() for n, p in model.named_parameters() if n != "unused")
    return {"diff": diff, "buckets": n_buckets, "launched": launched, "unused": model.unused.grad.abs().max().item()}


@pytest.mark.parametrize("mode,bucket_mb,micro", [
    ("overlap", 0.002, 1),  # about 2 KB buckets: many buckets, launched from hooks during backward
    ("overlap", 25.0, 2),  # one bucket; the first microbatch under no_sync
    ("after", 0.002, 2),
])
def test_grad_average_equals_whole_batch(pool2, mode, bucket_mb, micro):
    results = pool2.run(_grad_sync_worker, mode, bucket_mb, micro, (2, 1, 1))
    for res in results:
        assert res["diff"] <= EXACT, res
        assert res["unused"] == 0.0
    if bucket_mb < 1:
        assert results[0]["buckets"] > 10
    if mode == "overlap":  # every bucket whose gradients all arrived was launched before backward returned
        assert all(r["launched"] == r["buckets"] - 1 for r in results), results  # the unused param's bucket waits


def test_grad_average_over_dp_subgroup(pool4):
    """dp=2, tp=2: ranks {0, 2} and {1, 3} average separately (tp ranks hold the same data here)."""
    results = pool4.run(_grad_sync_worker, "overlap", 0.002, 1, (2, 1, 2))
    assert all(r["diff"] <= EXACT for r in results), results


def _zero1_worker(mesh_shape, steps):
    mesh = Mesh.build(*mesh_shape)
    model, mine, data = _setup(mesh.dp, mesh.dp_rank, micro=steps)
    ref = copy.deepcopy(model)
    opt = zero1_optimizer(model.parameters(), torch.optim.AdamW, mesh.dp_group, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    sync = GradSync(model.parameters(), mesh.dp_group, bucket_mb=0.01)
    for step in range(steps):
        opt.zero_grad()
        _loss(model, mine[step]).backward()
        sync.finish()
        opt.step()
        ref_opt.zero_grad()
        (sum(_loss(ref, data[r, step]) for r in range(mesh.dp)) / mesh.dp).backward()
        ref_opt.step()
    ref_params = dict(ref.named_parameters())
    diff = max((p - ref_params[n]).abs().max().item() for n, p in model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(mesh.world_size)]
    dist.all_gather(gathered, flat)
    states = len(opt.optim.state)  # this rank's shard of the optimizer state
    return {"diff": diff, "replicas_equal": all(torch.equal(g, flat) for g in gathered), "states": states,
            "n_params": len(list(model.parameters()))}


@pytest.mark.parametrize("shape,pool_name", [((2, 1, 1), "pool2"), ((2, 1, 2), "pool4")])
def test_zero1_matches_plain_adamw(request, shape, pool_name):
    results = request.getfixturevalue(pool_name).run(_zero1_worker, shape, 3)
    for res in results:
        assert res["diff"] <= 1e-12, res
        assert res["replicas_equal"]
    # Optimizer state is sharded over dp: each dp rank holds state for only its part of the parameters.
    dp_ranks = results[:: shape[2]][: shape[0]]
    assert sum(r["states"] for r in dp_ranks) == results[0]["n_params"]
    assert all(0 < r["states"] < r["n_params"] for r in dp_ranks)
