# Quantized matmul kernels (kernels/quant_matmul.py): Triton (GPU, or CPU interpreter) against the torch reference.
"""Tolerances, with ``mag = |x| @ |W^|^T`` (the sum of the products' magnitudes, per output):

- float32 inputs: |kernel - reference| <= 1e-5 * mag: both dequantize exactly and sum float32 products,
  in different orders.
- bfloat16 inputs: |kernel - reference| <= 2^-7 * max|reference| + 2^-6 * |reference| + 1e-5 * mag: one
  rounding of the float32 result to bf16 (the interpreter truncates toward zero: up to two bf16 ulps).

As in tests/test_kernels.py, TRITON_INTERPRET=1 must be set before triton is imported, so without a GPU
``test_interpreter_runs_quant_kernel_tests`` runs the ``test_triton_*`` tests in a child pytest.
"""

from __future__ import annotations


import pytest
import torch
from pipeloom import features
from pipeloom.inference.quant import QuantizedLinear, formats, quantize_model
from pipeloom.kernels import int8_gemv as gemv
from pipeloom.kernels import interpreted
from pipeloom.kernels import quant_matmul as qm


@pytest.fixture
def device():
    """The device the Triton path runs on: CUDA, or CPU under the interpreter."""
    if not features.has("triton"):
        pytest.skip("triton is not installed (pip install triton)")
    if interpreted():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("no GPU and no TRITON_INTERPRET=1: these run in a child process (test_interpreter_runs_...)")


