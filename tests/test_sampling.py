# pipeloom.inference.sampling: filters against Hugging Face, penalties, seeded batch invariance, validation.
import random

import pytest
import torch
from pipeloom.inference import Sampler, SamplingParams, validate_request
from pipeloom.inference.sampling import apply_min_p, apply_top_k, apply_top_p
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def fresh_logits(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3
    logits[0, :4] = logits[0, 4]  # a tie, so "ties at the k-th logit" is exercised
    return logits


def hf_chain(logits_row, history, p: SamplingParams):
    """Hugging Face's processors, in generate's order, for one row."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    ids = torch.tensor([history or [0]], dtype=torch.long)
    return procs(ids, logits_row.unsqueeze(0).clone()).squeeze(0)


@pytest.mark.parametrize("name", ["top_k", "top_p", "min_p"])
def test_each_filter_equals_its_hf_warper_row_by_row(name):
    logits = fresh_logits(6, 50, seed=1)
    values = {"top_k": [1, 3, 7, 0, 50, 12], "top_p": [0.1, 0.5, 0.9, 1.0, 0.99, 0.3],
              "min_p": [0.0, 0.05, 0.2, 0.5, 1.0, 0.01]}[name]
    fn = {"top_k": apply_top_k, "top_p": apply_top_p, "min_p": apply_min_p}[name]
    dtype = torch.long if name == "top_k" else torch.float32
    ours = fn(logits, torch.tensor(values, dtype=dtype))
    warper = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "min_p": MinPLogitsWarper}[name]
    for i, v in enumerate(values):
        if (name == "top_k" and v == 0) or (name == "min_p" and v == 0.0):
            expected = logits[i]
        else:
            expected = warper(v)(torch.zeros(1, 1, dtype=torch.long), logits[i:i + 1].clone())[0]
        assert torch.equal(ours[i], expected), (name, v)
    assert (ours[0] > float("-inf")).sum() >= 1


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_whole_pipeline_equals_hf_processor_chain(dtype, atol):
    """Processed logprobs over the full (small) vocabulary equal log_softmax of HF's chain, row by row."""
    vocab = 20
    logits = fresh_logits(5, vocab, seed=2).to(dtype)
    params = [SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.3, logprobs=20),
              SamplingParams(temperature=1.3, top_p=0.6, logprobs=20),
              SamplingParams(temperature=0.5, repetition_penalty=0.8, min_p=0.3, logprobs=20),
              SamplingParams(temperature=1.0, top_k=3, logprobs=20),
              SamplingParams(temperature=2.0, repetition_penalty=1.7, logprobs=20)]
    prompts = [[1, 2, 3, 3], [5], [0, 19, 7], [4, 4], [8, 9, 10, 11]]
    outputs = [[2, 6], [], [7, 7, 7], [1], [12]]
    out = Sampler(logprobs_mode="processed")(logits, params, prompt_ids=prompts, output_ids=outputs)
    for i, p in enumerate(params):
        expected = hf_chain(logits[i], prompts[i] + outputs[i], p).log_softmax(-1)
        got = torch.full((vocab,), float("nan"), dtype=dtype).scatter(0, out.top_ids[i], out.top_logprobs[i])
        assert got.dtype == dtype and torch.allclose(got, expected, atol=atol, rtol=0, equal_nan=False), i
        assert torch.isfinite(expected[out.token_ids[i]])  # the drawn token survived the filters


def test_presence_and_frequency_follow_openais_formula():
    vocab = 16
    logits = fresh_logits(3, vocab, seed=3)
    params = [SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=16),
              SamplingParams(temperature=0, presence_penalty=-1.0, logprobs=16),
              SamplingParams(temperature=0, frequency_penalty=2.0, repetition_penalty=1.5, logprobs=16)]
    prompts = [[1, 1, 9], [2], [3, 4]]  # presence/frequency ignore the prompt; repetition sees it
    outputs = [[3, 3, 3, 5], [2, 2, 7], [4, 4, 6]]
    out = Sampler(logprobs_mode="processed")(logits, params, prompt_ids=prompts, output_ids=outputs)
    for i, p in enumerate(params):
        ref = logits[i].clone()
        for t in set(prompts[i] + outputs[i]):  # CTRL repetition penalty first, over prompt + output
            ref[t] = ref[t] * p.repetition_penalty if ref[t] < 0 else ref[t] / p.repetition_penalty
        for t in set(outputs[i]):  # OpenAI: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
            ref[t] -= outputs[i].count(t) * p.frequency_penalty + p.presence_penalty
        got = torch.empty(vocab).scatter(0, out.top_ids[i], out.top_logprobs[i])
        assert torch.allclose(got, ref.log_softmax(-1), atol=1e-6)
        assert out.token_ids[i] == ref.argmax()


