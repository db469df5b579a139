# The fp8 KV cache: code/scale planes and their bounds, twice the blocks per byte, and the Triton prefill / split-K
# decode kernels reading (and the decode kernel writing) it against the torch reference (GPU, or CPU under
# TRITON_INTERPRET=1).
import types

import pytest
import torch
from pipeloom.kernels.kv_fp8 import (dequantize_rows, planes, quantize_cache, quantize_rows, read_blocks,
                                     write_rows)
from pipeloom.kernels.paged_attention import paged_attention_torch, paged_attention_triton
from pipeloom.kernels.paged_decode import paged_decode_torch, paged_decode_triton, rotate_new_tokens
from pipeloom.models import get_model_config

E4M3_REL = 2.0**-4  # half a unit in the last place of a 3-bit mantissa, relative
E4M3_SUBNORMAL_STEP = 2.0**-9  # the spacing of e4m3's subnormals, in units of the scale
# The fp8 kernels' dots run in float16 (q over its largest magnitude, softmax weights times scales over the tile's
# largest scale): roundings of 2^-11 relative on both. Against the float64 reference over the same dequantized
# cache, outputs of size ~1 here agree to a few 1e-4 (a lost or doubled key would be off by ~1e-2 or more).
F16_DOTS = dict(atol=2e-3, rtol=2e-3)


@pytest.fixture
def device(triton_child):
    return triton_child.device("test_interpreter_runs_fp8_triton_tests")


def e4m3_bound(x: torch.Tensor) -> torch.Tensor:
    """The stated bound on |dequantized - x| per element: half an e4m3 step (relative), and half a subnormal step
    of the row's scale for values in e4m3's subnormal range."""
    scale = x.abs().amax(-1, keepdim=True) / 448
    return (E4M3_REL * x.abs() + E4M3_SUBNORMAL_STEP / 2 * scale) * (1 + 1e-6)


def test_rows_round_trip_within_the_e4m3_bound():
    x = torch.randn(64, 4, 32, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None, None]
    codes, scales = quantize_rows(x)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 4, 32)
    assert scales.dtype == torch.float32 and scales.shape == (64, 4)
    back = dequantize_rows(codes, scales, torch.float64)
    assert bool(((back - x).abs() <= e4m3_bound(x)).all())
    assert torch.equal(dequantize_rows(*quantize_rows(torch.zeros(3, 8))), torch.zeros(3, 8))


