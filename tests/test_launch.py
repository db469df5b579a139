# pipeloom-train end to end: layouts (torchrun for one, the launcher's run on pool ranks for the rest), kill and resume,
# bad configs (one error line, whichever rank exits first).
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_module
from pipeloom import features
from pipeloom.configs.train import ConfigError, check_config, register
from pipeloom.parallel.spawn import RankPool
from pipeloom.training import read_metrics

register()

TINY = ["model=gpt-tiny", "model.n_layers=2", "data.seq_len=32", "data.batch_size=8", "train.eval_batches=1",
        "train.eval_every=0", "optimizer.warmup_steps=2", "optimizer.decay_steps=20", "checkpoint.every=2",
        "checkpoint.keep=10"]
LAYOUTS = {"4x1x1": (4, 1, 1), "2x2x1": (2, 2, 1), "2x1x2": (2, 1, 2), "1x2x2": (1, 2, 2)}  # pp x tp x dp
STEPS = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


def command(nproc: int, *overrides: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
                if nproc > 1 else [sys.executable, "-m"])
    return launcher + ["pipeloom.launch.train", *TINY, *overrides]


def launch(run_dir, cache, *overrides, nproc=4, timeout=240, check=True):
    out = subprocess.run(command(nproc, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", *overrides),
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in its own session, so a group kill misses them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


_RUNS: dict[str, str] = {}
TORCHRUN_LAYOUT = "2x2x1"  # the layout launched with torchrun; the others run the launcher's run() on pool ranks


def layout_run(name, workdir, cache, ranks) -> str:
    """Run directory of an uninterrupted STEPS-step run under layout ``name`` (run once per module). The
    :data:`TORCHRUN_LAYOUT` run goes through ``torchrun ... pipeloom.launch.train`` (the command line, the
    kill-and-resume test's reference); the others through the launcher's ``run`` on 4 forked ranks of this module's
    pool, the code torchrun's ranks run once Hydra has composed the config, without 4 fresh interpreters each."""
    if name not in _RUNS:
        pp, tp, dp = LAYOUTS[name]
        run_dir = str(workdir / f"run-{name}")
        overrides = [f"parallel.pp={pp}", f"parallel.tp={tp}", f"parallel.dp={dp}", f"train.steps={STEPS}",
                     "checkpoint.every=4"]  # step_4 (resumed under another layout) and step_8
        if name == TORCHRUN_LAYOUT:
            launch(run_dir, cache, *overrides)
        else:
            ranks[4].run(_launcher_run, [f"data.cache_dir={cache}", *overrides], run_dir, timeout=300)
        _RUNS[name] = run_dir
    return _RUNS[name]


@pytest.fixture(scope="module")
def reference(workdir, cache):
    """The same training in this process without any parallelism (through the launcher's ``run``)."""
    from pipeloom.launch.train import run

    run_dir = str(workdir / "run-single")
    run(compose_train(*TINY, f"data.cache_dir={cache}", f"train.steps={STEPS}", "train.timeline=false"), run_dir)
    return losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_like_one_process(name, workdir, cache, reference, ranks):
    run_dir = layout_run(name, workdir, cache, ranks)
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1] - 0.5, got  # the loss falls on the stdlib corpus
    for step in got:  # same init, same global batches: the same curve up to float32 reduction order
        assert got[step] == pytest.approx(reference[step], abs=2e-4), (step, got[step], reference[step])
    files = os.listdir(run_dir)
    assert {"metrics.jsonl", "timeline.png", "checkpoints"} <= set(files)
    first = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[0]
    if LAYOUTS[name][0] > 1:
        assert 0 < first["bubble_rate_measured"] < 1 and 0 < first["bubble_rate_predicted"] < 1


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(workdir, cache, ranks):
    """torchrun's job killed (SIGKILL to torchrun and every rank) after step 3, maybe mid-save; a job resumed from
    its checkpoints (the launcher's run on pool ranks) reproduces the uninterrupted torchrun run's losses."""
    full = losses(layout_run(TORCHRUN_LAYOUT, workdir, cache, ranks))
    ck, killed_dir = str(workdir / "kill-ck"), str(workdir / "killed")
    args = command(4, f"data.cache_dir={cache}", f"hydra.run.dir={killed_dir}", "parallel.pp=2", "parallel.tp=2",
                   "train.steps=1000", f"checkpoint.dir={ck}")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(killed_dir, "metrics.jsonl")
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and max(losses(killed_dir) or [0]) >= 3:
                break
            time.sleep(0.02)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and its 4 ranks, mid-step (maybe mid-save)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    resumed_dir = str(workdir / "resumed")
    out = ranks[4].run(_launcher_run, [f"data.cache_dir={cache}", "parallel.pp=2", "parallel.tp=2",
                                       f"train.steps={STEPS}", f"checkpoint.dir={ck}", "checkpoint.resume=true"],
                       resumed_dir, timeout=300)
    assert "resumed from" in out[0][1], out[0][1][-2000:]
    got = losses(resumed_dir)
    assert got, f"the killed run got past step {STEPS} before the kill: {out[0][1][-1000:]}"
    start = min(got) - 1
    assert 2 <= start < STEPS and [s for s, _ in out] == [start] * 4, (start, out)
    assert {s: got[s] for s in range(start + 1, STEPS + 1)} == {s: full[s] for s in range(start + 1, STEPS + 1)}


def _launcher_run(overrides: list[str], run_dir: str) -> tuple[int, str]:
    """On every rank of a pool: what pipeloom-train's ranks run once Hydra has composed the config (the launcher's
    ``run``); the step it started from and what the rank printed."""
    import contextlib
    import io

    from pipeloom.launch.train import run

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        start = run(compose_train(*TINY, *overrides), run_dir).start_step
    return start, printed.getvalue()


@pytest.fixture(scope="module")
def ranks():
    """Gloo ranks of this module's own (forked, so cheap; by world size) for launcher runs that need no torchrun of
    their own: the command line and torchrun are what the tests above check."""
    pools = {n: RankPool(n) for n in (2, 4)}
    yield pools
    for pool in pools.values():
        pool.close(kill=True)


@pytest.mark.slow
def test_resume_with_dropout_under_tp_is_exact(workdir, cache, ranks):
    """tp=2 x dp=2 with dropout: the checkpoint carries the default and the tensor-parallel dropout streams,
    so steps after a resume draw the masks (and give the losses) of the uninterrupted run. The launcher's run on
    4 ranks of a pool (the torchrun tests above cover the command line); the resumed job starts from the
    uninterrupted run's step-3 checkpoint, and with streams from the seed instead it would draw step 1's masks."""
    common = [f"data.cache_dir={cache}", "parallel.pp=1", "parallel.tp=2", "parallel.dp=2", "model.dropout=0.2",
              "train.steps=6", "train.timeline=false", "checkpoint.every=3", "checkpoint.save_final=false"]
    full_dir, resumed_dir, ck = (str(workdir / name) for name in ("drop-full", "drop-resumed", "drop-ck"))
    assert [start for start, _ in ranks[4].run(_launcher_run, common, full_dir, timeout=300)] == [0] * 4
    shutil.copytree(os.path.join(full_dir, "checkpoints", "step_3"), os.path.join(ck, "step_3"))
    resumed = ranks[4].run(_launcher_run, [*common, f"checkpoint.dir={ck}", "checkpoint.resume=true"], resumed_dir,
                           timeout=300)
    assert [start for start, _ in resumed] == [3] * 4 and "resumed from" in resumed[0][1], resumed
    full, got = losses(full_dir), losses(resumed_dir)
    assert sorted(got) == [4, 5, 6], got
    assert {s: got[s] for s in got} == {s: full[s] for s in got}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipedream_run_stopped_and_resumed_reproduces_the_uninterrupted_run(workdir, cache, ranks):
    """Weight stashing on 2 pipeline ranks: each stage updates after every microbatch inside the step. torchrun
    launches it; a run resumed (the launcher's run on 2 ranks of a pool) from the step-2 checkpoint of the
    uninterrupted run (live weights - the only version a stage holds between steps - optimizer state and RNG)
    gives that run's losses for steps 3 and 4."""
    common = ["parallel.pp=2", "parallel.tp=1", "schedule.name=pipedream", "model.tie_embeddings=false",
              "train.steps=4", "train.timeline=false", "checkpoint.save_final=false", "model.dropout=0.1"]
    full_dir, resumed_dir, ck = (str(workdir / name) for name in ("pd-full", "pd-resumed", "pd-ck"))
    launch(full_dir, cache, *common, nproc=2)
    shutil.copytree(os.path.join(full_dir, "checkpoints", "step_2"), os.path.join(ck, "step_2"))
    resumed = ranks[2].run(_launcher_run, [f"data.cache_dir={cache}", *common, f"checkpoint.dir={ck}",
                                           "checkpoint.resume=true"], resumed_dir, timeout=300)
    assert [start for start, _ in resumed] == [2, 2] and "resumed from" in resumed[0][1], resumed
    full, got = losses(full_dir), losses(resumed_dir)
    assert sorted(got) == [3, 4] and full[4] < full[1], (got, full)
    assert {s: got[s] for s in got} == {s: full[s] for s in got}


@pytest.mark.parametrize("saved,resumed", [("2x2x1", "4x1x1")])  # pp 2 -> 4, tp 2 -> 1
def test_resume_under_another_layout(saved, resumed, workdir, cache, ranks):
    """The torchrun run's step-4 checkpoint, resumed by the launcher's run on 4 ranks of a pool under another
    layout, continues its loss curve."""
    full = losses(layout_run(saved, workdir, cache, ranks))
    ck = workdir / f"relayout-{saved}-{resumed}"
    shutil.copytree(os.path.join(layout_run(saved, workdir, cache, ranks), "checkpoints", "step_4"), ck / "step_4")
    pp, tp, dp = LAYOUTS[resumed]
    run_dir = str(workdir / f"relayout-run-{saved}-{resumed}")
    out = ranks[4].run(_launcher_run, [f"data.cache_dir={cache}", f"parallel.pp={pp}", f"parallel.tp={tp}",
                                       f"parallel.dp={dp}", f"train.steps={STEPS}", f"checkpoint.dir={ck}",
                                       "checkpoint.resume=true"], run_dir, timeout=300)
    assert [start for start, _ in out] == [4] * 4, out
    assert "resumed from" in out[0][1] and f"'pp': {LAYOUTS[saved][0]}" in out[0][1], out[0][1]
    got = losses(run_dir)
    assert sorted(got) == list(range(5, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(full[step], abs=2e-4)


@pytest.mark.slow
def test_hf_gpt2_import_parity_through_the_launcher(workdir, cache, ranks):
    transformers = pytest.importorskip("transformers")
    from pipeloom.data import TokenBatches, prepare_data

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2,
                                                               n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    folder = str(workdir / "hf-gpt2")
    hf.save_pretrained(folder, safe_serialization=True)
    run_dir = str(workdir / "hf-run")
    ranks[4].run(_launcher_run, [f"data.cache_dir={cache}", f"model.hf_checkpoint={folder}", "parallel.pp=2",
                                 "parallel.tp=2", "train.steps=1", "checkpoint.save_final=false",
                                 "train.timeline=false"], run_dir, timeout=300)
    batch = TokenBatches(prepare_data(cache_dir=cache).train, 32, 8, seed=0).global_batch(0)
    x = torch.from_numpy(batch)
    with torch.no_grad():
        logits = hf.eval()(x[:, :-1]).logits  # (8, 32, 256)
    expected = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)))
    assert losses(run_dir)[1] == pytest.approx(expected, abs=1e-4)  # step 1's loss is before any update


