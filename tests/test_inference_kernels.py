# The Triton paged-attention kernel against the torch reference (GPU, or CPU under TRITON_INTERPRET=1).
"""Without a GPU, ``test_interpreter_runs_paged_triton_tests`` runs the ``test_triton_*`` tests below in a
child pytest under TRITON_INTERPRET=1 (triton decides interpreter or compiler at import; see test_kernels.py).
"""

import types

import pytest
import torch
from pipeloom.kernels.paged_attention import paged_attention_torch, paged_attention_triton, query_tiles



@pytest.fixture
def device(triton_child):
    return triton_child.device("test_interpreter_runs_paged_triton_tests")


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 16, 4), (8, 1, 32, 16), (6, 2, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paged_attention_matches_the_reference(device, heads, kv_heads, head_dim, block_size, dtype):
    g = torch.Generator().manual_seed(heads * 100 + block_size)
    num_blocks = 48
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    query_lens, seq_lens = [5, 1, 17, 1, 3, 9], [5, 9, 30, 1, 40, 9]  # prefills, decodes, chunks after a prefix
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[: -(-max(seq_lens) // block_size)]
                          for _ in query_lens]).int().to(device)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(device, dtype)
    ref = paged_attention_torch(q.double(), k_cache.double(), v_cache.double(), query_lens, seq_lens, tables)
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    out = paged_attention_triton(q, k_cache, v_cache, starts, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                                 tables, max_query_len=max(query_lens))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_triton_engine_forward_matches_the_torch_path(device):
    from pipeloom.inference.block_manager import BlockManager
    from pipeloom.inference.model_runner import ModelRunner
    from pipeloom.models import Transformer, get_model_config

    torch.manual_seed(0)
    model = Transformer(get_model_config("llama-tiny", n_layers=2)).to(device).eval()
    g = torch.Generator().manual_seed(3)
    logits = {}
    for backend, dense in (("torch", None), ("triton", None), ("triton-dense", 10)):  # dense: the 13 and 21
        bm = BlockManager(32, 8)  # token prompts run SDPA, the 4-token one the kernel
        runner = ModelRunner(model, 32, 8, backend=backend.split("-")[0], cuda_graphs=False,
                             dense_prefill_tokens=dense)
        seqs = [types.SimpleNamespace(id=f"r{i}", token_ids=torch.randint(0, 256, (n,), generator=g).tolist(),
                                      num_computed=0, num_tokens=n) for i, n in enumerate([13, 4, 21])]
        g = torch.Generator().manual_seed(3)
        slices = []
        for s in seqs:
            assert bm.allocate(s, s.num_tokens)
            slices.append(types.SimpleNamespace(request=s, first_token=0, n_tokens=s.num_tokens, samples=True))
        logits[backend] = runner.run(types.SimpleNamespace(slices=slices), bm)
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits["triton-dense"], logits["torch"], atol=1e-4, rtol=1e-4)


def test_query_tiles_cover_every_token_once():
    seqs, firsts = query_tiles([5, 1, 17], group=4, block_m=16)  # 4 tokens per tile
    assert list(zip(seqs, firsts)) == [(0, 0), (0, 4), (1, 0), (2, 0), (2, 4), (2, 8), (2, 12), (2, 16)]


def test_interpreter_runs_paged_triton_tests(triton_child):
    """Without a GPU: the test_triton_* tests above in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "paged-attention")
