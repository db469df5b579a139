# quantize_model: swap a model's linear layers for quantized ones (ours or torchao's); save and reload them.
"""The engine's ``inference.quantization=none|int8|int4|fp8`` option calls::

    model = quantize_model(model, "int4", group_size=128)          # in place; returns the model
    save_quantized(model, "model-int4.pt")                          # config + recipe + state_dict
    model = load_quantized("model-int4.pt", device="cuda")          # no float weights materialised

Every ``nn.Linear`` is quantized except the embedding (an ``nn.Embedding``: a lookup reads one row per token,
so quantizing it saves no bandwidth) and, unless ``skip_head=False``, the output head (the logits are the
most sensitive layer; gpt-fast and torchao's examples keep it in bf16 too). An int4 layer whose input width
is not a multiple of ``group_size`` stays in float (counted in :func:`quantization_report`).

``backend="pipeloom"`` (default) uses :class:`~.linear.QuantizedLinear` (runs on CPU; on a GPU the int8 Triton
GEMV and, for int4, torch's tinygemm kernel: ``kernels="triton"`` keeps int4 on pipeloom's Triton kernel).
``backend="torchao"`` calls torchao's ``quantize_`` with ``Int8WeightOnlyConfig``,
``Int4WeightOnlyConfig(group_size, tile-packed)``, ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` or
``Float8WeightOnlyConfig``; on CPU (torchao 0.18, torch 2.13) only int8 and fp8 weight-only work there, int4
needs a CUDA GPU and bf16 weights, and fp8 activations need compute capability 8.9.

Quantize after moving the model to its device and dtype: scales are stored in the weights' dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from pipeloom import features
from torch import nn

from . import formats
from .linear import LAYER_BACKENDS, QUANT_MODES, QuantizedLinear

MODES = ("none",) + QUANT_MODES
QUANT_BACKENDS = ("pipeloom", "torchao")
FILE_FORMAT = "pipeloom-quantized-v1"


@dataclass(frozen=True)
class QuantConfig:
    """How a model was quantized (stored with a saved model; ``model.quant_config`` after quantize_model)."""

    mode: str = "none"  # none | int8 | int4 | fp8
    group_size: int = 128  # int4: columns per scale/offset (32, 64, 128 or 256)
    skip_head: bool = True  # keep the output head in float
    fp8_activations: bool = True  # fp8: quantize activations per row at run time (W8A8); False: weight-only
    backend: str = "pipeloom"  # pipeloom (QuantizedLinear) | torchao (torchao.quantization.quantize_)
    kernels: str = "auto"  # pipeloom backend: auto (tinygemm/Triton where usable) | triton | torch | tinygemm

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantization mode={self.mode!r}; choose one of {MODES}")
        if self.backend not in QUANT_BACKENDS:
            raise ValueError(f"quantization backend={self.backend!r}; choose one of {QUANT_BACKENDS}")
        if self.group_size not in formats.GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} must be one of {formats.GROUP_SIZES}")
        if self.kernels not in LAYER_BACKENDS:
            raise ValueError(f"kernels={self.kernels!r}; choose one of {LAYER_BACKENDS}")
        if self.kernels == "tinygemm" and self.mode not in ("none", "int4"):
            raise ValueError(f"kernels='tinygemm' runs int4 weights only, not mode={self.mode!r}; use 'auto'")


def _targets(model: nn.Module, config: QuantConfig) -> list[str]:
    """Qualified names of the linears to quantize (see the module docstring)."""
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if config.skip_head and (name == "head.out" or name.endswith(".head.out") or name in ("lm_head", "output")):
            continue
        if config.mode == "int4" and module.in_features % config.group_size:
            continue
        names.append(name)
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 128, *, skip_head: bool = True,
                   fp8_activations: bool = True, backend: str = "pipeloom", kernels: str = "auto") -> nn.Module:
    """Quantize ``model``'s linear layers in place (see the module docstring); returns ``model``.

    ``mode="none"`` returns the model untouched. The recipe is kept as ``model.quant_config``.
    """
    config = QuantConfig(mode, group_size, skip_head, fp8_activations, backend, kernels)
    if getattr(model, "quant_config", None) is not None and model.quant_config.mode != "none":
        raise ValueError(f"the model is quantized already ({model.quant_config.mode}); quantize a float model")
    if config.mode == "none":
        return model
    names = _targets(model, config)
    if backend == "torchao":
        _torchao_quantize(model, config, names)
    else:
        for name in names:
            linear = model.get_submodule(name)
            _set(model, name, QuantizedLinear.from_linear(linear, config.mode, group_size=group_size,
                                                          fp8_activations=fp8_activations, backend=kernels))
    model.quant_config = config
    return model


def prepare_quantized(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Give a float ``model`` the structure of a quantized one, with empty buffers, for ``load_state_dict``.

    Cheap (nothing is quantized) and works on the meta device. pipeloom backend only: torchao's layouts are
    rebuilt by quantizing (see :func:`load_quantized`).
    """
    if config.backend != "pipeloom":
        raise ValueError("prepare_quantized builds pipeloom QuantizedLinear layers; for backend='torchao' call "
                         "quantize_model on the float model, then load_state_dict(..., assign=True)")
    for name in _targets(model, config):
        linear = model.get_submodule(name)
        _set(model, name, QuantizedLinear(linear.in_features, linear.out_features, config.mode,
                                          bias=linear.bias is not None, group_size=config.group_size,
                                          dtype=linear.weight.dtype, device=linear.weight.device,
                                          fp8_activations=config.fp8_activations, backend=config.kernels))
    model.quant_config = config
    return model


