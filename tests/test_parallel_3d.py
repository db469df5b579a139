# Pipeline x tensor x data parallelism composed: a small GPT on 4 ranks equals one process, step by step.
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeloom.models import Transformer, get_model_config
from pipeloom.parallel.apply import RecomputePolicy, apply_recompute, apply_tp
from pipeloom.parallel.cross_entropy import vocab_parallel_cross_entropy
from pipeloom.parallel.data_parallel import allreduce_gradients
from pipeloom.parallel.mesh import Mesh
from pipeloom.parallel.runtime import PipelineRuntime
from pipeloom.parallel.stage import split_stages
from pipeloom.schedules import get_schedule

VOCAB = 61  # not a multiple of tp: the vocab-parallel head pads and masks


def _config(family):
    return get_model_config(
        f"{family}-tiny",
        vocab_size=VOCAB,
        dim=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2 if family == "llama" else 4,
        max_seq_len=16,
        dropout=0.0,
    )


def _train_composed(dp, pp, tp, family, schedule, steps, recompute):
    """Train on this rank's (dp, pp, tp) coordinate; also train a one-process copy; return both curves."""
    torch.manual_seed(0)
    mesh = Mesh.build(dp=dp, pp=pp, tp=tp)
    model = Transformer(_config(family)).double()
    reference = copy.deepcopy(model)
    if tp > 1:
        apply_tp(model, mesh)
    if recompute:
        apply_recompute(model, RecomputePolicy(mode="full"))
    plan = get_schedule(schedule, pp=pp, microbatches=4)
    split = split_stages(model, plan.num_stages)
    tp_group = mesh.tp_group if tp > 1 else None

    def loss_fn(logits, target):  # (b, T, V/tp) vocabulary shard of the logits, (b, T) targets
        if tp_group is None:
            return F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return vocab_parallel_cross_entropy(logits.flatten(0, 1), target.flatten(), group=tp_group, vocab_size=VOCAB)

    runtime = PipelineRuntime(
        plan, split, loss_fn=loss_fn, tied=split.tied, pp_group=mesh.pp_group, pp_ranks=mesh.pp_peers, timeout=60
    )
    local = [p for m in runtime.modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(local, lr=3e-3, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    losses, ref_losses = [], []
    batch = torch.randint(0, VOCAB, (8, 17), generator=gen)  # (B, T+1): one batch, learnt over the steps
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mine = slice(mesh.dp_rank * (8 // dp), (mesh.dp_rank + 1) * (8 // dp))  # this replica's rows
    for _ in range(steps):
        result = runtime.step(inputs[mine], targets[mine])
        if dp > 1:
            allreduce_gradients(local, mesh.dp_group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = torch.tensor([result.loss], dtype=torch.float64)
        if dp > 1:
            dist.all_reduce(loss, group=mesh.dp_group)
            loss /= dp
        losses.append(loss.item())
        ref_loss = reference.loss(reference(inputs), targets)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_losses.append(ref_loss.item())
    # every parameter: the final weights reproduce the reference's logits through the same pipeline
    probe = torch.randint(0, VOCAB, (4, 16), generator=gen)
    forward = PipelineRuntime(
        get_schedule("forward-only", pp=pp, microbatches=2, vpp=plan.vpp),
        split,
        pp_group=mesh.pp_group,
        pp_ranks=mesh.pp_peers,
        timeout=60,
    )
    out = forward.step(probe, return_outputs=True).outputs
    logits_diff = None
    if out is not None:
        if tp_group is not None:
            shards = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(shards, out.contiguous(), group=tp_group)
            out = torch.cat(shards, dim=-1)[..., :VOCAB]
        with torch.no_grad():
            logits_diff = (out - reference(probe)).abs().max().item()
    return {"rank": dist.get_rank(), "losses": losses, "ref_losses": ref_losses, "logits_diff": logits_diff}


@pytest.mark.parametrize(
    "dp, pp, tp, family, schedule, recompute",
    [
        (1, 2, 2, "gpt", "1f1b", False),
        (2, 2, 1, "gpt", "zb-h1", False),
        (1, 2, 2, "llama", "interleaved-1f1b", True),
        (2, 1, 2, "llama", "gpipe", False),
    ],
)
def test_composed_parallelism_matches_one_process(pool4, dp, pp, tp, family, schedule, recompute):
    results = pool4.run(_train_composed, dp, pp, tp, family, schedule, 4, recompute, timeout=240)
    for r in results:
        assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-10, rel=1e-10), r
    assert results[0]["ref_losses"][-1] < results[0]["ref_losses"][0]  # it trains: a comparison that can fail
    diffs = [r["logits_diff"] for r in results if r["logits_diff"] is not None]
    assert len(diffs) == 4 // pp  # each last-stage rank checked the final weights through the pipeline
    assert max(diffs) < 1e-10
