# What weight-only quantization costs a trained model: validation loss of the float model and its quantized copies.
"""``quantized_validation(model, batches)`` quantizes deep copies of ``model`` (int8 per channel, int4 group-wise,
optionally fp8) and returns each copy's validation loss next to the float one; :func:`validation_report` prints
them against :data:`VAL_MARGIN`, the increase each mode is allowed (nats per token). ``make demo`` prints it for
the model it just trained; the tests hold a trained model to the same margins.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .apply import quantize_model

VAL_MARGIN = {"int8": 0.005, "int4": 0.03, "fp8": 0.02}  # allowed validation-loss increase over float, nats/token


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token loss of ``model`` over ``batches`` (each (B, T + 1) token ids)."""
    if not batches:
        raise ValueError("batches is empty: pass at least one (B, T + 1) validation batch")
    model = model.eval()
    return sum(float(model.loss(model(b[:, :-1]), b[:, 1:])) for b in batches) / len(batches)


def quantized_validation(model: nn.Module, batches: Sequence[torch.Tensor], modes: Sequence[str] = ("int8", "int4"),
                         group_size: int = 64) -> dict[str, float]:
    """{"float": loss, mode: loss of a quantized deep copy, ...}; ``model`` itself is left unchanged. int4 uses
    ``group_size`` columns per scale (layers it does not divide stay in float)."""
    losses = {"float": validation_loss(model, batches)}
    for mode in modes:
        losses[mode] = validation_loss(quantize_model(copy.deepcopy(model), mode, group_size), batches)
    return losses


def validation_report(losses: dict[str, float], group_size: int = 64) -> str:
    """One line per mode: its loss, the increase over float and the margin it is held to."""
    base = losses["float"]
    lines = [f"validation loss under weight-only quantization: float {base:.4f}"]
    for mode, loss in losses.items():
        if mode == "float":
            continue
        group = f" g={group_size}" if mode == "int4" else ""
        verdict = "within" if loss - base <= VAL_MARGIN[mode] else "OUTSIDE"
        lines.append(f"  {mode}{group}: {loss:.4f} ({loss - base:+.4f} nats; {verdict} the margin "
                     f"+{VAL_MARGIN[mode]})")
    return "\n".join(lines)


__all__ = ["VAL_MARGIN", "quantized_validation", "validation_loss", "validation_report"]
