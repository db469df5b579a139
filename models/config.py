# Model hyperparameters: the validated ModelConfig dataclass and the registry of named sizes.
"""One dataclass describes every model pipeloom builds, GPT-2 style or Llama style.

Fields left as ``None`` are filled in ``__post_init__`` from the family (GPT-2 or Llama conventions),
so ``ModelConfig(family="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4)`` is complete. Bad
values raise ``ValueError`` naming the field and the number.

Named sizes live in :data:`MODEL_CONFIGS`; :func:`get_model_config` returns one, with overrides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

FAMILIES = ("gpt", "llama")
ACTIVATIONS = {"gpt": ("gelu_tanh", "gelu"), "llama": ("silu",)}


def llama_ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim (same parameter count as a 4*dim GELU MLP), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and conventions of a decoder-only transformer.

    ``family="gpt"``: LayerNorm, learned positions, GELU MLP, biases, tied embeddings (GPT-2).
    ``family="llama"``: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases.
    """

    family: str = "gpt"  # "gpt" or "llama"
    vocab_size: int = 256  # number of token ids (rows of the embedding)
    dim: int = 64  # model width D (residual stream)
    n_layers: int = 2  # number of transformer blocks L
    n_heads: int = 4  # query heads; head_dim = dim // n_heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None: n_heads (plain multi-head attention)
    ffn_hidden: int | None = None  # MLP width; None: 4*dim (gpt) or llama_ffn_hidden(dim) (llama)
    max_seq_len: int = 1024  # longest sequence: size of the position table / rotary cache
    norm_eps: float | None = None  # epsilon of LayerNorm/RMSNorm; None: 1e-5 (gpt) or 1e-6 (llama)
    rope_theta: float = 10000.0  # rotary base (llama only)
    rope_scaling: dict[str, Any] | None = (
        None  # None, or Llama-3 frequency scaling {"rope_type": "llama3", ...}
    )
    tie_embeddings: bool | None = (
        None  # output head shares the token embedding; None: True (gpt), False (llama)
    )
    dropout: float = 0.0  # dropout on embeddings, attention probabilities and residual branches
    bias: bool | None = None  # biases in linears and LayerNorm; None: True (gpt), False (llama)
    activation: str | None = None  # MLP nonlinearity; None: "gelu_tanh" (gpt, as GPT-2) or "silu" (llama)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {FAMILIES}")
        gpt = self.family == "gpt"
        defaults = {
            "n_kv_heads": self.n_heads,
            "ffn_hidden": 4 * self.dim if gpt else llama_ffn_hidden(self.dim),
            "norm_eps": 1e-5 if gpt else 1e-6,
            "tie_embeddings": gpt,
            "bias": gpt,
            "activation": "gelu_tanh" if gpt else "silu",
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen dataclass: fill defaults once
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; pick n_heads that divides dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "each key/value head must serve a whole group of query heads"
            )
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be positive")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")
        if self.activation not in ACTIVATIONS[self.family]:
            raise ValueError(
                f"activation={self.activation!r} is not supported for family={self.family!r}; "
                f"choose one of {ACTIVATIONS[self.family]}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if self.family != "llama" or kind != "llama3":
                raise ValueError(
                    f"rope_scaling={self.rope_scaling!r} is not supported; only rope_type 'llama3' "
                    "on family 'llama' is implemented"
                )

    @property
    def head_dim(self) -> int:
        """Width of one attention head: dim // n_heads."""
        return self.dim // self.n_heads

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


# Named sizes, kept as the fields each one sets, so that derived defaults (ffn width, norm eps, ...)
# follow overrides: get_model_config("gpt-small", dim=512) gets ffn_hidden 2048, not 3072.
# Tiny ones are for CPU tests (byte-level vocab of 256); the rest follow published models.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt-tiny": {
        "family": "gpt",
        "vocab_size": 256,
        "dim": 64,
        "n_layers": 4,
        "n_heads": 4,
        "max_seq_len": 256,
    },
    "llama-tiny": {
        "family": "llama",
        "vocab_size": 256,
        "dim": 64,
        "n_layers": 4,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_hidden": 192,
        "max_seq_len": 256,
    },
    # GPT-2 124M with the vocabulary padded from 50257 to 50304 (a multiple of 64), as in nanoGPT.
    "gpt-small": {
        "family": "gpt",
        "vocab_size": 50304,
        "dim": 768,
        "n_layers": 12,
        "n_heads": 12,
        "max_seq_len": 1024,
    },
    "gpt-medium": {
        "family": "gpt",
        "vocab_size": 50304,
        "dim": 1024,
        "n_layers": 24,
        "n_heads": 16,
        "max_seq_len": 1024,
    },
    # GPT-3 XL shape (arXiv 2005.14165 Table 2.1): 24 layers, d=2048, 16 heads of 128.
    "gpt-1.3b": {
        "family": "gpt",
        "vocab_size": 50304,
        "dim": 2048,
        "n_layers": 24,
        "n_heads": 16,
        "max_seq_len": 2048,
    },
    # TinyLlama 1.1B shape: 22 layers, d=2048, 32 heads, 4 kv heads, SwiGLU 5632, vocab 32000.
    "llama-1b": {
        "family": "llama",
        "vocab_size": 32000,
        "dim": 2048,
        "n_layers": 22,
        "n_heads": 32,
        "n_kv_heads": 4,
        "ffn_hidden": 5632,
        "max_seq_len": 2048,
        "norm_eps": 1e-5,
    },
    # Llama 3.2 1B shape (context cut to 8192 to keep the rotary cache small).
    "llama3.2-1b": {
        "family": "llama",
        "vocab_size": 128256,
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_hidden": 8192,
        "max_seq_len": 8192,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # Llama 2 7B shape.
    "llama-7b": {
        "family": "llama",
        "vocab_size": 32000,
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "ffn_hidden": 11008,
        "max_seq_len": 4096,
        "norm_eps": 1e-5,
    },
}
MODEL_CONFIGS["gpt2-124m"] = MODEL_CONFIGS["gpt-small"]


def model_config_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(MODEL_CONFIGS)


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The registered config ``name`` with ``overrides`` applied.

    Example: ``get_model_config("gpt-tiny", n_layers=2)``.

    Raises ``KeyError`` listing the valid names, and ``TypeError`` naming an unknown field.
    """
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; valid names: {', '.join(model_config_names())}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    return ModelConfig(**{**MODEL_CONFIGS[name], **overrides})
