# Under load: 200 clients leaving mid-stream free everything, overload 429s while admitted requests finish, fuzzing.
import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipeloom.data import ByteTokenizer
from pipeloom.inference import LLMEngine
from pipeloom.models import Transformer, get_model_config
from pipeloom.serving import Server, ServerSettings
from pipeloom.serving.grpc_protos import load

MODEL = "tiny64"


def tiny_engine(num_blocks: int) -> LLMEngine:
    """gpt-tiny with a 64-token context: every request is short, so fuzzing and floods stay fast."""
    torch.manual_seed(0)
    model = Transformer(get_model_config("gpt-tiny", max_seq_len=64)).eval()
    return LLMEngine(model, tokenizer=ByteTokenizer(), num_blocks=num_blocks, block_size=8, token_budget=256)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server():
    srv = Server(tiny_engine(2048), ServerSettings(port=0, grpc_port=0, max_body_bytes=32 << 10, max_jobs=64),
                 model_name=MODEL)
    yield srv.start_in_thread()
    srv.stop()


@pytest.fixture(scope="module")
def small():
    """At most 4 sequences and 40 queued prompt tokens: easy to overload."""
    srv = Server(tiny_engine(256), ServerSettings(port=0, grpc_port=0, max_requests=4, max_queued_tokens=40),
                 model_name=MODEL)
    yield srv.start_in_thread()
    srv.stop()