def check(actual, expected, mag, dtype, what):
    err = (actual.double() - expected.double()).abs()
    allowed = 1e-5 * mag.double()
    if dtype == torch.bfloat16:
        allowed = allowed + 2**-7 * expected.double().abs().max() + 2**-6 * expected.double().abs()
    assert bool((err <= allowed + 1e-30).all()), f"{what}: worst excess {float((err - allowed).max()):.3e}"


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_int8_matmul(device, seed, rows, dtype, bias):
    N, K = 40, 200  # ragged against the interpreter's 16 x 64 tiles
    w = torch.randn(N, K, device=device) * 0.05
    q, s = formats.quantize_int8(w, dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    x = torch.randn(2, rows, K, device=device).to(dtype)[1]  # (rows, K): a view with an offset
    y = qm.int8_matmul(x, q, s, b, backend="triton")
    ref = qm.int8_matmul_torch(x.float(), q, s.float(), None if b is None else b.float())
    assert y.dtype == dtype and y.shape == (rows, N)
    check(y, ref, x.float().abs() @ formats.dequantize_int8(q, s).abs().t(), dtype, f"int8 {rows} rows")


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_int4_matmul(device, seed, group_size, rows, dtype):
    N, K = 33, 384
    w = torch.randn(N, K, device=device) * 0.05 + 0.02
    packed, s, m = formats.quantize_int4(w, group_size, dtype)
    b = torch.randn(N, device=device).to(dtype)
    x = torch.randn(rows, K, device=device).to(dtype)
    y = qm.int4_matmul(x, packed, s, m, group_size, b, backend="triton")
    ref = qm.int4_matmul_torch(x.float(), packed, s.float(), m.float(), group_size, b.float())
    deq = formats.dequantize_int4(packed, s, m, group_size)
    check(y, ref, x.float().abs() @ deq.abs().t() + b.float().abs(), dtype, f"int4 g={group_size} {rows} rows")


@pytest.mark.parametrize("config", sorted(gemv.CONFIGS))
def test_triton_int8_gemv_configs(device, seed, config):
    """Every configuration the GPU bench times computes the int8 matmul exactly (float32: only the summation
    order differs), for 1 and 5 rows, with the scale applied once after the reduction and a bias; N and K ragged
    against every tile, and K a multiple of the M = 1 step (no mask) for the 512-column tiles."""
    n, k = (18, 512) if gemv.CONFIGS[config].block_k == 512 else (18, 200)
    w = torch.randn(n, k, device=device) * 0.05
    q, s = formats.quantize_int8(w)
    q[0, :3] = torch.tensor([-128, 127, -127], dtype=torch.int8)  # the ends of the magic-number conversion
    b = torch.randn(n, device=device)
    for rows in (1, 5):
        x = torch.randn(rows, k, device=device)
        y = gemv.int8_gemv(x, q, s, b, config=config)
        ref = gemv.int8_gemv_torch(x, q, s, b)
        assert y.shape == (rows, n) and y.dtype == torch.float32
        check(y, ref, x.abs() @ (q.float().abs() * s.unsqueeze(1)).t() + b.abs(), torch.float32,
              f"int8 GEMV {config} {rows} rows")
    xb = torch.randn(1, k, device=device).to(torch.bfloat16)
    check(gemv.int8_gemv(xb, q, s, config=config), gemv.int8_gemv_torch(xb, q, s),
          xb.float().abs() @ (q.float().abs() * s.unsqueeze(1)).t(), torch.bfloat16, f"int8 GEMV {config} bf16")


def test_triton_int8_gemv_env_config(device, seed, monkeypatch):
    """PIPELOOM_INT8_GEMV picks the configuration the engine's layers launch; an unknown name is refused."""
    q, s = formats.quantize_int8(torch.randn(24, 96, device=device))
    x = torch.randn(1, 96, device=device)
    launched = []
    real = gemv.config_for
    monkeypatch.setattr(gemv, "config_for", lambda name=None: launched.append(real(name)) or launched[-1])
    monkeypatch.setenv(gemv.ENV_CONFIG, "n4k2048w4s2")
    torch.testing.assert_close(qm.int8_matmul(x, q, s, backend="triton"), gemv.int8_gemv_torch(x, q, s),
                               rtol=1e-5, atol=1e-5)
    assert [c.name for c in launched] == ["n4k2048w4s2"]
    monkeypatch.setenv(gemv.ENV_CONFIG, "n3k7")
    with pytest.raises(ValueError, match="n3k7"):
        qm.int8_matmul(x, q, s, backend="triton")


def test_int8_magic_number_conversion_is_exact():
    """The kernel's int8 -> float32 conversion: bits 0x4B000080 + q read as a float, minus 2^23 + 128, is q for
    every int8 value (so the GEMV's products are the reference's)."""
    q = torch.arange(-128, 128, dtype=torch.int32)
    f = (q + gemv.MAGIC_BITS).view(torch.float32) - gemv.MAGIC_VALUE
    assert torch.equal(f, q.float())
    magic = torch.tensor([gemv.MAGIC_BITS], dtype=torch.int32).view(torch.float32)
    assert gemv.MAGIC_VALUE == 2.0**23 + 128 and magic.item() == 2.0**23 + 128


def test_int8_gemv_configs_are_named_and_bounded():
    """A handful of explicit configurations (the bench times each on four shapes), the default among them."""
    assert gemv.DEFAULT_CONFIG in gemv.CONFIGS and 2 <= len(gemv.CONFIGS) <= 6
    for name, c in gemv.CONFIGS.items():
        assert c.name == name and c.block_k % 16 == 0 and c.num_warps in (1, 2, 4, 8)
        assert c.block_n * c.block_k // (32 * c.num_warps) <= 64, f"{name}: > 64 float32 accumulators per thread"
    with pytest.raises(ValueError, match="not one of"):
        gemv.config_for("n4k512")


def _compile_for_sm90(config: "gemv.GemvConfig", k: int, m: int):
    """The int8 GEMV compiled for a Hopper GPU (sm_90) by Triton's own ptxas, no GPU needed: the kernel the H200
    would launch for bf16 activations, M rows and K columns (K, N, strides multiples of 16, as Triton specializes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = gemv._int8_gemv_kernel
    block_m = triton.next_power_of_2(m)
    block_k = config.block_k if block_m == 1 else max(config.block_k // block_m, 32)
    signature = {"X": "*bf16", "W": "*i8", "S": "*bf16", "B": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32",
                 "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    constants = dict(HAS_BIAS=False, EXACT_BITS=config.exact_bits, REDUCE_EACH_STEP=config.reduce_each_step,
                     EVEN_K=k % block_k == 0, NUM_STAGES=config.num_stages, BLOCK_M=block_m,
                     BLOCK_N=config.block_n, BLOCK_K=block_k, **({"M": 1} if m == 1 else {}))
    signature.update({name: "constexpr" for name in constants})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in ("X", "W", "S", "B", "Y", "N", "K", "stride_wn", "stride_xm", "stride_ym") if name != "M"}
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": config.num_warps,
                                                                   "num_stages": config.num_stages})
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def test_int8_gemv_compiles_for_hopper():
    """Every configuration compiles for sm_90 (the interpreter cannot tell: it runs the Python), vectorizes the
    int8 stream into 16-byte loads (LDG.128, or cp.async 16-byte copies when pipelined) and, with exact bits,
    converts without I2F. Skipped where Triton's CUDA backend or its ptxas is not installed."""
    if not features.has("triton") or interpreted():
        pytest.skip("needs the Triton compiler (not the interpreter)")
    try:
        _compile_for_sm90(gemv.CONFIGS[gemv.DEFAULT_CONFIG], 4096, 1)
    except (ImportError, RuntimeError, FileNotFoundError, AttributeError, TypeError) as err:
        pytest.skip(f"cannot compile for sm_90 here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    for name, config in gemv.CONFIGS.items():
        shapes = ((4096, 1), (11008, 1), (4096, 4)) if name == gemv.DEFAULT_CONFIG else ((4096, 1),)
        for k, m in shapes:  # a ragged K (11008 = 21.5 steps of 512) and several rows for the default
            ptx = _compile_for_sm90(config, k, m).asm["ptx"]
            if m == 1:
                assert ("cp.async.cg.shared.global" in ptx and ", 16" in ptx) or "ld.global.v4" in ptx, name
            assert ("cvt.rn.f32.s" in ptx) != config.exact_bits, f"{name}: conversion by cast iff not exact bits"


def test_triton_model_decode_runs_the_kernels(device, seed, monkeypatch):
    """A quantized Llama decoding one token per row runs the kernels (counted) and equals the torch path;
    a prefill-sized input takes the torch path."""
    from pipeloom.models import ModelConfig, Transformer

    calls = {"int8": 0, "int4": 0}
    for mode in calls:
        fn = getattr(qm, f"{mode}_gemv")

        def counted(*args, _fn=fn, _mode=mode, **kwargs):
            calls[_mode] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(qm, f"{mode}_gemv", counted)
    config = ModelConfig(family="llama", vocab_size=96, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_hidden=256, max_seq_len=32)
    for mode in ("int8", "int4"):
        model = quantize_model(Transformer(config).to(device).eval(), mode, group_size=64,
                               kernels="triton" if mode == "int4" else "auto")  # not tinygemm on a GPU
        token = torch.randint(0, 96, (1, 1), device=device)  # one row: every linear sees M = 1
        with torch.no_grad():
            y = model(token)
            assert calls[mode] == 2 * 7, calls  # q, k, v, o, w1, w3, w2 in 2 blocks (the head stays float)
            for m in model.modules():
                if isinstance(m, QuantizedLinear):
                    m.backend = "torch"
            ref = model(token)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        before = calls[mode]
        model(torch.randint(0, 96, (1, 20), device=device))  # 20 rows > MAX_KERNEL_ROWS: torch path
        assert calls[mode] == before


def test_triton_kernel_limits_and_compile(device, seed):
    q, s = formats.quantize_int8(torch.randn(16, 64, device=device))
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv.int8_gemv(torch.randn(17, 64, device=device), q, s)
    many = torch.randn(17, 64, device=device)  # backend='triton' sends prefill-sized inputs to the torch path
    torch.testing.assert_close(qm.int8_matmul(many, q, s, backend="triton"), qm.int8_matmul_torch(many, q, s))
    x = torch.randn(2, 64, device=device)
    compiled = torch.compile(lambda t: qm.int8_matmul(t, q, s, backend="triton"), backend="aot_eager",
                             fullgraph=True)  # the custom op traces through its fake
    torch.testing.assert_close(compiled(x), qm.int8_matmul_torch(x, q, s), rtol=1e-5, atol=1e-5)


def test_dispatch_without_kernels():
    """Without a GPU or the interpreter ``auto`` takes the torch path; bad backends are named."""
    x = torch.randn(2, 64)
    q, s = formats.quantize_int8(torch.randn(16, 64))
    if not interpreted() and not torch.cuda.is_available():
        assert not qm.kernel_usable(x)
    torch.testing.assert_close(qm.int8_matmul(x, q, s, backend="torch"), x @ formats.dequantize_int8(q, s).t(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend='cuda'"):
        qm.int8_matmul(x, q, s, backend="cuda")


def test_interpreter_runs_quant_kernel_tests(triton_child):
    """Without a GPU: the test_triton_* tests in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "quantized-matmul")
