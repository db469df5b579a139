# Tensor-parallel layers and a whole Transformer under apply_tp match their dense originals (tp=2, 4; gloo).
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pipeloom.models.config import ModelConfig
from pipeloom.models.transformer import Transformer
from pipeloom.parallel.apply import RecomputePolicy, apply_recompute, apply_tp
from pipeloom.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    sync_sequence_parallel_grads,
)
from torch import nn

EXACT = 1e-12  # float64: sharding reorders sums, nothing else


def _group(tp):
    """The tp group: the whole world, or ranks 0..tp-1 (created on every rank, as new_group requires)."""
    return None if tp == dist.get_world_size() else dist.new_group(list(range(tp)))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _rows(t, tp, rank, padded):
    """This rank's rows of ``t`` zero-padded to ``padded`` rows."""
    t = torch.cat([t, t.new_zeros((padded - t.shape[0],) + t.shape[1:])])
    return t.chunk(tp, 0)[rank]


class _MLP(nn.Module):
    """fc -> gelu -> proj: the column-then-row pair of arXiv 1909.08053 Fig. 3a."""

    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d, dtype=torch.float64)
        self.fc = nn.Linear(d, h, dtype=torch.float64)
        self.proj = nn.Linear(h, d, dtype=torch.float64)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(self.norm(x))))  # (B, T, D)


