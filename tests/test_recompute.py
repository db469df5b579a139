# Activation recomputation changes no number (dropout on) and reduces what autograd saves; bytes reported.
import copy

import pytest
import torch
from pipeloom.models.config import ModelConfig
from pipeloom.models.transformer import Transformer
from pipeloom.parallel.apply import RecomputePolicy, SavedActivations, apply_recompute
from torch import nn

B, T = 2, 32


def _model(family):
    torch.manual_seed(0)
    config = ModelConfig(family=family, vocab_size=97, dim=32, n_layers=4, n_heads=4,
                         n_kv_heads=2 if family == "llama" else None, dropout=0.1, max_seq_len=64)
    return Transformer(config).double().train()  # dropout active: masks must be replayed exactly


def _run(model, tokens, targets):
    """Forward (counting saved activations) and backward with a fixed RNG seed."""
    torch.manual_seed(1234)
    with SavedActivations(model) as saved:
        logits = model(tokens)
    loss = model.loss(logits, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return saved.bytes, loss.detach(), grads


POLICIES = {
    "none": RecomputePolicy("none"),
    "full": RecomputePolicy("full"),
    "full/every 2": RecomputePolicy("full", every=2),
    "selective": RecomputePolicy("selective"),
    "selective/layers 1,3": RecomputePolicy("selective", layers=(1, 3)),
}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_recompute_is_exact_and_saves_less(family):
    base = _model(family)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 97, (B, T), generator=g)
    targets = torch.randint(0, 97, (B, T), generator=g)
    results = {}
    for name, policy in POLICIES.items():
        model = copy.deepcopy(base)
        chosen = apply_recompute(model, policy)
        results[name] = _run(model, tokens, targets)
        assert len(chosen) == {"none": 0, "full": 4, "full/every 2": 2, "selective": 4,
                               "selective/layers 1,3": 2}[name]

    ref_bytes, ref_loss, ref_grads = results["none"]
    print(f"\n{family}: saved-activation bytes, B={B} T={T} dim=32 4 layers float64")
    for name, (nbytes, loss, grads) in results.items():
        print(f"  {name:22s} {nbytes:9d} B  ({nbytes / ref_bytes:5.1%} of none)")
        assert torch.equal(loss, ref_loss), name  # bitwise: same ops, same dropout masks
        for n in ref_grads:
            assert torch.equal(grads[n], ref_grads[n]), (name, n)
    b = {name: r[0] for name, r in results.items()}
    assert b["full"] < b["full/every 2"] < b["none"]
    assert b["selective"] < b["selective/layers 1,3"] < b["none"]
    # Full recomputation keeps each block's input (B, T, D) instead of its intermediates: >5x less here.
    assert b["full"] * 5 < b["none"]
    # Every recomputing block saves the same amount: half the blocks, half the saving.
    assert b["none"] - b["full/every 2"] == (b["none"] - b["full"]) // 2


def test_dropout_masks_are_replayed():
    """Negative control: without RNG restoration the recomputed dropout masks differ, and so do gradients."""
    from torch.utils.checkpoint import checkpoint

    layer = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for preserve in (True, False):
        torch.manual_seed(0)
        checkpoint(layer, x, use_reentrant=False, preserve_rng_state=preserve).pow(2).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    torch.manual_seed(0)
    layer(x).pow(2).sum().backward()
    assert torch.equal(grads[0], x.grad) and not torch.equal(grads[1], x.grad)


def test_policy_is_removable_and_keeps_names():
    model = _model("gpt")
    keys = list(model.state_dict())
    apply_recompute(model, RecomputePolicy("full"))
    assert list(model.state_dict()) == keys
    assert all(b._pipeloom_recompute == "full" for b in model.blocks)
    apply_recompute(model, RecomputePolicy("selective", every=2))
    assert [b._pipeloom_recompute for b in model.blocks] == [None] * 4
    marks = [getattr(b.attn, "_pipeloom_recompute", None) for b in model.blocks]
    assert marks == ["selective", None, "selective", None]
    apply_recompute(model, RecomputePolicy("none"))
    assert all("forward" not in b.__dict__ and "forward" not in b.attn.__dict__ for b in model.blocks)
    with pytest.raises(ValueError, match="mode='some'"):
        RecomputePolicy("some")


def test_deepcopy_of_recomputing_model_runs_its_own_weights():
    model = _model("llama")
    apply_recompute(model, RecomputePolicy("full"))
    clone = copy.deepcopy(model)
    tokens = torch.randint(0, 97, (B, T))
    clone.loss(clone(tokens), tokens).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters())


def test_recompute_inside_a_pipeline_stage():
    """A stage is a slice of the model's layers; the policy applies to the blocks it holds."""
    model = _model("gpt").eval()  # no dropout: compare a stage against the same layers run plainly
    stage = nn.Sequential(*model.pipeline_layers()[1:4])  # blocks 0..2
    plain = copy.deepcopy(stage)
    assert apply_recompute(stage, RecomputePolicy("full", every=2)) == [0, 2]
    x = torch.randn(B, T, 32, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with SavedActivations(stage) as saved_stage:
        y_stage = stage(xs[0])
    with SavedActivations(plain) as saved_plain:
        y_plain = plain(xs[1])
    y_stage.sum().backward()
    y_plain.sum().backward()
    assert torch.equal(y_stage, y_plain) and torch.equal(xs[0].grad, xs[1].grad)
    assert saved_stage.bytes < saved_plain.bytes


def test_selective_refuses_attention_without_sdpa():
    """An attention core that is not F.scaled_dot_product_attention cannot be found: said, not ignored."""

    class ManualAttention(nn.Module):
        def forward(self, x):  # (B, T, D)
            return torch.softmax(x @ x.transpose(1, 2), -1) @ x

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = ManualAttention()

        def forward(self, x):
            return x + self.attn(x)

    stage = nn.Sequential(Block())
    apply_recompute(stage, RecomputePolicy("selective"))
    with pytest.raises(RuntimeError, match="no F.scaled_dot_product_attention call in ManualAttention.forward"):
        stage(torch.randn(1, 4, 8, requires_grad=True))
