# Splitting a model into pipeline stages: layouts (uniform, parameters, time, explicit) and the Stage module.
"""A model is a list of layers (``model.pipeline_layers()``, an ``nn.Sequential``, a list of modules, or
named module paths); :func:`split_stages` cuts it into contiguous :class:`Stage` modules::

    split = split_stages(model, num_stages=4, method="parameters")
    split = split_stages(model, 4, method=[3, 4, 4, 3])           # explicit layers per stage
    split = split_stages(model, 4, method="time", sample_input=x)  # profile forward+backward per layer
    print(split)                       # which layers (embedding, blocks, head) each stage holds
    modules = split.for_rank(plan, rank)   # {stage index: Stage} that this rank runs

A :class:`Stage` names its layers by their global index, so its parameter names equal those of
``nn.Sequential(*layers)`` (``"3.attn.wq.weight"``), and its children are the layers themselves (what
``apply_recompute`` and ``apply_tp`` look for). Parameters shared by layers of different stages (a tied
embedding and output head) are found here and listed in ``split.tied``, the one declaration the runtime
needs. Interleaved plans (``plan.num_stages == pp * vpp``) simply ask for ``pp * vpp`` stages.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class Stage(nn.Module):
    """Consecutive layers ``first .. first+len-1`` of a model: ``forward(*inputs, **extras)``.

    Each layer receives the previous layer's output (a tuple is unpacked into positional arguments)
    and those ``extras`` (attention masks, position ids, ...) that its ``forward`` names as keyword
    parameters (all of them if it takes ``**kwargs``).
    """

    def __init__(self, layers: Sequence[nn.Module], first: int = 0, index: int = 0):
        super().__init__()
        self.index = index
        self.first = first
        for offset, layer in enumerate(layers):
            self.add_module(str(first + offset), layer)
        self._accepts = [_keyword_names(layer) for layer in layers]

    @property
    def layer_ids(self) -> range:
        return range(self.first, self.first + len(self._accepts))

    def forward(self, *inputs, **extras):
        x = inputs
        for layer, accepts in zip(self.children(), self._accepts):
            kwargs = extras if accepts is None else {k: v for k, v in extras.items() if k in accepts}
            x = layer(*x, **kwargs) if isinstance(x, tuple) else layer(x, **kwargs)
        return x

    def wants(self, name: str) -> bool:
        """True when some layer of this stage takes the extra input ``name``."""
        return any(accepts is None or name in accepts for accepts in self._accepts)


def _keyword_names(layer: nn.Module) -> frozenset | None:
    """Names ``layer.forward`` accepts beyond its first argument; None means ``**kwargs`` (all)."""
    try:
        params = list(inspect.signature(layer.forward).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature take no extras
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params[1:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                             inspect.Parameter.KEYWORD_ONLY))


@dataclass
class StageSplit:
    """The stages of one model, with where every layer went and the parameters tied across stages.

    ``tied`` lists one dict per shared parameter: ``{stage index: parameter name in that Stage}`` (for
    a GPT: ``{0: "0.tok.weight", S-1: "L.out.weight"}``); pass it to ``PipelineRuntime(tied=...)``.
    """

    stages: list[Stage]
    layout: tuple[int, ...]
    method: str
    costs: tuple[float, ...] | None = None
    tied: list[dict[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> Stage:
        return self.stages[index]

    def __iter__(self):
        return iter(self.stages)

    def for_rank(self, plan, rank: int) -> dict[int, Stage]:
        """The stage modules ``plan`` places on ``rank``, by stage index."""
        if plan.num_stages != len(self.stages):
            raise ValueError(f"plan {plan.name!r} has {plan.num_stages} stages but the model was split into "
                             f"{len(self.stages)}; split with num_stages=plan.num_stages ({plan.num_stages})")
        return {s: self.stages[s] for s in plan.stages_of(rank)}

    @property
    def tied_stages(self) -> tuple[int, ...]:
        return tuple(sorted({s for group in self.tied for s in group}))

    def __str__(self) -> str:
        lines = [f"{len(self.stages)} stages, layout {list(self.layout)} ({self.method})"]
        for stage in self.stages:
            names = [type(layer).__name__ for layer in stage.children()]
            ids = stage.layer_ids
            params = sum(p.numel() for p in stage.parameters())
            lines.append(f"  stage {stage.index}: layers {ids.start}-{ids.stop - 1} {_compress(names)} "
                         f"({params} parameters)")
        for group in self.tied:
            lines.append("  tied: " + ", ".join(f"stage {s} {name}" for s, name in sorted(group.items())))
        return "\n".join(lines)


def _compress(names: list[str]) -> str:
    out: list[str] = []
    for name in names:
        if out and out[-1].split(" x")[0] == name:
            count = int(out[-1].split(" x")[1]) + 1 if " x" in out[-1] else 2
            out[-1] = f"{name} x{count}"
        else:
            out.append(name)
    return "[" + ", ".join(out) + "]"


def model_layers(model, paths: Sequence[str] | None = None) -> list[nn.Module]:
    """The ordered layer list of ``model``: ``paths`` (dotted names; a ModuleList expands), else
    ``model.pipeline_layers()``, the children of an ``nn.Sequential``, or ``model`` itself if a list."""
    if paths is not None:
        layers: list[nn.Module] = []
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError as missing:
                raise ValueError(f"layer path {path!r} does not name a submodule of {type(model).__name__}: "
                                 f"{missing}") from None
            layers.extend(module if isinstance(module, nn.ModuleList) else [module])
        return layers
    if hasattr(model, "pipeline_layers"):
        return list(model.pipeline_layers())
    if isinstance(model, (nn.Sequential, nn.ModuleList, list, tuple)):
        return list(model)
    raise TypeError(f"cannot list the layers of {type(model).__name__}: pass a list of modules, an "
                    f"nn.Sequential, a model with pipeline_layers(), or paths=[...]")


def split_stages(model, num_stages: int, method: str | Sequence = "uniform", *, paths: Sequence[str] | None = None,
                 sample_input=None, sample_extras: dict | None = None, repeats: int = 3) -> StageSplit:
    """Cut ``model``'s layers into ``num_stages`` contiguous :class:`Stage` modules.

    ``method``:
      * ``"uniform"`` - layer counts differ by at most one (the first stages take the extra layers);
      * ``"parameters"`` - balance parameter counts (minimise the largest stage);
      * ``"time"`` - profile each layer's forward + backward on ``sample_input`` and balance the time;
      * a list of layer counts, ``[3, 4, 4, 3]``, or of layer-index lists, ``[[0, 1, 2], [3, 4], ...]``:
        used as given; a layout that drops, duplicates or reorders a layer is rejected.
    Every stage gets at least one layer, so ``num_stages`` may not exceed the number of layers.
    """
    layers = model_layers(model, paths)
    n = len(layers)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if num_stages > n:
        raise ValueError(f"cannot split {n} layers into {num_stages} stages: every stage needs at least one "
                         f"layer; use at most {n} stages (pp * vpp <= {n}) or a model with more layers")
    costs = None
    if isinstance(method, str):
        if method == "uniform":
            base, extra = divmod(n, num_stages)
            layout = [base + (1 if s < extra else 0) for s in range(num_stages)]
        elif method in ("parameters", "time"):
            if method == "parameters":
                costs = [float(sum(p.numel() for p in _unique_params(layer))) for layer in layers]
            else:
                if sample_input is None:
                    raise ValueError("method='time' profiles each layer and needs sample_input (a batch the "
                                     "first layer accepts)")
                costs = [f + b for f, b in profile_layers(layers, sample_input, sample_extras, repeats)]
            layout = balanced_partition(costs, num_stages)
        else:
            raise ValueError(f"unknown split method {method!r}; valid: 'uniform', 'parameters', 'time', or a list "
                             f"of layers per stage like [3, 4, 4, 3]")
        label = method
    else:
        layout = _explicit_layout(list(method), n, num_stages)
        label = "explicit"
    stages, first = [], 0
    for index, count in enumerate(layout):
        stages.append(Stage(layers[first:first + count], first=first, index=index))
        first += count
    return StageSplit(stages=stages, layout=tuple(layout), method=label,
                      costs=None if costs is None else tuple(costs), tied=find_tied(stages))


def _explicit_layout(layout: list, n: int, num_stages: int) -> list[int]:
    if len(layout) != num_stages:
        raise ValueError(f"layout {layout} has {len(layout)} stages; num_stages is {num_stages}")
    if all(isinstance(c, int) for c in layout):
        if any(c < 1 for c in layout):
            raise ValueError(f"layout {layout}: every stage needs at least one layer")
        total = sum(layout)
        if total != n:
            what = "drops" if total < n else "duplicates"
            raise ValueError(f"layout {layout} {what} layers: it places {total} layers, the model has {n}; "
                             f"the counts must sum to {n}")
        return layout
    flat = [i for group in layout for i in group]
    if any(len(group) == 0 for group in layout):
        raise ValueError(f"layout {layout}: every stage needs at least one layer")
    counts: dict[int, int] = {}
    for i in flat:
        counts[i] = counts.get(i, 0) + 1
    dup = sorted(i for i, c in counts.items() if c > 1)
    missing = sorted(set(range(n)) - set(flat))
    if dup or missing or flat != list(range(n)):
        raise ValueError(f"layout {layout} must list layers 0..{n - 1} once each, in order "
                         f"(duplicated: {dup}, dropped: {missing}, out of range: "
                         f"{sorted(i for i in flat if not 0 <= i < n)})")
    return [len(group) for group in layout]


def balanced_partition(costs: Sequence[float], parts: int) -> list[int]:
    """Layer counts of a contiguous split of ``costs`` into ``parts`` minimising the largest part sum."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest max-part cost of splitting the first i layers into k parts.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    layout, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        layout.append(i - j)
        i = j
    return layout[::-1]