def _torchao_quantize(model: nn.Module, config: QuantConfig, names: list[str]) -> None:
    features.require("torchao", "quantize_model(..., backend='torchao')")
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    weight = next(model.parameters())
    if config.mode == "int4" and (not weight.is_cuda or weight.dtype != torch.bfloat16):
        raise ValueError(f"torchao's int4 weight-only layout needs bfloat16 weights on a CUDA GPU (got {weight.dtype} "
                         f"on {weight.device}); use backend='pipeloom' here")
    if config.mode == "fp8" and config.fp8_activations and not (
            weight.is_cuda and torch.cuda.get_device_capability(weight.device) >= (8, 9)):
        raise ValueError("torchao's float8 dynamic activations need a CUDA GPU of compute capability 8.9+; use "
                         "fp8_activations=False (weight-only) or backend='pipeloom' (emulated on CPU)")
    ao_config = {
        "int8": lambda: Int8WeightOnlyConfig(),
        "int4": lambda: Int4WeightOnlyConfig(group_size=config.group_size, int4_packing_format="tile_packed_to_4d"),
        "fp8": lambda: (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if config.fp8_activations
                        else Float8WeightOnlyConfig()),
    }[config.mode]()
    wanted = set(names)
    quantize_(model, ao_config, filter_fn=lambda module, fqn: fqn in wanted)


def save_quantized(model: nn.Module, path: str) -> None:
    """Write the quantized ``model``: its ModelConfig (``model.config``), the recipe and the state dict."""
    config = getattr(model, "quant_config", None)
    if config is None:
        raise ValueError("the model has no quant_config; call quantize_model (mode may be 'none') before saving")
    model_config = getattr(model, "config", None)
    torch.save({"format": FILE_FORMAT, "quantization": dataclasses.asdict(config),
                "model_config": None if model_config is None else model_config.to_dict(),
                "state_dict": model.state_dict()}, path)


def load_quantized(path: str, device: torch.device | str = "cpu", model: nn.Module | None = None) -> nn.Module:
    """A quantized model from :func:`save_quantized`'s file. Builds a pipeloom Transformer from the stored
    ModelConfig unless ``model`` (a float model of the same architecture, e.g. on the meta device) is given."""
    blob = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a file written by save_quantized (format {FILE_FORMAT!r})")
    config = QuantConfig(**blob["quantization"])
    if model is None:
        from pipeloom.models import ModelConfig, Transformer

        if blob["model_config"] is None:
            raise ValueError(f"{path} has no model_config; pass the float model to load into as model=")
        with torch.device("meta"):
            model = Transformer(ModelConfig(**blob["model_config"]))
    state = blob["state_dict"]
    if config.backend == "torchao":  # rebuild torchao's tensor subclasses by quantizing, then take the saved ones
        model = model.to_empty(device=device) if _on_meta(model) else model.to(device)
        quantize_model(model, **{k: v for k, v in dataclasses.asdict(config).items()})
        model.load_state_dict(state, assign=True)
    else:
        if _on_meta(model):
            model.to_empty(device=device)
        prepare_quantized(model, config)
        model.to(device)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _retie(model)
    prepare_kernels(model)
    if hasattr(model, "init_buffers"):
        model.init_buffers()  # rotary tables are not saved
    return model.eval()


def prepare_kernels(model: nn.Module) -> int:
    """Build the derived kernel layouts of every int4 layer where its kernel can run (the GEMV's (s, m) pairs, or
    tinygemm's tiles: ``QuantizedLinear.prepare_kernels``); returns how many were built. ``quantize_model`` and
    ``load_quantized`` call it; call it again after moving a quantized model to another GPU, before compiling or
    capturing CUDA graphs."""
    return sum(m.prepare_kernels() for m in model.modules() if isinstance(m, QuantizedLinear) and m.mode == "int4")


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _retie(model: nn.Module) -> None:
    """Re-tie a float head to the embedding after ``to_empty`` (a quantized head holds its own copy)."""
    config = getattr(model, "config", None)
    head = getattr(getattr(model, "head", None), "out", None)
    if config is not None and getattr(config, "tie_embeddings", False) and type(head) is nn.Linear:
        model.tie_weights()


def quantization_report(model: nn.Module) -> dict[str, int]:
    """Counts and bytes: quantized linears, float linears left, bytes of quantized layers, of all weights (kernel
    layouts derived from the saved buffers, tinygemm's, not counted)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    floats = [m for m in model.modules() if type(m) is nn.Linear]
    seen, total = set(), 0
    buffers = [b for name, b in model.named_buffers() if not name.rpartition(".")[2].startswith("tinygemm_")]
    for t in list(model.parameters()) + buffers:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return {"quantized_layers": len(quantized), "float_linears": len(floats),
            "quantized_bytes": sum(m.weight_bytes() for m in quantized), "total_bytes": total}
