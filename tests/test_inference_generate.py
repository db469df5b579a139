# pipeloom-generate and LLM on a pipeloom-train run: JSONL out, greedy equal to the checkpoint's own forward.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from pipeloom.configs.generate import register

register()
REPO = Path(__file__).resolve().parents[1]


def compose_generate(*overrides):
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step pipeloom-train run of a 2-layer byte-level GPT on a small slice of the stdlib."""
    from pipeloom.configs.train import register as register_train
    from pipeloom.launch.train import run

    register_train()
    run_dir = str(tmp_path_factory.mktemp("train-run"))
    cache = str(tmp_path_factory.mktemp("tokens"))
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=gpt-tiny", "model.n_layers=2", "data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000",
            f"data.cache_dir={cache}", "train.steps=2", "train.eval_every=0", "train.eval_batches=1",
            "train.timeline=false", "logger=none", "schedule.microbatches=1"])
    from pipeloom.kernels import set_kernels

    previous = set_kernels("auto")
    try:
        run(cfg, run_dir)
    finally:
        set_kernels(previous)  # the launcher picks the kernels' path for its process: leave ours as it was
    return run_dir


def test_llm_loads_a_training_run_and_matches_its_forward(trained_run):
    from pipeloom.inference import LLM, SamplingParams
    from pipeloom.training import latest_checkpoint, load_dense

    llm = LLM(model=trained_run, device="cpu", dtype="float64", block_size=8, num_blocks=64)
    out = llm.generate("import os\n", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    model = load_dense(latest_checkpoint(str(Path(trained_run) / "checkpoints")))[0].double()
    ids = list(b"import os\n")
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[10:]
    assert out.text == bytes(out.token_ids).decode("utf-8", errors="replace")


def test_generate_app_writes_one_json_line_per_prompt(tmp_path):
    """The console app in its own process (pipeloom-train's ``model`` group must not shadow ``model=``)."""
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "pipeloom.launch.generate", "model=llama-tiny",
                           "prompts=[hello,'def f(',[1,2,3]]", "sampling.max_tokens=7", "sampling.temperature=0",
                           "sampling.ignore_eos=true", "sampling.n=2", "inference.policy=chunked-prefill",
                           "inference.token_budget=64", "kv.block_size=16", f"output={out}", "device=cpu",
                           "progress=false"], cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["hello", "def f(", [1, 2, 3]]
    for line in lines:
        assert len(line["token_ids"]) == 7 and line["finish_reason"] == "length"
        assert line["text"] == bytes(line["token_ids"]).decode("utf-8", errors="replace")
        assert [o["token_ids"] for o in line["outputs"]] == [line["token_ids"]] * 2  # greedy: n equal samples
    assert "tokens/s" in done.stdout and "predicted" in done.stdout


def test_generate_config_composes_with_the_documented_keys():
    cfg = compose_generate("prompts=[a,[1,2]]", "sampling.max_tokens=64", "sampling.temperature=0",
                           "inference.policy=chunked-prefill", "inference.token_budget=512", "kv.block_size=16",
                           "output=out.jsonl", "kv.num_blocks=100", "kv.gpu_memory_fraction=0.5", "dtype=float32")
    assert cfg.sampling.max_tokens == 64 and cfg.kv.block_size == 16 and list(cfg.prompts[1]) == [1, 2]


def test_generate_cli_names_the_bad_field(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeloom.launch.generate", "sampling.top_p=1.5", "progress=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "top_p=1.5" in done.stderr


def test_demo_ends_by_generating_through_the_engine(trained_run, capsys):
    from pipeloom.launch.demo import generate_with_engine

    assert generate_with_engine(trained_run, max_tokens=6) > 0
    printed = capsys.readouterr().out
    assert "through the inference engine" in printed and "tokens/s" in printed