# Starts pipeloom-train, but rank 0 first sleeps (what a loaded machine may do to a rank): it is still asleep
# when the other ranks find the bad config and exit, and torchrun stops the job. If it wakes, it leaves a mark.
LATE_RANKS = """import os, sys, time
rank = os.environ["RANK"]
if rank == "0":
    time.sleep(600)
    open(os.path.join(os.environ["MARKS"], "rank%s-woke" % rank), "w").close()
from pipeloom.launch.train import main
sys.argv[0] = "pipeloom-train"
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("override", ["parallel.pp=3",  # check_config refuses it
                                      "model=gpt-huge"])  # Hydra refuses it
def test_bad_config_fails_with_one_line_when_rank_0_is_late(override, cache, tmp_path):
    """Rank 0 is still asleep when ranks 1-3 refuse the config and exit (the order that used to lose the line)."""
    script = tmp_path / "late_ranks.py"
    script.write_text(LATE_RANKS)
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(script), *TINY,
           f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", override]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MARKS": str(tmp_path)})
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and its ranks (rank 0 would sleep on)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not stop within 240 s:\n{stderr[-3000:]}")
    assert proc.returncode != 0
    lines = [ln for ln in (stdout + stderr).splitlines() if "pipeloom-train: error:" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"pipeloom-train: error: {override}: "), stderr[-3000:]
    assert not list(tmp_path.glob("rank*-woke")), "rank 0 woke up: the unlucky order did not happen"
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [("parallel.bogus=1", "parallel.bogus=1: "),
                                               ("train.steps=abc", "train.steps=abc: "),
                                               ("model=gpt-huge", "model=gpt-huge: "),
                                               # on a machine without a GPU (CI): Triton cannot run here
                                               ("model.kernels=triton", "model.kernels='triton': ")])
def test_one_process_refuses_bad_config_with_one_line(override, expected, workdir, cache):
    out = launch(str(workdir / "bad"), cache, override, nproc=1, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pipeloom-train: error: {expected}"), out.stderr[-2000:]


@pytest.mark.slow
def test_multirun_sweep_over_schedules(workdir, cache):
    sweep = str(workdir / "sweep")
    out = subprocess.run(command(1, f"data.cache_dir={cache}", "train.steps=2", "checkpoint.save_final=false",
                                 "schedule.name=gpipe,1f1b", f"hydra.sweep.dir={sweep}", "--multirun"),
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [len(losses(os.path.join(sweep, str(i)))) for i in (0, 1)] == [2, 2]


def compose_train(*overrides):
    with initialize_config_module(config_module="pipeloom.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("overrides,world,key,value", [
    (["parallel.pp=3"], 4, "parallel.pp", 3),
    (["parallel.tp=2", "parallel.dp=4"], 4, "parallel.dp", 4),
    (["parallel.tp=8"], 8, "parallel.tp", 8),  # gpt-tiny has 4 heads
    (["schedule.name=interleaved-1f1b", "parallel.pp=2", "schedule.microbatches=3", "data.batch_size=6"], 2,
     "schedule.microbatches", 3),
    (["schedule.microbatches=3"], 1, "schedule.microbatches", 3),  # 16 sequences do not split into 3
    (["schedule.name=zigzag"], 1, "schedule.name", "zigzag"),
    (["schedule.name=pipedream", "parallel.pp=2"], 2, "model.tie_embeddings", True),  # gpt ties: across versions
    (["schedule.name=forward-only"], 1, "schedule.name", "forward-only"),
    (["schedule.name=pipedream", "+schedule.options.update_every=2"], 1, "schedule.options", {"update_every": 2}),
    (["parallel.pp=4", "model.n_layers=1"], 4, "parallel.pp", 4),
    (["logger.kind=tensorboard"], 1, "logger.kind", "tensorboard"),
    (["model.kernels=fast"], 1, "model.kernels", "fast"),
    (["data.seq_len=512"], 1, "data.seq_len", 512),
    (["train.steps=0"], 1, "train.steps", 0),
])
def test_check_config_names_the_key_and_value(overrides, world, key, value):
    with pytest.raises(ConfigError) as info:
        check_config(compose_train(*overrides), world)
    assert info.value.key == key and info.value.value == value
    assert str(info.value).startswith(f"{key}={value!r}")


def _hf_folder(path, n_head: int) -> str:
    """A Hugging Face GPT-2 folder's config.json (all check_config reads; the weights come later)."""
    import json

    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 256, "n_positions": 128,
              "n_embd": 12 * n_head, "n_layer": 2, "n_head": n_head, "activation_function": "gelu_new"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_check_config_reads_the_heads_of_an_hf_checkpoint(tmp_path):
    folder = _hf_folder(tmp_path / "gpt2-3-heads", n_head=3)
    with pytest.raises(ConfigError) as info:
        check_config(compose_train(f"model.hf_checkpoint={folder}", "parallel.tp=2"), 2)
    assert (info.value.key, info.value.value) == ("parallel.tp", 2)
    assert "does not divide the model's n_heads=3" in str(info.value) and "config.json" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        check_config(compose_train(f"model.hf_checkpoint={tmp_path / 'missing'}"), 1)
    assert check_config(compose_train(f"model.hf_checkpoint={folder}", "parallel.tp=3"), 3)["dp"] == 1


