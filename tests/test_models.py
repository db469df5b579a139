# Tests of pipeloom.models: config validation, structure contract, per-head attention, init, causality.
import copy

import pytest
import torch
from pipeloom.models import (
    Attention,
    ModelConfig,
    Transformer,
    cross_entropy_loss,
    get_model_config,
    model_config_names,
)
from torch import nn

FAMILIES = ["gpt-tiny", "llama-tiny"]


def build(name: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_model_config(name, n_layers=2, **overrides)).double().eval()


def tokens(config: ModelConfig, B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T), generator=g)  # (B, T)


# ----------------------------------------------------------------------------- config


def test_config_validation_names_the_values():
    with pytest.raises(ValueError, match=r"dim=100 is not divisible by n_heads=3"):
        ModelConfig(family="gpt", dim=100, n_heads=3)
    with pytest.raises(ValueError, match=r"n_heads=6 is not divisible by n_kv_heads=4"):
        ModelConfig(family="llama", dim=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"family='bert'"):
        ModelConfig(family="bert")
    with pytest.raises(ValueError, match=r"n_layers=0"):
        ModelConfig(n_layers=0)
    with pytest.raises(ValueError, match=r"dropout=1.5"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"activation='silu'.*family='gpt'"):
        ModelConfig(family="gpt", activation="silu")


def test_registry_sizes_and_errors():
    assert {"gpt-tiny", "llama-tiny", "gpt-small", "gpt2-124m", "gpt-1.3b", "llama-1b"} <= set(
        model_config_names()
    )
    small = get_model_config("gpt2-124m")
    assert (small.n_layers, small.dim, small.max_seq_len, small.vocab_size) == (12, 768, 1024, 50304)
    big = get_model_config("gpt-1.3b")
    assert (big.n_layers, big.dim, big.max_seq_len) == (24, 2048, 2048)
    with pytest.raises(KeyError, match=r"gpt-huge.*valid names:.*gpt-tiny.*llama-tiny"):
        get_model_config("gpt-huge")
    with pytest.raises(TypeError, match=r"n_layer"):
        get_model_config("gpt-tiny", n_layer=3)
    # Derived defaults follow overrides; explicit overrides win.
    assert get_model_config("gpt-tiny", dim=128).ffn_hidden == 512
    assert get_model_config("llama-tiny", n_layers=3).n_layers == 3
    llama = ModelConfig(family="llama", vocab_size=256, dim=64, n_heads=4)
    assert (llama.n_kv_heads, llama.tie_embeddings, llama.bias, llama.ffn_hidden) == (4, False, False, 256)


def test_gpt_small_parameter_count_matches_nanogpt():
    with torch.device("meta"):
        model = Transformer(get_model_config("gpt2-124m", vocab_size=50257))
    # nanoGPT reports 123.65M for GPT-2 124M, excluding the position table (1024 * 768).
    assert model.num_params(exclude_embeddings=True) == 123_653_376
    assert model.num_params() == 123_653_376 + 1024 * 768
    N, L, D, T = 123_653_376, 12, 768, 1024
    assert model.flops_per_token(T) == 6 * N + 12 * L * D * T


# ----------------------------------------------------------------------------- structure contract


@pytest.mark.parametrize("name", FAMILIES)
def test_pipeline_layers_sequential_equals_forward(name):
    model = build(name)
    x = tokens(model.config)
    layers = model.pipeline_layers()
    assert layers[0] is model.embed and layers[-1] is model.head and len(layers) == model.config.n_layers + 2
    logits = model(x)
    assert logits.shape == (2, 24, model.config.vocab_size)
    torch.testing.assert_close(nn.Sequential(*layers)(x), logits, rtol=0, atol=0)
    # Split into two stages at an arbitrary cut, as the pipeline runtime does.
    h = nn.Sequential(*layers[:2])(x)
    assert h.shape == (2, 24, model.config.dim)
    torch.testing.assert_close(nn.Sequential(*layers[2:])(h), logits, rtol=0, atol=0)


def test_tied_and_untied_heads():
    gpt = build("gpt-tiny")
    assert gpt.head.out.weight is gpt.embed.tok.weight
    assert sum(p is gpt.embed.tok.weight for p in gpt.parameters()) == 1
    llama = build("llama-tiny")
    assert llama.head.out.weight is not llama.embed.tok.weight
    tied = build("llama-tiny", tie_embeddings=True)
    assert tied.head.out.weight is tied.embed.tok.weight
    # After a meta-device build and to_empty, init_weights re-ties and fills everything.
    with torch.device("meta"):
        meta = Transformer(get_model_config("gpt-tiny", n_layers=2))
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    assert meta.head.out.weight is meta.embed.tok.weight
    torch.testing.assert_close(
        meta.double().eval()(tokens(meta.config)), build("gpt-tiny")(tokens(meta.config))
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_init_is_deterministic_and_gpt2_scaled(name):
    a, b, c = build(name, seed=3), build(name, seed=3), build(name, seed=4)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k
    assert not torch.equal(a.blocks[0].attn.wq.weight, c.blocks[0].attn.wq.weight)
    big = Transformer(get_model_config(name, dim=256, n_heads=4, n_layers=8))
    down = big.blocks[0].mlp.proj if name == "gpt-tiny" else big.blocks[0].mlp.w2
    for w, std in (
        (big.blocks[0].attn.wq.weight, 0.02),
        (big.blocks[0].attn.wo.weight, 0.02 / 4),
        (down.weight, 0.02 / 4),
    ):  # 1 / sqrt(2 * 8) = 1/4
        assert abs(w.std().item() - std) < 0.1 * std


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_future_token_does_not_change_earlier_logits(name):
    model = build(name)
    x = tokens(model.config, T=32)
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1 + torch.randint(0, 100, (2,))) % model.config.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-12)
    assert (a[:, 20:] - b[:, 20:]).abs().amax() > 1e-4