def test_greedy_is_exactly_argmax_and_mixes_with_sampled_rows():
    logits = fresh_logits(64, 1000, seed=4).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0) if i % 3 else SamplingParams(temperature=0.8, top_p=0.9)
              for i in range(64)]
    out = Sampler()(logits, params)
    greedy = torch.tensor([i % 3 != 0 for i in range(64)])
    assert torch.equal(out.token_ids[greedy], logits.float().argmax(-1)[greedy])
    assert out.token_ids.dtype == torch.long and out.logprobs is None
    assert torch.equal(Sampler()(logits, [SamplingParams(temperature=0)] * 64).token_ids, logits.argmax(-1))


def test_min_tokens_masks_eos_and_stop_ids_until_reached_and_ignore_eos():
    logits = torch.zeros(4, 10)
    logits[:, 9] = 50.0  # EOS would always win
    logits[:, 8] = 40.0  # a stop token id next
    logits[:, 7] = 30.0
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(8,)),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(8,)),
              SamplingParams(temperature=0.5, min_tokens=2, ignore_eos=True, seed=0),
              SamplingParams(temperature=0, min_tokens=1)]
    outputs = [[1, 2], [1, 2, 3], [0], []]
    gens = [p.generator() for p in params]
    out = Sampler(eos_token_id=9)(logits, params, output_ids=outputs, generators=gens)
    assert out.token_ids.tolist() == [7, 9, 9, 8]  # below min: both masked -> 7; reached: EOS; ignore_eos: EOS


def test_logprobs_are_the_raw_distribution_by_default_with_ranks_and_top_n():
    logits = fresh_logits(3, 40, seed=5)
    params = [SamplingParams(temperature=0.5, repetition_penalty=2.0, logprobs=5, seed=1),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=1.0)]
    gens = [p.generator() for p in params]
    out = Sampler()(logits, params, prompt_ids=[[1, 2], [3], [4]], output_ids=[[], [], []], generators=gens)
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.equal(out.ranks, (raw > out.logprobs[:, None]).sum(-1) + 1)
    assert out.ranks[1] == 1 and out.top_ids.shape == (3, 5)
    top = raw.topk(5, -1)
    assert torch.allclose(out.top_logprobs, top.values) and torch.equal(out.top_ids, top.indices)


def decode_run(rows, target, steps, vocab=64):
    """Tokens of row ``target`` over ``steps`` iterations of a batch ``rows`` of (params, generator or None)."""
    sampler = Sampler(generator=torch.Generator().manual_seed(123))
    gens = [p.generator() for p, _ in rows]
    outputs = [[] for _ in rows]
    for step in range(steps):
        logits = torch.stack([fresh_logits(1, vocab, seed=1000 * step + key)[0] for _, key in rows])
        params = [p for p, _ in rows]
        tokens = sampler(logits, params, prompt_ids=[[1, 2, 3]] * len(rows), output_ids=outputs,
                         generators=gens).token_ids.tolist()
        for out, t in zip(outputs, tokens):
            out.append(t)
    return outputs[target]


