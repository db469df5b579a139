# WebSocket, polling / long polling jobs and gRPC against one real server: the same tokens as HTTP, cancel, errors.
import json
import threading
import time

import grpc
import httpx
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipeloom.inference import LLM
from pipeloom.serving import Server, ServerSettings
from pipeloom.serving.grpc_protos import load

KEY = "sk-proto"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "gpt-tiny"
SEEDED = {"prompt": "for i in range(", "max_tokens": 16, "temperature": 1.0, "top_k": 40, "seed": 7, "n": 2}
GREEDY = {"prompt": "class A:", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM(model=MODEL, device="cpu", dtype="float32", num_blocks=256, block_size=16, token_budget=256)
    settings = ServerSettings(port=0, grpc_port=0, api_key=KEY, job_ttl=1.5, job_max_wait=5.0)
    srv = Server(llm.engine, settings, model_name=MODEL).start_in_thread()
    yield srv
    srv.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    pb2, pb2_grpc = load()
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb2, pb2_grpc.GenerationStub(channel)


def http_tokens(http, body) -> dict[int, list[int]]:
    out = http.post("/v1/completions", json={**body, "return_token_ids": True}).json()
    return {c["index"]: c["token_ids"] for c in out["choices"]}


def wait_idle(server, timeout=10.0) -> None:
    """No request left in the engine and every KV block free (bounded wait)."""
    engine, deadline = server.engine, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.has_unfinished() and engine.block_manager.usage() == 0.0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {len(engine.scheduler.running)} running, "
                         f"{len(engine.scheduler.waiting)} waiting, kv usage {engine.block_manager.usage()}")


def decoded(server) -> int:
    """Decode tokens the engine has run so far (tests here run one request at a time)."""
    return server.engine.stats()["decode_tokens"]


def assert_aborted_early(server, before: int, limit: int = 200) -> None:
    """The request ended by abort: idle again well before it could have generated its 240 tokens."""
    wait_idle(server)
    assert decoded(server) - before < limit, f"{decoded(server) - before} tokens decoded: it was not aborted"


def ws_run(url, body) -> tuple[dict[int, list[int]], dict]:
    with connect(url.replace("http", "ws") + "/v1/ws", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"type": "request", **body}))
        assert json.loads(ws.recv())["type"] == "created"
        tokens: dict[int, list[int]] = {}
        while True:
            event = json.loads(ws.recv())
            if event["type"] == "done":
                break
            assert event["type"] == "delta"
            tokens.setdefault(event["index"], []).extend(event["token_ids"])
    return tokens, event


def poll_job(http, body, wait: float) -> tuple[dict[int, list[int]], dict, list[float]]:
    job = http.post("/v1/jobs", json=body).json()
    assert job["status"] in ("queued", "running")
    tokens: dict[int, list[int]] = {}
    cursor, seen, durations = 0, [], []
    while True:
        start = time.monotonic()
        page = http.get(f"/v1/jobs/{job['id']}", params={"after": cursor, "wait": wait}).json()
        durations.append(time.monotonic() - start)
        for event in page["events"]:
            seen.append(event["sequence_number"])
            tokens.setdefault(event["index"], []).extend(event["token_ids"])
        cursor = page["cursor"]
        if page["status"] != "running" and page["status"] != "queued":
            break
        if not wait:
            time.sleep(0.01)
    assert seen == list(range(1, len(seen) + 1))  # nothing lost or repeated between cursors
    return tokens, page, durations


def grpc_request(pb2, body, request_id=""):
    sampling = pb2.SamplingOptions(**{k: v for k, v in body.items() if k != "prompt"})
    return pb2.GenerateRequest(request_id=request_id, text=body["prompt"], sampling=sampling)


