# Which optional dependencies this process can use: the one place availability is decided.
"""Availability flags for optional integrations, checked once and cached.

Code that uses an optional package asks here (``features.has("triton")``) and, when the feature is
required, calls :func:`require`, which raises an error that says what to install.
"""

from __future__ import annotations

import functools
import importlib.util
import os

_INSTALL_HINTS = {
    "triton": "pip install triton (GPU kernels; on CPU set TRITON_INTERPRET=1 to run them slowly and exactly)",
    "apex": "NVIDIA apex is not on PyPI (the 'apex' package there is unrelated); build it from NVIDIA's sources",
    "deepspeed": "pip install --no-build-isolation 'pipeloom[deepspeed]' after torch is installed (DS_BUILD_OPS=0)",
    "wandb": "pip install 'pipeloom[wandb]'",
    "transformers": "pip install transformers safetensors",
    "tokenizers": "pip install tokenizers",
    "fastapi": "pip install 'pipeloom[serve]'",
    "torchao": "pip install 'pipeloom[quant]' (torchao: its quantized layouts and kernels)",
    "grpc_tools": "pip install 'pipeloom[serve]' (grpcio-tools generates the gRPC code)",
}

_MODULES = {"apex": "apex.normalization"}


@functools.cache
def has(name: str) -> bool:
    """True when the optional package ``name`` can be imported (apex: NVIDIA's, not PyPI's namesake)."""
    module = _MODULES.get(name, name)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a namesake without submodules
        return False


def require(name: str, feature: str) -> None:
    """Raise ImportError naming ``feature`` and how to install ``name`` when it is not importable."""
    if not has(name):
        hint = _INSTALL_HINTS.get(name, f"pip install {name}")
        raise ImportError(f"{feature} needs the optional package '{name}': {hint}")


def triton_usable() -> bool:
    """Triton kernels can run here: a CUDA GPU is present, or the interpreter is on (TRITON_INTERPRET=1)."""
    if not has("triton"):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()
