# pipeloom.kernels: fused Triton kernels with torch fallbacks; `use_triton` is the one place a path is chosen.
"""Fused kernels, one file per operation (cross_entropy, linear_cross_entropy, rmsnorm, add_rmsnorm, layernorm,
rotary, swiglu, and the inference ones: paged_attention, paged_decode, kv_fp8, quant_matmul with int8_gemv and
int4_tinygemm). Each file holds a
torch reference, the Triton kernel(s), a launcher and an ``autograd.Function``; its public function
(``rmsnorm(x, w)``, ...) asks :func:`use_triton` which path to run.

The Triton path runs when triton is importable and either the tensor is on a CUDA device or the Triton
interpreter is on (``TRITON_INTERPRET=1``, CPU tensors, slow and exact). Triton 3.x decides interpreter
versus compiler when a function is *defined* by ``@triton.jit``, its own library (``tl.sum``, ``tl.max``,
``tl.sigmoid``) included, so ``TRITON_INTERPRET=1`` must be set before ``import triton``; when it was set
later, CPU tensors keep the torch path. Force the torch path with ``PIPELOOM_KERNELS=torch`` in the
environment, ``with torch_path(): ...``, or for the whole process :func:`set_kernels` (``"torch"``); the
training launcher's ``model.kernels`` option calls it. ``pipeloom.models`` asks :func:`use_triton` too, so
the models run these kernels wherever they are usable (a CUDA GPU with triton) unless switched off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
from pipeloom import features

_forced_torch = False
_local = threading.local()  # always_fuse: per thread (an engine may step its model in a background thread)
_mode = "auto"  # set_kernels: "auto" (Triton where usable) or "torch"
KERNEL_MODES = ("auto", "triton", "torch")


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the kernels compute in float32


def use_triton(x: torch.Tensor) -> bool:
    """True when the fused Triton kernel should run on ``x``; False: the torch path (always for float64,
    and while ``torch.compile`` traces, so Inductor generates and fuses those operations itself)."""
    if torch.compiler.is_compiling():  # first: what follows may break a Dynamo graph and run eagerly
        return False  # inside torch.compile, Inductor fuses these operations itself (and better: bench/RESULTS.md)
    if (_forced_torch or _mode == "torch" or os.environ.get("PIPELOOM_KERNELS", "auto") == "torch"
            or x.dtype not in TRITON_DTYPES):
        return False
    if not features.triton_usable():
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreted())


# Below this many elements a fused kernel saves less GPU time than its launch costs on the CPU: Triton's
# Python launcher and our wrappers take ~100-350 us per call on the H100 host, so a launcher-like step of
# 4 microbatches of 4x1024 tokens on a 124M GPT (3.1M elements per norm) ran at 183 ms with the kernels and
# 123 ms without; with 16x1024 tokens (12.6M) they made the eager step 1.32x faster (bench/RESULTS.md).
MIN_FUSED_ELEMENTS = 1 << 23


def worth_fusing(x: torch.Tensor) -> bool:
    """What ``pipeloom.models`` asks: :func:`use_triton`, and ``x`` large enough for the fused kernel to pay
    for its launch (``MIN_FUSED_ELEMENTS``) unless :func:`always_fuse` is on in this thread. Explicit calls of
    the kernel functions only ask ``use_triton``."""
    if torch.compiler.is_compiling():  # first: the torch path, before a thread-local read could break the graph
        return False
    if x.numel() < MIN_FUSED_ELEMENTS and not getattr(_local, "always", False):
        return False  # the cheap tests before use_triton's (~10 us of host time per call)
    return use_triton(x)


@contextlib.contextmanager
def always_fuse(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread) :func:`worth_fusing` ignores the size threshold: every tensor the Triton
    path can take runs the fused kernel. For forwards captured in a CUDA graph, where a kernel's host launch cost
    is paid once at capture and each replayed kernel costs ~1-2 us of GPU time, so one fused kernel always beats
    the several an eager composite launches (the inference runner's decode graphs enter it). ``enabled=False``:
    leave the choice as it is. Not for ``torch.compile``'d code: there the torch path runs and Inductor fuses."""
    previous = getattr(_local, "always", False)
    _local.always = previous or enabled
    try:
        yield
    finally:
        _local.always = previous


def interpreted() -> bool:
    """Triton runs in its interpreter: TRITON_INTERPRET=1 now, and it was when triton was imported."""
    return os.environ.get("TRITON_INTERPRET") == "1" and type(tl.sum).__name__ == "InterpretedFunction"


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype the references compute in: float32, or float64 for float64."""
    return t if t.dtype == torch.float64 else t.float()


def set_kernels(mode: str) -> str:
    """Choose the kernels' path for this process and return the previous mode.

    ``"auto"``: the Triton kernels wherever :func:`use_triton` finds them usable (CUDA tensors with triton
    installed; CPU tensors under ``TRITON_INTERPRET=1``), the torch path elsewhere. ``"triton"``: the same,
    but refused with a message saying what is missing when Triton cannot run here. ``"torch"``: always the
    torch path.
    """
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r}; choose one of {KERNEL_MODES}")
    if mode == "triton" and not features.triton_usable():
        missing = "triton is not installed" if not features.has("triton") else "there is no CUDA GPU"
        raise RuntimeError(f"kernels='triton' but {missing} (the kernels need triton and a CUDA GPU, or "
                           f"TRITON_INTERPRET=1 on CPU); use kernels='auto' (Triton where usable) or 'torch'")
    previous, _mode = _mode, "torch" if mode == "torch" else "auto"
    return previous


@contextlib.contextmanager
def torch_path(enabled: bool = True) -> Iterator[None]:
    """Within this block every kernel takes its torch path (``enabled=False``: leave the choice as it is)."""
    global _forced_torch
    previous, _forced_torch = _forced_torch, _forced_torch or enabled
    try:
        yield
    finally:
        _forced_torch = previous


class _MissingTriton:
    """Stands in for ``triton`` and ``triton.language`` when triton is absent, so kernel files still import.

    ``@triton.jit`` returns a kernel that raises, on launch, an error saying what to install; the torch paths
    never launch one because :func:`use_triton` is False without triton.
    """

    constexpr = "constexpr"  # kernel signatures annotate with tl.constexpr

    def jit(self, fn=None, **kwargs):
        if fn is None:
            return self.jit
        return _UnavailableKernel(fn.__name__)

    def __getattr__(self, name: str):
        features.require("triton", f"triton.{name}")


class _UnavailableKernel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, grid):
        features.require("triton", f"the fused kernel {self.name}")


if features.has("triton"):
    import triton
    import triton.language as tl
else:
    triton = tl = _MissingTriton()

__all__ = ["KERNEL_MODES", "MIN_FUSED_ELEMENTS", "always_fuse", "interpreted", "set_kernels", "tl", "torch_path",
           "triton", "upcast", "use_triton", "worth_fusing"]
