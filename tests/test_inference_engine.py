# The engine on pipeloom's own models: paged forward == training forward, seeded batch invariance, aborts,
# bad input, the async engine, text and stop strings through LLM, iteration records and the cost model.
import asyncio
import types

import pytest
import torch

from pipeloom.inference import LLM, AsyncEngine, LLMEngine, SamplingParams
from pipeloom.inference.block_manager import BlockManager
from pipeloom.inference.model_runner import ModelRunner
from pipeloom.models import Transformer, get_model_config
from pipeloom.schedules.batching import list_batching


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return Transformer(get_model_config("llama-tiny", n_layers=2, max_seq_len=96)).double().eval()


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_paged_forward_equals_the_training_forward(name):
    """Three sequences over three ragged iterations (chunks, decodes, mixed) against full forwards (float64)."""
    torch.manual_seed(1)
    model = Transformer(get_model_config(name, n_layers=2)).double().eval()
    bm, runner = BlockManager(32, 4), ModelRunner(model, 32, 4, backend="torch")
    seqs = [types.SimpleNamespace(id=f"r{i}", token_ids=p, num_computed=0, num_tokens=len(p))
            for i, p in enumerate(_prompts([9, 18, 13], seed=1))]
    plan = [[(0, 5), (0, 10), (0, 9)], [(5, 1), (10, 7), (9, 3)], [(6, 1), (17, 1), (12, 1)]]
    logits = []
    for chunks in plan:
        slices = []
        for s, (first, n) in zip(seqs, chunks):
            s.num_computed = first
            assert bm.allocate(s, n)
            slices.append(types.SimpleNamespace(request=s, first_token=first, n_tokens=n, samples=True))
        logits.append(runner.run(types.SimpleNamespace(slices=slices), bm))
    with torch.no_grad():
        for i, s in enumerate(seqs):
            full = model(torch.tensor([s.token_ids]))[0]  # (T, V)
            for step, chunks in enumerate(plan):
                end = chunks[i][0] + chunks[i][1]
                torch.testing.assert_close(logits[step][i], full[end - 1], rtol=1e-12, atol=1e-12)
    # the runner ran one GEMM per projection group: q|k|v of every attention (and gate|up of every SwiGLU), with
    # the model's own linears re-pointed at views of those weights (no second copy)
    for block in model.blocks:
        weight, _, sizes = runner.fused[block.attn]
        assert block.attn.wq.weight.data_ptr() == weight.data_ptr() and sum(sizes) == weight.size(0)
        if name == "llama-tiny":
            weight, _, sizes = runner.fused[block.mlp]
            assert sizes == [block.mlp.w1.out_features] * 2
            assert block.mlp.w3.weight.data_ptr() == weight[sizes[0]:].data_ptr()
        else:
            assert block.mlp not in runner.fused


def _run_all(engine, requests):
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("policy", list_batching())
def test_seeded_sampling_is_the_same_alone_and_in_any_batch(llama, policy):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    prompt = _prompts([11], seed=5)[0]
    alone = _run_all(LLMEngine(llama, policy=policy, token_budget=16, block_size=4, num_blocks=64),
                     [("x", prompt, params)])["x"].outputs[0].token_ids
    others = [(f"o{i}", p, SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True))
              for i, p in enumerate(_prompts([3, 17, 8, 25], seed=6))]
    batched = _run_all(LLMEngine(llama, policy=policy, token_budget=16, block_size=4, num_blocks=64),
                       others[:2] + [("x", prompt, params)] + others[2:])
    assert batched["x"].outputs[0].token_ids == alone
    assert len(alone) == 8


def test_abort_frees_blocks_at_once_and_others_keep_running(llama):
    engine = LLMEngine(llama, policy="continuous", block_size=4, num_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = _run_all(LLMEngine(llama, block_size=4, num_blocks=64), [("b", _prompts([7])[0], greedy)])
    engine.add_request("a", _prompts([20], seed=3)[0], greedy)
    engine.add_request("b", _prompts([7])[0], greedy)
    engine.step()
    engine.step()
    held = engine.block_manager.num_total_blocks() - engine.block_manager.num_free_blocks()
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_total_blocks() - engine.block_manager.num_free_blocks() < held
    assert engine.abort("a") is None
    rest = _run_all(engine, [])
    assert rest["b"].outputs[0].token_ids == expected["b"].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks() == engine.block_manager.num_total_blocks()


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty"),
    (list(range(97)), SamplingParams(), r"Input length \(97\)"),
    ([1, 300], SamplingParams(), "300"),
    ([1, 2], dict(max_tokens=0), "max_tokens=0"),
    ([1, 2], dict(temperature=-1), "temperature=-1"),
    ([1, 2], dict(top_p=1.5), "top_p=1.5"),
    ([1, 2], dict(n=500), "n=500"),
    ([1, 2], dict(max_tokens=90), "max_tokens=90"),  # prompt + max_tokens beyond a 16-block cache
])
def test_bad_input_raises_at_add_request_and_others_keep_running(llama, prompt, params, match):
    engine = LLMEngine(llama, block_size=4, num_blocks=16)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("good", [5, 6, 7], greedy)
    engine.step()
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params if isinstance(params, SamplingParams) else SamplingParams(**params))
    assert "bad" not in engine.groups
    assert len(_run_all(engine, [])["good"].outputs[0].token_ids) == 4


