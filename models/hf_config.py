# Hugging Face config.json <-> ModelConfig for GPT2LMHeadModel and LlamaForCausalLM.
"""Translate Hugging Face ``config.json`` dicts to and from :class:`~pipeloom.models.config.ModelConfig`.

Only the options our layers implement are accepted; anything else raises ``ValueError`` naming the option.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ModelConfig

SUPPORTED_ARCHITECTURES = {"GPT2LMHeadModel": "gpt", "LlamaForCausalLM": "llama"}
_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def architecture_of(hf_config: dict[str, Any]) -> str:
    """The supported architecture named by ``config.json`` (``architectures``, else ``model_type``)."""
    names = hf_config.get("architectures") or []
    if not names and hf_config.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ValueError(
        f"unsupported architectures={names!r} (model_type={hf_config.get('model_type')!r}); "
        f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
    )


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig for a Hugging Face ``config.json`` dict (dropout 0 unless overridden)."""
    arch = architecture_of(hf_config)
    c = hf_config
    if arch == "GPT2LMHeadModel":
        act = c.get("activation_function", "gelu_new")
        acts = {
            "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_fast": "gelu_tanh",
            "gelu": "gelu",
        }
        if act not in acts:
            raise ValueError(f"GPT-2 activation_function={act!r} is not supported; supported: {sorted(acts)}")
        for key, ok in (
            ("scale_attn_by_inverse_layer_idx", False),
            ("scale_attn_weights", True),
            ("add_cross_attention", False),
        ):
            if c.get(key, ok) != ok:
                raise ValueError(f"GPT-2 option {key}={c[key]!r} is not supported (need {ok})")
        fields = {
            "family": "gpt",
            "vocab_size": c["vocab_size"],
            "dim": c["n_embd"],
            "n_layers": c["n_layer"],
            "n_heads": c["n_head"],
            "ffn_hidden": c.get("n_inner") or 4 * c["n_embd"],
            "max_seq_len": c["n_positions"],
            "norm_eps": c.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": c.get("tie_word_embeddings", True),
            "bias": True,
            "activation": acts[act],
        }
    else:
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama hidden_act={c['hidden_act']!r} is not supported (need 'silu')")
        attn_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
        if attn_bias != mlp_bias:
            raise ValueError(
                f"Llama attention_bias={attn_bias} and mlp_bias={mlp_bias} differ; pipeloom has one "
                "`bias` switch for both"
            )
        head_dim = c.get("head_dim")
        if head_dim is not None and head_dim != c["hidden_size"] // c["num_attention_heads"]:
            raise ValueError(
                f"Llama head_dim={head_dim} differs from hidden_size/num_attention_heads="
                f"{c['hidden_size'] // c['num_attention_heads']}; not supported"
            )
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"Llama rope_type={rope_type!r} is not supported; supported: ['default', 'llama3']"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (need 1.0)"
            )
        fields = {
            "family": "llama",
            "vocab_size": c["vocab_size"],
            "dim": c["hidden_size"],
            "n_layers": c["num_hidden_layers"],
            "n_heads": c["num_attention_heads"],
            "n_kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
            "ffn_hidden": c["intermediate_size"],
            "max_seq_len": c.get("max_position_embeddings", 2048),
            "norm_eps": c.get("rms_norm_eps", 1e-6),
            "rope_theta": float(rope_theta),
            "rope_scaling": rope if rope_type == "llama3" else None,
            "tie_embeddings": c.get("tie_word_embeddings", False),
            "bias": attn_bias,
        }
    return ModelConfig(**{"dropout": 0.0, **fields, **overrides})


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for our config (GPT2LMHeadModel or LlamaForCausalLM)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if config.family == "gpt":
        if config.n_kv_heads != config.n_heads:
            raise ValueError(
                f"GPT-2 has no grouped-query attention: n_kv_heads={config.n_kv_heads} != "
                f"n_heads={config.n_heads}; export as family 'llama' instead"
            )
        eos = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocab has it
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_embd": config.dim,
            "n_layer": config.n_layers,
            "n_head": config.n_heads,
            "n_inner": config.ffn_hidden,
            "n_positions": config.max_seq_len,
            "n_ctx": config.max_seq_len,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
            "tie_word_embeddings": config.tie_embeddings,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
        }
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(config.rope_scaling)  # the pre-v5 key; transformers v5 still reads it
    return out