@pytest.mark.parametrize("body", [SEEDED, GREEDY], ids=["seeded", "greedy"])
def test_every_protocol_gives_the_tokens_http_gives(server, http, stub, body):
    pb2, client = stub
    want = http_tokens(http, body)
    assert len(want) == body.get("n", 1) and all(len(t) == body["max_tokens"] for t in want.values())
    sse: dict[int, list[int]] = {}
    with http.stream("POST", "/v1/completions", json={**body, "return_token_ids": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    sse.setdefault(c["index"], []).extend(c["token_ids"])
    assert sse == want
    ws_tokens, done = ws_run(server.url, body)
    assert ws_tokens == want and {c["index"]: c["token_ids"] for c in done["choices"]} == want
    assert done["usage"]["completion_tokens"] == sum(map(len, want.values()))
    polled, final, _ = poll_job(http, body, wait=0)
    assert polled == want and final["status"] == "succeeded"
    assert {c["index"]: c["token_ids"] for c in final["choices"]} == want
    long_polled, _, durations = poll_job(http, body, wait=2.0)
    assert long_polled == want and max(durations) < 2.0 + 1.0  # returns within the wait bound
    unary = client.Generate(grpc_request(pb2, body), metadata=[("authorization", f"Bearer {KEY}")])
    assert {c.index: list(c.token_ids) for c in unary.choices} == want
    assert unary.usage.completion_tokens == sum(map(len, want.values()))
    streamed: dict[int, list[int]] = {}
    chunks = list(client.GenerateStream(grpc_request(pb2, body), metadata=[("authorization", f"Bearer {KEY}")]))
    for chunk in chunks:
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.token_ids)
    assert streamed == want and chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    wait_idle(server)


def test_long_poll_holds_until_new_tokens_or_the_bound(server, http):
    job = http.post("/v1/jobs", json={"prompt": "x", "max_tokens": 3, "temperature": 0}).json()
    start = time.monotonic()
    page = http.get(f"/v1/jobs/{job['id']}", params={"after": 0, "wait": 4}).json()
    assert page["events"] and time.monotonic() - start < 4  # returned as soon as tokens came
    while page["status"] in ("queued", "running"):
        page = http.get(f"/v1/jobs/{job['id']}", params={"after": page["cursor"], "wait": 4}).json()
    start = time.monotonic()  # finished: nothing after the last cursor, and no waiting for it
    again = http.get(f"/v1/jobs/{job['id']}", params={"after": page["cursor"], "wait": 4}).json()
    assert again["events"] == [] and time.monotonic() - start < 2 and again["usage"]["completion_tokens"] == 3
    assert http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).status_code == 400  # beyond job_max_wait
    assert http.get("/v1/jobs/job-nope").status_code == 404


def test_jobs_cancel_and_expire(server, http):
    before = decoded(server)
    job = http.post("/v1/jobs", json={"prompt": "y", "max_tokens": 240, "ignore_eos": True}).json()
    cancelled = http.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert_aborted_early(server, before)
    time.sleep(1.8)  # job_ttl=1.5 after it finished
    gone = http.get(f"/v1/jobs/{job['id']}")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == 410


def test_a_job_nobody_polls_is_cancelled():
    llm = LLM(model=MODEL, device="cpu", dtype="float32", num_blocks=64, block_size=16)
    srv = Server(llm.engine, ServerSettings(port=0, job_idle_timeout=0.1), model_name=MODEL).start_in_thread()
    try:
        before = decoded(srv)
        idle = httpx.post(f"{srv.url}/v1/jobs", json={"prompt": "z", "max_tokens": 240, "ignore_eos": True}).json()
        time.sleep(1.0)  # far longer than job_idle_timeout=0.1 without a poll
        page = httpx.get(f"{srv.url}/v1/jobs/{idle['id']}").json()
        assert page["status"] == "cancelled" and "not polled" in page["error"]["message"]
        assert len(page["choices"][0]["token_ids"]) < 240
        assert_aborted_early(srv, before)
    finally:
        srv.stop()