@pytest.mark.parametrize("kind", ["key", "value"])
def test_cache_planes_are_aligned_contiguous_and_hold_what_was_written(kind):
    """The layout the kernels rely on: per block, a head-major plane of codes (each (block, head) block_size * hd
    contiguous bytes on a 16-byte boundary: keys a row of hd per token, values a row of block_size per dimension),
    then a plane of float32 scales (block_size contiguous per head); the allocation's bytes are exactly codes +
    scales; values read back within the e4m3 bound; writing a slot changes only that slot's codes and scale."""
    nb, bs, h, hd = 5, 16, 3, 32
    x = torch.randn(nb, bs, h, hd) * torch.rand(nb, bs, h, 1) * 10
    cache = quantize_cache(x, kind)
    assert cache.shape == (nb, bs, h, hd + 4) and cache.dtype == torch.uint8
    codes, scales = planes(cache, kind)
    assert codes.shape == (nb, bs, h, hd) and scales.shape == (nb, bs, h) and scales.dtype == torch.float32
    block_bytes = bs * h * (hd + 4)
    base = cache.data_ptr()
    for b, t, kvh, d in [(0, 0, 0, 0), (2, 5, 1, 7), (4, 15, 2, 31)]:
        code_at = codes[b, t, kvh, d].data_ptr() - base
        within = t * hd + d if kind == "key" else d * bs + t  # a row per token, or a row per dimension
        assert code_at == b * block_bytes + kvh * bs * hd + within
        assert (code_at - within) % 16 == 0  # each (block, head) starts on a 16-byte boundary
        assert scales[b, t, kvh].data_ptr() - base == b * block_bytes + bs * h * hd + 4 * (kvh * bs + t)
    code_strides = (block_bytes, hd, bs * hd, 1) if kind == "key" else (block_bytes, 1, bs * hd, bs)
    assert codes.stride() == code_strides and scales.stride() == (block_bytes // 4, 1, bs)
    assert bool(((read_blocks(cache, torch.arange(nb), torch.float64, kind) - x.double()).abs()
                 <= e4m3_bound(x.double())).all())
    # every byte is a code or a scale: the planes cover the allocation exactly once
    seen = torch.zeros(cache.numel(), dtype=torch.int32)
    for plane, size in ((codes, 1), (scales, 4)):
        start = (plane.data_ptr() - base) // size
        flat = torch.as_strided(torch.arange(cache.numel() // size), plane.shape, plane.stride(), start)
        for i in range(size):
            seen.index_add_(0, (flat.reshape(-1) * size + i), torch.ones(flat.numel(), dtype=torch.int32))
    assert bool((seen == 1).all())
    before = cache.clone()
    new = torch.randn(2, h, hd) * 3
    write_rows(cache, new, torch.tensor([2 * bs + 7, 4 * bs + 0]), kind)
    back = read_blocks(cache, torch.tensor([2, 4]), torch.float64, kind)
    assert bool(((back[0, 7] - new[0].double()).abs() <= e4m3_bound(new[0].double())).all())
    assert bool(((back[1, 0] - new[1].double()).abs() <= e4m3_bound(new[1].double())).all())
    changed = set((cache.view(-1) != before.view(-1)).nonzero()[:, 0].tolist())  # byte offsets
    allowed = set()
    for b, t in ((2, 7), (4, 0)):
        for kvh in range(h):
            allowed |= {codes[b, t, kvh, d].data_ptr() - base for d in range(hd)}
            at = scales[b, t, kvh].data_ptr() - base
            allowed |= set(range(at, at + 4))
    assert changed and changed <= allowed
    with pytest.raises(ValueError, match="contiguous uint8"):
        planes(cache[:, :, :2], kind)
    with pytest.raises(ValueError, match="kind='keys'"):
        planes(cache, "keys")


def test_fp8_pool_holds_about_twice_the_tokens():
    from pipeloom.inference import LLMEngine
    from pipeloom.inference.model_runner import num_blocks_for_budget

    config = get_model_config("llama-7b")  # head size 128: rows of 132 bytes against 256
    cpu = torch.device("cpu")
    bf16 = num_blocks_for_budget(config, 16, torch.bfloat16, cpu, 0.5)
    fp8 = num_blocks_for_budget(config, 16, torch.bfloat16, cpu, 0.5, kv_cache_dtype="fp8")
    print(f"7B config, 512 MiB: {bf16} bf16 blocks, {fp8} fp8 blocks ({fp8 / bf16:.3f}x)")
    assert 1.9 <= fp8 / bf16 <= 2.0
    torch.manual_seed(0)
    from pipeloom.models import Transformer

    model = Transformer(get_model_config("llama-tiny", n_layers=1)).to(torch.bfloat16)
    auto = LLMEngine(model, gpu_memory_fraction=0.01)
    eight = LLMEngine(model, gpu_memory_fraction=0.01, kv_cache_dtype="fp8")
    k_auto, k_eight = auto.runner.caches[model.blocks[0].attn][0], eight.runner.caches[model.blocks[0].attn][0]
    hd = model.config.head_dim  # 16 here: rows of 20 bytes against 32, 1.6x (2x as hd grows: 1.94x at 128)
    ratio = eight.block_manager.num_blocks / auto.block_manager.num_blocks
    assert abs(ratio - 2 * hd / (hd + 4)) < 0.01, ratio
    assert k_eight.dtype == torch.uint8 and k_eight.shape[-1] == hd + 4
    assert k_eight.nbytes / k_eight.shape[0] == (hd + 4) / (2 * hd) * k_auto.nbytes / k_auto.shape[0]
    with pytest.raises(ValueError, match="inference.kv_cache_dtype='int8'"):
        LLMEngine(model, num_blocks=8, kv_cache_dtype="int8")


def _fp8_caches(g, num_blocks, block_size, kv_heads, head_dim):
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) * 2
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    return quantize_cache(k, "key"), quantize_cache(v, "value")


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 16, 4), (8, 1, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fp8_prefill_matches_the_reference(device, heads, kv_heads, head_dim, block_size, dtype):
    """The ragged kernel over an fp8 cache against the torch path over the same codes (float64): float32 q within
    F16_DOTS (the kernel's float16 dots), bfloat16 within 2e-2 (the query's rounding)."""
    g = torch.Generator().manual_seed(heads + block_size)
    k_cache, v_cache = (c.to(device) for c in _fp8_caches(g, 40, block_size, kv_heads, head_dim))
    query_lens, seq_lens = [5, 1, 17, 3], [5, 9, 30, 40]
    tables = torch.stack([torch.randperm(40, generator=g)[: -(-max(seq_lens) // block_size)]
                          for _ in query_lens]).int().to(device)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(device, dtype)
    ref = paged_attention_torch(q.double(), k_cache, v_cache, query_lens, seq_lens, tables)
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    out = paged_attention_triton(q, k_cache, v_cache, starts, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                                 tables, max_query_len=max(query_lens))
    tol = F16_DOTS if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("kv_cache,splits,rotary", [("auto", 1, False), ("auto", 4, False), ("fp8", 1, False),
                                                    ("fp8", 4, False), ("fp8", 4, True)])
def test_triton_decode_writes_and_attends_like_the_reference(device, kv_cache, splits, rotary):
    """The split-K decode kernel (writes the new K/V itself) against the torch reference: outputs within 2e-5
    (float32; fp8: F16_DOTS), and the caches it leaves byte for byte equal (fp8: the same codes and scales).
    ``rotary``: the kernel rotates q and k first (the reference rotates them in float32 beforehand; an fp8 code at
    a rounding boundary may then fall the other way, so the caches compare within half an e4m3 step; so do fp8 caches
    written on a GPU, whose e4m3 conversion may round a code the other way than torch's on the CPU: seen on an H200)."""
    g = torch.Generator().manual_seed(7 + splits)
    heads, kv_heads, hd, bs, nb = 8, 2, 32, 8, 30
    if kv_cache == "fp8":
        k_cache, v_cache = _fp8_caches(g, nb, bs, kv_heads, hd)
    else:
        k_cache, v_cache = torch.randn(2, nb, bs, kv_heads, hd, generator=g)
    seq_lens = torch.tensor([1, 9, 40, 23], dtype=torch.int32)
    tables = torch.stack([torch.randperm(nb, generator=g)[:6] for _ in seq_lens]).int()
    slots = torch.stack([tables[i, (n - 1) // bs].long() * bs + (n - 1) % bs for i, n in enumerate(seq_lens.tolist())])
    q = torch.randn(4, heads, hd, generator=g)
    k, v = torch.randn(2, 4, kv_heads, hd, generator=g)
    caches_ref = (k_cache.clone(), v_cache.clone())
    tables_rope = None
    if rotary:
        angles = torch.rand(64, hd // 2, generator=g) * 6.3
        tables_rope = [torch.cat([f(angles)] * 2, -1) for f in (torch.cos, torch.sin)]  # (P, hd) each
    rq, rk = rotate_new_tokens(q, k, seq_lens, *tables_rope) if rotary else (q, k)
    ref = paged_decode_torch(rq.double(), rk.double(), v.double(), *caches_ref, slots, seq_lens, tables)
    caches = (k_cache.to(device), v_cache.to(device))
    rope = {} if not rotary else dict(cos=tables_rope[0].to(device), sin=tables_rope[1].to(device))
    out = paged_decode_triton(q.to(device), k.to(device), v.to(device), *caches, slots.to(device),
                              seq_lens.to(device), tables.to(device), splits, **rope)
    tol = dict(atol=1e-2, rtol=2e-5) if rotary else F16_DOTS if kv_cache == "fp8" else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    for mine, theirs, kind in zip(caches, caches_ref, ("key", "value")):
        if rotary or (kv_cache == "fp8" and device.type == "cuda"):  # a GPU's e4m3 rounding may differ by a step
            every = torch.arange(nb)
            torch.testing.assert_close(read_blocks(mine.cpu(), every, torch.float64, kind),
                                       read_blocks(theirs, every, torch.float64, kind), atol=1e-6, rtol=E4M3_REL)
        else:
            assert torch.equal(mine.cpu(), theirs.to(mine.dtype))


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,splits", [
    (6, 2, 48, 5, 2),  # GQA group 3, a head size below its power-of-two tile (masked dims), odd blocks
    (4, 4, 20, 3, 8),  # a head size that is not a multiple of 16 (codes off 16-byte boundaries), empty splits
    (8, 2, 64, 16, 1),
])
def test_triton_fp8_decode_odd_shapes_and_strided_tables(device, heads, kv_heads, head_dim, block_size, splits):
    """The split-K decode kernel over an fp8 cache with odd shapes and block tables that are a column slice of a
    wider tensor (row stride > width, shuffled blocks): its output within the float16 dots' tolerance of the torch
    reference over the dequantized cache, the caches it leaves byte for byte the reference's, and the new token's
    key and value read back within the e4m3 bound of what was written."""
    g = torch.Generator().manual_seed(heads * 100 + head_dim + splits)
    seq_lens = [1, 66, 131, 7]
    width = -(-max(seq_lens) // block_size)
    nb = len(seq_lens) * width + 2
    wide = torch.randperm(nb, generator=g)[: len(seq_lens) * width * 1].view(len(seq_lens), width)
    wide = torch.cat([wide, torch.full_like(wide, nb - 1)], 1).int()  # (B, 2W): the kernel reads only W columns
    tables = wide[:, :width]
    assert not tables.is_contiguous() and tables.stride(0) == 2 * width
    k_cache, v_cache = _fp8_caches(g, nb, block_size, kv_heads, head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    slots = torch.tensor([int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(seq_lens)])
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g)
    k, v = torch.randn(2, len(seq_lens), kv_heads, head_dim, generator=g) * 3
    caches_ref = (k_cache.clone(), v_cache.clone())
    ref = paged_decode_torch(q.double(), k.double(), v.double(), *caches_ref, slots, lens, tables)
    caches = (k_cache.to(device), v_cache.to(device))
    out = paged_decode_triton(q.to(device), k.to(device), v.to(device), *caches, slots.to(device), lens.to(device),
                              tables.to(device), splits)
    torch.testing.assert_close(out.double().cpu(), ref, **F16_DOTS)
    for mine, theirs, new, kind in zip(caches, caches_ref, (k, v), ("key", "value")):
        assert torch.equal(mine.cpu(), theirs)
        back = read_blocks(mine.cpu(), slots // block_size, torch.float64, kind)[torch.arange(len(seq_lens)),
                                                                                 slots % block_size]  # (B, Hkv, hd)
        assert bool(((back - new.double()).abs() <= e4m3_bound(new.double())).all())


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(6, 2, 48, 5), (4, 4, 20, 3)])
def test_triton_fp8_prefill_odd_shapes_shared_and_strided_tables(device, heads, kv_heads, head_dim, block_size):
    """The ragged prefill kernel over an fp8 cache, odd shapes, two sequences sharing their first blocks (a cached
    prefix) and a strided block table, against the torch reference over the dequantized cache (F16_DOTS)."""
    g = torch.Generator().manual_seed(heads + head_dim)
    query_lens, seq_lens = [3, 1, 70, 12], [40, 9, 70, 75]
    width = -(-max(seq_lens) // block_size)
    nb = 4 * width
    k_cache, v_cache = (c.to(device) for c in _fp8_caches(g, nb, block_size, kv_heads, head_dim))
    wide = torch.randperm(nb, generator=g)[: 4 * width].view(4, width).repeat(1, 3).int()
    tables = wide[:, width : 2 * width]
    tables[3, :4] = tables[2, :4]  # sequence 3 shares sequence 2's first four blocks
    assert tables.stride(0) == 3 * width
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(device)
    ref = paged_attention_torch(q.double(), k_cache, v_cache, query_lens, seq_lens, tables)
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    out = paged_attention_triton(q, k_cache, v_cache, starts, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                                 tables.to(device), max_query_len=max(query_lens))
    torch.testing.assert_close(out.double(), ref, **F16_DOTS)


def test_triton_fp8_engine_forward_matches_the_torch_path(device):
    from pipeloom.inference.block_manager import BlockManager
    from pipeloom.inference.model_runner import ModelRunner
    from pipeloom.models import Transformer

    torch.manual_seed(0)
    model = Transformer(get_model_config("llama-tiny", n_layers=2)).to(device).eval()
    logits = {}
    for backend in ("torch", "triton"):
        g = torch.Generator().manual_seed(3)
        bm = BlockManager(32, 8)
        runner = ModelRunner(model, 32, 8, backend=backend, cuda_graphs=False, dense_prefill_tokens=None,
                             kv_cache_dtype="fp8")
        seqs = [types.SimpleNamespace(id=f"r{i}", token_ids=torch.randint(0, 256, (n,), generator=g).tolist(),
                                      num_computed=0, num_tokens=n) for i, n in enumerate([13, 4, 21])]
        out = []
        for first in (0, None):  # the prompts, then one decode token each
            slices = []
            for s in seqs:
                start = 0 if first == 0 else s.num_tokens - 1
                n = s.num_tokens if first == 0 else 1
                if first is None:
                    s.token_ids.append(int(torch.randint(0, 256, (1,), generator=g)))
                    s.num_computed, s.num_tokens = s.num_tokens, s.num_tokens + 1
                    start = s.num_computed
                assert bm.allocate(s, n)
                slices.append(types.SimpleNamespace(request=s, first_token=start, n_tokens=n, samples=True))
            out.append(runner.run(types.SimpleNamespace(slices=slices), bm))
        logits[backend] = torch.cat(out)
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


def _kernel_sass():
    import importlib.util
    import os
    from pathlib import Path

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles real kernels: not under the interpreter")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton's NVIDIA backend is not installed")
    spec = importlib.util.spec_from_file_location("kernel_sass_under_test",
                                                  Path(__file__).resolve().parents[1] / "bench" / "kernel_sass.py")
    sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass)
    return sass


def test_fp8_kernels_compile_to_wide_pipelined_loads_without_spills():
    """What the layout is for, checked without a GPU (and the kernels compiled for real: the interpreter accepts
    code the compiler rejects): the split-K decode kernel and the prefill kernel at the 7B shape compiled for sm_90
    (Triton's NVIDIA backend and ptxas, as bench/kernel_sass.py does) read an fp8 cache with 16-byte asynchronous
    copies, no one-byte loads, spill no registers, and the decode kernel's key loop costs at most twice the
    instructions of the bf16 cache's (for half the bytes). The first layout (rows of 132 bytes) compiled to 128
    one-byte loads per thread and step, no asynchronous copies, 876 B of spills and 4.5x the bf16 loop's
    instructions (3178 against 711)."""
    sass = _kernel_sass()
    from pipeloom.kernels.paged_attention import _paged_attention_kernel
    from pipeloom.kernels.paged_decode import _decode_split_kernel

    stats = {}
    for name, kernel, make in (("decode", _decode_split_kernel, sass.decode_kernel_args),
                               ("prefill", _paged_attention_kernel, sass.prefill_kernel_args)):
        for kv in (("auto", "fp8") if name == "decode" else ("fp8",)):
            args, kwargs = make(kv)
            stats[name, kv] = sass.ptx_stats(sass.compile_for(kernel, *args, arch=90, **kwargs))
    print(stats)
    for (name, kv), got in stats.items():
        assert got["spill_store_bytes"] == 0 and got["spill_load_bytes"] == 0, (name, kv, got)
        assert got["cp_async"].get("16B", 0) >= 4, (name, kv, got)  # the tiles stream asynchronously
        if kv == "fp8":
            assert not [t for t in got["loads"] if t.endswith("8")], (name, got)  # b8 / u8 / s8: a byte per load
    assert stats["decode", "fp8"]["loop_instructions"] <= 2 * stats["decode", "auto"]["loop_instructions"], stats


def test_interpreter_runs_fp8_triton_tests(triton_child):
    """Without a GPU: the test_triton_* tests above in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "fp8 KV")
