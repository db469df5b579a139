# Speculative decoding inside the engine: greedy == plain greedy under continuous batching with preemption,
# sampling keeps the target distribution (chi-square over seeded requests), draft slots released, blocks freed.
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from pipeloom.inference import LLM, LLMEngine, SamplingParams, SpeculativeEngine, spec_decode
from pipeloom.models import Transformer, get_model_config

# the statistics of test_spec_decode.py (pytest's importlib mode cannot import a sibling test module by name)
_spec_tests = importlib.util.spec_from_file_location("spec_decode_tests",
                                                     Path(__file__).with_name("test_spec_decode.py"))
STATS = importlib.util.module_from_spec(_spec_tests)
_spec_tests.loader.exec_module(STATS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return Transformer(get_model_config("llama-tiny", n_layers=2, max_seq_len=128)).double().eval()


def _prompts():
    g = torch.Generator().manual_seed(4)
    loop = [5, 9, 14, 3, 7, 5, 9, 14, 3, 7, 5, 9]  # repeats: prompt lookup finds its n-grams
    rand = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 26, 9, 33)]
    return [loop, rand[0], loop * 2 + [1], rand[1], rand[2], loop[:7], rand[3], rand[4]]


def _run(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params[i] if isinstance(params, list) else params)
    done = {}
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculative_equals_plain_greedy_with_preemption(llama, k):
    """Eight prompts of mixed lengths (some repetitive), a pool of 14 blocks of 4 tokens: requests are preempted
    and recomputed; every token equals the plain engine's, drafts are accepted, every block is free at the end."""
    prompts, params = _prompts(), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    options = dict(policy="chunked-prefill", token_budget=32, block_size=4, num_blocks=14)
    plain = _run(LLMEngine(llama, **options), prompts, params)
    engine = SpeculativeEngine(llama, num_speculative_tokens=k, **options)
    spec = _run(engine, prompts, params)
    print(f"k={k}: {engine.spec_stats}; preemptions {engine.num_preemptions}")
    for a, b in zip(spec, plain):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "length"
    assert engine.num_preemptions > 0, "the tiny pool should force preemptions"
    assert engine.spec_stats.accepted > 0 and engine.spec_stats.tokens_per_step > 1.0
    assert engine.block_manager.num_free_blocks() == engine.block_manager.num_blocks
    engine.block_manager.check()
    assert len(engine.records) < sum(len(p.token_ids) for p in plain)  # fewer iterations than tokens


