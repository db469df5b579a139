# Vocab-parallel cross-entropy equals F.cross_entropy (loss and gradient) on tp=1, 2 and 4 gloo ranks.
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pipeloom.kernels.cross_entropy import cross_entropy_stats
from pipeloom.parallel.cross_entropy import vocab_parallel_cross_entropy

# (vocab_size, ignore_fraction, label_smoothing, reduction, dtype, scale, shift)
CASES = [
    (37, 0.0, 0.0, "mean", torch.float64, 3.0, 0.0),  # 37 = prime: padded for tp=2 and tp=4
    (37, 0.3, 0.0, "mean", torch.float64, 3.0, 0.0),  # ignore_index
    (37, 0.3, 0.1, "mean", torch.float64, 3.0, 0.0),  # label smoothing with ignore_index
    (40, 0.2, 0.2, "sum", torch.float64, 3.0, 0.0),  # divisible
    (5, 0.2, 0.1, "none", torch.float64, 3.0, 0.0),  # tp=4: the last shard is all padding
    (37, 0.1, 0.1, "mean", torch.float32, 30.0, 1000.0),  # large logits: exp(1000) overflows without max-subtraction
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _data(case, seed=0):
    vocab, ignore, _, _, dtype, scale, shift = case
    g = torch.Generator().manual_seed(seed + vocab)
    logits = (torch.randn(6, 5, vocab, generator=g, dtype=torch.float64) * scale + shift).to(dtype)  # (B, T, V)
    target = torch.randint(0, vocab, (6, 5), generator=g)  # (B, T)
    target[torch.rand(6, 5, generator=g) < ignore] = -100
    return logits, target


def _shard(logits, tp, rank):
    vp = math.ceil(logits.shape[-1] / tp)
    padded = F.pad(logits, (0, vp * tp - logits.shape[-1]), value=-7.0)  # pad value must not matter
    return padded[..., rank * vp:(rank + 1) * vp]


def _dense(case):
    logits, target = _data(case)
    logits.requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, label_smoothing=case[2],
                           reduction=case[3])
    loss = loss.view(target.shape) if case[3] == "none" else loss
    loss.backward(torch.ones_like(loss))
    return loss.detach(), logits.grad


def _ce_worker(cases, tp):
    """Each rank: its shard of the logits -> loss and the gradient of its shard (group = the first tp ranks)."""
    group = dist.new_group(list(range(tp))) if tp != dist.get_world_size() else None
    rank = dist.get_rank()
    if rank >= tp:
        return None
    out = []
    for case in cases:
        logits, target = _data(case)
        shard = _shard(logits, tp, rank).detach().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(shard, target, group, vocab_size=case[0], label_smoothing=case[2],
                                            reduction=case[3])
        loss.backward(torch.ones_like(loss))
        out.append((loss.detach(), shard.grad))
    return out


def _check(results, tp):
    for i, case in enumerate(CASES):
        want_loss, want_grad = _dense(case)
        vp = math.ceil(case[0] / tp)
        grads = [results[r][i][1] for r in range(tp)]
        for r in range(tp):
            atol = TOL[case[4]] * max(1, want_loss.abs().max())
            got = results[r][i][0]
            assert torch.allclose(got, want_loss, rtol=0, atol=atol), (case, r, got, want_loss)
        full = torch.cat(grads, dim=-1)  # (B, T, vp*tp)
        assert full.shape[-1] == vp * tp
        assert torch.equal(full[..., case[0]:], torch.zeros_like(full[..., case[0]:])), "padding columns get grad 0"
        diff = (full[..., :case[0]] - want_grad).abs().max().item()
        assert diff <= TOL[case[4]], (case, diff)


def test_single_rank_matches_torch():
    out = []
    for case in CASES:
        logits, target = _data(case)
        logits = logits.detach().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(logits, target, None, label_smoothing=case[2], reduction=case[3])
        loss.backward(torch.ones_like(loss))
        out.append((loss.detach(), logits.grad))
    _check([out], 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_torch(pool2, pool4, tp):
    pool = pool2 if tp == 2 else pool4
    _check(pool.run(_ce_worker, CASES, tp), tp)


def test_tp2_subgroup_of_four_ranks(pool4):
    """The tp group may be a subgroup: ranks 0-1 of a 4-rank world."""
    _check(pool4.run(_ce_worker, CASES, 2), 2)


def test_local_stats_of_shards_combine_to_the_full_logsumexp():
    """The local piece (the fused kernel's cross_entropy_stats) per shard, combined as the ranks do."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 10, generator=g, dtype=torch.float64) * 5  # (N, V), V=10 in 3 shards of 4 (2 padding)
    target = torch.tensor([2, 9, -1, 5])
    shards = F.pad(z, (0, 2)).split(4, dim=-1)
    stats = [cross_entropy_stats(s, target, v_start=4 * r, v_end=min(4 * r + 4, 10)) for r, s in enumerate(shards)]
    m = torch.stack([s.row_max for s in stats]).max(0).values  # all-reduce MAX
    sum_exp = sum(s.sum_exp * torch.exp(s.row_max - m) for s in stats)  # all-reduce SUM of rescaled sums
    assert torch.allclose(m + sum_exp.log(), z.logsumexp(-1), rtol=0, atol=1e-14)
    assert torch.equal(sum(s.target_logit for s in stats), torch.tensor([z[0, 2], z[1, 9], 0.0, z[3, 5]]))
    assert torch.allclose(sum(s.sum_logits for s in stats), z.sum(-1), rtol=0, atol=1e-13)


def test_refuses_bad_arguments():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="reduction='avg'"):
        vocab_parallel_cross_entropy(z, torch.zeros(3, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match=r"target shape \(4,\) must be logits shape \(3, 4\)"):
        vocab_parallel_cross_entropy(z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size=9"):
        vocab_parallel_cross_entropy(z, torch.zeros(3, dtype=torch.long), vocab_size=9)
