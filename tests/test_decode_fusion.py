# The fused decode step: add+RMSNorm, q/k rotary at positions, strided SwiGLU kernels, and the kernels it launches.
"""Kernels against their torch references (float32 tight, bfloat16 loose, strided inputs), the decode step's
kernel count, and the fused decode's tokens against the torch path. Without a GPU,
``test_interpreter_runs_decode_fusion_tests`` runs the ``test_triton_*`` tests in ONE child pytest under
TRITON_INTERPRET=1 (see tests/conftest.py ``triton_child``); the rest run here on the torch paths.
"""

import threading

import pytest
import torch
from pipeloom import kernels
from pipeloom.inference.launch_count import count_launches, decode_step_launches
from pipeloom.inference.model_runner import ModelRunner, share_rope_tables
from pipeloom.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_torch
from pipeloom.kernels.rotary import rotary_qk, rotary_torch
from pipeloom.kernels.swiglu import swiglu, swiglu_torch
from pipeloom.models import Transformer, get_model_config
from pipeloom.models.kv import PagedBatch

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture
def device(triton_child):
    return triton_child.device("test_interpreter_runs_decode_fusion_tests")


def _strided(shape, width, offset, dtype, device, g):
    """A (…, shape[-1]) view at ``offset`` of a (…, width) tensor: rows strided as a fused projection's split."""
    wide = torch.randn(*shape[:-1], width, generator=g).to(device, dtype)
    return wide[..., offset: offset + shape[-1]]