def test_rejected_drafts_release_their_blocks(llama):
    """After every step the block table holds exactly the blocks of the computed tokens (plus, for a decode,
    none beyond the next token's), with prefix caching on: no draft slot outlives its step."""
    engine = SpeculativeEngine(llama, num_speculative_tokens=4, block_size=2, num_blocks=64, token_budget=64)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(_prompts()[:4]):
        engine.add_request(f"r{i}", p, params)
    bm = engine.block_manager
    while engine.has_unfinished():
        engine.step()
        bm.check()
        for seq in engine.scheduler.running:
            assert len(bm.block_table(seq.id)) == -(-seq.num_computed // bm.block_size), seq
    assert engine.spec_stats.proposed > engine.spec_stats.accepted > 0  # some drafts were rejected
    assert bm.num_free_blocks() == bm.num_blocks


def test_stop_tokens_and_max_tokens_inside_accepted_drafts(llama):
    """A stop token among accepted drafts ends the request there, as plain decoding does; so does max_tokens."""
    prompts = _prompts()
    plain = _run(LLMEngine(llama, block_size=4, num_blocks=256), prompts,
                 SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop = plain[2].token_ids[9]  # a token the repetitive prompt's continuation emits
    params = SamplingParams(temperature=0, max_tokens=13, stop_token_ids=(stop,), ignore_eos=True)
    expect = _run(LLMEngine(llama, block_size=4, num_blocks=256), prompts, params)
    got = _run(SpeculativeEngine(llama, block_size=4, num_blocks=256), prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expect]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expect]
    assert "stop" in [o.finish_reason for o in got] and "length" in [o.finish_reason for o in got]


def test_sampled_speculative_engine_keeps_the_target_distribution(monkeypatch):
    """3 tokens over a 4-token vocabulary (top-k 3), 1200 seeded requests batched through the engine with prompt
    lookup (k=3): indistinguishable from the target's own sampling (measured p = 0.46, acceptance 0.16); with the
    wrong residual (resample from p) 600 requests are not (p = 4.5e-9)."""
    V, length = 4, 3
    model = STATS._model(0, V, sharpen=8)
    prompt = [0, 1, 2, 1, 0]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=length, ignore_eos=True)
    expected = STATS._exact_sequence_probs(model, prompt, params, length, V)

    def counts(draws):
        engine = SpeculativeEngine(model, num_speculative_tokens=3, block_size=4, num_blocks=4096,
                                   max_num_seqs=256, token_budget=2048)
        outs = _run(engine, [prompt] * draws, [dataclasses.replace(params, seed=i) for i in range(draws)])
        c = torch.zeros(V**length, dtype=torch.long)
        for o in outs:
            c[sum(t * V ** (length - 1 - j) for j, t in enumerate(o.token_ids))] += 1
        return c, engine.spec_stats

    c, stats = counts(1200)
    right = STATS.chi_square_p(c, expected)
    print(f"\nengine, right rule: p = {right:.3g}; {stats}")
    assert right > 1e-3 and stats.accepted > 50 and stats.accepted < stats.proposed  # accepts and rejects
    attr, wrong = STATS.WRONG_RULES["resample from p"]
    with monkeypatch.context() as m:
        m.setattr(spec_decode, attr, wrong)
        bad = STATS.chi_square_p(counts(600)[0], expected)
    print(f"resample from p: p = {bad:.3g}")
    assert bad < 1e-6


def _noisy_copy(model, scale=0.5, seed=1):
    """A draft model: the target with noise on every weight (agrees with it often, not always)."""
    import copy

    draft = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(scale * w.std() * torch.randn_like(w))
    return draft


def test_draft_model_greedy_equals_plain_and_sampling_keeps_the_distribution(llama):
    """A draft model (RecomputeDraftProposer over a noisy copy of the target) inside the engine: greedy tokens equal
    the plain engine's with preemption; sampled tokens (1200 seeded requests, V=4) follow the target's exact
    distribution, the acceptance rule using the draft's q (measured: greedy acceptance 0.42; sampled p = 0.29,
    acceptance 0.75)."""
    from pipeloom.inference.spec_proposers import RecomputeDraftProposer

    prompts, params = _prompts(), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    options = dict(policy="chunked-prefill", token_budget=32, block_size=4, num_blocks=14)
    plain = _run(LLMEngine(llama, **options), prompts, params)
    draft = RecomputeDraftProposer(_noisy_copy(llama, 0.2))
    engine = SpeculativeEngine(llama, num_speculative_tokens=3, proposer=draft, **options)
    assert [o.token_ids for o in _run(engine, prompts, params)] == [o.token_ids for o in plain]
    print(f"greedy draft model: {engine.spec_stats}")
    assert engine.spec_stats.accepted > 0 and engine.num_preemptions > 0

    V, length = 4, 3
    model = STATS._model(0, V, sharpen=8)
    prompt = [0, 1, 2, 1, 0]
    sampled = SamplingParams(temperature=1.0, top_k=3, max_tokens=length, ignore_eos=True)
    expected = STATS._exact_sequence_probs(model, prompt, sampled, length, V)
    engine = SpeculativeEngine(model, num_speculative_tokens=3, proposer=RecomputeDraftProposer(_noisy_copy(model)),
                               block_size=4, num_blocks=4096, max_num_seqs=256, token_budget=2048)
    outs = _run(engine, [prompt] * 1200, [dataclasses.replace(sampled, seed=i) for i in range(1200)])
    counts = torch.zeros(V**length, dtype=torch.long)
    for o in outs:
        counts[sum(t * V ** (length - 1 - j) for j, t in enumerate(o.token_ids))] += 1
    p = STATS.chi_square_p(counts, expected)
    print(f"sampled draft model: p = {p:.3g}; {engine.spec_stats}")
    assert p > 1e-3 and 0 < engine.spec_stats.accepted < engine.spec_stats.proposed


