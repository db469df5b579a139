# Overlapped engine steps (the host prepares iteration i+1 while i runs) give exactly the sequential engine's outputs.
"""Every test runs the same requests with ``overlap`` on and off and compares tokens, finish reasons and text;
each also checks that steps really overlapped (``stats()["overlapped_iterations"]``) and that the block pool is
whole at the end. Covered: every batching policy, preemption by a tiny block pool (including a preempted
sequence re-admitted while its last token is still in flight), prefix-cache hits, ``n > 1``, the context-length
cap on ``max_tokens``, requests whose token values matter (seeded sampling, stop strings, EOS) mixed in, the
emulated CUDA-graph decode path, and an abort while an iteration is in flight."""

import pytest
import torch

from pipeloom.data import ByteTokenizer
from pipeloom.inference import LLM, LLMEngine, SamplingParams
from pipeloom.inference import host_inputs
from pipeloom.inference.model_runner import ModelRunner
from pipeloom.models import Transformer, get_model_config
from pipeloom.schedules.batching import list_batching

LENGTHS = [1, 3, 4, 5, 8, 9, 14, 23]  # around multiples of the block size 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return Transformer(get_model_config("llama-tiny", n_layers=2, max_seq_len=64)).double().eval()


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)


def _summary(results):
    return [[(o.token_ids, o.finish_reason, o.text) for o in r.outputs] for r in results]


def _both(model, prompts, params, **options):
    """(sequential results, overlapped results, the overlapped LLM) of one generate call each."""
    runs = []
    for overlap in (False, True):
        llm = LLM(model, device="cpu", eos_token_id=0, tokenizer=ByteTokenizer(), overlap=overlap, **options)
        runs.append((llm.generate(prompts, params, use_tqdm=False), llm))
    (seq, seq_llm), (ovl, llm) = runs
    assert seq_llm.engine.stats()["overlapped_iterations"] == 0
    for engine in (seq_llm.engine, llm.engine):
        bm = engine.block_manager
        bm.check()
        assert bm.num_free_blocks() == bm.num_total_blocks() and not engine.has_unfinished()
    return seq, ovl, llm


@pytest.mark.parametrize("policy", list_batching())
def test_overlap_changes_no_token_under_every_policy(llama, policy):
    prompts = _prompts(LENGTHS)
    params = [_greedy(3 + i % 5) for i in range(len(prompts))]  # ends at different iterations
    seq, ovl, llm = _both(llama, prompts, params, policy=policy, token_budget=16, block_size=4, num_blocks=128)
    assert _summary(ovl) == _summary(seq)
    assert [len(r.outputs[0].token_ids) for r in ovl] == [p.max_tokens for p in params]
    assert llm.engine.stats()["overlapped_iterations"] > 0


@pytest.mark.parametrize("policy", ["continuous", "chunked-prefill"])
def test_overlap_under_preemption_changes_nothing(llama, policy, monkeypatch):
    """A tiny pool preempts; a victim re-admitted in the same schedule as its in-flight token gets that token
    from the device (the prefill span one short on the host)."""
    late = []
    ragged = host_inputs.ragged_inputs

    def spy(iteration, block_manager, tables):
        out = ragged(iteration, block_manager, tables)
        late.extend(row for row, _ in out.missing if any(sl.n_tokens > 1 for sl in iteration.slices))
        return out

    monkeypatch.setattr("pipeloom.inference.model_runner.ragged_inputs", spy)
    prompts = _prompts(LENGTHS, seed=1)
    seq, ovl, llm = _both(llama, prompts, _greedy(10), policy=policy, token_budget=16, block_size=4, num_blocks=9)
    assert _summary(ovl) == _summary(seq)
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["overlapped_iterations"] > 0
    assert late or policy == "continuous"  # chunked-prefill re-admits a victim while its token is in flight


def test_overlap_with_prefix_hits_n_samples_and_the_context_cap(llama):
    shared = _prompts([12], seed=2)[0]
    prompts = [shared + p for p in _prompts([1, 4, 7], seed=3)] + [_prompts([60], seed=4)[0]]  # 60 + 5 > 64
    params = [_greedy(9, n=2), _greedy(6), _greedy(8, n=3), _greedy(30)]
    seq, ovl, llm = _both(llama, prompts, params, token_budget=32, block_size=4, num_blocks=128)
    assert _summary(ovl) == _summary(seq)
    assert len(ovl[-1].outputs[0].token_ids) == 64 - 60 + 1 and ovl[-1].outputs[0].finish_reason == "length"
    assert llm.engine.block_manager.hits > 0 and llm.engine.stats()["overlapped_iterations"] > 0
    again = llm.generate(prompts, params, use_tqdm=False)  # now from the prefix cache
    assert _summary(again) == _summary(seq)