def _tables(positions: int, dim: int, g):
    angles = torch.rand(positions, dim // 2, generator=g) * 6.3
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (P, D) each


# ---------------------------------------------------------------- kernels (GPU, or the interpreter in a child)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_add_rmsnorm_matches_the_reference(device, dtype):
    g = torch.Generator().manual_seed(1)
    x = _strided((3, 5, 200), 330, 70, dtype, device, g).requires_grad_()  # (B, T, D) rows of stride 330
    r = torch.randn(3, 5, 200, generator=g).to(device, dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(200, generator=g)).to(device, dtype).requires_grad_()
    s, y = add_rmsnorm(x, r, w, 1e-6)
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    grads = torch.autograd.grad((s, y), (x, r, w), (ds, dy))
    s_ref, y_ref = add_rmsnorm_torch(x, r, w, 1e-6)
    grads_ref = torch.autograd.grad((s_ref, y_ref), (x, r, w), (ds, dy))
    assert s.dtype == y.dtype == dtype
    # the sum rounds once, as the unfused add (bfloat16: the interpreter truncates where a GPU rounds, one ulp)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0 if dtype == torch.float32 else 2**-7)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[dtype])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    with torch.inference_mode(), count_launches() as launches:  # inference: one kernel, no copy of the strided x
        add_rmsnorm(x.detach(), r.detach(), w.detach())
    assert launches.total == 1 and dict(launches.triton) == {"_add_rmsnorm_fwd_kernel": 1}, launches.summary()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_triton_rotary_qk_at_positions_matches_the_reference(device, dtype, batch):
    """q and k as strided views of one fused projection (GQA: 4 and 2 heads), whole tables read at ragged
    positions, in one launch; and its backward."""
    g = torch.Generator().manual_seed(2 + batch)
    T, hd, hq, hk = 7, 16, 4, 2
    qkv = torch.randn(batch, T, (hq + 2 * hk) * hd, generator=g).to(device, dtype)
    q, k = (t.view(batch, T, -1, hd) for t in qkv.split([hq * hd, hk * hd, hk * hd], -1)[:2])
    cos, sin = (t.to(device, dtype) for t in _tables(40, hd, g))
    positions = torch.randint(0, 40, (batch * T,), generator=g).to(device)
    rows = positions.view(batch, T)
    with torch.inference_mode(), count_launches() as launches:
        got_q, got_k = rotary_qk(q, k, cos, sin, positions)
    assert launches.total == 1 and dict(launches.triton) == {"_rotary_kernel": 1}, launches.summary()
    torch.testing.assert_close(got_q.float(), rotary_torch(q, cos[rows], sin[rows]).float(), **TOL[dtype])
    torch.testing.assert_close(got_k.float(), rotary_torch(k, cos[rows], sin[rows]).float(), **TOL[dtype])
    leaf = qkv.detach().float().requires_grad_()  # backward (float32): the same kernel, transposed
    lq, lk = (t.view(batch, T, -1, hd) for t in leaf.split([hq * hd, hk * hd, hk * hd], -1)[:2])
    dq, dk = (torch.randn(batch, T, h, hd, generator=g).to(device) for h in (hq, hk))
    out = rotary_qk(lq, lk, cos.float(), sin.float(), positions)
    (grad,) = torch.autograd.grad(out, leaf, (dq, dk))
    ref = [rotary_torch(t, cos[rows].float(), sin[rows].float()) for t in (lq, lk)]
    (grad_ref,) = torch.autograd.grad(ref, leaf, (dq, dk))
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_swiglu_reads_strided_halves_in_place(device, dtype):
    g = torch.Generator().manual_seed(4)
    gate_up = (2 * torch.randn(3, 5, 2 * 301, generator=g)).to(device, dtype)  # (B, T, 2F): halves strided
    gate, up = gate_up.chunk(2, -1)
    with torch.inference_mode(), count_launches() as launches:
        y = swiglu(gate, up)
    assert launches.total == 1 and dict(launches.triton) == {"_swiglu_fwd_kernel": 1}, launches.summary()
    torch.testing.assert_close(y.float(), swiglu_torch(gate, up).float(), **TOL[dtype])


def _llama(n_layers: int, dtype: torch.dtype, max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_model_config("llama-tiny", n_layers=n_layers, max_seq_len=max_seq_len)).to(dtype).eval()


def _runner(model: Transformer, fuse: bool = True, num_blocks: int = 16) -> ModelRunner:
    runner = ModelRunner(model, num_blocks, 4, backend="triton", cuda_graphs="emulate", graph_batch_sizes=(1, 2))
    assert runner.fuse_decode, "the Triton path's decode graphs fuse by default"
    runner.fuse_decode = fuse
    return runner


def test_triton_decode_step_launches_nine_kernels_per_layer(device):
    """The kernels one decode step of a tiny Llama (bfloat16, batch 1, 4 decode splits + merge as at 1.1B) launches,
    counted as its decode graph would capture them (inference/launch_count.py: aten ops that run a kernel, seen by
    a TorchDispatchMode, plus Triton launches), per layer = count(3 layers) - count(2 layers).

    Before (main at 2016550, the eager composites below the fusion threshold), counted the same way: 38 kernels
    per layer (RMSNorm 8 each x 2, rotary 12 with the per-layer gathers of the cos/sin rows, SiLU and * up 2,
    residual adds 2, the q|k|v and gate|up GEMMs, wo, w2, the split-K decode kernel and its merge) and 10 outside
    the layers; on the H200 the 1.1B's replay launched 868 (~22 x 39 + 10). After: 9 per layer (add+RMSNorm x 2,
    q|k|v, decode (rotating q and k itself) + merge, wo, gate|up, SwiGLU, w2) and 3 outside (embedding, the first
    RMSNorm, the head's GEMM). ``fuse_decode=False`` (the eager composites, with the rotary rows now gathered once
    per batch) counts 36 per layer.
    """
    counts = {(layers, fuse): decode_step_launches(_runner(_llama(layers, torch.bfloat16, 256), fuse))
              for layers in (2, 3) for fuse in (True, False)}
    fused = counts[3, True].total - counts[2, True].total
    unfused = counts[3, False].total - counts[2, False].total
    print(f"per layer: fused {fused}, unfused {unfused}; {counts[3, True].summary()}")
    assert fused <= 9, counts[3, True].summary()
    assert unfused >= 30, counts[3, False].summary()
    assert counts[3, True].total - 3 * fused <= 3 and counts[3, True].syncs == 0
    assert set(counts[3, True].triton) == {"_add_rmsnorm_fwd_kernel", "_rmsnorm_fwd_kernel", "_swiglu_fwd_kernel",
                                           "_decode_split_kernel", "_decode_merge_kernel"}  # rotary: in the decode


def test_triton_fused_decode_gives_the_torch_paths_logits_and_tokens(device):
    """The fused decode step's logits equal the unfused one's over random caches (float32), and greedy tokens
    through the engine (decode graphs emulated, fused by default) equal the torch backend's."""
    from pipeloom.inference import LLMEngine, SamplingParams

    model = _llama(2, torch.float32)
    runner = _runner(model)
    g = torch.Generator().manual_seed(7)
    for k_cache, v_cache in runner.caches.values():
        k_cache.copy_(torch.randn(k_cache.shape, generator=g))
        v_cache.copy_(torch.randn(v_cache.shape, generator=g))
    step = (torch.tensor([5, 77]), torch.tensor([6, 1]), torch.tensor([10, 12]),  # ids, positions, slots
            torch.tensor([7, 2], dtype=torch.int32), torch.tensor([[0, 2], [3, 4]], dtype=torch.int32))
    with torch.inference_mode():
        with kernels.always_fuse(), count_launches() as launches:
            fused = runner.decode_forward(*step)
        unfused = runner.decode_forward(*step)
    assert launches.triton["_add_rmsnorm_fwd_kernel"] == 4, launches.summary()
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)

    tokens = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(model, block_size=4, num_blocks=16)
        if backend == "triton":
            engine.runner = _runner(model)
        g = torch.Generator().manual_seed(9)
        for i, n in enumerate([6, 3]):
            engine.add_request(f"r{i}", torch.randint(0, 256, (n,), generator=g).tolist(),
                               SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens.setdefault(backend, {})[out.request_id] = out.outputs[0].token_ids
    assert tokens["triton"] == tokens["torch"] and len(tokens["torch"]) == 2
    assert sorted(engine.runner.graphs) == [1, 2], "the decode steps replayed the (emulated) graphs"


# ---------------------------------------------------------------- torch paths and plumbing (this process)


@pytest.mark.parametrize("attention", ["tiles", "split"])
def test_triton_verification_graph_gives_the_torch_paths_tokens(device, attention):
    """Speculative decoding with its verification steps replayed from (emulated) graphs on the Triton path: the
    paged-attention kernel over the graph's own work list, each sequence padded to 1 + k rows, the norms and
    SwiGLU fused ("tiles"), or the split-K decode kernel over every row with the keys written first ("split").
    Greedy tokens equal the plain torch backend's, and the verification graphs ran."""
    from pipeloom.inference import LLMEngine, SamplingParams, SpeculativeEngine

    model = _llama(2, torch.float32).to(device)

    def greedy(engine, prompts, max_tokens):
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        done = {}
        while engine.has_unfinished():
            done.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
        return [done[f"r{i}"] for i in range(len(prompts))]

    options = dict(block_size=4, num_blocks=24, max_num_seqs=2)
    loop = [5, 9, 14, 3, 7, 5, 9, 14, 3, 7, 5, 9, 14]
    seen = greedy(LLMEngine(model, attention="torch", **options), [loop], 12)[0]  # prompts that hold their
    prompts = [loop + seen + loop, [200, 3, 77] + seen + loop[:8] + seen]  # continuation: prompt lookup drafts
    engine = SpeculativeEngine(model, num_speculative_tokens=3, attention="triton", cuda_graphs="emulate",
                               verify_attention=attention, **options)
    tokens = {"torch": greedy(LLMEngine(model, attention="torch", **options), prompts, 10),
              "triton": greedy(engine, prompts, 10)}
    assert tokens["triton"] == tokens["torch"] and len(tokens["torch"]) == 2
    assert engine.runner.verify_graphs.graphs and engine.spec_stats.accepted > 0, engine.spec_stats


def test_interpreter_runs_decode_fusion_tests(triton_child):
    """Without a GPU: the test_triton_* tests above in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "decode-fusion")


def test_rotary_warps_are_powers_of_two():
    """Triton launches only power-of-two warp counts: 16 query + 8 key heads of 64 (a 350M Llama's attention) once
    asked for 3 and failed on the H200 (the interpreter does not check)."""
    from pipeloom.kernels.rotary import rotary_warps

    assert rotary_warps(16 + 8, 32) == 4
    for rows in range(1, 200):
        for half in (1, 2, 4, 8, 16, 32, 64, 128):
            w = rotary_warps(rows, half)
            assert 1 <= w <= 8 and w & (w - 1) == 0, (rows, half, w)


def test_always_fuse_is_per_thread_nested_and_off_inside_torch_compile(monkeypatch):
    monkeypatch.setattr(kernels, "use_triton", lambda x: not torch.compiler.is_compiling())  # as on a GPU
    x = torch.randn(4)
    assert not kernels.worth_fusing(x), "small tensors keep the eager path by default"
    seen = []
    with kernels.always_fuse():
        assert kernels.worth_fusing(x)
        with kernels.always_fuse(False):  # False leaves it on
            assert kernels.worth_fusing(x)
        thread = threading.Thread(target=lambda: seen.append(kernels.worth_fusing(x)))
        thread.start()
        thread.join()
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: t * 2 if kernels.worth_fusing(t) else t + 1, backend="eager",
                                 fullgraph=True)
        assert torch.equal(compiled(x), x + 1), "under torch.compile the torch path, without a graph break"
    assert seen == [False], "another thread keeps its own setting"
    assert not kernels.worth_fusing(x)


def test_block_forward_residual_equals_forward_bit_for_bit():
    """The inference residual stream (torch path) gives the training forward's very numbers (float32)."""
    torch.manual_seed(3)
    model = Transformer(get_model_config("llama-tiny", n_layers=3)).eval()
    x = torch.randn(2, 9, model.config.dim)
    with torch.no_grad():
        expected = model.head(model.blocks[2](model.blocks[1](model.blocks[0](x))))
        h, residual = x, None
        for block in model.blocks:
            h, residual = block.forward_residual(h, residual)
        got = model.head.forward_residual(h, residual)
    assert torch.equal(got, expected)


def test_add_rmsnorm_torch_path_float64():
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(4, 40, dtype=torch.float64, generator=g), torch.randn(4, 40, dtype=torch.float64, generator=g)
    w = torch.randn(40, dtype=torch.float64, generator=g)
    with kernels.torch_path():
        s, y = add_rmsnorm(x, r, w, 1e-6)
    torch.testing.assert_close(s, x + r, atol=0, rtol=0)
    torch.testing.assert_close(y, (x + r) / torch.sqrt(((x + r) ** 2).mean(-1, keepdim=True) + 1e-6) * w)


def test_rope_rows_are_gathered_once_per_pair_of_tables():
    """Layers sharing tables (share_rope_tables) get one gather per batch; other tables, even equal in value,
    never get another's rows."""
    torch.manual_seed(0)
    model = Transformer(get_model_config("llama-tiny", n_layers=3))
    model.blocks[2].attn.rope_cos = model.blocks[2].attn.rope_cos * 2  # a layer whose table differs
    assert share_rope_tables(model) == 1
    a0, a1, a2 = (b.attn for b in model.blocks)
    assert a1.rope_cos is a0.rope_cos and a2.rope_cos is not a0.rope_cos
    positions = torch.tensor([3, 0, 7])
    batch = PagedBatch(positions=positions, slot_mapping=positions, query_start=None, seq_lens=positions.int(),
                       block_tables=positions.int()[:, None], block_size=4)
    rows = [batch.rope_rows(a.rope_cos, a.rope_sin) for a in (a0, a1, a2)]
    assert rows[1][0] is rows[0][0] and len(batch.rope) == 2
    torch.testing.assert_close(rows[2][0], 2 * a0.rope_cos[positions])
    copy = a0.rope_cos.clone()  # equal values, another tensor: its own entry
    assert batch.rope_rows(copy, a0.rope_sin)[0] is not rows[0][0] and len(batch.rope) == 3


def test_rotary_qk_torch_path_checks_its_tables():
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
    cos, sin = _tables(10, 8, torch.Generator().manual_seed(0))
    positions = torch.tensor([9, 0, 4])
    got_q, got_k = rotary_qk(q, k, cos, sin, positions)
    torch.testing.assert_close(got_q, rotary_torch(q, cos[positions], sin[positions]))
    torch.testing.assert_close(got_k, rotary_torch(k, cos[positions], sin[positions]))
    with pytest.raises(ValueError, match="positions has 2 entries"):
        rotary_qk(q, k, cos, sin, positions[:2])
    with pytest.raises(ValueError, match="whole tables"):
        rotary_qk(q, k, cos[None], sin[None], positions)
