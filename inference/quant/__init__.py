# pipeloom.inference.quant: weight-only quantization (int8, int4, float8) for inference, ours or torchao's.
"""``quantize_model(model, "none"|"int8"|"int4"|"fp8", group_size=128)`` swaps a model's linears for
:class:`QuantizedLinear` layers (formats and error bounds in ``formats``; kernels in
``pipeloom.kernels.quant_matmul``); ``save_quantized`` / ``load_quantized`` store and restore the result.
"""

from .apply import (
    MODES,
    QuantConfig,
    load_quantized,
    prepare_kernels,
    prepare_quantized,
    quantization_report,
    quantize_model,
    save_quantized,
)
from .evaluate import VAL_MARGIN, quantized_validation, validation_loss, validation_report
from .linear import QuantizedLinear

__all__ = ["MODES", "VAL_MARGIN", "QuantConfig", "QuantizedLinear", "load_quantized", "prepare_kernels",
           "prepare_quantized", "quantization_report", "quantize_model", "quantized_validation", "save_quantized",
           "validation_loss", "validation_report"]
