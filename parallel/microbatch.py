# Cutting a batch into microbatches: inputs, targets and extras (attention masks, position ids) per stage.
"""How :class:`~pipeloom.parallel.runtime.PipelineRuntime` cuts a batch: along dim 0 with
``torch.tensor_split`` (an uneven batch gives microbatches one row apart); extras with the batch's size
in dim 0 are cut the same way, other extras reach every microbatch whole; a stage receives the extras its
``forward`` names (all of them if it takes ``**kwargs``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .stage import _keyword_names


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


def split_extras(extras: Mapping | None, m: int, batch: int | None) -> list[dict]:
    out: list[dict] = [{} for _ in range(m)]
    if batch is None and any(torch.is_tensor(v) and v.dim() > 0 for v in (extras or {}).values()):
        raise ValueError("tensor extras need the batch size to be cut into microbatches: pass the inputs or "
                         "the targets too (the same batch on every rank)")
    for name, value in (extras or {}).items():
        if torch.is_tensor(value) and batch is not None and value.dim() > 0 and value.shape[0] == batch:
            for i, piece in enumerate(torch.tensor_split(value, m, dim=0)):
                out[i][name] = piece
        else:
            for i in range(m):
                out[i][name] = value
    return out


def extras_for(module: nn.Module, extras: dict) -> dict:
    if not extras:
        return {}
    accepts = _keyword_names(module)
    return dict(extras) if accepts is None else {k: v for k, v in extras.items() if k in accepts}