def test_llm_generates_text_with_stop_strings_and_logprobs():
    llm = LLM(model="gpt-tiny", dtype="float32", device="cpu", block_size=8, num_blocks=64)
    free = llm.generate(["hello", [104, 105]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert free[0].prompt == "hello" and free[1].prompt is None
    text = free[0].outputs[0].text
    assert text == bytes(free[0].outputs[0].token_ids).decode("utf-8", errors="replace")
    assert free[0].outputs[0].finish_reason == "length"
    stop = text[3:5] if len(text) >= 5 and "\ufffd" not in text[:5] else None
    if stop:
        cut = llm.generate("hello", SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False)[0]
        assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].text == text[: text.index(stop)]
    lp = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, logprobs=2), use_tqdm=False)
    steps = lp[0].outputs[0].logprobs
    assert len(steps) == 3 and all(len(s) >= 2 and max(s.values()) <= 0 for s in steps)
    assert llm.last_run["output_tokens"] == 3 and llm.last_run["tokens_per_s"] > 0


def test_async_engine_streams_deltas_and_abort_ends_a_stream(llama):
    async def main():
        engine = AsyncEngine(LLMEngine(llama, block_size=4, num_blocks=64))
        greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        with pytest.raises(ValueError, match="temperature"):
            await engine.add_request("bad", [1, 2], SamplingParams(temperature=-2.0))
        stream_a = await engine.add_request("a", _prompts([9])[0], greedy)
        stream_b = await engine.add_request("b", _prompts([15], seed=2)[0], greedy)
        tokens, last = [], None
        async for out in stream_a:
            tokens += out.delta_token_ids.get(0, [])
            last = out
        assert last.finished and tokens == last.outputs[0].token_ids and len(tokens) == 10
        await engine.abort("b")
        seen = [out async for out in stream_b]
        assert seen and seen[-1].finished and seen[-1].outputs[0].finish_reason in ("abort", "length")
        bm = engine.engine.block_manager
        assert bm.num_free_blocks() == bm.num_total_blocks()
        await engine.close()

    asyncio.run(main())


def test_iterations_are_recorded_for_the_cost_model():
    from pipeloom.schedules.batching import IterationRecord

    llm = LLM(model="llama-tiny", device="cpu", block_size=8, num_blocks=64, token_budget=16)
    llm.generate(_prompts([5, 30, 12]), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    recs = llm.engine.records
    assert all(isinstance(r, IterationRecord) and r.duration > 0 for r in recs)
    assert sum(r.num_decode_seqs for r in recs) + 3 == 18 and sum(r.num_prefill_tokens for r in recs) == 47
    assert max(r.num_prefill_tokens + r.num_decode_seqs for r in recs) <= 16  # the token budget
    assert "predicted" in llm.engine.latency_report()


def test_decode_graph_path_pads_batches_and_changes_nothing(llama):
    """The CUDA-graph decode path's static buffers and padding (batch 3 replays the size-4 graph, its spare row
    writing to the scratch block), emulated on CPU, give the eager path's tokens."""
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    requests = [(f"r{i}", p, greedy) for i, p in enumerate(_prompts([6, 11, 3], seed=9))]
    eager = _run_all(LLMEngine(llama, block_size=4, num_blocks=64), requests)
    engine = LLMEngine(llama, block_size=4, num_blocks=64)
    engine.runner = ModelRunner(llama, 64, 4, backend="torch", cuda_graphs="emulate", graph_batch_sizes=(1, 2, 4))
    graphed = _run_all(engine, requests)
    assert sorted(engine.runner.graphs) == [1, 2, 4]
    assert {k: v.outputs[0].token_ids for k, v in graphed.items()} == {k: v.outputs[0].token_ids
                                                                       for k, v in eager.items()}


def test_penalties_see_the_prompt_and_output_histories(llama):
    """Repetition/frequency penalties and min_tokens through the engine equal the sampler fed by hand."""
    from pipeloom.inference import Sampler

    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.6, frequency_penalty=0.7,
                            min_tokens=4, ignore_eos=True)
    prompt = _prompts([9], seed=4)[0]
    got = _run_all(LLMEngine(llama, block_size=4, num_blocks=64), [("p", prompt, params)])["p"].outputs[0].token_ids
    ids, sampler = list(prompt), Sampler()
    with torch.no_grad():
        for _ in range(12):
            logits = llama(torch.tensor([ids]))[0, -1:]  # (1, V)
            ids.append(int(sampler(logits, [params], prompt_ids=[prompt], output_ids=[ids[9:]]).token_ids[0]))
    assert got == ids[9:]