def test_sequence_longer_than_max_seq_len_is_named():
    model = build("gpt-tiny", max_seq_len=16)
    with pytest.raises(ValueError, match=r"sequence length 20 exceeds max_seq_len=16"):
        model(tokens(model.config, T=20))


# ----------------------------------------------------------------------------- tensor-parallel head slices


def _narrow(linear: nn.Linear, rows: slice | None = None, cols: slice | None = None) -> nn.Linear:
    """A Linear holding rows (out features) or columns (in features) of ``linear``: a TP shard."""
    w = linear.weight[rows] if rows is not None else linear.weight[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None and rows is not None).double()
    with torch.no_grad():
        out.weight.copy_(w)
        if out.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out


@pytest.mark.parametrize(
    "name,n_heads,n_kv_heads,tp",
    [
        ("gpt-tiny", 4, 4, 2),
        ("llama-tiny", 4, 2, 2),
        ("llama-tiny", 8, 4, 4),
        ("llama-tiny", 8, 2, 2),
    ],
)
def test_attention_runs_a_slice_of_heads(name, n_heads, n_kv_heads, tp):
    """Column-shard wq/wk/wv by heads, row-shard wo: each shard's pre-wo output is its slice of the full
    one, and the shards' outputs sum to the full attention output (Megatron-LM, arXiv 1909.08053 §3)."""
    config = get_model_config(name, n_heads=n_heads, n_kv_heads=n_kv_heads, dim=64, bias=True)
    torch.manual_seed(0)
    full = Attention(config).double().eval()
    with torch.no_grad():  # random biases too, so a wrongly sliced bias shows up
        for lin in (full.wq, full.wk, full.wv, full.wo):
            if lin.bias is not None:
                lin.bias.normal_()
    x = torch.randn(2, 12, config.dim, dtype=torch.float64)  # (B, T, D)
    hd = config.head_dim
    ref = full(x)
    probe = copy.deepcopy(full)
    probe.wo = nn.Identity()
    ref_heads = probe(x)  # (B, T, Hq*hd), before wo
    q_per, kv_per = config.n_heads // tp, config.n_kv_heads // tp
    total = torch.zeros_like(ref)
    for r in range(tp):
        qs, kvs = slice(r * q_per * hd, (r + 1) * q_per * hd), slice(r * kv_per * hd, (r + 1) * kv_per * hd)
        shard = copy.deepcopy(full)
        shard.wq, shard.wk, shard.wv = (
            _narrow(full.wq, rows=qs),
            _narrow(full.wk, rows=kvs),
            _narrow(full.wv, rows=kvs),
        )
        shard.wo = nn.Identity()
        torch.testing.assert_close(shard(x), ref_heads[..., qs], rtol=1e-12, atol=1e-12)
        shard.wo = _narrow(full.wo, cols=qs)  # row-parallel: input columns of this shard, no bias
        total += shard(x)
    if full.wo.bias is not None:
        total += full.wo.bias
    torch.testing.assert_close(total, ref, rtol=1e-12, atol=1e-12)


def test_attention_rejects_heads_not_grouped():
    config = get_model_config("llama-tiny", n_heads=4, n_kv_heads=2)
    attn = Attention(config)
    attn.wk = nn.Linear(config.dim, 3 * config.head_dim, bias=False)  # 3 kv heads for 4 query heads
    attn.wv = nn.Linear(config.dim, 3 * config.head_dim, bias=False)
    with pytest.raises(ValueError, match=r"4 query heads but 3 key/value heads"):
        attn(torch.randn(1, 5, config.dim))


# ----------------------------------------------------------------------------- loss and training


def test_loss_ignores_index_and_trains():
    torch.manual_seed(0)
    model = Transformer(get_model_config("llama-tiny", n_layers=2))
    x = tokens(model.config, B=4, T=16)
    targets = x.roll(-1, dims=1)
    targets[:, -1] = -100
    logits = model(x)
    manual = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), targets[:, :-1].reshape(-1))
    torch.testing.assert_close(cross_entropy_loss(logits, targets), manual)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(10):
        loss = model.loss(model(x), targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_only_in_training():
    model = build("llama-tiny", dropout=0.3)
    x = tokens(model.config)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # eval: deterministic
    model.train()
    assert (model(x) - model(x)).abs().amax() > 1e-3
