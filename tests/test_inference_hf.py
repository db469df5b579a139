# Greedy outputs of the engine equal Hugging Face transformers' generate, token for token (GPT-2 and Llama).
"""Random-weight Hugging Face models (float64), saved and imported through ``models/hf.py`` into ``LLM``.
Prompts of mixed lengths straddle the 4-token block boundaries; every batching policy runs them; prefix-cache
hits, preemption by a tiny block pool and ``n > 1`` are each checked to happen and to change nothing.
"""

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from pipeloom.inference import LLM, SamplingParams  # noqa: E402 - after importorskip
from pipeloom.schedules.batching import list_batching  # noqa: E402

VOCAB, NEW = 97, 10
LENGTHS = [1, 3, 4, 5, 8, 9, 14, 23]  # around multiples of the block size 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared: one intra-op thread keeps these small forwards fast and steady."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def _hf_model(family: str):
    torch.manual_seed(11 if family == "gpt" else 12)
    if family == "gpt":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        return _randomize(transformers.GPT2LMHeadModel(config))
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64, rope_theta=5000.0, bos_token_id=0,
                                      eos_token_id=0, attn_implementation="sdpa")
    return _randomize(transformers.LlamaForCausalLM(config))


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module", params=["gpt", "llama"])
def case(request, tmp_path_factory):
    """(HF folder, prompts, HF greedy continuations) per family."""
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(folder)
    prompts = _prompts()
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=0,
                              pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            expected.append(out[0, len(p):].tolist())
    assert any(e != expected[0] for e in expected[1:])  # a degenerate model would prove nothing
    return folder, prompts, expected


def _greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW, **extra)


def _tokens(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]


@pytest.mark.parametrize("policy", list_batching())
def test_greedy_equals_transformers_under_every_policy(case, policy):
    folder, prompts, expected = case
    llm = LLM(model=str(folder), dtype="float64", device="cpu", policy=policy, token_budget=16, block_size=4,
              num_blocks=128)
    results = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert _tokens(results) == expected
    for r in results:
        assert r.outputs[0].finish_reason in ("stop", "length")
    llm.engine.block_manager.check()


def test_prefix_cache_hits_change_nothing(case):
    folder, prompts, expected = case
    llm = LLM(model=str(folder), dtype="float64", device="cpu", token_budget=16, block_size=4, num_blocks=128)
    first = llm.generate(prompts, _greedy(), use_tqdm=False)
    hits_before = llm.engine.block_manager.hits
    again = llm.generate(prompts[::-1], _greedy(), use_tqdm=False)  # the same prompts: their blocks are cached
    assert llm.engine.block_manager.hits > hits_before
    assert _tokens(first) == expected and _tokens(again) == expected[::-1]
    # one shared prefix inside a batch
    shared = prompts[-1][:12]
    batch = [shared + p for p in prompts[:3]]
    assert [o.outputs[0].token_ids for o in llm.generate(batch, _greedy(), use_tqdm=False)] == [
        o.outputs[0].token_ids for o in LLM(model=str(folder), dtype="float64", device="cpu", block_size=4,
                                            num_blocks=128, enable_prefix_caching=False).generate(
            batch, _greedy(), use_tqdm=False)]


@pytest.mark.parametrize("policy", ["continuous", "chunked-prefill"])
def test_preemption_by_a_tiny_block_pool_changes_nothing(case, policy):
    folder, prompts, expected = case
    llm = LLM(model=str(folder), dtype="float64", device="cpu", policy=policy, token_budget=16, block_size=4,
              num_blocks=9)  # 36 slots: the longest request (23 + 10) barely fits alone
    results = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert llm.engine.stats()["preemptions"] > 0
    assert _tokens(results) == expected
    bm = llm.engine.block_manager
    bm.check()
    assert bm.num_free_blocks() == bm.num_total_blocks()


def test_n_samples_share_the_prompt_blocks(case):
    folder, prompts, expected = case
    llm = LLM(model=str(folder), dtype="float64", device="cpu", token_budget=64, block_size=4, num_blocks=128)
    results = llm.generate(prompts[-2:], _greedy(n=3), use_tqdm=False)
    for r, e in zip(results, expected[-2:]):
        assert [o.index for o in r.outputs] == [0, 1, 2]
        assert all(o.token_ids == e for o in r.outputs)
    # samples 1 and 2 found the full prompt blocks of sample 0 in the cache: 2 * (full blocks) per prompt
    full = sum(2 * ((len(p) - 1) // 4) * 4 for p in prompts[-2:])
    assert llm.engine.block_manager.hits >= full


def test_hf_folder_with_its_tokenizer_takes_text(tmp_path):
    pytest.importorskip("tokenizers")
    from pipeloom.data import train_bpe

    corpus = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "héllo wörld ünïcode\n"] * 20
    train_bpe(corpus, 300, str(tmp_path / "tokenizer.json"))
    torch.manual_seed(3)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=300, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=299)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float64", device="cpu", block_size=4, num_blocks=64)
    assert llm.tokenizer is not None and llm.engine.eos_token_id == 299
    text = "def f(a):\n    return"
    by_text, by_ids = llm.generate([text, llm.tokenizer.encode(text)], _greedy(ignore_eos=True), use_tqdm=False)
    assert by_text.prompt == text and by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == llm.tokenizer.decode(by_text.outputs[0].token_ids)
