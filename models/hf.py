# Hugging Face checkpoint import/export: GPT2LMHeadModel and LlamaForCausalLM folders <-> our Transformer.
"""Read and write Hugging Face model folders (``config.json`` + ``*.safetensors``).

GPT-2 stores its linears as ``Conv1D`` with weights of shape (in, out), the transpose of ``nn.Linear``, and
fuses q, k, v into ``c_attn`` of shape (D, 3D); both are undone here. Llama's q/k weights are stored for the
"rotate_half" rotary convention, which is the one :mod:`pipeloom.models.layers` uses, so they load as-is.
Needs ``safetensors`` (imported here); ``transformers`` is not needed. Config translation: ``hf_config``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .. import features
from .config import ModelConfig
from .hf_config import config_from_hf, config_to_hf
from .transformer import Transformer

# Stored tensors that are buffers or derived values, not weights.
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


# ----------------------------------------------------------------------------- weight names and layouts


def _gpt2_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, HF name, transposed) for every GPT-2 weight except the fused c_attn.

    ``transposed``: HF stores it as a Conv1D weight (in, out), the transpose of our nn.Linear (out, in).
    """
    names = [
        ("embed.tok.weight", "wte.weight", False),
        ("embed.pos.weight", "wpe.weight", False),
        ("head.norm.weight", "ln_f.weight", False),
        ("head.norm.bias", "ln_f.bias", False),
    ]
    pairs = [
        ("attn_norm", "ln_1", False),
        ("attn.wo", "attn.c_proj", True),
        ("mlp_norm", "ln_2", False),
        ("mlp.fc", "mlp.c_fc", True),
        ("mlp.proj", "mlp.c_proj", True),
    ]
    for i in range(config.n_layers):
        for ours, theirs, transposed in pairs:
            names.append((f"blocks.{i}.{ours}.weight", f"h.{i}.{theirs}.weight", transposed))
            names.append((f"blocks.{i}.{ours}.bias", f"h.{i}.{theirs}.bias", False))
    if not config.tie_embeddings:
        names.append(("head.out.weight", "lm_head.weight", False))
    return names


