# The int4 GEMV (kernels/int4_gemv.py): exact against the float32 reference under the interpreter, its sm_90 code.
"""Tolerance, with ``mag2 = |x| @ (q |s| + |m|)^T`` (per output, the magnitudes of both terms the kernel adds:
``s * sum(x q)`` and ``m * sum(x)``): float32 inputs ``|kernel - reference| <= 1e-5 * mag2`` (the codes convert
exactly, only the summation order and the place of the scale differ); 16-bit inputs add the one rounding of
the output to the input dtype, ``2^-7 |reference|`` for bf16 (the interpreter truncates: two ulps).

Without a GPU the ``test_triton_*`` tests run in the interpreter child (``test_interpreter_runs_...``); the
compile test builds the GPU code with Triton's own ptxas and reads the SASS (no GPU needed).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
from pipeloom import features
from pipeloom.inference.quant import QuantizedLinear, formats
from pipeloom.kernels import int4_gemv as gemv
from pipeloom.kernels import interpreted
from pipeloom.kernels import quant_matmul as qm
from torch import nn


@pytest.fixture
def device(triton_child):
    return triton_child.device("test_interpreter_runs_int4_gemv_tests")


def _weights(n: int, k: int, group_size: int, dtype: torch.dtype, device) -> tuple:
    w = torch.randn(n, k, device=device) * 0.05 + 0.02
    packed, s, m = formats.quantize_int4(w, group_size, dtype)
    q = formats.unpack_int4(packed)
    q[0, :4] = torch.tensor([0, 15, 15, 0], dtype=q.dtype)  # both ends of the code range, in one word
    q[-1, -8:] = 15  # a word of all ones: every nibble mask at its widest
    return formats.pack_int4(q), s, m


def check(y: torch.Tensor, x, packed, s, m, group_size: int, bias, what: str) -> None:
    ref = gemv.int4_gemv_torch(x.float(), packed, s, m, group_size, None if bias is None else bias.float())
    q = formats.unpack_int4(packed).float()  # (N, K)
    terms = q * s.float().abs().repeat_interleave(group_size, 1) + m.float().abs().repeat_interleave(group_size, 1)
    mag2 = x.float().abs() @ terms.t() + (0 if bias is None else bias.float().abs())
    allowed = 1e-5 * mag2.double()
    if y.dtype != torch.float32:
        allowed = allowed + 2**-7 * ref.double().abs() + 1e-30
    err = (y.double() - ref.double()).abs()
    assert y.shape == ref.shape, what
    assert bool((err <= allowed).all()), f"{what}: worst excess {float((err - allowed).max()):.3e}"


@pytest.mark.parametrize("config", sorted(gemv.CONFIGS))
def test_triton_int4_gemv_configs(device, seed, config):
    """Every configuration the GPU bench times: N ragged against every tile (18 rows), K = 1280 (one full step of
    1024 columns and a ragged 256-column tail; for the 2048-column steps only the tail), float32 and the bf16 path
    (x and pairs as int32 views), 1 and 3 rows, groups of 32 and 256."""
    n, k = 18, 1280
    for dtype, rows, group_size in ((torch.float32, 1, 32), (torch.bfloat16, 3, 256)):
        packed, s, m = _weights(n, k, group_size, dtype, device)
        x = torch.randn(rows, k, device=device).to(dtype)
        bias = torch.randn(n, device=device).to(dtype)
        y = gemv.int4_gemv(x, packed, gemv.scales_offsets(s, m), group_size, bias, config=config)
        assert y.dtype == dtype
        check(y, x, packed, s, m, group_size, bias, f"{config} {dtype} {rows} rows g={group_size}")


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_triton_int4_gemv_rows_groups_and_dtypes(device, seed, group_size):
    """The small interpreter tile (256 columns per step) over 1..16 rows, ragged N, a K with full steps and (but
    for g = 256) a ragged tail, x in float32 / bf16 / fp16 (fp16: the generic path), an x row view at an odd
    offset (the bf16 path needs 4-byte alignment, else the generic one), and x from 1e-3 to 1e4 and exact zeros."""
    n, k = 13, 3 * 256 + group_size % 256  # a ragged tail but for g = 256 (then K is whole steps)
    many = 16 if group_size == 64 else 7
    for dtype, rows in ((torch.float32, 1), (torch.bfloat16, 2), (torch.float16, 5), (torch.float32, many)):
        packed, s, m = _weights(n, k, group_size, dtype, device)
        x = torch.randn(rows, k, device=device) * torch.logspace(-3, 4, k, device=device)
        x[:, 1::7] = 0.0
        x = x.to(dtype)
        y = gemv.int4_gemv(x, packed, gemv.scales_offsets(s, m), group_size)
        check(y, x, packed, s, m, group_size, None, f"g={group_size} {dtype} {rows} rows")
    packed, s, m = _weights(n, k, group_size, torch.bfloat16, device)
    base = torch.randn(2 * k + 1, device=device).to(torch.bfloat16)
    x = base[1:k + 1].view(1, k)  # 2-byte aligned only
    y = gemv.int4_gemv(x, packed, gemv.scales_offsets(s, m), group_size)
    check(y, x, packed, s, m, group_size, None, f"g={group_size} unaligned bf16 row")


def test_triton_int4_gemv_env_config_and_limits(device, seed, monkeypatch):
    """PIPELOOM_INT4_GEMV picks the configuration; unknown names, too many rows, bad groups and pairs are named."""
    packed, s, m = _weights(8, 256, 64, torch.float32, device)
    pairs = gemv.scales_offsets(s, m)
    x = torch.randn(1, 256, device=device)
    launched = []
    real = gemv.config_for
    monkeypatch.setattr(gemv, "config_for", lambda name=None: launched.append(real(name)) or launched[-1])
    monkeypatch.setenv(gemv.ENV_CONFIG, "n4k1024w1s1")
    check(qm.int4_matmul(x, packed, s, m, 64, backend="triton"), x, packed, s, m, 64, None, "env config")
    assert [c.name for c in launched] == ["n4k1024w1s1"]
    monkeypatch.setenv(gemv.ENV_CONFIG, "n3k7")
    with pytest.raises(ValueError, match="n3k7"):
        gemv.int4_gemv(x, packed, pairs, 64)
    monkeypatch.delenv(gemv.ENV_CONFIG)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv.int4_gemv(torch.randn(17, 256, device=device), packed, pairs, 64)
    with pytest.raises(ValueError, match="group_size=48"):
        gemv.int4_gemv(x, packed, pairs, 48)
    with pytest.raises(ValueError, match="scale_offset"):
        gemv.int4_gemv(x, packed, pairs[:, :2], 64)
    with pytest.raises(ValueError, match="power of two"):
        gemv.int4_gemv(x, packed, pairs, 64, config=gemv.Int4GemvConfig(8, 128, 1, 1))


def test_triton_int4_layer_builds_pairs_once(device, seed):
    """An int4 QuantizedLinear builds the GEMV's (s, m) pairs when quantized (not saved, dropped on load), runs
    the GEMV on decode-sized inputs and equals the torch path; backend='triton' still sends prefill-sized inputs
    to the torch path."""
    linear = nn.Linear(256, 40, bias=True, device=device)
    layer = QuantizedLinear.from_linear(linear, "int4", group_size=64)
    assert layer.gemv_scale_offset is not None and layer.gemv_scale_offset.shape == (40, 4, 2)
    assert "gemv_scale_offset" not in layer.state_dict()
    x = torch.randn(3, 256, device=device)
    ref = qm.int4_matmul_torch(x, layer.qweight, layer.scale, layer.offset, 64, layer.bias)
    check(layer(x), x, layer.qweight, layer.scale, layer.offset, 64, layer.bias, "layer")
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.load_state_dict(QuantizedLinear.from_linear(nn.Linear(256, 40, device=device), "int4", group_size=64)
                          .state_dict(), strict=False)
    assert layer.gemv_scale_offset is None  # a layout of the old scales must not survive new ones
    layer(x)
    assert torch.equal(layer.gemv_scale_offset, gemv.scales_offsets(layer.scale, layer.offset))
    forced = QuantizedLinear.from_linear(linear, "int4", group_size=64, backend="triton")
    big = torch.randn(20, 256, device=device)
    torch.testing.assert_close(forced(big), qm.int4_matmul_torch(big, forced.qweight, forced.scale, forced.offset,
                                                                 64, forced.bias), rtol=0, atol=0)


def test_forced_triton_backend_sends_prefill_to_torch(monkeypatch):
    """backend='triton' (int4:triton in the engine) on a prefill-sized input takes the dequantize + matmul path,
    for the functions and a quantized model; no kernel is launched (none could run here)."""
    from pipeloom.inference.quant import quantize_model
    from pipeloom.models import ModelConfig, Transformer

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was launched for a prefill-sized input")

    monkeypatch.setattr(qm, "int4_gemv", no_kernel)
    monkeypatch.setattr(qm, "int8_gemv", no_kernel)
    packed, s, m = formats.quantize_int4(torch.randn(24, 128), 32)
    x = torch.randn(2, 17, 128)  # 34 rows
    torch.testing.assert_close(qm.int4_matmul(x, packed, s, m, 32, backend="triton"),
                               qm.int4_matmul_torch(x, packed, s, m, 32), rtol=0, atol=0)
    q8, s8 = formats.quantize_int8(torch.randn(24, 128))
    torch.testing.assert_close(qm.int8_matmul(x, q8, s8, backend="triton"), qm.int8_matmul_torch(x, q8, s8),
                               rtol=0, atol=0)
    config = ModelConfig(family="llama", vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                         ffn_hidden=128, max_seq_len=64)
    model = Transformer(config).eval()
    ref = model(torch.arange(1, 33).view(1, 32))
    quantize_model(model, "int4", group_size=32, kernels="triton")
    with torch.no_grad():
        out = model(torch.arange(1, 33).view(1, 32))  # 32 rows in every linear
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_int4_kernel_choice_is_read_when_a_layer_is_built(monkeypatch):
    """PIPELOOM_INT4_KERNEL decides what backend='auto' runs on a GPU, read when the layer is built (a fused layer
    keeps its parts' choice); a bad value is named."""
    from pipeloom.inference.quant.linear import INT4_KERNEL_ENV, fuse_quantized, int4_kernel_choice

    monkeypatch.delenv(INT4_KERNEL_ENV, raising=False)
    assert int4_kernel_choice() == "triton"  # the default: our GEMV, 1.5x tinygemm's speed on an H200
    from pipeloom import features

    with monkeypatch.context() as m:  # a GPU machine without triton: tinygemm rather than the torch path
        m.setattr(features, "has", lambda name: name != "triton")
        assert int4_kernel_choice() == "tinygemm"
    assert not QuantizedLinear(64, 8, "int4", group_size=32).auto_tinygemm
    monkeypatch.setenv(INT4_KERNEL_ENV, "tinygemm")
    assert QuantizedLinear(64, 8, "int4", group_size=32).auto_tinygemm
    monkeypatch.setenv(INT4_KERNEL_ENV, "tinygemm")
    parts = [QuantizedLinear.from_linear(nn.Linear(64, 8), "int4", group_size=32) for _ in range(2)]
    assert all(p.auto_tinygemm and p._runs_tinygemm() for p in parts)
    monkeypatch.setenv(INT4_KERNEL_ENV, "triton")
    assert fuse_quantized(parts).auto_tinygemm
    parts[0].backend = "torch"
    assert not parts[0]._runs_tinygemm()
    monkeypatch.setenv(INT4_KERNEL_ENV, "marlin")
    with pytest.raises(ValueError, match="PIPELOOM_INT4_KERNEL='marlin'"):
        int4_kernel_choice()


def test_subnormal_conversion_is_exact():
    """The kernel's conversion: a nibble masked in place at bit p, read as float32 bits, is q 2^p 2^-149, and times
    x 2^(64 - p) gives x q 2^-85 exactly (here for every code, position and a spread of bf16 x)."""
    q = torch.arange(16, dtype=torch.int32)
    x = torch.randn(64).to(torch.bfloat16).float()
    for p in (0, 4, 8, 12, 16):
        f = (q << p).view(torch.float32)  # subnormal
        assert torch.equal(f.double(), q.double() * 2.0 ** (p - 149))
        prod = f[:, None] * (x * 2.0 ** (gemv.X_EXPONENT - p))[None, :]
        assert torch.equal(prod.double(), (q.double()[:, None] * x.double()[None, :]) * 2.0 ** (gemv.X_EXPONENT - 149))


def _compile_for_sm90(config: gemv.Int4GemvConfig, k: int, bf16: bool = True):
    """The int4 GEMV compiled for a Hopper GPU (sm_90) by Triton's own ptxas, no GPU needed: the kernel the H200
    launches for one row of bf16 x (int32 views), K columns and groups of 128."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = gemv._int4_gemv_kernel
    t = "*i32" if bf16 else "*fp32"
    signature = {"X": t, "W": "*i32", "SM": t, "B": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                 "stride_xm": "i32", "stride_wn": "i32", "stride_smn": "i32", "stride_ym": "i32"}
    constants = dict(GROUP=128, HAS_BIAS=False, BF16=bf16, NUM_STAGES=config.num_stages, BLOCK_N=config.block_n,
                     BLOCK_T=config.block_k // gemv.CHUNK_COLUMNS, M=1)
    signature.update({name: "constexpr" for name in constants})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in ("X", "W", "SM", "B", "Y", "N", "K", "stride_xm", "stride_wn", "stride_smn", "stride_ym")}
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True})
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _loop_sass(cubin: bytes, tmp_path) -> list[str]:
    """The opcodes of the kernel's main loop (its first backward branch's body), from Triton's nvdisasm."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(tool):
        pytest.skip("Triton's nvdisasm is not installed")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    for end, line in enumerate(lines):
        branch = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if branch and any(ln.startswith(branch.group(1) + ":") for ln in lines[:end]):
            start = next(i for i, ln in enumerate(lines) if ln.startswith(branch.group(1) + ":"))
            ops = [re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln) for ln in lines[start:end + 1]]
            return [op.group(1) for op in ops if op]
    raise AssertionError("no loop found in the SASS")