def test_requests_whose_tokens_matter_fall_back_and_change_nothing(llama):
    """Seeded sampling, a stop string and EOS need each token on the host: steps run sequentially while such a
    request is live, and overlap once only plain greedy ones are left."""
    prompts = _prompts([5, 9, 3, 7, 11], seed=5)
    free = LLM(llama, device="cpu", tokenizer=ByteTokenizer()).generate(prompts[0], _greedy(8), use_tqdm=False)
    text = free[0].outputs[0].text  # random bytes: some replaced, some multi-byte characters
    stop = next(text[i : i + 2] for i in range(len(text) - 1) if "\ufffd" not in text[i : i + 2])  # across tokens
    params = [SamplingParams(temperature=0, max_tokens=8, stop=[stop]),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=4), _greedy(24),
              SamplingParams(temperature=1.0, seed=11, max_tokens=3, n=2),
              SamplingParams(temperature=0, max_tokens=6)]  # EOS (id 0) can end it
    seq, ovl, llm = _both(llama, prompts, params, token_budget=16, block_size=4, num_blocks=128)
    assert _summary(ovl) == _summary(seq)
    assert ovl[0].outputs[0].finish_reason == "stop" and ovl[0].outputs[0].text == text[: text.index(stop)]
    assert llm.engine.stats()["overlapped_iterations"] > 0
    solo = LLM(llama, device="cpu", eos_token_id=0, tokenizer=ByteTokenizer())
    alone = solo.generate(prompts[1], params[1], use_tqdm=False)
    assert alone[0].outputs[0].token_ids == ovl[1].outputs[0].token_ids  # seeded: the same alone


def test_overlap_on_the_emulated_decode_graphs(llama):
    """The decode-graph replay takes the in-flight tokens into its static input buffer on the device."""
    prompts = _prompts([6, 11, 3], seed=9)
    results = []
    for overlap in (False, True):
        engine = LLMEngine(llama, block_size=4, num_blocks=64, overlap=overlap)
        engine.runner = ModelRunner(llama, 64, 4, backend="torch", cuda_graphs="emulate", graph_batch_sizes=(1, 2, 4))
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, _greedy(9))
        done = {}
        while engine.has_unfinished():
            done.update((out.request_id, out) for out in engine.step(finished_only=True))
        results.append([done[f"r{i}"] for i in range(len(prompts))])
        assert sorted(engine.runner.graphs) == [1, 2, 4]
    assert _summary(results[1]) == _summary(results[0])
    assert engine.stats()["overlapped_iterations"] > 0


def test_abort_while_an_iteration_is_in_flight(llama):
    prompts = _prompts([4, 6, 9], seed=6)
    outs = {}
    for overlap in (False, True):
        engine = LLMEngine(llama, block_size=4, num_blocks=64, overlap=overlap)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, _greedy(12))
        done = {}
        for step in range(200):
            if step == 5:
                aborted = engine.abort("r1")
                assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
            for out in engine.step(finished_only=True):
                done[out.request_id] = out
            if not engine.has_unfinished():
                break
        assert sorted(done) == ["r0", "r2"]
        engine.block_manager.check()
        assert engine.block_manager.num_free_blocks() == engine.block_manager.num_total_blocks()
        outs[overlap] = {k: v.outputs[0].token_ids for k, v in done.items()}
    assert outs[True] == outs[False]


def test_auto_does_not_overlap_on_the_cpu(llama):
    """``overlap="auto"`` (the default) overlaps on CUDA only (a synchronous CPU forward hides nothing); a bad
    value is named."""
    engine = LLMEngine(llama, block_size=4, num_blocks=64)
    assert engine.overlap == "auto"
    for i, p in enumerate(_prompts([4, 6], seed=7)):
        engine.add_request(f"r{i}", p, _greedy(5))
    while engine.has_unfinished():
        engine.step(finished_only=True)
    assert engine.stats()["overlapped_iterations"] == 0
    with pytest.raises(ValueError, match="overlap='yes'"):
        LLMEngine(llama, block_size=4, num_blocks=64, overlap="yes")