def _maybe_t(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return tensor.t().contiguous() if transposed else tensor


def _llama_names(config: ModelConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for every Llama weight: a pure renaming, same layouts."""
    names = [("embed.tok.weight", "model.embed_tokens.weight"), ("head.norm.weight", "model.norm.weight")]
    if not config.tie_embeddings:
        names.append(("head.out.weight", "lm_head.weight"))
    suffixes = ["weight", "bias"] if config.bias else ["weight"]
    for i in range(config.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        names += [
            (b + "attn_norm.weight", h + "input_layernorm.weight"),
            (b + "mlp_norm.weight", h + "post_attention_layernorm.weight"),
        ]
        pairs = [
            ("attn.wq", "self_attn.q_proj"),
            ("attn.wk", "self_attn.k_proj"),
            ("attn.wv", "self_attn.v_proj"),
            ("attn.wo", "self_attn.o_proj"),
            ("mlp.w1", "mlp.gate_proj"),
            ("mlp.w3", "mlp.up_proj"),
            ("mlp.w2", "mlp.down_proj"),
        ]
        names += [(f"{b}{ours}.{s}", f"{h}{theirs}.{s}") for ours, theirs in pairs for s in suffixes]
    return names


def hf_to_state_dict(hf: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict from Hugging Face tensors, checking every shape against ``model``.

    Errors name the checkpoint tensor that is missing, extra, or of the wrong shape.
    """
    config, expected = model.config, model.state_dict()
    hf = dict(hf)
    out: dict[str, torch.Tensor] = {}

    def take(hf_name: str) -> torch.Tensor:
        if hf_name not in hf:
            raise KeyError(f"checkpoint is missing tensor {hf_name!r}")
        return hf.pop(hf_name)

    def put(ours: str, tensor: torch.Tensor, hf_name: str) -> None:
        if tensor.shape != expected[ours].shape:
            raise ValueError(
                f"shape mismatch for checkpoint tensor {hf_name!r} (-> {ours!r}): got "
                f"{tuple(tensor.shape)} after conversion, the config needs {tuple(expected[ours].shape)}"
            )
        out[ours] = tensor

    if config.family == "gpt":
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
        for ours, theirs, transposed in _gpt2_names(config):
            put(ours, _maybe_t(take(theirs), transposed), theirs)
        D = config.dim
        for i in range(config.n_layers):
            for suffix in ("weight", "bias"):
                name = f"h.{i}.attn.c_attn.{suffix}"
                qkv = take(name)  # weight (D, 3D) as Conv1D, bias (3D,)
                if qkv.shape[-1] != 3 * D:
                    raise ValueError(
                        f"shape mismatch for checkpoint tensor {name!r}: got {tuple(qkv.shape)}, "
                        f"last dimension should be 3*dim={3 * D}"
                    )
                for part, proj in zip(qkv.split(D, dim=-1), ("wq", "wk", "wv")):
                    put(
                        f"blocks.{i}.attn.{proj}.{suffix}",
                        part.t().contiguous() if suffix == "weight" else part,
                        name,
                    )
        if config.tie_embeddings:
            hf.pop("lm_head.weight", None)  # some checkpoints store the tied copy
            out["head.out.weight"] = out["embed.tok.weight"]
    else:
        for ours, theirs in _llama_names(config):
            put(ours, take(theirs), theirs)
        if config.tie_embeddings:
            hf.pop("lm_head.weight", None)
            out["head.out.weight"] = out["embed.tok.weight"]
    unexpected = sorted(k for k in hf if not _IGNORED.search(k))
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensor(s) this {config.family} config does not use: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    return out


def state_dict_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (names and layouts) for a whole, unsharded model."""
    config = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        reference = Transformer(config).state_dict()
    for name, tensor in reference.items():
        if name not in sd:
            raise ValueError(f"model has no tensor {name!r}: export needs the whole model, not one stage")
        if sd[name].shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: model has {tuple(sd[name].shape)}, the config needs "
                f"{tuple(tensor.shape)} (a tensor-parallel shard? gather the full model before export)"
            )
    ours = dict(sd)
    out: dict[str, torch.Tensor] = {}
    if config.family == "gpt":
        if not config.bias:  # HF GPT-2 always has biases: zero ones are the same function
            for name, w in list(sd.items()):
                if name.endswith("norm.weight") or re.search(r"\.(w[qkvo]|fc|proj)\.weight$", name):
                    ours.setdefault(name[: -len("weight")] + "bias", torch.zeros(w.shape[0], dtype=w.dtype))
        for mine, theirs, transposed in _gpt2_names(config):
            prefix = "" if theirs.startswith("lm_head") else "transformer."
            out[prefix + theirs] = _maybe_t(ours[mine], transposed)
        for i in range(config.n_layers):
            b = f"blocks.{i}.attn."
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
                [ours[b + p + ".weight"].t() for p in ("wq", "wk", "wv")], dim=1
            ).contiguous()  # (D, 3D)
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
                [ours[b + p + ".bias"] for p in ("wq", "wk", "wv")]
            )
    else:
        for mine, theirs in _llama_names(config):
            out[theirs] = ours[mine].contiguous()
    return out


# ----------------------------------------------------------------------------- folders


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's ``model.safetensors``, or of the shards its index lists."""
    features.require("safetensors", "Hugging Face checkpoint import")
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        hint = (
            " (found PyTorch .bin weights: re-save with save_pretrained(safe_serialization=True))"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"shard {name} listed in {index} is missing from {folder}")
        tensors.update(load_file(str(path)))
    return tensors


def load_hf_checkpoint(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[Transformer, ModelConfig]:
    """Build our Transformer from a Hugging Face folder (``config.json`` + safetensors, single or sharded).

    ``dtype``: parameter dtype (default: the checkpoint's floating dtype). ``overrides``: ModelConfig fields
    that do not change weight shapes, e.g. ``dropout`` or, for Llama, ``max_seq_len`` (rotary cache size).
    Returns ``(model, config)``; the model is in eval mode.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face model folder needs config.json")
    config = config_from_hf(json.loads(config_path.read_text()), **overrides)
    tensors = read_safetensors(folder)
    if dtype is None:
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    model.init_buffers()
    model.load_state_dict(hf_to_state_dict(tensors, model), strict=True)
    return model.eval(), config


def save_hf_checkpoint(
    model: Transformer, config: ModelConfig | None, folder: str | Path, *, max_shard_bytes: int | None = None
) -> Path:
    """Write ``model`` as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Writes ``config.json`` and ``model.safetensors`` (or shards of at most ``max_shard_bytes`` each plus
    ``model.safetensors.index.json``). ``config`` defaults to ``model.config``. Returns the folder.
    """
    features.require("safetensors", "Hugging Face checkpoint export")
    from safetensors.torch import save_file

    config = model.config if config is None else config
    if config != model.config:
        raise ValueError(f"config does not match model.config:\n  given {config}\n  model {model.config}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in state_dict_to_hf(model).items()}
    dtype = model.embed.tok.weight.dtype
    (folder / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
