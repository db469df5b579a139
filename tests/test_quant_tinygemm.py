# int4 through torch's tinygemm (kernels/int4_tinygemm.py): the layout conversion's math and the CPU path unchanged.
"""tinygemm's CUDA op cannot run here, so this file checks what decides its correctness:

- the conversion (nibble order, ``z = m + 8 s``, the (G, N, 2) layout) reproduces our dequantized weights within
  the stated bf16 bound, and, where this torch has the CPU twin of the kernel
  (``aten._weight_int4pack_mm_for_cpu``, same scales-and-zeros convention), torch's own kernel agrees with it;
- QuantizedLinear keeps its CPU behaviour (no tinygemm buffers, not saved, same outputs) and names bad choices.

``bench/quant_gemv.py`` checks the CUDA op against the float32 reference on the GPU before timing it.
"""

from __future__ import annotations


import pytest
import torch
from pipeloom.inference.quant import QuantConfig, QuantizedLinear, formats, quantize_model
from pipeloom.kernels import int4_tinygemm as tg
from pipeloom.kernels import quant_matmul as qm
from torch import nn


def _quantized(n: int, k: int, group_size: int, shift: float = 0.0):
    w = (torch.randn(n, k) * 0.05 + shift).to(torch.bfloat16)
    return formats.quantize_int4(w, group_size)  # packed (N, K/2), scales and offsets (N, G) bf16


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("shift", [0.0, 0.3])  # groups centred on zero, and far from it (|m + 8 s| large)
def test_scales_and_zeros_reproduce_our_weights(seed, group_size, shift):
    n, k = 24, 512
    packed, s, m = _quantized(n, k, group_size, shift)
    sz = tg.scales_and_zeros(s, m)
    assert sz.shape == (k // group_size, n, 2) and sz.dtype == torch.bfloat16 and sz.is_contiguous()
    assert torch.equal(sz[..., 0], s.t())  # the scale itself, not rounded
    ours = formats.dequantize_int4(packed, s, m, group_size)  # q s + m, float32
    theirs = tg.dequantize_tinygemm(tg.tinygemm_codes(packed), sz, group_size)  # (q - 8) s + z
    mid = (m.float() + 8 * s.float()).abs().repeat_interleave(group_size, dim=1)
    err = (theirs - ours).abs()
    assert bool((err <= tg.BF16_UNIT_ROUNDOFF * mid + 1e-6 * ours.abs() + 1e-30).all()), float(err.max())
    # after each side's bf16 rounding (tinygemm rounds (q - 8) s + z, our reference q s + m): the stated bound
    diff = (theirs.to(torch.bfloat16).float() - ours.to(torch.bfloat16).float()).abs()
    assert bool((diff <= tg.weight_difference_bound(ours, s, m, group_size) * (1 + 1e-6)).all())
    # here the z rounding is small against the int4 step itself: far from moving a weight by a code
    assert bool((err <= s.float().repeat_interleave(group_size, dim=1) / 4).all())


def test_codes_are_nibble_swapped(seed):
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    codes = tg.tinygemm_codes(formats.pack_int4(q))
    assert codes.dtype == torch.uint8 and codes.shape == (8, 32)
    assert torch.equal(codes >> 4, q[:, 0::2]) and torch.equal(codes & 0xF, q[:, 1::2])  # even column high


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                    reason="this torch has no CPU tinygemm twin")
@pytest.mark.parametrize("group_size", [32, 128])
def test_torch_cpu_kernel_agrees_with_the_conversion(seed, group_size):
    """torch's CPU int4 kernel, fed our scales and zeros, multiplies by (q - 8) s + z: the convention the CUDA
    kernel shares (one schema, one docstring), checked against torch's code rather than ours."""
    n, k = 16, 256
    packed, s, m = _quantized(n, k, group_size, 0.1)
    q = formats.unpack_int4(packed).to(torch.int32)  # (N, K) codes
    try:
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError as err:
        pytest.skip(f"the CPU packing op refused its input here: {str(err).splitlines()[0]}")
    x = torch.randn(3, k).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, tg.scales_and_zeros(s, m))  # (3, N)
    deq = tg.dequantize_tinygemm(tg.tinygemm_codes(packed), tg.scales_and_zeros(s, m), group_size)
    ref = x.float() @ deq.t()
    mag = x.float().abs() @ deq.abs().t()
    err = (y.float() - ref).abs()
    assert bool((err <= 2**-7 * mag + 2**-7 * ref.abs()).all()), float(err.max())
    unsigned = x.float() @ (deq + 8 * s.float().repeat_interleave(group_size, dim=1)).t()  # if W were q s + z
    assert not bool(((y.float() - unsigned).abs() <= 2**-7 * mag).all()), "the test cannot tell the conventions apart"


def test_shapes_tinygemm_takes():
    assert tg.unsupported(12288, 4096, 128) is None and tg.unsupported(4096, 11008, 128) is None
    assert "multiple of 128" in tg.unsupported(4096, 4160, 64)
    assert "multiple of 8" in tg.unsupported(4100, 4096, 128)
    assert "group_size=48" in tg.unsupported(4096, 4096, 48)
    assert not tg.available("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        tg.pack(*_quantized(16, 256, 128), 128)
    with pytest.raises(ValueError, match="bfloat16"):
        tg.int4_matmul_tinygemm(torch.randn(1, 256), torch.zeros(2, 2, 32, 4, dtype=torch.int32),
                                torch.zeros(2, 16, 2), 128)


def test_cpu_layers_are_unchanged_and_save_no_tinygemm_buffers(seed):
    """On CPU an int4 layer builds no tinygemm layout, computes what the torch reference computes, saves only its
    own buffers and counts only those as weight bytes; backend='tinygemm' is named where it cannot run."""
    linear = nn.Linear(256, 48, bias=True).to(torch.bfloat16)
    layer = QuantizedLinear.from_linear(linear, "int4", group_size=64)
    assert layer.tinygemm_weight is None and layer.tinygemm_scales_zeros is None
    assert not layer.prepare_tinygemm() and "CUDA" in layer.tinygemm_unsupported()
    x = torch.randn(2, 256).to(torch.bfloat16)
    ref = qm.int4_matmul_torch(x, layer.qweight, layer.scale, layer.offset, 64, layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    assert set(layer.state_dict()) == {"qweight", "scale", "offset", "bias"}
    before = layer.weight_bytes()
    layer.tinygemm_weight = torch.zeros(1000, dtype=torch.int32)  # as prepare_tinygemm would set it on a GPU
    assert layer.weight_bytes() == before and "tinygemm_weight" not in layer.state_dict()
    layer.load_state_dict(QuantizedLinear.from_linear(nn.Linear(256, 48).to(torch.bfloat16), "int4", group_size=64)
                          .state_dict())
    assert layer.tinygemm_weight is None  # a layout of the old codes must not survive new ones
    forced = QuantizedLinear.from_linear(linear, "int4", group_size=64, backend="tinygemm")
    with pytest.raises(ValueError, match="tinygemm"):
        forced(x)
    with pytest.raises(ValueError, match="int4 weights only"):
        QuantizedLinear(256, 48, "int8", backend="tinygemm")
    with pytest.raises(ValueError, match="int4 weights only"):
        QuantConfig(mode="int8", kernels="tinygemm")
    model = nn.Sequential(nn.Linear(256, 64)).to(torch.bfloat16)
    quantize_model(model, "int4", 64, skip_head=False, kernels="tinygemm")  # allowed: it is int4
    assert model[0].backend == "tinygemm"
