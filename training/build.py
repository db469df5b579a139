# Per-stage model build: a meta-device model whose local pipeline layers alone are materialised and filled.
"""What :func:`~pipeloom.training.parts.build_parts` uses so that a rank allocates only its own layers.

The model is built on the meta device (shapes, no memory); the stage split is computed on it; then only the
pipeline layers of this rank's stages (:meth:`~pipeloom.models.Transformer.pipeline_layers` indices: 0 the
embedding, 1..L the blocks, L+1 the head) are allocated on the device and either initialised - layer by
layer, each from its own seeded generator, so they hold exactly the dense model's numbers whatever the
layout (:meth:`~pipeloom.models.Transformer.init_weights`) - or loaded from a state source that reads only
their tensors (a state dict, or a function such as :func:`pipeloom.models.hf.read_hf_tensors` for a Hugging
Face folder). Every other layer stays on the meta device, so peak parameter memory falls with pp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from pipeloom.models import ModelConfig, Transformer
from pipeloom.models.transformer import draw_init_seed

StateSource = Mapping[str, torch.Tensor] | Callable[[list[str]], Mapping[str, torch.Tensor]]


def layer_prefixes(config: ModelConfig) -> list[str]:
    """The state-dict prefix of each pipeline layer: ``["embed.", "blocks.0.", ..., "head."]``."""
    return ["embed."] + [f"blocks.{i}." for i in range(config.n_layers)] + ["head."]


def layer_names(model: Transformer, layers: Iterable[int]) -> list[str]:
    """The state-dict names (tied copies included) of the pipeline layers ``layers``, in model order."""
    prefixes = tuple(layer_prefixes(model.config)[i] for i in sorted(set(layers)))
    return [name for name in model.state_dict() if name.startswith(prefixes)]


def fill_layers(model: Transformer, layers: Iterable[int], device: str | torch.device,
                init_state: StateSource | None = None) -> None:
    """Materialise the pipeline layers ``layers`` of a meta-device ``model`` on ``device`` and fill them.

    ``init_state`` None: initialise them as the dense model would be (one draw from the default generator,
    as the dense constructor takes). Else load them from ``init_state``: a state dict of the plain model
    (names as ``model.state_dict()``), or a function from a list of names to such tensors, called with
    exactly this rank's names (so a checkpoint reader reads only those). The default generator is consumed
    the same way either way.
    """
    layers = sorted(set(layers))
    seed = draw_init_seed()
    model.materialize(layers, device)
    if init_state is None:
        model.init_weights(layers, seed=seed)
        return
    names = layer_names(model, layers)
    if callable(init_state):
        values = init_state(names)
    else:
        unknown = sorted(set(init_state) - set(model.state_dict()))
        if unknown:
            raise KeyError(f"init_state has tensors {unknown[:8]} that this {model.config.family} model does not have")
        values = init_state
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in names:
            if name not in values:
                raise KeyError(f"init_state has no tensor {name!r}")
            value, param = values[name], params[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"init_state's {name!r} has shape {tuple(value.shape)}, the model needs "
                                 f"{tuple(param.shape)}")
            param.copy_(value)
    for i in layers:
        if 1 <= i <= model.config.n_layers:
            model.blocks[i - 1].attn.init_buffers()  # rotary tables: not in a state dict


def forked_rng(device: str | torch.device):
    """Run a block without moving the default generators of the CPU and of ``device`` (a CUDA device).

    Layer constructors draw their own default init from them (tensor-parallel layers do, before copying
    the dense weights in): under a fork, how many layers a rank builds leaves no trace in the stream
    that dropout draws from afterwards.
    """
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


__all__ = ["StateSource", "fill_layers", "forked_rng", "layer_names", "layer_prefixes"]
