# pipeloom.models: GPT-2 and Llama style transformers as plain nn.Modules, plus Hugging Face import/export.
"""What runs: models built from layers that ``pipeloom.parallel`` can split into stages or shard.

>>> from pipeloom.models import Transformer, get_model_config
>>> model = Transformer(get_model_config("llama-tiny"))
>>> stages = model.pipeline_layers()  # [embed, *blocks, head]

Hugging Face checkpoints: :func:`load_hf_checkpoint` / :func:`save_hf_checkpoint` (from ``models.hf``;
they need ``safetensors``, imported when called).
"""

from .config import MODEL_CONFIGS, ModelConfig, get_model_config, llama_ffn_hidden, model_config_names
from .hf import load_hf_checkpoint, save_hf_checkpoint
from .layers import MLP, Attention, Block, RMSNorm, SwiGLU, apply_rotary, rope_cache
from .transformer import IGNORE_INDEX, Embedding, Head, Transformer, cross_entropy_loss

__all__ = [
    "IGNORE_INDEX",
    "MLP",
    "MODEL_CONFIGS",
    "Attention",
    "Block",
    "Embedding",
    "Head",
    "ModelConfig",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "apply_rotary",
    "cross_entropy_loss",
    "get_model_config",
    "llama_ffn_hidden",
    "load_hf_checkpoint",
    "model_config_names",
    "rope_cache",
    "save_hf_checkpoint",
]
