# torchrun -m pipeloom.launch.generate parallel.pp=2: the one-process launcher's keys and output file, token for
# token; a world that does not match pp x tp is refused with one line.
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from pipeloom.configs.generate import register
from pipeloom.parallel.spawn import free_port

register()
REPO = Path(__file__).resolve().parents[1]
COMMON = ["model=llama-tiny", "dtype=float64", "device=cpu", "prompts=[hello, 'def f(', 'import os, sys']",
          "sampling.temperature=0", "sampling.max_tokens=8", "sampling.ignore_eos=true", "kv.block_size=4",
          "kv.num_blocks=64", "inference.token_budget=16", "progress=false"]


def _torchrun(nproc: int, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "-m",
           "pipeloom.launch.generate", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # a hang is ended by killing the whole group (ranks included)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun exceeded {timeout} s:\n{(out + err)[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_torchrun_pipeline_writes_the_one_process_output(tmp_path):
    from pipeloom.launch.generate import run

    single, parallel = tmp_path / "single.jsonl", tmp_path / "pp2.jsonl"
    # model set after composing: pipeloom-train's ``model`` config group, in this process's ConfigStore once its
    # tests ran, would take ``model=...`` as a group choice
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        cfg = compose(config_name="generate", overrides=COMMON[1:] + [f"output={single}"])
    cfg.model = COMMON[0].split("=", 1)[1]
    run(cfg)
    done = _torchrun(2, *COMMON, "parallel.pp=2", "parallel.layout=[3,3]", f"output={parallel}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.count("generated ") == 1, done.stdout  # the driver prints, once
    want = [json.loads(line) for line in single.read_text().splitlines()]
    got = [json.loads(line) for line in parallel.read_text().splitlines()]
    assert got == want


@pytest.mark.slow
def test_a_world_that_is_not_pp_times_tp_is_refused_in_one_line():
    done = _torchrun(2, *COMMON, "parallel.pp=3")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("pipeloom-generate: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "parallel.pp=3 x parallel.tp=1 = 3 ranks, but WORLD_SIZE=2" in lines[0]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_of(pid: int) -> int | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"]) if b"RANK" in env else None


@pytest.mark.slow
def test_torchrun_serve_answers_from_the_driver_and_stops_every_rank(tmp_path):
    """pp=2 behind the OpenAI server on rank 0 only: the completion equals the one-process engine's; SIGINT to the
    driver stops its server, and the stop reaches the other rank, which exits cleanly too."""
    import httpx

    from pipeloom.inference import LLM, SamplingParams

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "pipeloom.launch.serve",
           "model=llama-tiny", "device=cpu", "kv.num_blocks=64", "kv.block_size=4", "parallel.pp=2", "server.port=0",
           "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # the driver prints its address once the server accepts connections
            lines.append(line)
            if line.startswith("pipeloom-serve: serving"):
                break
        url = line.split(" at ")[1].split(" ")[0]
        assert url.startswith("http://127.0.0.1:"), "".join(lines)[-3000:]
        body = {"model": "llama-tiny", "prompt": "def f(", "max_tokens": 6, "temperature": 0}
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        want = LLM("llama-tiny", device="cpu", block_size=4, num_blocks=64).generate(
            "def f(", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
        assert got == want
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        driver = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 0)
        os.kill(driver, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(lines)[-2000:] + out[-3000:]
        assert "pipeloom-serve: stopped" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
