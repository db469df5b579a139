# pipeloom-serve (Hydra app, console process, HF folder with its chat template), a dead engine, bench/serve_load.py.
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hydra import compose, initialize_config_module
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipeloom.configs.serve import ServerSection, register
from pipeloom.inference import LLM
from pipeloom.serving import Server, ServerSettings

register()
REPO = Path(__file__).resolve().parents[1]


def compose_serve(model: str, *overrides):
    """The serve config for ``model``; set after composing, since pipeloom-train's ``model`` config group (in
    the same process's ConfigStore once its tests ran) would take ``model=...`` as a group choice."""
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        cfg = compose(config_name="serve", overrides=list(overrides))
    cfg.model = model
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_config_server_section_is_server_settings_field_for_field():
    ours = {f.name: f.default for f in dataclasses.fields(ServerSection)}
    theirs = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
    assert ours == theirs


def test_bad_server_values_are_named_before_anything_loads():
    from pipeloom.launch.serve import build

    for override, field in (("server.port=70000", "server.port=70000"), ("server.max_n=500", "server.max_n=500"),
                            ("server.job_ttl=0", "server.job_ttl=0")):
        with pytest.raises(ValueError, match=re.escape(field)):
            build(compose_serve("gpt-tiny", override))


def test_console_app_prints_its_address_serves_grpc_from_a_fresh_cache_and_stops_on_sigint(tmp_path):
    env = {**os.environ, "PIPELOOM_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeloom.launch.serve", "model=llama-tiny", "server.port=0",
                             "server.grpc_port=0", "server.api_key=k1", "kv.num_blocks=64", "device=cpu", "threads=1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for line in proc.stdout:  # the first line it prints is the address, once both servers are up
            if line.startswith("pipeloom-serve: serving"):
                break
        match = re.search(r"at (http://127\.0\.0\.1:\d+) .*gRPC at (127\.0\.0\.1:\d+)", line)
        assert match, line
        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="k1", max_retries=0, timeout=60)
        out = client.completions.create(model="llama-tiny", prompt="def ", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5
        generated = list((tmp_path / "cache" / "grpc").glob("*/pipeloom_serving_pb2_grpc.py"))
        assert len(generated) == 1  # gRPC code generated from the package's .proto into the fresh cache
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_hf_folder_is_served_with_its_own_chat_template(tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from pipeloom.data import HFTokenizer, train_bpe
    from pipeloom.launch.serve import build
    from pipeloom.models import Transformer, get_model_config, save_hf_checkpoint

    train_bpe(["hello world, this is a tiny corpus for a tiny tokenizer. " * 20], 300,
              str(tmp_path / "tokenizer.json"))
    vocab = HFTokenizer(str(tmp_path / "tokenizer.json")).vocab_size
    torch.manual_seed(0)
    save_hf_checkpoint(Transformer(get_model_config("gpt-tiny", vocab_size=vocab, n_layers=2)), None, tmp_path)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    srv = build(compose_serve(str(tmp_path), "device=cpu", "dtype=float32", "kv.num_blocks=32",
                              "server.port=0", "server.model_name=tiny-hf"))
    srv.start_in_thread()
    try:
        messages = [{"role": "user", "content": "hello world"}]
        tokens = httpx.post(f"{srv.url}/tokenize", json={"messages": messages}).json()["tokens"]
        assert srv.engine.tokenizer.decode(tokens) == "<user>hello world<assistant>"
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="tiny-hf", messages=messages, max_tokens=4, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert out.usage.prompt_tokens == len(tokens) and out.usage.completion_tokens == 4
    finally:
        srv.stop()


def test_a_dead_engine_errors_in_band_after_the_200_and_health_says_503():
    llm = LLM(model="gpt-tiny", device="cpu", dtype="float32", num_blocks=64, block_size=16)
    run, calls = llm.engine.runner.run, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device lost")
        return run(*args, **kwargs)

    llm.engine.runner.run = failing
    srv = Server(llm.engine, ServerSettings(port=0), model_name="gpt-tiny").start_in_thread()
    try:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 20,
                                                                     "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["text"] is not None
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and "device lost" in error["message"]
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
        again = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert again.status_code == 500 and again.json()["error"]["type"] == "InternalServerError"
        with connect(srv.url.replace("http", "ws") + "/v1/ws") as ws:
            ws.send(json.dumps({"type": "request", "prompt": "x"}))
            assert json.loads(ws.recv())["error"]["code"] == 500
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv()
            assert closed.value.rcvd.code == 1011
    finally:
        srv.stop()


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load_under_test", REPO / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_serve_load_bench_measures_and_prints_the_simulators_prediction(capsys):
    bench = _bench()
    llm = LLM(model="gpt-tiny", device="cpu", dtype="float32", num_blocks=128, block_size=16, token_budget=64)
    srv = Server(llm.engine, ServerSettings(port=0), model_name="gpt-tiny").start_in_thread()
    try:
        result = bench.run(srv.url, num_prompts=10, rate=20.0, input_len=12, output_len=8, range_ratio=0.5,
                           max_time=120)
        assert bench.main(["--url", "http://10.1.2.3:8000"]) == 2  # loopback only
        assert bench.main(["--url", srv.url, "--num-prompts", "4", "--rates", "50,100", "--input-len", "8",
                           "--output-len", "4", "--max-time", "60"]) == 0
    finally:
        srv.stop()
    m, sim = result["measured"], result["simulated"]
    assert m.completed == 10 and result["failed"] == result["rejected"] == result["short"] == 0
    assert sim is not None and sim.completed == 10 and result["cost_model"] is not None
    assert m.ttft.p50 > 0 and m.itl.p99 >= m.itl.p50 > 0 and m.e2e.p99 >= m.ttft.p99 and m.output_throughput > 0
    assert m.tpot.p50 > 0 and m.goodput == m.request_throughput  # no SLO given: every request counts
    report = bench.report(result)
    assert "| ITL p99 (ms) |" in report and "| TTFT p50 (ms) |" in report and "cost model fitted" in report
    out = capsys.readouterr().out
    assert out.count("| metric | measured | simulator |") == 2 and "capacity (highest swept rate" in out
