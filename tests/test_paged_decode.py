# The split-K paged decode kernel against the torch references (GPU, or CPU under TRITON_INTERPRET=1).
"""``kernels/paged_decode.py``: one new token per sequence, written into the cache by the kernel itself, then
attention over the sequence's blocks in ``splits`` key shares merged by a second kernel. Without a GPU,
``test_interpreter_runs_paged_decode_tests`` runs the ``test_triton_*`` tests in a child pytest under
TRITON_INTERPRET=1 (triton decides interpreter or compiler at import; see test_kernels.py).
"""


import pytest
import torch
from pipeloom.kernels.paged_attention import paged_attention_torch
from pipeloom.kernels.paged_decode import (decode_splits, paged_decode, paged_decode_torch, paged_decode_triton,
                                           rotate_new_tokens)
from pipeloom.kernels.rotary import rotary_torch



@pytest.fixture
def device(triton_child):
    return triton_child.device("test_interpreter_runs_paged_decode_tests")


def _case(seq_lens, heads, kv_heads, head_dim, block_size, dtype, device, seed=0):
    """(q, k, v, k_cache, v_cache, slots, seq_lens, tables): random caches, shuffled block tables (disjoint, as
    the block manager's: a slot one sequence writes is never one another reads), the new token of sequence s
    at position seq_lens[s] - 1."""
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    width = -(-max(seq_lens) // block_size) + 1  # one spare column: tables are wider than the longest sequence
    num_blocks = b * width + 3
    tables = torch.randperm(num_blocks, generator=g)[: b * width].view(b, width).int()
    slots = torch.tensor([int(tables[s, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for s, n in enumerate(seq_lens)])
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(b, heads, head_dim, generator=g)
    k = torch.randn(b, kv_heads, head_dim, generator=g)
    v = torch.randn(b, kv_heads, head_dim, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(device, dtype) for t in (q, k, v, k_cache, v_cache)] + [slots.to(device), lens.to(device),
                                                                         tables.to(device)]


def _loop_reference(q, k, v, k_cache, v_cache, slots, seq_lens, tables):
    """Write k/v slot by slot, then the general paged attention with one query per sequence (float64)."""
    k_cache, v_cache = k_cache.double().clone(), v_cache.double().clone()
    nb, bs, n_kv, hd = k_cache.shape
    for s, slot in enumerate(slots.tolist()):
        k_cache[slot // bs, slot % bs] = k[s].double()
        v_cache[slot // bs, slot % bs] = v[s].double()
    out = paged_attention_torch(q.double(), k_cache, v_cache, [1] * q.size(0), seq_lens.tolist(), tables)
    return out, k_cache, v_cache


# lengths: only the new token (1), a partial block, exact block multiples (8, 16, 64), several 64-key steps
LENGTHS = [1, 5, 8, 16, 37, 64, 150]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 4, 16, 4),  # no GQA
    (8, 2, 32, 8),  # GQA 4
    (8, 1, 16, 16),  # MQA: one kv head, 8 query heads
    (6, 2, 24, 8),  # GQA 3 and a head dim that is not a power of two
])
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_paged_decode_matches_the_reference(device, heads, kv_heads, head_dim, block_size, splits):
    args = _case(LENGTHS, heads, kv_heads, head_dim, block_size, torch.float32, device, seed=heads + block_size)
    q, k, v, k_cache, v_cache, slots, lens, tables = args
    ref, ref_k, ref_v = _loop_reference(*[a.cpu() for a in args])
    out = paged_decode_triton(*args, splits=splits)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(k_cache.double().cpu(), ref_k)  # the new keys/values written, nothing else
    torch.testing.assert_close(v_cache.double().cpu(), ref_v)


def test_triton_paged_decode_without_store_reads_what_the_caller_wrote(device):
    """``store=False`` (a prewrite batch): the kernel leaves the cache alone - new keys and values it was not given
    in the cache do not land there - and attends to what the caller wrote, as the reference does."""
    args = _case(LENGTHS, 8, 2, 32, 8, torch.float32, device, seed=5)
    q, k, v, k_cache, v_cache, slots, lens, tables = args
    ref, ref_k, ref_v = _loop_reference(*[a.cpu() for a in args])
    k_cache.copy_(ref_k.to(k_cache))  # the caller's writes
    v_cache.copy_(ref_v.to(v_cache))
    written = k_cache.clone(), v_cache.clone()
    paged_decode_triton(q, 3 * k, 3 * v, k_cache, v_cache, slots, lens, tables, splits=4, store=False)
    assert torch.equal(k_cache, written[0]) and torch.equal(v_cache, written[1])
    out = paged_decode_triton(q, k, v, k_cache, v_cache, slots, lens, tables, splits=4, store=False)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(paged_decode_torch(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                  k_cache.double().cpu(), v_cache.double().cpu(), slots.cpu(),
                                                  lens.cpu(), tables.cpu(), store=False), ref)


def test_triton_prewritten_rows_of_one_sequence_attend_to_each_other(device):
    """A speculative verification as a decode batch (``PagedBatch.prewrite``, ModelRunner's "split" verification):
    three new tokens of ONE sequence as rows of their own, listed last position first, each row seeing its position
    + 1 keys through the same block table. Every key is written before the kernel runs, so whatever order its
    programs run in, the outputs equal the causal paged attention of the three tokens. Without the prewrite, the
    interpreter (programs in grid order) runs the last row first and reads the earlier rows' slots unwritten."""
    from pipeloom.kernels import interpreted
    from pipeloom.models.kv import PagedBatch

    heads, kv_heads, hd, bs, cached = 4, 2, 16, 8, 37
    g = torch.Generator().manual_seed(3)
    table = torch.randperm(12, generator=g)[:6].int()  # 6 blocks of 8: room for 48 positions
    positions = torch.tensor([cached + 2, cached + 1, cached])  # rows: last position first
    slots = table.long()[positions // bs] * bs + positions % bs
    k_cache, v_cache = (torch.randn(12, bs, kv_heads, hd, generator=g) for _ in range(2))
    q = torch.randn(3, heads, hd, generator=g)
    k, v = (torch.randn(3, kv_heads, hd, generator=g) for _ in range(2))
    order = [2, 1, 0]  # rows by position
    want_k, want_v = k_cache.double().clone(), v_cache.double().clone()
    for row, slot in enumerate(slots.tolist()):
        want_k[slot // bs, slot % bs], want_v[slot // bs, slot % bs] = k[row].double(), v[row].double()
    want = paged_attention_torch(q[order].double(), want_k, want_v, [3], [cached + 3], table[None])[order]
    outs = {}
    for prewrite in (True, False):
        module = torch.nn.Module()
        caches = {module: (k_cache.clone().to(device), v_cache.clone().to(device))}
        batch = PagedBatch(positions=positions.to(device), slot_mapping=slots.to(device), query_start=None,
                           seq_lens=(positions + 1).int().to(device), block_tables=table.repeat(3, 1).to(device),
                           block_size=bs, caches=caches, backend="triton", decode_splits=2, prewrite=prewrite)
        outs[prewrite] = batch.attend(module, q.to(device), k.to(device), v.to(device)).double().cpu()
        torch.testing.assert_close(caches[module][0].double().cpu(), want_k)  # every new key written
    torch.testing.assert_close(outs[True], want, atol=2e-5, rtol=2e-5)
    if interpreted():
        assert not torch.allclose(outs[False], want, atol=1e-3), "the order the interpreter runs should show the race"


@pytest.mark.parametrize("splits", [2, 16])  # 16: more splits than 64-key steps, so some are empty
def test_triton_paged_decode_bfloat16_and_empty_splits(device, splits):
    args = _case([3, 64, 129], 8, 2, 64, 16, torch.bfloat16, device, seed=splits)
    ref, ref_k, _ = _loop_reference(*[a.cpu() for a in args])
    out = paged_decode_triton(*args, splits=splits)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(args[3].double().cpu(), ref_k)


def _tables(positions, head_dim, dtype, device, seed):
    angles = torch.rand(positions, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    return [torch.cat([f(angles)] * 2, -1).to(device, dtype) for f in (torch.cos, torch.sin)]  # (P, hd) each


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 16), (torch.float32, 24), (torch.bfloat16, 64)])
def test_triton_paged_decode_rotates_q_and_k_at_the_new_position(device, dtype, head_dim):
    """With rotary tables the kernel rotates q and k (strided views, as split from one q|k|v output) at
    seq_lens - 1 before it writes and attends: as rotating first and decoding without tables."""
    args = _case([1, 9, 37], 4, 2, head_dim, 8, dtype, device, seed=head_dim)
    q, k, v = args[:3]
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1)  # (B, (4 + 2 + 2) hd)
    q, k, v = (t.view(3, -1, head_dim) for t in qkv.split([4 * head_dim, 2 * head_dim, 2 * head_dim], 1))
    cos, sin = _tables(40, head_dim, dtype, device, seed=1)
    rq, rk = rotate_new_tokens(q, k, args[6], cos, sin)
    ref, ref_k, _ = _loop_reference(*[a.cpu() for a in [rq, rk, v, *args[3:]]])
    out = paged_decode_triton(q, k, v, *args[3:], splits=2, cos=cos, sin=sin)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    torch.testing.assert_close(args[3].double().cpu(), ref_k, **tol)  # the rotated keys were written


def test_rotate_new_tokens_reads_the_rows_at_seq_lens_minus_one():
    q, k = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    cos, sin = _tables(20, 8, torch.float64, "cpu", seed=2)
    lens = torch.tensor([1, 7, 20], dtype=torch.int32)
    rq, rk = rotate_new_tokens(q, k, lens, cos, sin)
    for s, n in enumerate(lens.tolist()):
        torch.testing.assert_close(rq[s], rotary_torch(q[s][None, None], cos[n - 1 : n], sin[n - 1 : n])[0, 0])
        torch.testing.assert_close(rk[s], rotary_torch(k[s][None, None], cos[n - 1 : n], sin[n - 1 : n])[0, 0])
    args = _case([5, 16], 4, 2, 8, 4, torch.float64, torch.device("cpu"), seed=3)
    caches = [a.clone() for a in args[3:5]]
    out = paged_decode(*args[:3], *caches, *args[5:], backend="torch", cos=cos, sin=sin)
    rq, rk = rotate_new_tokens(*args[:2], args[6], cos, sin)
    torch.testing.assert_close(out, paged_decode_torch(rq, rk, *args[2:]))
    with pytest.raises(ValueError, match="both rotary tables"):
        paged_decode(*args, backend="torch", cos=cos)


def test_triton_paged_decode_rejects_a_bad_split_count(device):
    args = _case([4], 4, 2, 16, 4, torch.float32, device)
    with pytest.raises(ValueError, match="splits=3"):
        paged_decode_triton(*args, splits=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_reference_equals_the_loop_reference(dtype):
    args = _case(LENGTHS, 8, 2, 16, 8, dtype, torch.device("cpu"), seed=4)
    ref, ref_k, ref_v = _loop_reference(*args)
    out = paged_decode_torch(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args[3].double(), ref_k)
    torch.testing.assert_close(args[4].double(), ref_v)


def test_the_custom_op_compiles_without_a_graph_break():
    """Under torch.compile the call is the custom op ``pipeloom::paged_decode``: one graph, same output."""
    import torch._dynamo as dynamo

    args = _case([5, 16, 33], 4, 2, 16, 8, torch.float64, torch.device("cpu"), seed=5)
    eager_caches = [a.clone() for a in args[3:5]]
    expected = paged_decode(*args[:3], *eager_caches, *args[5:], backend="torch")

    def step(q, k, v, k_cache, v_cache, slots, lens, tables):
        return paged_decode(q * 1.0, k, v, k_cache, v_cache, slots, lens, tables, backend="torch") + 0.0

    dynamo.reset()
    explained = dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(args[3], eager_caches[0])  # the op wrote the caches (it declares the mutation)


def test_decode_splits_fill_the_device_and_stay_powers_of_two():
    assert decode_splits(1, 4, 4096, num_sms=132) == 16  # batch 1: the most splits
    assert decode_splits(256, 8, 4096, num_sms=132) == 1  # a big batch fills the device by itself
    assert decode_splits(1, 4, 100, num_sms=132) == 2  # at most one split per 64-key step
    for b in (1, 3, 17, 64):
        s = decode_splits(b, 2, 2048, num_sms=132)
        assert s & (s - 1) == 0 and 1 <= s <= 16


def test_interpreter_runs_paged_decode_tests(triton_child):
    """Without a GPU: the test_triton_* tests above in a child pytest under TRITON_INTERPRET=1; all must pass."""
    triton_child.run(__file__, "paged-decode")
