# Cutting a batch into microbatches: inputs, targets and extras (attention masks, position ids) per stage.
"""How :class:`~pipeloom.parallel.runtime.PipelineRuntime` cuts a batch.

Inputs and targets are cut along dim 0 with ``torch.tensor_split`` (an uneven batch gives microbatches
one row apart). Extras are cut as their *chunk spec* says, one per extra name, like
``torch.distributed.pipelining``'s ``kwargs_chunk_spec``:

* ``"split"`` (or ``0``): cut along dim 0 with the batch - a per-row attention mask ``(B, T)``;
* an int ``d``: cut along dim ``d`` into the same microbatches (e.g. a ``(T, B)`` layout);
* ``"replicate"`` (the default): every microbatch gets the whole value - position ids ``(T,)``, a causal
  mask ``(T, T)``, a rotary table ``(T, D)``.

Nothing is guessed from sizes: a tensor extra with no spec whose first dim equals the batch size is
refused, because it may be per-row (to be split) or may only happen to be as long as the batch (a
``(T, T)`` mask when B == T), and the two need opposite treatment. A stage receives the extras its
``forward`` names (all of them if it takes ``**kwargs``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .stage import _keyword_names

REPLICATE, SPLIT = "replicate", "split"


def batch_size(inputs, targets) -> int | None:
    for x in (inputs, targets):
        first = x[0] if isinstance(x, (tuple, list)) else x
        if torch.is_tensor(first):
            return first.shape[0]
    return None


def split_batch(x, m: int, what: str) -> list:
    """``m`` microbatches of a tensor (or a tuple of tensors) along dim 0, the same kind of value each."""
    parts = x if isinstance(x, (tuple, list)) else (x,)
    size = parts[0].shape[0]
    if size < m:
        raise ValueError(f"the batch of {what} has {size} rows, fewer than the plan's {m} microbatches; "
                         f"use a batch of at least {m} rows or fewer microbatches")
    pieces = [torch.tensor_split(p, m, dim=0) for p in parts]
    return [tuple(piece[i] for piece in pieces) if isinstance(x, (tuple, list)) else pieces[0][i] for i in range(m)]


def check_chunk_specs(specs: Mapping | None) -> dict[str, int | str]:
    """``{extra name: "split" | "replicate" | dim}``, validated; ``"split"`` is stored as dim 0."""
    out: dict[str, int | str] = {}
    for name, spec in (specs or {}).items():
        if spec == SPLIT:
            spec = 0
        if spec != REPLICATE and (not isinstance(spec, int) or isinstance(spec, bool)):
            raise ValueError(f"extras_chunks[{name!r}]={spec!r}; give {SPLIT!r} (cut along dim 0 with the batch), "
                             f"a dim to cut along, or {REPLICATE!r} (every microbatch gets it whole)")
        out[name] = spec
    return out


def split_extras(extras: Mapping | None, m: int, batch: int | None, specs: Mapping | None = None) -> list[dict]:
    """Per microbatch, the extras cut by ``specs`` (from :func:`check_chunk_specs`; replicate by default)."""
    out: list[dict] = [{} for _ in range(m)]
    if not extras:
        return out
    specs = specs or {}
    for name, value in extras.items():
        spec = specs.get(name, REPLICATE)
        if spec == REPLICATE:
            if name not in specs and torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
                raise ValueError(
                    f"extra {name!r} has shape {tuple(value.shape)}: its first dim equals the batch size {batch}, so "
                    f"it may hold one row per sample (to be cut into microbatches) or only be as long as the batch (a "
                    f"(T, T) mask when B == T, to be given whole); say which: "
                    f"PipelineRuntime(..., extras_chunks={{{name!r}: {SPLIT!r}}}) or {{{name!r}: {REPLICATE!r}}}")
            for i in range(m):
                out[i][name] = value
            continue
        if not torch.is_tensor(value) or not -value.dim() <= spec < value.dim():
            raise ValueError(f"extras_chunks[{name!r}] cuts dim {spec}, but the extra is "
                             f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}; "
                             f"use {REPLICATE!r} for values to give whole")
        if batch is None:
            raise ValueError(f"extra {name!r} is cut into microbatches, which needs the batch size: pass the inputs "
                             f"or the targets too (the same batch on every rank)")
        if value.shape[spec] != batch:
            raise ValueError(f"extra {name!r} has shape {tuple(value.shape)}: dim {spec}, which extras_chunks cuts, "
                             f"has {value.shape[spec]} entries, but the batch has {batch} rows")
        for i, piece in enumerate(torch.tensor_split(value, m, dim=spec)):
            out[i][name] = piece
    return out


def extras_for(module: nn.Module, extras: dict) -> dict:
    if not extras:
        return {}
    accepts = _keyword_names(module)
    return dict(extras) if accepts is None else {k: v for k, v in extras.items() if k in accepts}
