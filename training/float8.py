# Float8 training through torchao: which linears convert (a GEMM-size filter), the conversion, and its report.
"""``train.float8=tensorwise|rowwise``: the ``nn.Linear`` layers of this rank's stages become torchao's
``Float8Linear`` (``torchao.float8.convert_to_float8_training``): each forward casts the input and the
weight to float8 e4m3 (and backward the output gradient to e5m2) with dynamic scales - one per tensor
(``tensorwise``) or one per row (``rowwise``, finer, slower) - and runs the three GEMMs of the layer
(output, input gradient, weight gradient) as float8 ``torch._scaled_mm`` on Hopper (arXiv 2209.05433;
torchao's float8 README). The weights, the optimizer and the checkpoints stay in full precision, under the
same names, so a run resumes with float8 on or off.

Which layers convert (:func:`float8_filter`). Casting costs memory traffic that a small GEMM does not win
back, so a linear is converted only when its dimensions are multiples of 16 (the hardware's requirement) and
its GEMM is large enough. ``min_dim=None`` (the default) applies torchao's per-recipe thresholds on
``K = in_features`` and ``N = out_features``, the ones torchtitan uses (its float8 converter's
``auto_filter_small_kn``), from torchao's H100 microbenchmarks:

* tensorwise: skip when ``K <= 4096 and N <= 1024``;
* rowwise: skip when ``N <= 2048``, or ``K <= 1024``, or ``N <= 4096 and K <= 2048``.

``min_dim=M`` replaces them with one measured threshold: convert when ``K >= M and N >= M``. Layers named in
``skip`` stay in high precision whatever their size; the default is the output head, as torchtitan keeps
its ``output`` layer (the logits' precision matters most and the vocabulary GEMM is often not a multiple
of 16). Tensor-parallel layers stay in bf16: torchao's float8 tensor parallelism works on DTensor layers
(``torchao.float8.float8_tensor_parallel``), while pipeloom's column/row-parallel layers hold plain tensors
and do their own communication; :class:`Float8Report` says so in the run's log.

On a CPU torch emulates the scaled matmuls (numbers as on a GPU, no speed-up): tests run it there. A CUDA
GPU needs compute capability 8.9 or newer (:func:`check_float8_device`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

FLOAT8_RECIPES = ("tensorwise", "rowwise")
DEFAULT_SKIP = ("head.out",)  # full-model names kept in high precision (torchtitan: filter_fqns=["output"])


def too_small(recipe: str, in_features: int, out_features: int, min_dim: int | None = None) -> str | None:
    """Why a linear of this shape should stay in high precision under ``recipe`` (None: convert it)."""
    K, N = in_features, out_features
    if K % 16 or N % 16:
        return f"K={K}, N={N} not multiples of 16"
    if min_dim is not None:
        return None if K >= min_dim and N >= min_dim else f"K={K}, N={N} below min_dim={min_dim}"
    if recipe == "tensorwise":  # torchao float8_linear_utils._auto_filter_for_tensorwise (H100 tables)
        small = K <= 4096 and N <= 1024
    else:  # torchao float8_linear_utils._auto_filter_for_rowwise
        small = N <= 2048 or K <= 1024 or (N <= 4096 and K <= 2048)
    return f"K={K}, N={N} under the {recipe} thresholds" if small else None


@dataclass
class Float8Report:
    """What :func:`apply_float8` did: converted layers, and the others with the reason."""

    recipe: str
    converted: list[str] = field(default_factory=list)  # full-model names of the converted linears
    skipped: dict[str, str] = field(default_factory=dict)  # full-model name -> why it stays in high precision

    def summary(self) -> str:
        """One log line."""
        tp = [n for n, why in self.skipped.items() if why.startswith("tensor-parallel")]
        small = {n: why for n, why in self.skipped.items() if n not in tp}
        line = f"float8 {self.recipe}: {len(self.converted)} linears converted"
        if small:
            shown = "; ".join(f"{n} ({why})" for n, why in list(small.items())[:3])
            line += f", {len(small)} kept in high precision: {shown}{' ...' if len(small) > 3 else ''}"
        if tp:
            line += (f"; {len(tp)} tensor-parallel linears left in bf16 (torchao's float8 tensor parallelism "
                     "needs DTensor layers; pipeloom's hold plain shards)")
        return line


def float8_filter(recipe: str, min_dim: int | None = None, skip=DEFAULT_SKIP,
                  name_of: Callable[[str], str] = lambda fqn: fqn,
                  report: Float8Report | None = None) -> Callable[[nn.Module, str], bool]:
    """``module_filter_fn`` for ``convert_to_float8_training``: True for the linears to convert.

    ``name_of`` maps the fqn torchao passes (relative to the converted module, e.g. a pipeline Stage's
    ``"3.attn.wq"``) to the full-model name (``"blocks.2.attn.wq"``) that ``skip`` and the report use.
    """

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        name = name_of(fqn)
        why = ("skipped by name" if any(name == s or name.startswith(s + ".") for s in skip)
               else too_small(recipe, module.in_features, module.out_features, min_dim))
        if report is not None:
            if why is None:
                report.converted.append(name)
            else:
                report.skipped[name] = why
        return why is None

    return keep


def apply_float8(modules: dict[int, nn.Module], recipe: str, *, min_dim: int | None = None, skip=DEFAULT_SKIP,
                 name_of: Callable[[str], str] = lambda fqn: fqn, fast_accum: bool = False) -> Float8Report:
    """Convert the linears of ``modules`` (``{stage: module}``, as ``ModelParts.modules``) in place.

    Apply after tensor parallelism and before ``torch.compile``. Returns the :class:`Float8Report`.
    ``fast_accum``: the backward GEMMs (input and weight gradients) also use Hopper's fast float8
    accumulation, as torchao's recipes already do for the forward GEMM (``use_fast_accum``: partial sums
    kept in fewer bits inside the tensor core, promoted to float32 less often; faster, less exact).
    """
    from pipeloom import features

    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"float8 recipe {recipe!r}; choose one of {FLOAT8_RECIPES}")
    features.require("torchao", "float8 training")
    import dataclasses

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.config import Float8GemmConfig

    from pipeloom.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    report = Float8Report(recipe)
    config = Float8LinearConfig.from_recipe_name(recipe)
    if fast_accum:
        config = dataclasses.replace(config, gemm_config_grad_input=Float8GemmConfig(use_fast_accum=True),
                                     gemm_config_grad_weight=Float8GemmConfig(use_fast_accum=True))
    for module in modules.values():
        for fqn, m in module.named_modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
                report.skipped[name_of(fqn)] = "tensor-parallel layer, left in bf16"
        convert_to_float8_training(module, config=config,
                                   module_filter_fn=float8_filter(recipe, min_dim, skip, name_of, report))
    return report


def check_float8_device(device: torch.device) -> str | None:
    """Why float8 training cannot run on ``device`` (None: it can; a CPU emulates it)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"needs a GPU of compute capability 8.9 or newer (H100/H200, L40S, RTX 4090) for float8 matmuls; "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use train.float8=off")
    return None


__all__ = ["DEFAULT_SKIP", "FLOAT8_RECIPES", "Float8Report", "apply_float8", "check_float8_device", "float8_filter",
           "too_small"]
