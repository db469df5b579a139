# Fused kernels vs torch references: Triton paths (GPU, or CPU interpreter) and torch fallbacks (float64).
"""Tolerances, relative to the largest magnitude of the expected tensor (``scale``):

- float32: |a - e| <= 1e-5 * scale + 1e-5 * |e| (float32 sums in another order).
- bfloat16: |a - e| <= 2**-7 * scale + 2**-6 * |e|: the kernels and the references both compute in float32
  and round once, but rounding may fall either side; the Triton 3.9 interpreter also rounds float32 -> bf16
  toward zero (the GPU rounds to nearest even), so up to two bf16 ulps apart.
- float64 (torch paths against plain torch): 1e-10 relative.

Triton 3.9 decides interpreter or compiler when ``@triton.jit`` runs, for its own library (``tl.sum``) at
``import triton``, so TRITON_INTERPRET=1 cannot be switched on in a process that imported triton already.
Without a GPU, ``test_interpreter_runs_triton_tests`` therefore runs the ``test_triton_*`` tests in a child
pytest with TRITON_INTERPRET=1; this process, and the other test files, keep the torch path. On a GPU they
run here, compiled. Inputs are fresh random draws; each test prints its seed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pipeloom import features
from pipeloom.kernels import _MissingTriton, interpreted, set_kernels, torch_path, use_triton

KERNEL_MODULES = ["cross_entropy", "linear_cross_entropy", "rmsnorm", "layernorm", "rotary", "swiglu"]
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-7, 2**-6), torch.float64: (1e-10, 1e-10)}
REPO = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(
    not features.has("triton"),
    reason="triton is not installed (pip install triton): the Triton-path comparisons need it; "
    "without a GPU they run under TRITON_INTERPRET=1",
)


def close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1
) -> None:
    """Assert ``actual`` matches ``expected`` within ``factor`` times the tolerance stated for ``dtype``."""
    atol, rtol = (factor * t for t in TOL[dtype])
    scale = expected.detach().abs().max().double().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        atol=atol * max(scale, 1e-30),
        rtol=rtol,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


@pytest.fixture
def kernels():
    """(kernel modules by name, device) for the Triton path: CUDA, or CPU under the interpreter."""
    if not features.has("triton"):
        pytest.skip("triton is not installed (pip install triton)")
    modules = {name: importlib.import_module(f"pipeloom.kernels.{name}") for name in KERNEL_MODULES}
    if interpreted():
        return modules, torch.device("cpu")
    if torch.cuda.is_available():
        return modules, torch.device("cuda")
    pytest.skip(
        "no GPU and triton was imported without TRITON_INTERPRET=1: these run in a child process "
        "under the interpreter (test_interpreter_runs_triton_tests)"
    )


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _run(fn, inputs, dy=None):
    """Output and input gradients of ``fn(*inputs)`` for upstream gradient ``dy`` (drawn when None)."""
    leaves = [_leaf(t) for t in inputs]
    out = fn(*leaves)
    dy = torch.randn_like(out) if dy is None else dy
    out.backward(dy)
    return out, [leaf.grad for leaf in leaves], dy


# ---------------------------------------------------------------- Triton path against the torch references


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rmsnorm(kernels, seed, dtype):
    mods, dev = kernels
    x = torch.randn(2, 37, 200, device=dev).to(dtype)  # (B, T, D), 74 rows
    w = (1 + 0.3 * torch.randn(200, device=dev)).to(dtype)
    assert use_triton(x)
    y, grads, dy = _run(lambda a, b: mods["rmsnorm"].rmsnorm(a, b, 1e-6), [x, w])
    y_ref, grads_ref, _ = _run(lambda a, b: mods["rmsnorm"].rmsnorm_torch(a, b, 1e-6), [x, w], dy)
    close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dw"), grads, grads_ref):
        close(g, g_ref, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_layernorm(kernels, seed, dtype):
    mods, dev = kernels
    x = (torch.randn(37, 200, device=dev) * 2 + 0.5).to(dtype)  # (M, D)
    w = (1 + 0.3 * torch.randn(200, device=dev)).to(dtype)
    b = (0.1 * torch.randn(200, device=dev)).to(dtype)
    y, grads, dy = _run(lambda *a: mods["layernorm"].layernorm(*a, 1e-5), [x, w, b])
    y_ref, grads_ref, _ = _run(lambda *a: mods["layernorm"].layernorm_torch(*a, 1e-5), [x, w, b], dy)
    close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dw", "db"), grads, grads_ref):
        close(g, g_ref, dtype, name)


@pytest.mark.parametrize("table", ["shared (T, D)", "per-sequence (B, T, D)"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rotary(kernels, seed, dtype, table):
    mods, dev = kernels
    B, T, H, D = 2, 13, 5, 24
    x = torch.randn(B, H, T, D, device=dev).to(dtype).transpose(1, 2)  # (B, T, H, D), not contiguous
    angles = torch.rand((T, D // 2) if table.startswith("shared") else (B, T, D // 2), device=dev) * 6.3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    y, (dx,), dy = _run(lambda a: mods["rotary"].rotary(a, cos, sin), [x])
    y_ref, (dx_ref,), _ = _run(lambda a: mods["rotary"].rotary_torch(a, cos, sin), [x], dy)
    close(y, y_ref, dtype, "y")
    close(dx, dx_ref, dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_swiglu(kernels, seed, dtype):
    mods, dev = kernels
    gate_up = (2 * torch.randn(37, 2 * 301, device=dev)).to(dtype)  # (M, 2F): a and b are strided halves
    y, (dg,), dy = _run(lambda g: mods["swiglu"].swiglu(*g.chunk(2, -1)), [gate_up])
    y_ref, (dg_ref,), _ = _run(lambda g: mods["swiglu"].swiglu_torch(*g.chunk(2, -1)), [gate_up], dy)
    close(y, y_ref, dtype, "y")
    close(dg, dg_ref, dtype, "d(gate, up)")


@pytest.mark.parametrize("smoothing,reduction", [(0.0, "mean"), (0.1, "sum"), (0.2, "none")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_cross_entropy(kernels, seed, monkeypatch, dtype, smoothing, reduction):
    mods, dev = kernels
    ce = mods["cross_entropy"]
    monkeypatch.setattr(ce, "BLOCK_V", 256)  # several vocabulary blocks per row, and a ragged last one
    N, V = 37, 1007
    logits = (3 * torch.randn(N, V, device=dev)).to(dtype)
    target = torch.randint(0, V, (N,), device=dev)
    target[::5] = -100
    fn = lambda z: ce.cross_entropy(z, target, label_smoothing=smoothing, reduction=reduction)
    ref = lambda z: ce.cross_entropy_torch(z, target, label_smoothing=smoothing, reduction=reduction)
    loss, (dz,), dy = _run(fn, [logits])
    loss_ref, (dz_ref,), _ = _run(ref, [logits], dy)
    assert loss.dtype == dtype and dz.dtype == dtype
    close(loss, loss_ref, dtype, "loss")
    close(dz, dz_ref, dtype, "dlogits")


def _combined_loss(ce, logits, target, slices, V, smoothing):
    """Per-row loss from per-slice statistics combined as the vocabulary-parallel version does."""
    parts = [ce.cross_entropy_stats(logits[:, a:b], target, a, min(b, V)) for a, b in slices]
    row_max = torch.stack([p.row_max for p in parts]).amax(0)
    total = ce.CEStats(
        row_max,
        sum(p.sum_exp * torch.exp(p.row_max - row_max) for p in parts),
        sum(p.target_logit for p in parts),
        sum(p.sum_logits for p in parts),
    )
    return ce.loss_from_stats(total, target, -100, smoothing, V)


def test_triton_cross_entropy_slices(kernels, seed, monkeypatch):
    mods, dev = kernels
    ce = mods["cross_entropy"]
    monkeypatch.setattr(ce, "BLOCK_V", 128)
    N, V, smoothing = 29, 1000 + 7, 0.1
    logits = 3 * torch.randn(N, 3 * 340, device=dev)  # 3 shards of 340 columns; the last has 13 of padding
    target = torch.randint(0, V, (N,), device=dev)
    target[::4] = -100
    lse, loss = _combined_loss(ce, logits, target, [(0, 340), (340, 680), (680, 1020)], V, smoothing)
    ref = F.cross_entropy(logits[:, :V], target, label_smoothing=smoothing, reduction="none")
    close(loss, ref, torch.float32, "combined loss")
    row_grad = (target != -100).float()
    grad = ce.cross_entropy_grad(logits[:, 680:], target, lse, row_grad, 680, V, smoothing, V)
    z = _leaf(logits[:, :V])
    F.cross_entropy(z, target, label_smoothing=smoothing, reduction="sum").backward()
    close(grad[:, : V - 680], z.grad[:, 680:], torch.float32, "slice gradient")
    assert torch.all(grad[:, V - 680 :] == 0), "padding columns must get no gradient"


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_linear_cross_entropy(kernels, seed, dtype):
    mods, dev = kernels
    lce = mods["linear_cross_entropy"]
    N, D, V = 37, 48, 1007
    hidden = torch.randn(N, D, device=dev).to(dtype)
    weight = (torch.randn(V, D, device=dev) / D**0.5).to(dtype)
    target = torch.randint(0, V, (N,), device=dev)
    target[::6] = -100
    dy = torch.tensor(1.7, device=dev, dtype=dtype)
    fn = lambda h, w: lce.linear_cross_entropy(h, w, target, label_smoothing=0.1, chunk_size=10)
    loss, grads, _ = _run(fn, [hidden, weight], dy)
    loss_ref, grads_ref, _ = _run(
        lambda h, w: lce.linear_cross_entropy_torch(h, w, target, -100, 0.1), [hidden, weight], dy
    )
    close(loss, loss_ref, dtype, "loss")
    # bf16 dweight: the fused path rounds each chunk's product dlogits_c.T @ hidden_c to bf16 before summing
    # them in float32 (4 chunks here), the reference one product: twice the stated tolerance
    for name, g, g_ref in zip(("dhidden", "dweight"), grads, grads_ref):
        close(g, g_ref, dtype, name, factor=2 if dtype == torch.bfloat16 else 1)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_triton_models_run_the_kernels_and_match_their_torch_path(kernels, seed, name, monkeypatch):
    """A whole model (loss and every gradient) with the fused kernels equals its torch path (float32), and
    the kernels really ran: each kernel Function is counted."""
    from pipeloom.kernels import set_kernels
    from pipeloom.models import Transformer, get_model_config

    import pipeloom.kernels as kernels_package

    mods, dev = kernels
    monkeypatch.setattr(kernels_package, "MIN_FUSED_ELEMENTS", 0)  # these shapes are tiny
    calls: dict[str, int] = {}
    for module, fn in (("rmsnorm", "RMSNormFunction"), ("layernorm", "LayerNormFunction"),
                       ("rotary", "RotaryFunction"), ("swiglu", "SwiGLUFunction"),
                       ("cross_entropy", "CrossEntropyFunction")):
        cls = getattr(mods[module], fn)
        original = cls.apply

        def counted(*args, _original=original, _name=fn):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args)

        monkeypatch.setattr(cls, "apply", counted)
    config = get_model_config(name).replace(dim=64, n_layers=2, vocab_size=97, max_seq_len=32)
    model = Transformer(config).to(dev)
    tokens = torch.randint(0, 97, (2, 19), device=dev)
    targets = torch.randint(0, 97, (2, 19), device=dev)
    targets[0, :5] = -100

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model.loss(model(tokens), targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    expected = {"gpt-tiny": {"CrossEntropyFunction"},  # LayerNorm stays torch's (models/layers.py make_norm)
                "llama-tiny": {"RMSNormFunction", "RotaryFunction", "SwiGLUFunction", "CrossEntropyFunction"}}
    assert set(calls) == expected[name], calls
    assert loss.dtype == torch.float32
    ran = dict(calls)
    previous = set_kernels("torch")
    try:
        ref_loss, ref_grads = loss_and_grads()
    finally:
        set_kernels(previous)
    assert calls == ran, "set_kernels('torch') must keep every kernel off"
    close(loss, ref_loss, torch.float32, "loss")
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max().item() for g in ref_grads.values())  # k's bias has a zero gradient: no own scale
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.skipif(
    not (features.has("apex") and torch.cuda.is_available()),
    reason="NVIDIA apex and a CUDA GPU are optional: comparison with apex's fused norms skipped",
)
def test_norms_match_apex(seed):
    from apex.normalization import FusedLayerNorm, FusedRMSNorm
    from pipeloom.kernels.layernorm import layernorm
    from pipeloom.kernels.rmsnorm import rmsnorm

    x = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16)
    ln, rms = FusedLayerNorm(1000).cuda().bfloat16(), FusedRMSNorm(1000, eps=1e-6).cuda().bfloat16()
    close(layernorm(x, ln.weight, ln.bias, ln.eps), ln(x), torch.bfloat16, "LayerNorm vs apex")
    close(rmsnorm(x, rms.weight, 1e-6), rms(x), torch.bfloat16, "RMSNorm vs apex")


# ---------------------------------------------------------------- torch paths against plain torch, float64


@pytest.mark.parametrize("smoothing,reduction", [(0.0, "mean"), (0.1, "mean"), (0.3, "sum"), (0.1, "none")])
def test_cross_entropy_torch_path_chunked(seed, monkeypatch, smoothing, reduction):
    import pipeloom.kernels.cross_entropy as ce

    monkeypatch.setattr(ce, "TORCH_CHUNK_ELEMENTS", 3000)  # chunks of 2 rows, a ragged last one
    N, V = 37, 1007
    logits = 3 * torch.randn(1, N, V, dtype=torch.float64)  # (B, T, V)
    target = torch.randint(0, V, (1, N))
    target[0, ::5] = -100
    with torch_path():
        loss, (dz,), dy = _run(lambda z: ce.cross_entropy(z, target, -100, smoothing, reduction), [logits])
    loss_ref, (dz_ref,), _ = _run(
        lambda z: F.cross_entropy(
            z.reshape(N, V),
            target.reshape(N),
            ignore_index=-100,
            label_smoothing=smoothing,
            reduction=reduction,
        ).reshape(loss.shape),
        [logits],
        dy,
    )
    close(loss, loss_ref, torch.float64, "loss")
    close(dz, dz_ref, torch.float64, "dlogits")


def test_cross_entropy_torch_path_gradcheck(seed):
    from pipeloom.kernels.cross_entropy import cross_entropy

    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([3, -100, 0, 10, 5, -100])
    with torch_path():
        for reduction in ("mean", "sum", "none"):
            assert torch.autograd.gradcheck(
                lambda z, r=reduction: cross_entropy(z, target, -100, 0.15, r), (logits,)
            )


def test_cross_entropy_torch_path_slices(seed, monkeypatch):
    import pipeloom.kernels.cross_entropy as ce

    monkeypatch.setattr(ce, "TORCH_CHUNK_ELEMENTS", 1000)
    N, V, smoothing = 29, 1007, 0.1
    logits = 3 * torch.randn(N, 1020, dtype=torch.float64)
    target = torch.randint(0, V, (N,))
    target[::4] = -100
    with torch_path():
        _, loss = _combined_loss(ce, logits, target, [(0, 340), (340, 680), (680, 1020)], V, smoothing)
        empty = ce.cross_entropy_stats(logits[:, 1010:], target, 1010, V)  # a shard of padding only
    ref = F.cross_entropy(logits[:, :V], target, label_smoothing=smoothing, reduction="none")
    close(loss, ref, torch.float64, "combined loss")
    assert torch.all(empty.row_max == float("-inf")) and torch.all(empty.sum_exp == 0)


def test_linear_cross_entropy_torch_path(seed):
    from pipeloom.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_torch

    hidden = torch.randn(2, 19, 24, dtype=torch.float64)  # (B, T, D)
    weight = torch.randn(301, 24, dtype=torch.float64) / 5
    target = torch.randint(0, 301, (2, 19))
    target[:, ::7] = -100
    for reduction in ("mean", "sum"):
        with torch_path():
            loss, grads, dy = _run(
                lambda h, w, r=reduction: linear_cross_entropy(h, w, target, -100, 0.1, r, chunk_size=8),
                [hidden, weight],
            )
        loss_ref, grads_ref, _ = _run(
            lambda h, w, r=reduction: linear_cross_entropy_torch(h, w, target, -100, 0.1, r),
            [hidden, weight],
            dy,
        )
        close(loss, loss_ref, torch.float64, f"loss ({reduction})")
        for name, g, g_ref in zip(("dhidden", "dweight"), grads, grads_ref):
            close(g, g_ref, torch.float64, f"{name} ({reduction})")
    with torch.no_grad():  # no gradient work without autograd
        close(
            linear_cross_entropy(hidden, weight, target),
            linear_cross_entropy_torch(hidden, weight, target),
            torch.float64,
            "no_grad loss",
        )


def test_torch_references_float64(seed):
    from pipeloom.kernels.layernorm import layernorm
    from pipeloom.kernels.rmsnorm import rmsnorm
    from pipeloom.kernels.rotary import rotary
    from pipeloom.kernels.swiglu import swiglu

    x = torch.randn(3, 7, 40, dtype=torch.float64)
    w, b = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    with torch_path():
        close(
            rmsnorm(x, w, 1e-6),
            x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w,
            torch.float64,
            "rms",
        )
        close(layernorm(x, w, b), F.layer_norm(x, (40,), w, b, 1e-5), torch.float64, "layernorm")
        a = torch.randn(5, 33, dtype=torch.float64)
        close(swiglu(a, x[0, :5, :33]), a * torch.sigmoid(a) * x[0, :5, :33], torch.float64, "swiglu")
        # rotary as complex multiplication: pairs (x_i, x_{i+D/2}) rotate by angle t * theta_i
        B, T, H, D = 2, 6, 3, 8
        q = torch.randn(B, T, H, D, dtype=torch.float64)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * 10000 ** (-torch.arange(D // 2) / (D // 2))
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (T, D)
        rotated = (
            torch.complex(q[..., : D // 2], q[..., D // 2 :])
            * torch.polar(torch.ones_like(angle), angle)[None, :, None]
        )
        close(rotary(q, cos, sin), torch.cat([rotated.real, rotated.imag], -1), torch.float64, "rotary")


# ---------------------------------------------------------------- dispatch and the absence of triton


def test_dispatch_switches(monkeypatch):
    import pipeloom.kernels as kernels_package

    x = torch.randn(3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(x), "CPU tensors take the torch path unless the interpreter is on"
    if not features.has("triton"):
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x) == interpreted(), "the interpreter counts only when triton was imported under it"
    monkeypatch.setattr(kernels_package, "interpreted", lambda: True)  # as in a process started with it
    assert use_triton(x) and use_triton(x.bfloat16())
    assert not use_triton(x.double()), "float64 always takes the (float64) torch path"
    with torch_path():
        assert not use_triton(x)
    assert use_triton(x)
    previous = set_kernels("torch")
    assert previous == "auto" and not use_triton(x)
    set_kernels("auto")
    assert use_triton(x)
    monkeypatch.setenv("PIPELOOM_KERNELS", "torch")
    assert not use_triton(x)


def test_models_fuse_only_tensors_worth_a_launch(monkeypatch):
    import pipeloom.kernels as kernels_package
    from pipeloom.kernels import worth_fusing

    monkeypatch.setattr(kernels_package, "use_triton", lambda x: True)  # as on a GPU
    monkeypatch.setattr(kernels_package, "MIN_FUSED_ELEMENTS", 100)
    assert not worth_fusing(torch.empty(9, 11)) and worth_fusing(torch.empty(10, 10))
    monkeypatch.setattr(kernels_package, "use_triton", lambda x: False)
    assert not worth_fusing(torch.empty(100, 100))


def test_kernels_step_aside_inside_torch_compile(monkeypatch):
    """Under torch.compile the models take the torch path (Inductor fuses it), decided without a graph break:
    a break would run the check eagerly, pick the kernel and trace it into the graph."""
    import pipeloom.kernels as kernels_package

    monkeypatch.setattr(features, "triton_usable", lambda: True)
    monkeypatch.setattr(kernels_package, "interpreted", lambda: True)  # CPU tensors count as Triton-ready
    monkeypatch.setattr(kernels_package, "MIN_FUSED_ELEMENTS", 0)
    x = torch.randn(4)
    assert kernels_package.worth_fusing(x), "eagerly, the kernel path"

    def f(t):
        return t * 2 if kernels_package.worth_fusing(t) else t + 1

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), x + 1)


def test_set_kernels_refuses_bad_modes(monkeypatch):
    with pytest.raises(ValueError, match="kernels='fast'; choose one of"):
        set_kernels("fast")
    monkeypatch.setattr(features, "triton_usable", lambda: False)
    with pytest.raises(RuntimeError, match="kernels='triton' but"):
        set_kernels("triton")
    assert set_kernels("auto") == "auto"


def test_missing_triton_stub_says_what_to_install(monkeypatch):
    monkeypatch.setattr(features, "has", lambda name: False)
    stub = _MissingTriton()

    @stub.jit
    def kernel(X, BLOCK: stub.constexpr):
        pass

    with pytest.raises(ImportError, match="pip install triton"):
        kernel[(1,)](torch.zeros(1), BLOCK=4)
    with pytest.raises(ImportError, match="pip install triton"):
        stub.cdiv(3, 2)


def test_interpreter_runs_triton_tests(triton_child):
    """Without a GPU: the test_triton_* tests in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "fused-kernel")


def test_bench_smoke():
    """bench/kernels.py --smoke runs every kernel on tiny CPU shapes (torch paths) and prints its table."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "kernels.py"), "--smoke"],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("rmsnorm", "layernorm", "rotary", "swiglu", "cross_entropy", "linear_cross_entropy", "copy"):
        assert name in done.stdout, f"{name} missing from the bench table:\n{done.stdout}"
