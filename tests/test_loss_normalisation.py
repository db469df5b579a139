# One loss convention for every layout: the mean over the valid targets of the whole global batch.
import pytest
import torch
from pipeloom.models import Transformer, get_model_config
from pipeloom.schedules import get_schedule
from pipeloom.training import LocalStep, build_parts, make_stepper

CONFIG = dict(n_layers=2, dim=32, n_heads=4, vocab_size=64, max_seq_len=16)
SEED = 5


def _global_batch(rows: int, replicas: int, empty_microbatch: bool = True):
    """(rows * replicas, 8) inputs and targets; replica 0's targets mostly ignored (-100), one of its
    microbatches entirely (``empty_microbatch``), replica 1's hardly: the replicas hold very different
    numbers of valid targets."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 64, (rows * replicas, 8), generator=g)
    y = torch.randint(0, 64, (rows * replicas, 8), generator=g)
    drop = torch.rand(y.shape, generator=g) < 0.1
    drop[:rows] |= torch.rand((rows, 8), generator=g) < 0.5
    drop[rows - 1] |= empty_microbatch  # replica 0's last microbatch (one row of 6 split 2, 2, 1, 1): no valid target
    return x, y.masked_fill(drop, -100)


def _reference(family: str, x, y):
    """One process, the whole batch at once, float64."""
    torch.manual_seed(SEED)
    ref = Transformer(get_model_config(f"{family}-tiny", **CONFIG)).double()
    loss = ref.loss(ref(x), y)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters()}


def _double(parts):
    parts.model.double()
    for module in parts.modules.values():
        module.double()
    return parts


@pytest.mark.parametrize("empty_microbatch", [False, True])
def test_pp1_uneven_microbatches_with_ignored_targets_match_the_full_batch(empty_microbatch):
    x, y = _global_batch(6, 1, empty_microbatch)  # 6 rows in 4 microbatches: 2, 2, 1, 1
    plan = get_schedule("1f1b", pp=1, microbatches=4)
    parts = _double(build_parts(get_model_config("gpt-tiny", **CONFIG), plan, seed=SEED))
    loss, _ = LocalStep(parts).step(x, y)
    ref_loss, ref_grads = _reference("gpt", x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    for name, p in parts.model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-11, atol=1e-13, msg=name)


def _dp_worker(pp: int, family: str, schedule: str):
    """dp=2 (x pp): each replica steps on its own rows, the shares are summed over dp; compare the
    global loss and every gradient with one process on the global batch."""
    import torch.distributed as dist
    from pipeloom.parallel.data_parallel import allreduce_gradients
    from pipeloom.parallel.mesh import Mesh

    mesh = Mesh.build(dp=2, pp=pp, tp=1)
    plan = get_schedule(schedule, pp=pp, microbatches=4)
    parts = _double(build_parts(get_model_config(f"{family}-tiny", **CONFIG), plan, mesh=mesh, seed=SEED))
    x, y = _global_batch(6, 2)
    mine = slice(6 * mesh.dp_rank, 6 * (mesh.dp_rank + 1))
    stepper = make_stepper(parts, mesh)
    share, _ = stepper.step(x[mine], y[mine])
    allreduce_gradients([s.param for s in parts.specs], mesh.dp_group, op="sum")
    total = torch.tensor([share], dtype=torch.float64)
    dist.all_reduce(total, group=mesh.dp_group)
    ref_loss, ref_grads = _reference(family, x, y)
    diffs = {s.name + ("" if s.primary else " (tied copy)"): (s.param.grad - ref_grads[s.name]).abs().max().item()
             for s in parts.specs}
    valid = int((y[mine] != -100).sum())
    return {"loss_diff": abs(float(total) - ref_loss), "grad_diff": max(diffs.values()), "valid": valid}


@pytest.mark.parametrize("pool_name,pp,family,schedule", [("pool2", 1, "gpt", "1f1b"),
                                                          ("pool4", 2, "llama", "zb-h1")])
def test_dp_replicas_with_different_valid_counts_match_one_process(request, pool_name, pp, family, schedule):
    results = request.getfixturevalue(pool_name).run(_dp_worker, pp, family, schedule)
    assert len({r["valid"] for r in results}) == 2, "the replicas should hold different numbers of valid targets"
    for rank, r in enumerate(results):
        assert r["loss_diff"] < 1e-13 and r["grad_diff"] < 1e-13, (rank, r)