def test_int4_gemv_compiles_for_hopper(tmp_path):
    """Every configuration compiles for sm_90; none flushes subnormals (the conversion relies on them); the codes
    arrive in 16-byte copies; the default's main loop is the design: about one LOP3 and one FFMA per weight, no
    conversion instruction (I2F), no shuffle or shared-memory store (no layout conversion), at most 3.5
    instructions per weight in all. Skipped where Triton's CUDA backend or its ptxas is not installed."""
    if not features.has("triton") or interpreted():
        pytest.skip("needs the Triton compiler (not the interpreter)")
    default = gemv.CONFIGS[gemv.DEFAULT_CONFIG]
    try:
        compiled = _compile_for_sm90(default, 4096)
    except (ImportError, RuntimeError, FileNotFoundError, AttributeError, TypeError) as err:
        pytest.skip(f"cannot compile for sm_90 here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    ops = _loop_sass(compiled.asm["cubin"], tmp_path)
    weights = default.block_n * gemv.CHUNK_COLUMNS  # per thread and step (one chunk per row)
    count = {name: ops.count(name) for name in set(ops)}
    assert count.get("LOP3", 0) >= weights and count.get("FFMA", 0) >= weights, count
    assert not any(name in count for name in ("I2F", "SHFL", "STS", "STL")), count
    assert len(ops) <= 3.5 * weights, f"{len(ops)} instructions for {weights} weights: {count}"
    for name, config in gemv.CONFIGS.items():
        shapes = ((4096, True), (11008, True), (4096, False)) if name == gemv.DEFAULT_CONFIG else ((4096, True),)
        for k, bf16 in shapes:
            ptx = (compiled if (name, k, bf16) == (gemv.DEFAULT_CONFIG, 4096, True)
                   else _compile_for_sm90(config, k, bf16)).asm["ptx"]
            assert ".ftz" not in ptx, f"{name}: flushes subnormals"
            if config.num_stages > 1:
                assert "cp.async.cg.shared.global" in ptx and ", 16" in ptx, name
            else:
                assert "ld.global.v4" in ptx, name


def test_interpreter_runs_int4_gemv_tests(triton_child):
    """Without a GPU: the test_triton_* tests in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "int4 GEMV")
