# The OpenAI-compatible HTTP API through the official `openai` client and raw httpx, against a real uvicorn server.
import json
import time

import httpx
import openai
import pytest
import torch

from pipeloom.inference import LLM
from pipeloom.serving import ChatTemplate, Server, ServerSettings

KEY = "sk-test-key"
MODEL = "gpt-tiny"


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM(model=MODEL, device="cpu", dtype="float32", num_blocks=256, block_size=16, token_budget=256)
    srv = Server(llm.engine, ServerSettings(port=0, api_key=KEY, max_body_bytes=64 << 10), model_name=MODEL)
    srv.start_in_thread()
    yield srv
    srv.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response (dicts, and the final "[DONE]")."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def test_streamed_completion_equals_the_whole_one_at_temperature_0(client):
    whole = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and whole.choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert whole.usage.prompt_tokens == len(b"def fib(n):") and whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_streamed_chat_equals_the_whole_one_and_the_role_comes_with_the_first_token(client, http):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 1 and chunks[-1].choices[0].finish_reason == "length"
    prompt = "system: be brief\nuser: hello there\nassistant:"  # the default template
    assert whole.usage.prompt_tokens == len(prompt.encode()) and whole.usage.completion_tokens == 20
    # raw wire format: role chunk, then content chunks, one finish_reason, usage chunk, [DONE]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": len(prompt.encode()),
                                                         "completion_tokens": 5, "total_tokens": 5 + len(prompt)}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["choices"][0]["finish_reason"] in (None, "length")
               for c in chunks)
    assert "role" not in chunks[1]["choices"][0]["delta"] and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n3_with_a_seed_gives_three_indexed_distinct_reproducible_choices(client):
    kw = dict(model=MODEL, prompt="import os\n", max_tokens=12, temperature=1.0, n=3, seed=1234)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3 and texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert first.usage.completion_tokens == 36
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(3)] == texts


def test_logprobs_have_one_entry_per_token_and_k_alternatives(client):
    out = client.completions.create(model=MODEL, prompt="ab", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    assert all(max(t.values()) == pytest.approx(v, abs=1e-5) for t, v in zip(lp.top_logprobs, lp.token_logprobs)
               if len(t) == 3)  # greedy: the sampled token is the most likely one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)


def test_stop_strings_cut_the_text_and_finish_with_stop(client):
    free = client.completions.create(model=MODEL, prompt="x = [", max_tokens=40, temperature=0).choices[0].text
    stop = free[10:12]
    cut = free[: free.index(stop)]
    out = client.completions.create(model=MODEL, prompt="x = [", max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt="x = [", max_tokens=40, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"


def test_echo_and_batched_prompts(client):
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=3, temperature=0, echo=True, n=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by = {c.index: c.text for c in out.choices}
    assert by[0].startswith("ab") and by[2].startswith("cd") and by[0] == by[1]  # greedy samples agree
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 12
    ids = client.completions.create(model=MODEL, prompt=[97, 98], max_tokens=3, temperature=0)
    assert ids.choices[0].text == by[0][2:]  # token ids and text prompts are the same request


def test_errors_raise_the_clients_exceptions(server, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=5.0)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match=r"Input length \(300\) exceeds the model's maximum context "
                                                     r"length \(256\)"):
        client.completions.create(model=MODEL, prompt="y" * 300, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"min_tokens": 5})
    with pytest.raises(openai.NotFoundError, match="The model `gpt-huge` does not exist."):
        client.completions.create(model="gpt-huge", prompt="x", max_tokens=4)
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_raw_errors_are_400_in_the_error_shape_before_anything_runs(server, http):
    cases = [
        ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),  # strict types: no coercion
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": [], "max_tokens": 2}, "prompt"),
        ({"prompt": "x", "suffix": "!"}, None),  # cannot be honoured: refused by name
        ({"prompt": [1, 99999], "max_tokens": 2}, "prompt"),  # outside the vocabulary (the engine's check)
        ({"prompt": "x", "stream_options": {"include_usage": True}}, None),
    ]
    for body, param in cases:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400, err
        assert param is None or err["param"] == param, (body, err)
    r = http.post("/v1/completions", content=b'{"prompt": "x", ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "x" * (70 << 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert http.post("/v1/nothing", json={}).status_code == 404
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}).status_code == 401
    assert server.generation.admission.seqs == 0 and not server.engine.has_unfinished()


def test_models_tokenize_detokenize_health_version_metrics(server, http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 256
    tok = http.post("/tokenize", json={"prompt": "héllo"}).json()
    assert tok == {"count": 6, "max_model_len": 256, "tokens": list("héllo".encode())}
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "héllo"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert bytes(chat["tokens"]).decode() == "user: hi\nassistant:"
    assert http.post("/detokenize", json={"tokens": [300]}).status_code == 400
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed for probes
    assert httpx.get(f"{server.url}/version").json()["version"]
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "request_success_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_requests_rejected_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket"):
        assert f"pipeloom:{name}" in text, name
    success = [line for line in text.splitlines() if line.startswith("pipeloom:request_success_total")]
    assert any('finished_reason="length"' in line and float(line.split()[-1]) >= 1 for line in success)
    stats = http.get("/engine/stats").json()
    assert stats["policy"] == "chunked-prefill" and stats["num_blocks"] == 256 and stats["cost_model"] is not None


def test_chat_template_from_the_tokenizer_config_or_the_default(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    chat = ChatTemplate.for_model(str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    assert chat.render(messages) == "<s><|user|>hi</s><|assistant|>"
    assert chat.render(messages, add_generation_prompt=False) == "<s><|user|>hi</s>"
    assert ChatTemplate.for_model("gpt-tiny").render(messages) == "user: hi\nassistant:"
    strict = ChatTemplate("{{ raise_exception('no system messages') }}")
    with pytest.raises(Exception, match="no system messages"):
        strict.render(messages)


def test_a_client_leaving_a_whole_request_aborts_it(server, http):
    before = server.engine.stats()["decode_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"prompt": "z", "max_tokens": 240, "ignore_eos": True},
                  timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 10
    while server.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.engine.has_unfinished() and server.engine.block_manager.usage() == 0
    assert server.engine.stats()["decode_tokens"] - before < 200  # aborted, not run to its 240 tokens
    assert server.generation.admission.seqs == 0
