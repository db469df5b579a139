# Text from a trained model: load any checkpoint into one dense process, then sample tokens autoregressively.
"""Because checkpoints store full tensors under plain-model names, a model trained under any
(pp, tp, dp) layout loads into a single un-sharded :class:`~pipeloom.models.Transformer` here::

    model, manifest = load_dense("runs/x/checkpoints/step_200")
    print(generate(model, ByteTokenizer(), "def ", max_new_tokens=200))
"""

from __future__ import annotations

import torch
from pipeloom.models import ModelConfig, Transformer

from .checkpoint import latest_checkpoint, load_checkpoint, read_manifest
from .parts import param_specs


def load_dense(path: str, verify: bool = True) -> tuple[Transformer, dict]:
    """A single-process model with the weights of checkpoint ``path`` (a step folder or a checkpoint dir)."""
    step_path = latest_checkpoint(path) or path
    manifest = read_manifest(step_path, verify=verify)
    config = ModelConfig(**manifest["model_config"])
    model = Transformer(config)
    aliases, first = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(p), name)
    specs = param_specs({0: model}, aliases, config.n_layers, staged=False)
    load_checkpoint(step_path, specs=specs, optimizer=None, model_config=manifest["model_config"], verify=False,
                    restore_rng=False)
    return model.eval(), manifest


@torch.no_grad()
def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0) -> str:
    """``prompt`` continued by ``max_new_tokens`` sampled tokens (temperature, top-k), decoded to text."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt) or [0]], dtype=torch.long)  # (1, t)
    limit = model.config.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -limit:])[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)  # (1, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return tokenizer.decode(ids[0].tolist())