def test_seeded_request_gives_the_same_tokens_alone_and_in_any_batch():
    mine = (SamplingParams(temperature=0.9, top_p=0.95, top_k=30, repetition_penalty=1.2, frequency_penalty=0.3,
                           seed=77), 7)  # (params, key of its logits stream)
    alone = decode_run([mine], 0, steps=25)
    rng = random.Random(0)
    others = [(SamplingParams(temperature=0), 1), (SamplingParams(temperature=1.5, min_p=0.1), 2),
              (SamplingParams(temperature=0.7, seed=5, presence_penalty=1.0), 3),
              (SamplingParams(temperature=1.0, top_k=5), 4), (SamplingParams(temperature=0.9, seed=78), 7)]
    for trial in range(4):
        batch = rng.sample(others, rng.randint(1, len(others))) + [mine]
        rng.shuffle(batch)
        assert decode_run(batch, batch.index(mine), steps=25) == alone, trial
    assert decode_run([(SamplingParams(**{**mine[0].__dict__, "seed": 78}), 7)], 0, steps=25) != alone


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi^2 >= observed) over the categories with positive expected counts (torch's regularized gamma)."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(keep.sum() - 1))
    return float(torch.special.gammaincc(dof / 2, stat / 2))


@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_filtered_softmax(seeded):
    vocab, draws = 10, 20000 if not seeded else 3000
    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.1]])
    p = SamplingParams(temperature=0.7, top_k=8, top_p=0.97, min_p=0.02)
    expected = hf_chain(logits[0], [], p).softmax(-1).double()
    assert (expected == 0).sum() >= 2  # the filters really removed tokens
    if seeded:
        params = [SamplingParams(**{**p.__dict__, "seed": s}) for s in range(draws)]
        gens = [q.generator() for q in params]
    else:
        params, gens = [p] * draws, None
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    tokens = sampler(logits.expand(draws, vocab), params, generators=gens).token_ids
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[expected == 0].sum() == 0
    assert chi_square_p_value(counts, expected) > 1e-3
    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)  # the test has power: a wrong law fails
    assert chi_square_p_value(counts, uniform.masked_fill(expected == 0, 0) / uniform[expected > 0].sum()) < 1e-6


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"), ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"seed": 1.5}, "seed"), ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"n": 2.0}, "n"), ({"temperature": "hot"}, "temperature"),
])
def test_every_bad_param_names_its_field_and_value(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    value = tuple(kwargs[field]) if isinstance(kwargs[field], list) else kwargs[field]
    assert str(err.value).startswith(f"{field}={value!r} ")


def test_stop_token_ids_outside_the_vocabulary_and_normalisation():
    with pytest.raises(ValueError, match=r"stop_token_ids=\(5, 300\): 300 is outside the vocabulary \[0, 256\)"):
        SamplingParams(stop_token_ids=[5, 300]).validate(vocab_size=256)
    p = SamplingParams(stop="END", stop_token_ids=[1], top_k=-1)
    assert p.stop == ("END",) and p.stop_token_ids == (1,) and p.validate(256) is p
    assert [c.seed for c in (SamplingParams(seed=10).child(j) for j in range(3))] == [10, 11, 12]
    assert SamplingParams(n=3).child(1).n == 1 and SamplingParams().generator() is None


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([], {}, r"prompt is empty \(0 tokens\)"),
    (list(range(9)), {}, r"^Input length \(9\) exceeds the model's maximum context length \(8\)\."),
    ([1, 2, 256], {}, r"prompt token id 256 at position 2 is outside the vocabulary \[0, 256\)"),
    ([1, -1], {}, r"prompt token id -1 at position 1"),
    ([1, 2.0], {}, r"prompt token 2.0 at position 1 is not an integer"),
    ("hello", {}, r"prompt_ids='hello' is text"),
    ([1], {"params": SamplingParams(n=5)}, r"n=5 is more sequences than the KV cache can hold at once \(4\)"),
    ([1], {"params": SamplingParams(stop_token_ids=[999])}, r"stop_token_ids=\(999,\): 999 is outside"),
])
def test_validate_request_rejects_bad_requests_naming_the_field(prompt, kwargs, message):
    params = kwargs.get("params", SamplingParams())
    with pytest.raises(ValueError, match=message):
        validate_request(prompt, params, vocab_size=256, max_model_len=8, max_seqs_for_n=4)


def test_validate_request_accepts_a_full_context_prompt_and_tensors():
    assert validate_request(torch.arange(8), SamplingParams(n=4), vocab_size=256, max_model_len=8,
                            max_seqs_for_n=4) == list(range(8))