def gauges(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            if line.startswith(f"pipeloom:{name}{{"):
                values[name] = float(line.split()[-1])
    return values


def wait_for_nothing_held(srv: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gauges(srv.url) == {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0}:
            assert srv.generation.admission.seqs == 0 and srv.generation.admission.queued_tokens == 0
            return
        time.sleep(0.05)
    raise AssertionError(f"still held after {timeout} s: {gauges(srv.url)}")


def test_200_clients_leaving_mid_stream_leave_nothing_behind(server):
    before = server.engine.stats()["decode_tokens"]

    async def sse_client(client: httpx.AsyncClient, i: int) -> bool:
        path, body = ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {i}"}]}) if i % 10 == 9 \
            else ("/v1/completions", {"prompt": f"client {i}:", "max_tokens": 60})
        async with client.stream("POST", path, json={**body, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True  # one chunk read, then the client goes away (the response is closed unread)
        return False

    async def impatient_client(client: httpx.AsyncClient, i: int) -> None:
        with pytest.raises(httpx.ReadTimeout):  # a whole (not streamed) request abandoned by its client
            await client.post("/v1/completions", json={"prompt": f"slow {i}", "max_tokens": 60, "ignore_eos": True},
                              timeout=httpx.Timeout(60, read=0.3))

    async def main() -> list:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            jobs = [sse_client(client, i) for i in range(190)] + [impatient_client(client, i) for i in range(10)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    results = asyncio.run(main())
    assert sum(r is True for r in results) == 190
    wait_for_nothing_held(server, timeout=20)
    decoded = server.engine.stats()["decode_tokens"] - before
    assert decoded < 200 * 59 / 4, f"{decoded} tokens decoded: the abandoned requests kept generating"
    start = time.monotonic()  # and the server is promptly useful again
    out = httpx.post(f"{server.url}/v1/completions", json={"prompt": "after", "max_tokens": 8}, timeout=30).json()
    assert out["choices"][0]["finish_reason"] == "length" and time.monotonic() - start < 10


def test_overload_gives_429_at_once_and_every_admitted_request_completes(small):
    async def one(client: httpx.AsyncClient, i: int):
        r = await client.post("/v1/completions", json={"prompt": f"r{i}", "max_tokens": 20, "ignore_eos": True})
        return r.status_code, r.json(), r.headers

    async def main():
        async with httpx.AsyncClient(base_url=small.url, timeout=60) as client:
            return await asyncio.gather(*[one(client, i) for i in range(30)])

    results = asyncio.run(main())
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4, codes
    for code, body, headers in results:
        if code == 200:
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 20
        else:
            assert body["error"]["code"] == 429 and "overloaded" in body["error"]["message"]
            assert headers["retry-after"] == "1"
    wait_for_nothing_held(small, timeout=10)
    rejected = [line for line in httpx.get(f"{small.url}/metrics").text.splitlines()
                if line.startswith("pipeloom:num_requests_rejected_total{")]
    assert float(rejected[0].split()[-1]) == codes.count(429)


def test_a_full_server_refuses_on_every_protocol(small):
    client = openai.OpenAI(base_url=f"{small.url}/v1", api_key="none", max_retries=0)
    holders = [client.completions.create(model=MODEL, prompt=f"hold {i}", max_tokens=60, stream=True,
                                         extra_body={"ignore_eos": True}) for i in range(4)]
    try:
        for h in holders:
            next(iter(h))  # all four are running
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="one more", max_tokens=2)
        with connect(small.url.replace("http", "ws") + "/v1/ws") as ws:
            ws.send(json.dumps({"type": "request", "prompt": "x", "max_tokens": 2}))
            assert json.loads(ws.recv())["error"]["code"] == 429
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv()
            assert closed.value.rcvd.code == 1013
        pb2, pb2_grpc = load()
        with grpc.insecure_channel(small.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb2_grpc.GenerationStub(channel).Generate(pb2.GenerateRequest(text="x"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert httpx.post(f"{small.url}/v1/jobs", json={"prompt": "x"}).status_code == 429
    finally:
        for h in holders:
            h.close()
    wait_for_nothing_held(small, timeout=10)
    too_long = httpx.post(f"{small.url}/v1/completions", json={"prompt": "p" * 41, "max_tokens": 2})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"  # could never fit: 400


# ------------------------------------------------------------------------------------------------ fuzzing

FIELDS = ["prompt", "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "stop", "seed", "logprobs", "top_logprobs", "echo", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
          "stop_token_ids", "tokens", "return_token_ids", "add_generation_prompt", "suffix", "best_of", "type"]
EDGE = st.sampled_from([None, True, False, 0, 1, 2, 3, -1, 20, 21, 2**31, 2**63, -(2**63), 10**30, 0.5, -0.5, 1.5,
                        2.5, 1e308, -1e308, "", "x", "gpt-tiny", MODEL, "stop", [], {}, [0], [300], [-1], [1, 2],
                        ["a", ""], [[1, 2]], [{"role": "user", "content": "hi"}],
                        [{"role": "bad", "content": 1}], [{"role": "user", "content": [{"type": "image"}]}],
                        {"include_usage": True}, {"include_usage": "yes"}])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), EDGE, max_size=8),
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5),
    JSON.map(json.dumps),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: '{"prompt": "' + t),
    st.integers(33 << 10, 80 << 10).map(lambda n: json.dumps({"prompt": "z" * n})),  # beyond max_body_bytes
)
ROUTES = st.sampled_from([("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                          ("POST", "/detokenize"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job}"),
                          ("POST", "/v1/jobs/{job}/cancel"), ("GET", "/v1/models"), ("GET", "/v1/models/{job}"),
                          ("GET", "/health"), ("GET", "/version"), ("GET", "/metrics"), ("GET", "/engine/stats"),
                          ("PUT", "/v1/completions"), ("GET", "/v1/completions")])
QUERY = st.dictionaries(st.sampled_from(["after", "wait", "since"]),
                        st.sampled_from(["0", "1", "-1", "0.5", "x", "1e9", "99999999999999999999", ""]), max_size=2)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Content-Type": "application/json"}) as client:
        yield client


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=ROUTES, body=BODIES, query=QUERY, job=st.sampled_from(["job-x", "", "%00", "a" * 300]))
def test_fuzzed_requests_never_get_a_5xx(http, route, body, query, job):
    method, path = route
    path = path.replace("{job}", job)
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = http.request(method, path, content=content, params=query)
    assert r.status_code < 500, (method, path, str(content)[:200], r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(st.one_of(BODIES.filter(lambda b: not isinstance(b, bytes)),
                                   st.dictionaries(st.sampled_from(FIELDS), EDGE, max_size=6).map(
                                       lambda d: json.dumps({**d, "type": "request"}))), min_size=1, max_size=3))
def test_fuzzed_websocket_messages_never_close_with_1011(server, messages):
    with connect(server.url.replace("http", "ws") + "/v1/ws", max_size=None) as ws:
        for message in messages:
            ws.send(message if isinstance(message, str) else json.dumps(message))
            while True:
                try:
                    event = json.loads(ws.recv(timeout=30))
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code in (1009,), closed.rcvd
                    return
                assert event["type"] in ("created", "delta", "done", "error")
                if event["type"] == "error":
                    assert event["error"]["code"] < 500
                if event["type"] in ("done", "error"):
                    break


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(values=st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(-5, 1 << 40), "temperature": st.floats(allow_nan=True),
    "top_p": st.floats(allow_nan=True), "top_k": st.integers(-(2**40), 2**40), "n": st.integers(-3, 300),
    "seed": st.integers(-(2**63), 2**63 - 1), "logprobs": st.integers(-3, 40), "min_tokens": st.integers(-3, 10**9),
    "stop_token_ids": st.lists(st.integers(-(2**40), 2**40), max_size=3), "stop": st.lists(st.text(max_size=3),
                                                                                          max_size=3)}),
       prompt=st.one_of(st.text(max_size=80), st.lists(st.integers(-(2**40), 2**40), max_size=80)))
def test_fuzzed_grpc_requests_get_only_client_error_codes(server, values, prompt):
    pb2, pb2_grpc = load()
    if isinstance(prompt, str):
        request = pb2.GenerateRequest(text=prompt, sampling=pb2.SamplingOptions(**values))
    else:
        request = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=prompt), sampling=pb2.SamplingOptions(**values))
    with grpc.insecure_channel(server.grpc_target) as channel:
        try:
            pb2_grpc.GenerationStub(channel).Generate(request, timeout=60)
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), err


def test_the_server_still_answers_after_the_fuzzing(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    out = httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 4}, timeout=30).json()
    assert out["usage"]["completion_tokens"] == 4
    wait_for_nothing_held(server, timeout=20)
