# Hugging Face checkpoint import/export: GPT2LMHeadModel and LlamaForCausalLM folders <-> our Transformer.
"""Read and write Hugging Face model folders (``config.json`` + ``*.safetensors``).

GPT-2 stores its linears as ``Conv1D`` with weights of shape (in, out), the transpose of ``nn.Linear``, and
fuses q, k, v into ``c_attn`` of shape (D, 3D); both are undone here. Llama's q/k weights are stored for the
"rotate_half" rotary convention, which is the one :mod:`pipeloom.models.layers` uses, so they load as-is.
Needs ``safetensors`` (imported here); ``transformers`` is not needed. Config translation: ``hf_config``.
"""

from __future__ import annotations

import contextlib
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


def _sources(config: ModelConfig) -> dict[str, tuple[str, Any]]:
    """``{our name: (HF name, how)}`` for every tensor of our state dict; ``how`` is None (as stored), "t" (a
    Conv1D weight, transposed) or ``("qkv", j)`` (part j of GPT-2's fused c_attn). HF names carry no
    ``transformer.`` prefix. A tied head reads the embedding's tensor."""
    out: dict[str, tuple[str, Any]] = {}
    if config.family == "gpt":
        for ours, theirs, transposed in _gpt2_names(config):
            out[ours] = (theirs, "t" if transposed else None)
        for i in range(config.n_layers):
            for j, proj in enumerate(("wq", "wk", "wv")):
                for suffix in ("weight", "bias"):
                    out[f"blocks.{i}.attn.{proj}.{suffix}"] = (f"h.{i}.attn.c_attn.{suffix}", ("qkv", j))
        embedding = "wte.weight"
    else:
        out.update((ours, (theirs, None)) for ours, theirs in _llama_names(config))
        embedding = "model.embed_tokens.weight"
    if config.tie_embeddings:
        out["head.out.weight"] = (embedding, None)
    return out


def _convert(tensor: torch.Tensor, how: Any, hf_name: str, config: ModelConfig) -> torch.Tensor:
    """A stored tensor in our layout (see :func:`_sources`)."""
    if how == "t":
        return tensor.t().contiguous()
    if how is None:
        return tensor
    D = config.dim
    if tensor.shape[-1] != 3 * D:  # c_attn: weight (D, 3D) as Conv1D, bias (3D,)
        raise ValueError(
            f"shape mismatch for checkpoint tensor {hf_name!r}: got {tuple(tensor.shape)}, "
            f"last dimension should be 3*dim={3 * D}"
        )
    part = tensor.split(D, dim=-1)[how[1]]
    return part.t().contiguous() if tensor.dim() == 2 else part


def _unexpected(stored, config: ModelConfig) -> list[str]:
    """Stored tensor names (``transformer.`` prefix removed) that no tensor of ``config`` reads."""
    used = {theirs for theirs, _ in _sources(config).values()}
    if config.tie_embeddings:
        used.add("lm_head.weight")  # some checkpoints store the tied copy
    return sorted(k for k in stored if k not in used and not _IGNORED.search(k))


def _unexpected_error(unexpected: list[str], config: ModelConfig) -> ValueError:
    return ValueError(
        f"checkpoint has {len(unexpected)} tensor(s) this {config.family} config does not use: "
        f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
    )


def _read(names, sources, fetch, shapes: dict[str, tuple], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our tensors ``names`` from ``fetch(hf_name)``, each checked against ``shapes`` (our name -> shape)."""
    out = {}
    for ours in names:
        theirs, how = sources[ours]
        tensor = _convert(fetch(theirs), how, theirs, config)
        if tuple(tensor.shape) != tuple(shapes[ours]):
            raise ValueError(
                f"shape mismatch for checkpoint tensor {theirs!r} (-> {ours!r}): got "
                f"{tuple(tensor.shape)} after conversion, the config needs {tuple(shapes[ours])}"
            )
        out[ours] = tensor
    return out


def _missing(hf_name: str) -> KeyError:
    return KeyError(f"checkpoint is missing tensor {hf_name!r}")


def hf_to_state_dict(hf: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict from Hugging Face tensors, checking every shape against ``model``.

    Errors name the checkpoint tensor that is missing, extra, or of the wrong shape.
    """
    config = model.config
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()} if config.family == "gpt" else dict(hf)

    def fetch(name: str) -> torch.Tensor:
        if name not in hf:
            raise _missing(name)
        return hf[name]

    shapes = {k: v.shape for k, v in model.state_dict().items()}
    out = _read(list(_sources(config)), _sources(config), fetch, shapes, config)
    unexpected = _unexpected(hf, config)
    if unexpected:
        raise _unexpected_error(unexpected, config)
    return out


def read_hf_tensors(folder: str | Path, config: ModelConfig, names) -> dict[str, torch.Tensor]:
    """Our tensors ``names`` (e.g. one pipeline stage's ``blocks.3.attn.wq.weight``...) from a Hugging Face
    folder, reading from its safetensors files only the stored tensors they come from (the files' headers
    are read whole, to refuse tensors this config does not use). Same checks and errors as
    :func:`hf_to_state_dict`; tensors keep the stored dtype."""
    features.require("safetensors", "Hugging Face checkpoint import")
    from safetensors import safe_open

    folder = Path(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    sources = _sources(config)
    unknown = sorted(set(names) - set(sources))
    if unknown:
        raise KeyError(f"{config.family} models have no tensor(s) {unknown[:8]}")
    handles = {}
    stored: dict[str, tuple[str, str]] = {}  # name without "transformer." -> (file, stored name)
    with contextlib.ExitStack() as stack:
        for file in _safetensors_files(folder):
            handles[file] = stack.enter_context(safe_open(str(folder / file), framework="pt"))
            for key in handles[file].keys():
                stored[key.removeprefix("transformer.") if config.family == "gpt" else key] = (file, key)
        unexpected = _unexpected(stored, config)
        if unexpected:
            raise _unexpected_error(unexpected, config)

        def fetch(name: str) -> torch.Tensor:
            if name not in stored:
                raise _missing(name)
            file, key = stored[name]
            return handles[file].get_tensor(key)

        return _read(list(names), sources, fetch, shapes, config)


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
    tensors: dict[str, torch.Tensor] = {}
    for name in _safetensors_files(folder):
        tensors.update(load_file(str(folder / name)))
    return tensors


def _safetensors_files(folder: Path) -> list[str]:
    """The safetensors files of a folder: ``model.safetensors``, or the shards its index lists (all there)."""
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
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"shard {name} listed in {index} is missing from {folder}")
    return files


def read_hf_config(folder: str | Path, **overrides: Any) -> ModelConfig:
    """Our ModelConfig for a Hugging Face folder's ``config.json`` (no weights read); ``overrides`` as in
    :func:`load_hf_checkpoint`."""
    config_path = Path(folder) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face model folder needs config.json")
    return config_from_hf(json.loads(config_path.read_text()), **overrides)


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
    config = read_hf_config(folder, **overrides)
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