def profile_layers(layers: Sequence[nn.Module], sample_input, sample_extras: dict | None = None,
                   repeats: int = 3) -> list[tuple[float, float]]:
    """(forward, backward) seconds of each layer on ``sample_input`` (median of ``repeats``).

    The input of layer i is the output of layer i-1; the backward takes gradients of the layer's input
    and parameters from a random output gradient.
    """
    extras = sample_extras or {}
    device_sync = _synchronizer(sample_input)
    x = sample_input
    out = []
    for layer in layers:
        accepts = _keyword_names(layer)
        kwargs = extras if accepts is None else {k: v for k, v in extras.items() if k in accepts}
        fwd, bwd = [], []
        for _ in range(max(1, repeats)):
            leaf = _as_leaf(x)
            device_sync()
            t0 = time.perf_counter()
            y = layer(*leaf, **kwargs) if isinstance(leaf, tuple) else layer(leaf, **kwargs)
            device_sync()
            t1 = time.perf_counter()
            ys = [t for t in (y if isinstance(y, tuple) else (y,)) if torch.is_tensor(t) and t.requires_grad]
            wrt = [t for t in (leaf if isinstance(leaf, tuple) else (leaf,)) if torch.is_tensor(t) and t.requires_grad]
            wrt += [p for p in layer.parameters() if p.requires_grad]
            if ys and wrt:
                torch.autograd.grad(ys, wrt, [torch.randn_like(t) for t in ys], allow_unused=True)
            device_sync()
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        out.append((sorted(fwd)[len(fwd) // 2], sorted(bwd)[len(bwd) // 2]))
        with torch.no_grad():
            x = layer(*x, **kwargs) if isinstance(x, tuple) else layer(x, **kwargs)
    return out


def _as_leaf(x):
    if isinstance(x, tuple):
        return tuple(_as_leaf(t) for t in x)
    if torch.is_tensor(x) and x.is_floating_point():
        return x.detach().requires_grad_(True)
    return x


def _synchronizer(x):
    first = x[0] if isinstance(x, tuple) else x
    if torch.is_tensor(first) and first.is_cuda:
        return torch.cuda.synchronize
    return lambda: None


def _unique_params(module: nn.Module):
    return {id(p): p for p in module.parameters()}.values()


def find_tied(stages: Sequence[nn.Module]) -> list[dict[int, str]]:
    """Parameters that appear (as the same object) in more than one stage: ``[{stage: name}, ...]``."""
    owners: dict[int, dict[int, str]] = {}
    for index, stage in enumerate(stages):
        for name, param in stage.named_parameters(remove_duplicate=True):
            owners.setdefault(id(param), {}).setdefault(index, name)
    return [group for group in owners.values() if len(group) > 1]