def _layers_worker(tp):
    group = _group(tp)
    rank = dist.get_rank()
    if rank >= tp:
        return None
    torch.manual_seed(0)  # identical dense layers and data on every rank
    diffs = {}

    # ColumnParallelLinear, output left sharded: (B, T, 12) -> (B, T, 16/tp)
    dense = nn.Linear(12, 16, dtype=torch.float64)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, 16, dtype=torch.float64)
    dense(x).backward(gy)
    col = ColumnParallelLinear.from_dense(dense, group)
    xt = x.detach().clone().requires_grad_(True)
    y = col(xt)
    y.backward(gy.chunk(tp, -1)[rank])
    diffs["column.out"] = _max_diff(y, dense(x).chunk(tp, -1)[rank])
    diffs["column.dW"] = _max_diff(col.weight.grad, dense.weight.grad.chunk(tp, 0)[rank])
    diffs["column.db"] = _max_diff(col.bias.grad, dense.bias.grad.chunk(tp, 0)[rank])
    diffs["column.dx"] = _max_diff(xt.grad, x.grad)  # all-reduced by copy_to_tp's backward

    # ColumnParallelLinear gathering its output, width 18 not divisible by 4: padded, gathered, cropped
    dense = nn.Linear(12, 18, dtype=torch.float64)
    x.grad = None
    dense(x).backward(gy.new_ones(3, 5, 18))
    col = ColumnParallelLinear.from_dense(dense, group, gather_output=True, pad_to_tp=True)
    xt = x.detach().clone().requires_grad_(True)
    y = col(xt)
    y.backward(gy.new_ones(3, 5, 18))
    diffs["column_gather.out"] = _max_diff(y, dense(x))
    diffs["column_gather.dW"] = _max_diff(col.weight.grad, _rows(dense.weight.grad, tp, rank, col.padded_out_features))
    diffs["column_gather.dx"] = _max_diff(xt.grad, x.grad)

    # RowParallelLinear, input already split: (B, T, 16/tp) -> (B, T, 10)
    for parallel_input in (True, False):
        dense = nn.Linear(16, 10, dtype=torch.float64)
        x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(3, 5, 10, dtype=torch.float64)
        dense(x).backward(gy)
        row = RowParallelLinear.from_dense(dense, group, input_is_parallel=parallel_input)
        xt = (x.detach().chunk(tp, -1)[rank] if parallel_input else x.detach()).clone().requires_grad_(True)
        y = row(xt)
        y.backward(gy)
        name = "row" if parallel_input else "row_split_here"
        diffs[f"{name}.out"] = _max_diff(y, dense(x))
        diffs[f"{name}.dW"] = _max_diff(row.weight.grad, dense.weight.grad.chunk(tp, 1)[rank])
        diffs[f"{name}.db"] = _max_diff(row.bias.grad, dense.bias.grad)
        diffs[f"{name}.dx"] = _max_diff(xt.grad, x.grad.chunk(tp, -1)[rank] if parallel_input else x.grad)

    # VocabParallelEmbedding, vocabulary 37 (prime): padded rows, masked lookups, all-reduced output
    dense = nn.Embedding(37, 8, dtype=torch.float64)
    ids = torch.randint(0, 37, (3, 5))
    gy = torch.randn(3, 5, 8, dtype=torch.float64)
    dense(ids).backward(gy)
    emb = VocabParallelEmbedding.from_dense(dense, group)
    y = emb(ids)
    y.backward(gy)
    diffs["embedding.out"] = _max_diff(y, dense(ids))
    diffs["embedding.dW"] = _max_diff(emb.weight.grad, _rows(dense.weight.grad, tp, rank, emb.padded_num_embeddings))

    # ... and with sequence parallelism: the lookups reduce-scattered to this rank's slice of the sequence
    ids = torch.randint(0, 37, (3, 8))
    dense.zero_grad()
    dense(ids).backward(gy.new_ones(3, 8, 8))
    emb = VocabParallelEmbedding.from_dense(dense, group, sequence_parallel=True)
    y = emb(ids)  # (B, T/tp, D)
    y.backward(gy.new_ones(3, 8 // tp, 8))
    diffs["embedding_sp.out"] = _max_diff(y, dense(ids).chunk(tp, 1)[rank])
    diffs["embedding_sp.dW"] = _max_diff(emb.weight.grad, _rows(dense.weight.grad, tp, rank, emb.padded_num_embeddings))

    # Megatron MLP (column then row), without and with sequence parallelism: (B, T, 12) -> (B, T, 12)
    for sp in (False, True):
        dense = _MLP(12, 16)
        for p in dense.norm.parameters():
            nn.init.normal_(p)  # not the identity norm, so its gradients are tested
        x = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(2, 8, 12, dtype=torch.float64)
        y_dense = dense(x)
        y_dense.backward(gy)
        mlp = copy.deepcopy(dense)
        mlp.fc = ColumnParallelLinear.from_dense(dense.fc, group, sequence_parallel=sp)
        mlp.proj = RowParallelLinear.from_dense(dense.proj, group, sequence_parallel=sp)
        mlp.zero_grad()
        if sp:
            for p in mlp.norm.parameters():
                p.sequence_parallel = True
            xt = x.detach().chunk(tp, 1)[rank].clone().requires_grad_(True)  # (B, T/tp, 12)
            y = mlp(xt)  # (B, T/tp, 12)
            y.backward(gy.chunk(tp, 1)[rank])
            assert sync_sequence_parallel_grads(mlp, group) == 3  # norm weight, norm bias, proj bias
            want_y, want_dx = y_dense.chunk(tp, 1)[rank], x.grad.chunk(tp, 1)[rank]
        else:
            xt = x.detach().clone().requires_grad_(True)
            y = mlp(xt)
            y.backward(gy)
            want_y, want_dx = y_dense, x.grad
        name = "mlp_sp" if sp else "mlp"
        diffs[f"{name}.out"] = _max_diff(y, want_y)
        diffs[f"{name}.dx"] = _max_diff(xt.grad, want_dx)
        diffs[f"{name}.fc.dW"] = _max_diff(mlp.fc.weight.grad, dense.fc.weight.grad.chunk(tp, 0)[rank])
        diffs[f"{name}.proj.dW"] = _max_diff(mlp.proj.weight.grad, dense.proj.weight.grad.chunk(tp, 1)[rank])
        diffs[f"{name}.proj.db"] = _max_diff(mlp.proj.bias.grad, dense.proj.bias.grad)
        diffs[f"{name}.norm.dW"] = _max_diff(mlp.norm.weight.grad, dense.norm.weight.grad)
    return diffs


@pytest.mark.parametrize("tp", [2, 4])
def test_layers_match_dense(pool2, pool4, tp):
    results = (pool2 if tp == 2 else pool4).run(_layers_worker, tp)
    for rank, diffs in enumerate(results):
        bad = {k: v for k, v in diffs.items() if not v <= EXACT}
        assert not bad, f"rank {rank}: {bad}"


def _config(family, tp):
    if family == "gpt":  # LayerNorm, learned positions, GELU, biases, tied head
        return ModelConfig(family="gpt", vocab_size=37, dim=32, n_layers=2, n_heads=4, max_seq_len=16)
    # RMSNorm, RoPE, SwiGLU, grouped-query attention (kv heads divisible by tp), untied head
    return ModelConfig(family="llama", vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2 if tp == 2 else 4,
                       ffn_hidden=48, max_seq_len=16)


def _full_grad(model, name, grad, group, tp):
    """The dense-shaped gradient of a (possibly sharded) parameter: all-gather shards, crop padding."""
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(owner, (ColumnParallelLinear, VocabParallelEmbedding)):
        dim = 0
    elif isinstance(owner, RowParallelLinear) and name.endswith("weight"):
        dim = 1
    else:
        return grad
    parts = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(parts, grad.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _model_worker(family, tp, sequence_parallel, recompute, gather_logits):
    group = _group(tp)
    rank = dist.get_rank()
    if rank >= tp:
        return None
    torch.manual_seed(0)
    dense = Transformer(_config(family, tp)).double()
    model = apply_tp(copy.deepcopy(dense), group, sequence_parallel=sequence_parallel, gather_logits=gather_logits)
    if recompute:
        apply_recompute(model, RecomputePolicy("full"))
    tokens = torch.randint(0, 37, (2, 8))  # (B, T)
    targets = torch.randint(0, 37, (2, 8))
    targets[0, :3] = -100

    logits = dense(tokens)  # (B, T, V)
    loss = dense.loss(logits, targets)
    loss.backward()
    out = model(tokens)  # (B, T, ceil(V/tp)) vocab shard, or (B, T, V) gathered
    tp_loss = model.loss(out, targets) if not gather_logits else F.cross_entropy(out.flatten(0, 1), targets.flatten())
    tp_loss.backward()
    if sequence_parallel:
        sync_sequence_parallel_grads(model, group)

    vp = model.head.out.local_out_features
    want = logits if gather_logits else _rows(logits.movedim(-1, 0), tp, rank, vp * tp).movedim(0, -1)
    diffs = {"loss": abs(tp_loss.item() - loss.item()), "logits": _max_diff(out, want)}
    dense_grads = dict(dense.named_parameters())
    names = []
    for name, p in model.named_parameters():
        full = _full_grad(model, name, p.grad, group, tp)
        ref = dense_grads[name].grad
        diffs[name] = _max_diff(full[: ref.shape[0]], ref)
        names.append(name)
    assert sorted(names) == sorted(dense_grads), "apply_tp keeps parameter names"
    return diffs


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("tp,sequence_parallel,recompute,gather_logits", [
    (2, False, False, False),
    (2, True, False, False),
    (2, False, True, True),
    (4, False, False, False),
    (4, True, True, False),
])
def test_transformer_under_tp_matches_dense(pool2, pool4, family, tp, sequence_parallel, recompute, gather_logits):
    """Loss, logits and every parameter's gradient of the TP model equal the dense model's (float64)."""
    results = (pool2 if tp == 2 else pool4).run(_model_worker, family, tp, sequence_parallel, recompute, gather_logits)
    for rank, diffs in enumerate(results):
        assert len(diffs) > 10
        bad = {k: v for k, v in diffs.items() if not v <= 1e-11}
        assert not bad, f"rank {rank}: {bad}"


def _refuse_worker():
    model = Transformer(ModelConfig(family="llama", vocab_size=37, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=48, max_seq_len=16))
    try:
        apply_tp(model, None)
    except ValueError as e:
        return str(e)
    return None


def test_apply_tp_refuses_tp_not_dividing_heads(pool4):
    messages = pool4.run(_refuse_worker)
    assert all(m is not None and "tp=4 does not divide n_kv_heads=2" in m for m in messages), messages


def _sp_bad_seq_worker():
    torch.manual_seed(0)
    model = apply_tp(Transformer(_config("gpt", 2)), None, sequence_parallel=True)
    try:
        model(torch.randint(0, 37, (1, 7)))
    except ValueError as e:
        return str(e)
    return None


def test_sequence_parallel_refuses_indivisible_sequence(pool2):
    assert all("size 7 into tp=2" in m for m in pool2.run(_sp_bad_seq_worker))


# ----- dropout under tp: replicated activations share masks, sharded ones draw their own, recompute replays both
def _dropout_step(family, tp, sequence_parallel, recompute, group):
    """One training step of a tp model with dropout 0.25 from fixed RNG states; (loss, grads, default RNG)."""
    import pipeloom.parallel.apply as apply_module

    torch.manual_seed(0)
    config = _config(family, tp).replace(dropout=0.25)
    model = apply_tp(Transformer(config).double(), group, sequence_parallel=sequence_parallel, rng_seed=5)
    if recompute == "full-no-replay":  # the control: recompute without replaying the sharded streams
        apply_recompute(model, RecomputePolicy("full"))
        saved, apply_module._sharded_streams = apply_module._sharded_streams, lambda module: []
    elif recompute:
        apply_recompute(model, RecomputePolicy(recompute))
    model.train()
    torch.manual_seed(1)
    tokens, targets = torch.randint(0, 37, (2, 8)), torch.randint(0, 37, (2, 8))
    try:
        loss = model.loss(model(tokens), targets)
        loss.backward()
    finally:
        if recompute == "full-no-replay":
            apply_module._sharded_streams = saved
    if sequence_parallel:
        sync_sequence_parallel_grads(model, group)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stream = model.blocks[0].attn.sharded_rng.get_state()["cpu"]
    return loss.item(), grads, torch.get_rng_state(), stream


def _dropout_worker(family, sequence_parallel):
    group = _group(2)
    ref = _dropout_step(family, 2, sequence_parallel, None, group)
    out = {"loss": ref[0]}
    for mode in ("full", "selective", "full-no-replay"):
        loss, grads, _, _ = _dropout_step(family, 2, sequence_parallel, mode, group)
        out[mode] = max([abs(loss - ref[0])] + [_max_diff(grads[n], ref[1][n]) for n in ref[1]])
    # Replicated regions consumed the default generator alike on both ranks; the sharded streams differ.
    states = [torch.empty_like(ref[2]) for _ in range(2)]
    dist.all_gather(states, ref[2], group=group)
    streams = [torch.empty_like(ref[3]) for _ in range(2)]
    dist.all_gather(streams, ref[3], group=group)
    out["default_rng_equal"] = torch.equal(states[0], states[1])
    out["streams_differ"] = not torch.equal(streams[0], streams[1])
    return out


@pytest.mark.parametrize("family,sequence_parallel", [("gpt", False), ("llama", True)])
def test_dropout_under_tp_and_its_recomputation(pool2, family, sequence_parallel):
    for rank, r in enumerate(pool2.run(_dropout_worker, family, sequence_parallel)):
        assert r["default_rng_equal"], f"rank {rank}: the tp ranks' default generators drifted apart"
        assert r["streams_differ"], f"rank {rank}: sharded activations drew the same dropout stream on both ranks"
        assert r["full"] == 0.0 and r["selective"] == 0.0, (rank, r)  # recompute replays every mask exactly
        assert r["full-no-replay"] > 1e-6, (rank, r)  # without replaying the sharded streams, masks differ


def test_sharded_rng_fork_keeps_the_default_stream_and_checkpoints_restore_it():
    from pipeloom.parallel.rng import (
        ShardedDropout,
        ShardedRNG,
        StreamMismatch,
        find_streams,
        set_stream_states,
        stream_states,
    )

    torch.manual_seed(3)
    expected_default = torch.rand(4)  # what the default generator draws next, without any fork
    torch.manual_seed(3)
    rng = ShardedRNG.for_rank(1, base_seed=10)
    assert rng.seed == 10 + 2718 + 1
    with rng.fork("cpu"):
        first = torch.rand(4)
    assert torch.equal(torch.rand(4), expected_default), "a fork must not consume the default stream"
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(rng.seed)))
    holder = torch.nn.Sequential(ShardedDropout(0.5, rng), ShardedDropout(0.5, rng))
    streams = find_streams([holder])  # one stream, found through the modules that draw from it
    assert streams == {rng.name: rng}
    saved = stream_states(streams)  # as a checkpoint saves them
    assert saved[rng.name]["seed"] == rng.seed
    with rng.fork("cpu"):
        after = torch.rand(4)
    set_stream_states(streams, saved)
    with rng.fork("cpu"):
        assert torch.equal(torch.rand(4), after), "restored streams draw the same numbers again"
    set_stream_states(streams, [saved[rng.name]])  # an older checkpoint's list: one stream is unambiguous
    with pytest.raises(StreamMismatch, match="'extra' is in the saved states but not in this model"):
        set_stream_states(streams, {**saved, "extra": saved[rng.name]})
    holder.append(ShardedDropout(0.5, ShardedRNG(5)))  # another stream under the same (default) name
    with pytest.raises(StreamMismatch, match=f"two different dropout streams are named {rng.name!r}"):
        find_streams([holder])