def test_websocket_cancel_errors_and_auth(server):
    url = server.url.replace("http", "ws") + "/v1/ws"
    with connect(url, additional_headers=AUTH) as ws:
        ws.send("{not json")
        assert json.loads(ws.recv())["error"]["code"] == 400  # the connection stays open
        ws.send(json.dumps({"type": "request", "prompt": "x", "temperature": -1}))
        err = json.loads(ws.recv())["error"]
        assert err["param"] == "temperature"
        before = decoded(server)
        ws.send(json.dumps({"type": "request", "prompt": "a", "max_tokens": 240, "ignore_eos": True}))
        assert json.loads(ws.recv())["type"] == "created"
        assert json.loads(ws.recv())["type"] == "delta"
        ws.send(json.dumps({"type": "cancel"}))
        while (event := json.loads(ws.recv()))["type"] != "done":
            assert event["type"] == "delta"
        assert event["choices"][0]["finish_reason"] == "abort" and event["usage"]["completion_tokens"] < 240
        assert_aborted_early(server, before)
        ws.send(json.dumps({"type": "request", "prompt": "b", "max_tokens": 2}))  # the connection still works
        assert json.loads(ws.recv())["type"] == "created"
        while json.loads(ws.recv())["type"] != "done":
            pass
    with connect(url, additional_headers={"Authorization": "Bearer wrong"}) as ws:
        assert json.loads(ws.recv())["error"]["code"] == 401
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd.code == 1008
    with connect(f"{url}?api_key={KEY}") as ws:  # browsers cannot set headers
        ws.send(json.dumps({"type": "request", "prompt": "c", "max_tokens": 2}))
        assert json.loads(ws.recv())["type"] == "created"


def test_websocket_client_leaving_mid_stream_aborts(server):
    before = decoded(server)
    with connect(server.url.replace("http", "ws") + "/v1/ws", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"type": "request", "prompt": "q", "max_tokens": 240, "ignore_eos": True}))
        json.loads(ws.recv())
        json.loads(ws.recv())
    assert_aborted_early(server, before)


def test_grpc_status_codes_abort_cancel_health_and_model_info(server, stub):
    pb2, client = stub
    meta = [("authorization", f"Bearer {KEY}")]
    with pytest.raises(grpc.RpcError) as err:
        client.Generate(grpc_request(pb2, {"prompt": "x", "max_tokens": 2}))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        client.Generate(grpc_request(pb2, {"prompt": "x", "temperature": 9.0}), metadata=meta)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.Generate(pb2.GenerateRequest(text="x", model="other"), metadata=meta)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Abort from another call ends a running stream with CANCELLED
    before = decoded(server)
    stream = client.GenerateStream(grpc_request(pb2, {"prompt": "w", "max_tokens": 240, "ignore_eos": True},
                                                request_id="mine"), metadata=meta)
    next(stream)
    assert client.Abort(pb2.AbortRequest(request_id="mine"), metadata=meta).found
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert not client.Abort(pb2.AbortRequest(request_id="mine"), metadata=meta).found
    assert_aborted_early(server, before)
    # the client cancelling its own call aborts the request in the engine
    before = decoded(server)
    stream = client.GenerateStream(grpc_request(pb2, {"prompt": "v", "max_tokens": 240, "ignore_eos": True}),
                                   metadata=meta)
    next(stream)
    stream.cancel()
    assert_aborted_early(server, before)
    before = decoded(server)
    unary = client.Generate.future(grpc_request(pb2, {"prompt": "u", "max_tokens": 240, "ignore_eos": True}),
                                   metadata=meta)
    threading.Event().wait(0.3)
    unary.cancel()
    assert_aborted_early(server, before)
    health = client.Health(pb2.HealthRequest())
    assert health.healthy and health.status == "ok"
    info = client.ModelInfo(pb2.ModelInfoRequest(), metadata=meta)
    assert (info.model, info.max_model_len, info.vocab_size, info.policy) == (MODEL, 256, 256, "chunked-prefill")
