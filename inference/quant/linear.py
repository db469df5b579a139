# QuantizedLinear: a drop-in nn.Linear replacement holding int8 / int4 / float8 weights as buffers.
"""Buffers by mode (N = out_features, K = in_features, G = K / group_size):

========  =====================================  ====================================================
mode      ``qweight``                             scales
========  =====================================  ====================================================
int8      (N, K) int8                            ``scale`` (N,) in the source weight's dtype
int4      (N, K/2) uint8, two codes per byte     ``scale``, ``offset`` (N, G) in the source dtype
fp8       (N, K) uint8 holding e4m3 bits         ``scale`` (N,) float32
========  =====================================  ====================================================

float8 codes are kept as their uint8 bit pattern so that ``model.to(torch.bfloat16)`` (which casts every
floating buffer) leaves them alone; they are viewed as ``torch.float8_e4m3fn`` in the forward. Every buffer
is persistent: ``state_dict()`` holds the quantized model, and :func:`~.apply.prepare_quantized` builds the
empty structure that ``load_state_dict`` fills.

Forward: int8/int4 call ``pipeloom.kernels.quant_matmul`` (the Triton GEMVs for decode-sized inputs on a GPU,
the torch reference otherwise). For int4 on a CUDA GPU ``backend="auto"`` runs the kernel that
``PIPELOOM_INT4_KERNEL`` names when the layer is built: ``triton`` (default: pipeloom's GEMV,
``kernels/int4_gemv.py``; 40 us per 7B layer on an H200, 2.7 TB/s) or ``tinygemm`` (torch's kernel,
``kernels/int4_tinygemm.py``; compute capability 8.0+, bf16 activations; 60 us there);
``backend="triton"`` / ``"tinygemm"`` insist on one. Both want a layout of their own,
built once per layer into *non-persistent* buffers (not saved; rebuilt after loading or moving) by
:meth:`QuantizedLinear.prepare_kernels`: the GEMV's (s, m) pairs (``gemv_scale_offset``, (N, G, 2)), or
tinygemm's tiles and (G, N, 2) scales and zeros. ``quantize_model`` / ``load_quantized`` call it; otherwise the
first eager forward that needs a layout builds it (never inside a CUDA-graph capture or a compile trace: there
the GEMV builds its pairs per call and tinygemm falls back to the GEMV). fp8 quantizes the activations per row
at run time and runs a rowwise-scaled float8 GEMM (``torch._scaled_mm``) - or, with ``fp8_activations=False``,
multiplies by the float8 weight converted to the input dtype (exact: e4m3 values are bf16 values) and scales
after.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from pipeloom.kernels import int4_tinygemm, interpreted
from pipeloom.kernels.int4_gemv import scales_offsets
from pipeloom.kernels.quant_matmul import BACKENDS, int4_pairs_matmul, int8_matmul, kernel_usable, runs_kernel
from torch import nn

from . import formats

QUANT_MODES = ("int8", "int4", "fp8")
LAYER_BACKENDS = BACKENDS + ("tinygemm",)  # tinygemm: int4 only, torch's CUDA kernel
INT4_KERNEL_ENV = "PIPELOOM_INT4_KERNEL"  # what backend="auto" runs for int4 on a CUDA GPU
INT4_KERNELS = ("triton", "tinygemm")


def int4_kernel_choice() -> str:
    """``$PIPELOOM_INT4_KERNEL``: the int4 kernel ``backend="auto"`` runs on a GPU. Unset: ``triton`` (our GEMV, 1.5x
    tinygemm's speed per 7B layer on an H200, ``bench/RESULTS.md``) where triton is installed, else ``tinygemm``;
    where tinygemm cannot run, the GEMV (or the torch path) does."""
    from pipeloom import features

    choice = os.environ.get(INT4_KERNEL_ENV, "triton" if features.has("triton") else "tinygemm")
    if choice not in INT4_KERNELS:
        raise ValueError(f"{INT4_KERNEL_ENV}={choice!r}; choose one of {INT4_KERNELS}")
    return choice


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored quantized; x (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, mode: str, *, bias: bool = False, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 fp8_activations: bool = True, backend: str = "auto"):
        super().__init__()
        if mode not in QUANT_MODES:
            raise ValueError(f"mode={mode!r}; a QuantizedLinear is one of {QUANT_MODES}")
        if backend not in LAYER_BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {LAYER_BACKENDS}")
        if backend == "tinygemm" and mode != "int4":
            raise ValueError(f"backend='tinygemm' runs int4 weights only, this layer is {mode}; use 'auto'")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.group_size = group_size if mode == "int4" else 0
        self.fp8_activations = fp8_activations
        self.backend = backend  # "auto": the GEMVs (or tinygemm) where usable; "triton"; "torch"; "tinygemm" (int4)
        # int4 on a GPU with backend "auto": tinygemm instead of the GEMV ($PIPELOOM_INT4_KERNEL, read once here so
        # that a compiled forward reads an attribute, not the environment)
        self.auto_tinygemm = mode == "int4" and int4_kernel_choice() == "tinygemm"
        n, k = out_features, in_features
        empty = dict(device=device)
        if mode == "int8":
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, **empty))
            self.register_buffer("scale", torch.empty(n, dtype=dtype, **empty))
        elif mode == "int4":
            formats.check_group_size(k, group_size)
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, **empty))
            self.register_buffer("scale", torch.empty(n, k // group_size, dtype=dtype, **empty))
            self.register_buffer("offset", torch.empty(n, k // group_size, dtype=dtype, **empty))
            # the kernels' layouts of the same weight (prepare_kernels); derived, so not saved
            self.register_buffer("gemv_scale_offset", None, persistent=False)  # (N, G, 2): the GEMV's (s, m)
            self.register_buffer("tinygemm_weight", None, persistent=False)
            self.register_buffer("tinygemm_scales_zeros", None, persistent=False)
            self.register_load_state_dict_post_hook(_drop_layouts)  # new codes: the old layouts are stale
        else:
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.uint8, **empty))
            self.register_buffer("scale", torch.empty(n, dtype=torch.float32, **empty))
        self.register_buffer("bias", torch.empty(n, dtype=dtype, **empty) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, *, group_size: int = 128, fp8_activations: bool = True,
                    backend: str = "auto") -> QuantizedLinear:
        """Quantize ``linear``'s weight (scales in its dtype; fp8: float32) into a new module on its device."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, mode, bias=linear.bias is not None, group_size=group_size,
                dtype=w.dtype, device=w.device, fp8_activations=fp8_activations, backend=backend)
        with torch.no_grad():
            if mode == "int8":
                codes, scale = formats.quantize_int8(w)
                q.qweight.copy_(codes)
                q.scale.copy_(scale)
            elif mode == "int4":
                packed, scale, offset = formats.quantize_int4(w, group_size)
                q.qweight.copy_(packed)
                q.scale.copy_(scale)
                q.offset.copy_(offset)
            else:
                w8, scale = formats.quantize_fp8(w)
                q.qweight.copy_(w8.view(torch.uint8))
                q.scale.copy_(scale)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        q.prepare_kernels()
        return q

    # ------------------------------------------------------------------ int4 kernels: the GEMV and tinygemm

    def _runs_tinygemm(self) -> bool:
        """Decode-sized inputs on a GPU go to tinygemm (else to the GEMV or the torch path)."""
        return self.backend == "tinygemm" or (self.backend == "auto" and self.auto_tinygemm)

    def tinygemm_unsupported(self) -> str | None:
        """Why this layer cannot run tinygemm where its buffers are now, or None when it can."""
        if self.mode != "int4":
            return f"tinygemm runs int4 weights, this layer is {self.mode}"
        if self.backend not in ("auto", "tinygemm"):
            return f"backend={self.backend!r}"
        if self.scale.dtype != torch.bfloat16:
            return f"tinygemm runs bfloat16 models, this layer's scales are {self.scale.dtype}"
        if not int4_tinygemm.available(self.qweight.device):
            return (f"the weights are on {self.qweight.device}; tinygemm needs a CUDA GPU of compute capability "
                    "8.0+ and a torch with aten._weight_int4pack_mm")
        return int4_tinygemm.unsupported(self.out_features, self.in_features, self.group_size)

    def prepare_tinygemm(self) -> bool:
        """Build tinygemm's weight layout from the int4 buffers where it can run; True when it is ready."""
        if self.tinygemm_unsupported() is not None:
            return False
        with torch.no_grad():
            weight, scales_zeros = int4_tinygemm.pack(self.qweight, self.scale, self.offset, self.group_size)
        self.tinygemm_weight, self.tinygemm_scales_zeros = weight, scales_zeros
        return True

    def prepare_kernels(self) -> bool:
        """Build the layout the int4 kernel this layer runs wants, where it can run (a GPU, or the Triton
        interpreter): tinygemm's, or the GEMV's (s, m) pairs. True when one was built."""
        if self.mode != "int4" or self.backend == "torch":
            return False
        if self._runs_tinygemm() and self.prepare_tinygemm():
            return True
        if self.backend == "tinygemm" or not (self.qweight.is_cuda or interpreted()):
            return False
        with torch.no_grad():
            self.gemv_scale_offset = scales_offsets(self.scale, self.offset)
        return True

    def _gemv_pairs(self, x: torch.Tensor) -> torch.Tensor | None:
        """The GEMV's (s, m) pairs for ``x``'s device, built on first eager use; None inside a capture or a compile
        trace (the op then builds them per call)."""
        pairs = self.gemv_scale_offset
        if pairs is not None and pairs.device == x.device and pairs.dtype == self.scale.dtype:
            return pairs
        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        with torch.no_grad():
            self.gemv_scale_offset = scales_offsets(self.scale, self.offset)
        return self.gemv_scale_offset

    def _tinygemm_ready(self, x: torch.Tensor) -> bool:
        """Run tinygemm on ``x``? Prepares the layout on first use outside a capture or a compile trace."""
        if self.backend == "tinygemm":
            if not (x.is_cuda and x.dtype == torch.bfloat16):
                raise ValueError(f"backend='tinygemm' needs bfloat16 CUDA activations, got {x.dtype} on {x.device}; "
                                 "use backend='auto'")
        elif not (x.is_cuda and x.dtype == torch.bfloat16 and kernel_usable(x)):
            return False
        w = self.tinygemm_weight
        if w is not None and w.device == x.device and self.tinygemm_scales_zeros.dtype == torch.bfloat16:
            return True
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            if self.backend == "tinygemm":
                raise RuntimeError("backend='tinygemm': call prepare_kernels() (or quantize on the GPU) before "
                                   "compiling or capturing a CUDA graph")
            return False  # the GEMV this time; packing here would be captured or traced
        if self.prepare_tinygemm():
            return True
        if self.backend == "tinygemm":
            raise ValueError(f"backend='tinygemm' cannot run this layer: {self.tinygemm_unsupported()}")
        return False

    @property
    def fp8_weight(self) -> torch.Tensor:
        """The fp8 codes as ``torch.float8_e4m3fn`` (N, K)."""
        return self.qweight.view(formats.FP8_DTYPE)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module multiplies by, (N, K) float32."""
        if self.mode == "int8":
            return formats.dequantize_int8(self.qweight, self.scale)
        if self.mode == "int4":
            return formats.dequantize_int4(self.qweight, self.scale, self.offset, self.group_size)
        return formats.dequantize_fp8(self.fp8_weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.in_features:
            raise ValueError(f"input has {x.size(-1)} features, this layer takes in_features={self.in_features}")
        if self.mode == "int8":
            return int8_matmul(x, self.qweight, self.scale, self.bias, backend=self.backend)
        if self.mode == "int4":
            if self._runs_tinygemm() and self._tinygemm_ready(x):
                return int4_tinygemm.int4_matmul_tinygemm(x, self.tinygemm_weight, self.tinygemm_scales_zeros,
                                                          self.group_size, self.bias)
            backend = "auto" if self.backend == "tinygemm" else self.backend
            pairs = self._gemv_pairs(x) if runs_kernel(x, backend) else None
            return int4_pairs_matmul(x, self.qweight, pairs, self.scale, self.offset, self.group_size, self.bias,
                                     backend=backend)
        return self._fp8_forward(x)

    def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.fp8_activations:
            x8, x_scale = formats.quantize_fp8_rows(x.reshape(-1, self.in_features))  # (M, K), (M, 1)
            y = formats.fp8_matmul(x8, x_scale, self.fp8_weight, self.scale, out_dtype=x.dtype)  # (M, N)
            y = y.reshape(*lead, self.out_features)
        else:
            y = F.linear(x, self.fp8_weight.to(x.dtype)) * self.scale.to(x.dtype)  # (..., N)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the saved buffers (codes, scales, offsets, bias): what a decode step reads for this layer
        (the kernels' layouts of an int4 weight hold the same bytes: the GEMV reads the codes and (s, m) pairs,
        tinygemm int32 tiles of the codes and (G, N, 2) bf16)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if name not in self._non_persistent_buffers_set)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        act = f", fp8_activations={self.fp8_activations}" if self.mode == "fp8" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}{act}, "
                f"bias={self.bias is not None}, backend={self.backend}")


def _drop_layouts(module: QuantizedLinear, incompatible_keys) -> None:
    """After ``load_state_dict``: forget the kernels' layouts of the previous weights (rebuilt on the next eager
    forward, or by ``prepare_kernels``)."""
    module.gemv_scale_offset = module.tinygemm_weight = module.tinygemm_scales_zeros = None


def fuse_quantized(layers: list[QuantizedLinear]) -> QuantizedLinear | None:
    """ONE layer computing the outputs of ``layers`` (over the same input) side by side, their buffers
    re-pointed at row views of its own (no second copy): quantization is per output row (int8/fp8 scales,
    int4 row groups), so stacking rows is exact. The inference runner fuses q/k/v and gate/up this way, one
    GEMV instead of three or two per step. None when the layers differ in mode, input, group, backend, dtype,
    device or bias."""
    first = layers[0]
    key = lambda m: (m.mode, m.in_features, m.group_size, m.backend, m.fp8_activations, m.scale.dtype,
                     m.qweight.device, m.bias is None, m.auto_tinygemm)
    if not all(isinstance(m, QuantizedLinear) and key(m) == key(first) for m in layers):
        return None
    sizes = [m.out_features for m in layers]
    fused = QuantizedLinear(first.in_features, sum(sizes), first.mode, bias=first.bias is not None,
                            group_size=first.group_size or 128, dtype=first.scale.dtype, device="meta",
                            fp8_activations=first.fp8_activations, backend=first.backend)
    fused.auto_tinygemm = first.auto_tinygemm
    names = ["qweight", "scale"] + (["offset"] if first.mode == "int4" else []) + \
        (["bias"] if first.bias is not None else [])
    with torch.no_grad():
        for name in names:
            whole = torch.cat([getattr(m, name) for m in layers])  # (sum of outputs, ...)
            setattr(fused, name, whole)
            for m, part in zip(layers, whole.split(sizes)):
                setattr(m, name, part)
    for m in layers:
        if m.mode == "int4":
            _drop_layouts(m, None)  # layouts of the old storage: rebuilt if needed
    if first.mode == "int4":
        fused.prepare_kernels()
    return fused
