# Counting the kernels a forward launches on any device: aten operations that run one, and Triton launches.
"""A CUDA graph replays the kernels its forward launched, so the kernel count of the batch-1 decode step is
what bounds it at small batch (launch-bound: ~1-2 us each). On a GPU ``torch.profiler`` counts them; this module
counts the same thing on any device, CPU included, from the Python side:

* aten operations seen by a :class:`~torch.utils._python_dispatch.TorchDispatchMode` (below autograd, after the
  composite operations decompose), less those that launch nothing: views (``split``, ``view``, ``t``) and
  allocations (``empty``); ``.item()``-style reads are counted apart as ``syncs`` (a captured graph has none);
* Triton kernel launches, by wrapping ``run`` of triton's ``JITFunction`` (compiled) and ``InterpretedFunction``
  (``TRITON_INTERPRET=1``): each ``kernel[grid](...)`` call is one launch.

One aten operation is counted as one kernel; on a GPU a few (cuBLAS split-K GEMVs) launch two, so the profiler's
figure on a GPU can be slightly larger. :func:`decode_step_launches` counts what a decode graph of the
runner captures.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from pipeloom import features
from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach",
              "alias", "_unsafe_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size"}
_SYNCS = {"_local_scalar_dense", "item"}
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


@dataclass
class Launches:
    """Kernels launched, by name: ``aten`` (operation name -> count), ``triton`` (kernel name -> count)."""

    aten: Counter = field(default_factory=Counter)
    triton: Counter = field(default_factory=Counter)
    syncs: int = 0  # device -> host reads (``.item()``, ``.tolist()``)

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def summary(self) -> str:
        """``total: op xN, ...`` with the most frequent first (aten and Triton together)."""
        parts = [f"{name} x{n}" for name, n in (self.aten + self.triton).most_common()]
        return f"{self.total} kernels: " + ", ".join(parts)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, launches: Launches):
        super().__init__()
        self.launches = launches
        self.paused = 0  # > 0 inside a Triton launch (the interpreter's own tensor copies are not kernels)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # a composite (under inference mode ``linear``, ``dropout`` reach here whole): count what its C++
            # implementation runs (not ``func.decompose``, which prefers Python decompositions that may differ:
            # eval-mode dropout clones there and returns its input in C++)
            with self:
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNCS:
            self.launches.syncs += 1
        elif not (func.is_view or name in _NO_KERNEL):
            self.launches.aten[name] += 1
        return func(*args, **kwargs)


def _triton_classes() -> list:
    """Triton's launchable kernel classes (each ``kernel[grid](...)`` calls their ``run``); [] without triton."""
    if not features.has("triton"):
        return []
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


@contextlib.contextmanager
def count_launches() -> Iterator[Launches]:
    """Count the kernels launched inside the block (this process, every thread: the Triton wrapper is global
    while it lasts, so do not overlap two counts)."""
    launches = Launches()
    aten = _AtenCounter(launches)
    originals = [(cls, cls.run) for cls in _triton_classes()]

    def wrap(run):
        def counted(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                launches.triton[getattr(self, "__name__", None) or self.fn.__name__] += 1
            aten.paused += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                aten.paused -= 1
        return counted

    for cls, run in originals:
        cls.run = wrap(run)
    try:
        with aten:
            yield launches
    finally:
        for cls, run in originals:
            cls.run = run


def decode_step_launches(runner, batch: int = 1) -> Launches:
    """The kernels of one decode step of ``batch`` sequences as the runner's decode graph captures it: its
    graph forward (fused where the runner fuses) over the static buffers, every row pointed at the scratch block
    (as capture does: no sequence's cache is touched)."""
    graphs = runner.decode_graphs
    n = graphs.size_for(batch)
    _, _, slots, seq_lens, tables = graphs.unpack(graphs.index, graphs.small, n, graphs.max_blocks)
    slots.fill_(graphs.scratch_slot)
    seq_lens.fill_(1)
    tables.fill_(runner.scratch_block)
    with torch.inference_mode(), count_launches() as launches:
        graphs.forward(graphs.index, graphs.small, n)
    return launches


__all__ = ["Launches", "count_launches", "decode_step_launches"]
