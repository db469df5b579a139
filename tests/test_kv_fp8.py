# The fp8 KV cache: row format bounds, twice the blocks per byte, and the Triton prefill / split-K decode kernels
# reading (and the decode kernel writing) it against the torch reference (GPU, or CPU under TRITON_INTERPRET=1).
import types

import pytest
import torch
from pipeloom.kernels.kv_fp8 import dequantize_rows, quantize_rows
from pipeloom.kernels.paged_attention import paged_attention_torch, paged_attention_triton
from pipeloom.kernels.paged_decode import paged_decode_torch, paged_decode_triton, rotate_new_tokens
from pipeloom.models import get_model_config

E4M3_REL = 2.0**-4  # half a unit in the last place of a 3-bit mantissa, relative
E4M3_SUBNORMAL_STEP = 2.0**-9  # the spacing of e4m3's subnormals, in units of the scale


@pytest.fixture
def device(triton_child):
    return triton_child.device("test_interpreter_runs_fp8_triton_tests")


def test_rows_round_trip_within_the_e4m3_bound():
    x = torch.randn(64, 4, 32, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None, None]
    rows = quantize_rows(x)
    assert rows.dtype == torch.uint8 and rows.shape == (64, 4, 36)
    back = dequantize_rows(rows, torch.float64)
    scale = x.abs().amax(-1, keepdim=True) / 448
    bound = E4M3_REL * x.abs() + E4M3_SUBNORMAL_STEP / 2 * scale
    assert bool(((back - x).abs() <= bound * (1 + 1e-6)).all())
    assert torch.equal(dequantize_rows(quantize_rows(torch.zeros(3, 8))), torch.zeros(3, 8))


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
    return quantize_rows(k), quantize_rows(v)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 16, 4), (8, 1, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fp8_prefill_matches_the_reference(device, heads, kv_heads, head_dim, block_size, dtype):
    """The ragged kernel over an fp8 cache against the torch path over the same codes (float64): float32 within
    2e-5, bfloat16 within 2e-2 (the query's rounding; both read the same dequantized values)."""
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
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("kv_cache,splits,rotary", [("auto", 1, False), ("auto", 4, False), ("fp8", 1, False),
                                                    ("fp8", 4, False), ("fp8", 4, True)])
def test_triton_decode_writes_and_attends_like_the_reference(device, kv_cache, splits, rotary):
    """The split-K decode kernel (writes the new K/V itself) against the torch reference: outputs within 2e-5
    (float32), and the caches it leaves byte for byte equal (fp8: the same codes and scales). ``rotary``: the kernel
    rotates q and k first (the reference rotates them in float32 beforehand; an fp8 code at a rounding boundary
    may then fall the other way, so the caches compare within half an e4m3 step)."""
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
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5 if not rotary else 1e-2, rtol=2e-5)
    for mine, theirs in zip(caches, caches_ref):
        if rotary:
            torch.testing.assert_close(dequantize_rows(mine.cpu(), torch.float64),
                                       dequantize_rows(theirs, torch.float64), atol=1e-6, rtol=E4M3_REL)
        else:
            assert torch.equal(mine.cpu(), theirs.to(mine.dtype))


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


def test_interpreter_runs_fp8_triton_tests(triton_child):
    """Without a GPU: the test_triton_* tests above in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "fp8 KV")