def test_llm_and_generate_config_select_speculation():
    llm = LLM(model="llama-tiny", device="cpu", dtype="float64", num_blocks=64, speculative="ngram",
              num_speculative_tokens=3)
    assert isinstance(llm.engine, SpeculativeEngine) and llm.engine.k == 3
    plain = LLM(model="llama-tiny", device="cpu", dtype="float64", num_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    assert (llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
            == plain.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
    drafted = LLM(model="llama-tiny", device="cpu", dtype="float64", num_blocks=64, speculative="draft",
                  draft_model="llama-tiny", num_speculative_tokens=3, seed=0)  # a draft with the target's weights
    out = drafted.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == plain.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    stats = drafted.engine.spec_stats
    assert stats.accepted == stats.proposed > 0  # the same weights: every draft is the target's own greedy token
    with pytest.raises(ValueError, match="inference.speculative='eagle'"):
        LLM(model="llama-tiny", device="cpu", num_blocks=16, speculative="eagle")
    with pytest.raises(ValueError, match="needs inference.draft_model"):
        LLM(model="llama-tiny", device="cpu", num_blocks=16, speculative="draft")
    with pytest.raises(ValueError, match="needs speculative='draft'"):
        LLM(model="llama-tiny", device="cpu", num_blocks=16, speculative="ngram", draft_model="llama-tiny")
    other = Transformer(get_model_config("llama-tiny", n_layers=1, vocab_size=300))
    with pytest.raises(ValueError, match="vocabulary of 300 tokens, the model 256"):
        LLM(model="llama-tiny", device="cpu", num_blocks=16, speculative="draft", draft_model=other)
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        LLM(model="llama-tiny", device="cpu", num_blocks=16, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="inference.verify_attention='flash'"):
        LLM(model="llama-tiny", device="cpu", num_blocks=16, speculative="ngram", verify_attention="flash")
    split = LLM(model="llama-tiny", device="cpu", num_blocks=16, speculative="ngram", verify_attention="split")
    assert split.engine.runner.verify_attention == "split"


def test_host_block_tables_follow_a_truncated_and_regrown_table():
    """Rejected drafts' blocks are released (BlockManager.truncate) and the table regrows at the next allocation,
    possibly with other blocks (another sequence took the released ones meanwhile): the runner's host copy of
    the table must follow. Shrinking the list in place and regrowing it to the same length left the host row
    with the released blocks' ids, and the verification attended to another sequence's keys (seen as
    speculative greedy tokens that were not the model's argmax)."""
    from types import SimpleNamespace

    from pipeloom.inference.block_manager import BlockManager
    from pipeloom.inference.host_inputs import BlockTables

    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = SimpleNamespace(id="a", num_computed=0), SimpleNamespace(id="b", num_computed=0)
    host = BlockTables(max_blocks=8)
    assert bm.allocate(a, 8)  # a: two blocks
    host.rows(["a"], bm)
    a.num_computed = 5
    bm.truncate(a, 5)  # keep the blocks of 5 tokens: two -> two; then drop to one
    a.num_computed = 4
    bm.truncate(a, 4)
    assert bm.allocate(b, 4)  # b takes the block a released
    assert bm.allocate(a, 4)  # a regrows to two blocks, with another block
    row = host.rows(["a"], bm)[0]
    assert host.array[row, : len(bm.tables["a"])].tolist() == list(bm.tables["a"])


@pytest.mark.parametrize("graphs", [False, "emulate"])
def test_cached_draft_proposes_what_the_recomputing_draft_proposes(llama, graphs):
    """CachedDraftProposer (the draft's own paged KV cache, fed only what it has not seen) inside the engine with
    preemption: greedy tokens equal plain greedy's, and the same acceptance counts as the recomputing reference over
    the same draft (so the same drafts, step for step); seeded sampled requests give the reference's tokens too.
    Rejected drafts leave the cache (commit), finished requests free their blocks (release); a cache of one block
    starves the requests of drafts but never of correctness. ``graphs="emulate"``: the draft's one-token forwards
    replay its decode graphs and its two-token ones its verification graphs (uncaptured on CPU), padded to the sizes
    (1, 2, 4, ...)."""
    from pipeloom.inference.spec_draft import CachedDraftProposer
    from pipeloom.inference.spec_proposers import RecomputeDraftProposer

    prompts, params = _prompts(), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    options = dict(policy="chunked-prefill", token_budget=32, block_size=4, num_blocks=14)
    plain = _run(LLMEngine(llama, **options), prompts, params)
    draft = _noisy_copy(llama, 0.2)
    runs = {}
    for name, proposer in (("recompute", RecomputeDraftProposer(draft)),
                           ("cached", CachedDraftProposer(draft, cuda_graphs=graphs))):
        engine = SpeculativeEngine(llama, num_speculative_tokens=3, proposer=proposer, **options)
        runs[name] = (_run(engine, prompts, params), engine.spec_stats, engine.num_preemptions)
    cached = runs["cached"][0]
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert (runs["cached"][1].proposed, runs["cached"][1].accepted) == (runs["recompute"][1].proposed,
                                                                        runs["recompute"][1].accepted)
    assert runs["cached"][1].accepted > 0 and runs["cached"][2] > 0  # drafts accepted, requests preempted
    proposer = engine.proposer
    assert not proposer.fed and not proposer.blocks and len(proposer.free) == proposer.runner.num_blocks
    assert not proposer.runner.tables._row  # the host block-table rows are released too
    assert bool(proposer.runner.graphs) == bool(graphs), sorted(proposer.runner.graphs)
    if graphs:  # a step's first forward after all drafts were accepted feeds two tokens: the two-row graphs
        assert proposer.runner.verify_graphs.graphs, "no two-token feed replayed a verification graph"

    sampled = [dataclasses.replace(params, temperature=1.0, top_k=20, seed=i) for i in range(len(prompts))]
    outs = {}
    for name, make in (("recompute", RecomputeDraftProposer),
                       ("cached", lambda model: CachedDraftProposer(model, cuda_graphs=graphs))):
        engine = SpeculativeEngine(llama, num_speculative_tokens=3, proposer=make(draft), **options)
        outs[name] = [o.token_ids for o in _run(engine, prompts, sampled)]
    assert outs["cached"] == outs["recompute"]

    starved = CachedDraftProposer(draft, num_blocks=1, block_size=4, cuda_graphs=graphs)
    engine = SpeculativeEngine(llama, num_speculative_tokens=3, proposer=starved, **options)
    assert [o.token_ids for o in _run(engine, prompts, params)] == [o.token_ids for o in plain]
    assert starved.starved > 0


def test_cached_draft_drops_what_the_context_no_longer_holds(llama):
    """Called without commit (as speculative_generate's one-request propose is), the cache still matches: after
    a context whose tail changed, the positions past the first difference are dropped and fed again, and the
    proposal equals the recomputing reference's."""
    from pipeloom.inference.spec_draft import CachedDraftProposer
    from pipeloom.inference.spec_proposers import RecomputeDraftProposer

    draft = _noisy_copy(llama, 0.2)
    cached, reference = CachedDraftProposer(draft, block_size=4), RecomputeDraftProposer(draft)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    context = [5, 9, 14, 3, 7, 5, 9, 14, 3]
    first = cached.propose(context, 4, params, prompt_len=5)
    assert first.token_ids == reference.propose(context, 4, params, prompt_len=5).token_ids
    assert cached.fed["0"] == context + first.token_ids[:-1]
    changed = context + [first.token_ids[0], (first.token_ids[1] + 1) % 256]  # the second draft "rejected"
    again = cached.propose(changed, 4, params, prompt_len=5)
    assert again.token_ids == reference.propose(changed, 4, params, prompt_len=5).token_ids
    assert again.probs is None  # plain greedy drafts are argmaxes, with no distribution to verify against
    assert cached.fed["0"] == changed + again.token_ids[:-1]
    chained = CachedDraftProposer(draft, block_size=4, cuda_graphs="emulate")  # drafts chained on the device
    assert chained.propose(changed, 4, params, prompt_len=5).token_ids == again.token_ids
    assert chained.fed["0"] == changed + again.token_ids[:-1]  # no placeholder left in the record
    penalised = dataclasses.replace(params, repetition_penalty=1.2)  # greedy over processed logits: q kept
    cached.release("0")
    got, want = cached.propose(changed, 4, penalised, prompt_len=5), reference.propose(changed, 4, penalised,
                                                                                       prompt_len=5)
    assert got.token_ids == want.token_ids and torch.allclose(got.probs, want.probs, atol=1e-9)


@pytest.mark.parametrize("attention", ["tiles", "split"])
def test_verification_graphs_give_the_eager_verifications_tokens(llama, attention):
    """Verification steps replayed from (emulated) graphs - every sequence padded to 1 + k query rows, the padding
    writing to the scratch block, the sizes (1, 2, 4) padded too - give plain greedy's tokens and accept exactly
    the drafts eager verification accepts, through preemptions (whose recomputing prefills run eagerly). Both
    attentions: the paged-attention work list ("tiles") and every row as a decode of its own ("split")."""
    prompts, params = _prompts(), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    options = dict(policy="chunked-prefill", token_budget=32, block_size=4, num_blocks=14, max_num_seqs=4)
    plain = _run(LLMEngine(llama, **options), prompts, params)
    eager = SpeculativeEngine(llama, num_speculative_tokens=3, **options)
    assert eager.runner.verify_graphs is None  # on CPU, cuda_graphs=True captures nothing
    graphed = SpeculativeEngine(llama, num_speculative_tokens=3, cuda_graphs="emulate", verify_attention=attention,
                                **options)
    assert graphed.runner.verify_attention == attention
    graphs = graphed.runner.verify_graphs
    replayed, replay = [], graphs.replay
    graphs.replay = lambda iteration, *a: replayed.append(len(iteration.slices)) or replay(iteration, *a)
    outputs = {"eager": _run(eager, prompts, params), "graphed": _run(graphed, prompts, params)}
    for name, outs in outputs.items():
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain], name
    assert (graphed.spec_stats.proposed, graphed.spec_stats.accepted) == (eager.spec_stats.proposed,
                                                                            eager.spec_stats.accepted)
    assert graphed.num_preemptions > 0 and graphed.spec_stats.accepted > 0
    assert len(replayed) > 10 and {1, 3} <= set(replayed), replayed  # batch 3 replays the graph of 4
    assert sorted(graphs.graphs) == [1, 2, 4] and graphs.tokens == 4
    assert graphed.block_manager.num_free_blocks() == graphed.block_manager.num_blocks


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_fast_acceptance_equals_rejection_sampling(llama, monkeypatch, penalty):
    """Plain greedy rows skip rejection_sample (one argmax read instead of per-row distributions): the same tokens
    and the same acceptance counts as the general path, which rows with a repetition penalty still take (their
    argmax is of the penalised logits) - both equal to the plain engine's greedy tokens."""
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=penalty)
    options = dict(policy="chunked-prefill", token_budget=64, block_size=4, num_blocks=128)
    plain = _run(LLMEngine(llama, **options), prompts, params)
    fast = SpeculativeEngine(llama, num_speculative_tokens=4, **options)
    taken = []
    accept_greedy = fast._accept_greedy
    fast._accept_greedy = lambda *a: taken.append(1) or accept_greedy(*a)
    got_fast = _run(fast, prompts, params)
    monkeypatch.setattr(SamplingParams, "plain_greedy", property(lambda self: False))
    general = SpeculativeEngine(llama, num_speculative_tokens=4, **options)
    got_general = _run(general, prompts, params)
    assert [o.token_ids for o in got_fast] == [o.token_ids for o in got_general] == [o.token_ids for o in plain]
    assert (fast.spec_stats.proposed, fast.spec_stats.accepted) == (general.spec_stats.proposed,
                                                                    general.spec_stats.accepted)
    assert fast.spec_stats.proposed > 0 and bool(taken) == (penalty == 1.0)
    assert fast.spec_stats.accepted > 0 or penalty > 1  # a penalty steers away from the repeats lookup proposes
