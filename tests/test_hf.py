# Tests of pipeloom.models.hf: Hugging Face GPT-2 / Llama folders load into our model and back, same logits.
import json

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from pipeloom.models import Transformer, get_model_config  # noqa: E402 - after importorskip
from pipeloom.models.hf import config_from_hf, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402

VOCAB = 96


def random_tokens(B: int = 2, T: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)  # (B, T)


def hf_gpt2(tie: bool = True):
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return _randomize(transformers.GPT2LMHeadModel(config).eval())


def hf_llama(tie: bool = False, rope_scaling: dict | None = None, n_kv_heads: int = 2):
    torch.manual_seed(2)
    extra = (
        {"rope_scaling": {**rope_scaling, "rope_theta": 5000.0}} if rope_scaling else {"rope_theta": 5000.0}
    )
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
        **extra,
    )
    return _randomize(transformers.LlamaForCausalLM(config).eval())


def _randomize(model):
    """Norm weights and biases start at 1/0 in HF: make every tensor random so a mix-up cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def assert_same_logits(ours, theirs, tokens):
    """Both models in float64, same logits to 1e-10 on fresh random tokens."""
    ours, theirs = ours.double().eval(), theirs.double().eval()
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    assert a.shape == b.shape
    assert b.std() > 0.05  # not a degenerate model
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_import_and_export_match_transformers(tmp_path, tie):
    hf = hf_gpt2(tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    model, config = load_hf_checkpoint(tmp_path / "hf")
    assert (config.family, config.dim, config.n_layers, config.n_heads, config.tie_embeddings) == (
        "gpt",
        32,
        2,
        4,
        tie,
    )
    assert (model.head.out.weight is model.embed.tok.weight) == tie
    # float32 as loaded
    x = random_tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    assert_same_logits(model, hf, random_tokens(seed=4))
    save_hf_checkpoint(model, config, tmp_path / "ours")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours")
    assert_same_logits(model, back, random_tokens(seed=5))


@pytest.mark.parametrize("tie", [False, True])
def test_llama_gqa_import_and_export_match_transformers(tmp_path, tie):
    hf = hf_llama(tie=tie)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded: exercises the index file
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, config = load_hf_checkpoint(tmp_path / "hf")
    assert (config.family, config.n_heads, config.n_kv_heads, config.rope_theta, config.tie_embeddings) == (
        "llama",
        4,
        2,
        5000.0,
        tie,
    )
    assert (model.head.out.weight is model.embed.tok.weight) == tie
    assert_same_logits(model, hf, random_tokens(seed=6, T=40))
    save_hf_checkpoint(model, config, tmp_path / "ours", max_shard_bytes=40_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours")
    assert back.config.num_key_value_heads == 2
    assert_same_logits(model, back, random_tokens(seed=7, T=40))
    # And our own export reads back with our loader.
    again, again_config = load_hf_checkpoint(tmp_path / "ours")
    assert again_config == config
    assert_same_logits(again, back, random_tokens(seed=8))


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    hf = hf_llama(rope_scaling=scaling)
    hf.save_pretrained(tmp_path)
    model, config = load_hf_checkpoint(tmp_path)
    assert config.rope_scaling["factor"] == 8.0
    assert_same_logits(model, hf, random_tokens(seed=9, T=48))


def test_our_random_model_exports_to_transformers(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_model_config("llama-tiny", n_layers=2, vocab_size=VOCAB, bias=True))
    save_hf_checkpoint(model, model.config, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_logits(model, back, random_tokens(seed=10))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    with pytest.raises(
        ValueError, match=r"BertForMaskedLM.*supported: \['GPT2LMHeadModel', 'LlamaForCausalLM'\]"
    ):
        load_hf_checkpoint(tmp_path)

    hf = hf_llama()
    hf.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").rename(tmp_path / "llama" / "weights.bak")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_hf_checkpoint(tmp_path / "llama")
    (tmp_path / "llama" / "weights.bak").rename(tmp_path / "llama" / "model.safetensors")

    # A config that disagrees with the weights: the error names the tensor.
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(128, 64\)"
    ):
        load_hf_checkpoint(tmp_path / "llama")

    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf({**cfg, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        config_from_hf({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    gqa_gpt = Transformer(get_model_config("gpt-tiny", n_layers=1, n_kv_heads=2))
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        save_hf_checkpoint(gqa_gpt, None, tmp_path / "gqa")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_gpt2().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("h.1.mlp.c_fc.weight"))
    del tensors[name]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"h\.1\.mlp\.c_fc\.weight"):
        load_hf_checkpoint(tmp_path)


def test_export_rejects_a_sharded_model(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_model_config("llama-tiny", n_layers=1))
    model.blocks[0].attn.wq = torch.nn.Linear(64, 32, bias=False)  # half the query heads, as a TP shard holds
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.wq\.weight.*\(32, 64\).*\(64, 64\)"):
        save_hf_checkpoint(model, None, tmp_path)