@pytest.mark.slow
def test_hf_checkpoint_whose_heads_tp_does_not_divide_fails_before_training(workdir, cache, tmp_path):
    folder = _hf_folder(tmp_path / "gpt2-3-heads", n_head=3)
    run_dir = str(workdir / "bad-hf-tp")
    out = launch(run_dir, cache, f"model.hf_checkpoint={folder}", "parallel.tp=2", "parallel.pp=1", nproc=2,
                 check=False, timeout=120)
    assert out.returncode != 0 and "exitcode: 2" in out.stderr, (out.returncode, out.stderr[-2000:])
    errors = [line for line in out.stderr.splitlines() if "pipeloom-train: error:" in line]
    assert len(errors) == 1 and "parallel.tp=2: does not divide the model's n_heads=3" in errors[0], out.stderr[-2000:]
    frames = [line for line in out.stderr.splitlines() if line.strip().startswith("File ") and "pipeloom" in line]
    assert not frames, frames  # no traceback through pipeloom (torchrun prints its own for the failed job)
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))


def test_default_config_and_documented_override_keys_exist():
    cfg = compose_train("parallel.pp=2", "parallel.tp=1", "parallel.dp=1", "parallel.vpp=2",
                        "schedule.name=interleaved-1f1b", "schedule.microbatches=4", "train.steps=3", "train.seed=5",
                        "model=llama-tiny", "checkpoint.dir=x", "checkpoint.every=1", "checkpoint.resume=true",
                        "logger=jsonl")
    assert cfg.model.name == "llama-tiny" and cfg.logger.kind == "jsonl" and cfg.parallel.vpp == 2
    resolved = check_config(cfg, 2)
    assert resolved["dp"] == 1 and resolved["vpp"] == 2 and resolved["model_config"].family == "llama"
    assert compose_train("logger=none").logger.kind == "none"
    wandb = compose_train("logger=wandb")
    assert wandb.logger.kind == "wandb" and wandb.logger.mode == "offline"
    if not features.has("wandb"):  # optional: a clear error before training, naming what to install
        with pytest.raises(ConfigError, match="pip install 'pipeloom\\[wandb\\]'"):
            check_config(wandb, 1)
    assert compose_train("model=gpt-demo").model.dim == 128
