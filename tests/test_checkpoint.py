# Checkpoints: any optimizer's state, atomic re-saves, dropout streams by name, per-rank checksums.
import os

import pytest
import torch
from pipeloom.models import get_model_config
from pipeloom.parallel.rng import ShardedRNG
from pipeloom.schedules import get_schedule
from pipeloom.training import (
    CheckpointError,
    LocalStep,
    build_parts,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

CONFIG = get_model_config("llama-tiny", n_layers=1, dim=32, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)
META = {"model_config": CONFIG.to_dict(), "tokenizer": {"kind": "byte", "vocab_size": 256}}


def _parts(seed=0):
    return build_parts(CONFIG, get_schedule("1f1b", pp=1, microbatches=2), seed=seed)


def _train(parts, optimizer, steps: range):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 64, (4, 8), generator=g)
        LocalStep(parts).step(x, y)
        optimizer.step()


def _load(path, parts, optimizer=None, **kw):
    return load_checkpoint(path, specs=parts.specs, optimizer=optimizer, model_config=META["model_config"],
                           tokenizer=META["tokenizer"], **kw)


def _sgd(parts):
    return torch.optim.SGD([p for _, p in parts.named_parameters()], lr=0.1, momentum=0.9, nesterov=True)


def test_sgd_with_momentum_resumes_exactly(tmp_path):
    full = _parts()
    opt = _sgd(full)
    _train(full, opt, range(4))
    first = _parts()
    opt = _sgd(first)
    _train(first, opt, range(2))
    path = save_checkpoint(str(tmp_path), 2, specs=first.specs, optimizer=opt, meta=META)
    resumed = _parts(seed=1)  # other weights, no momentum: everything must come from the checkpoint
    opt = _sgd(resumed)
    _load(path, resumed, opt)
    _train(resumed, opt, range(2, 4))
    for (name, p), (_, q) in zip(resumed.named_parameters(), full.named_parameters()):
        assert torch.equal(p, q), name


def test_another_optimizer_class_is_refused(tmp_path):
    parts = _parts()
    opt = _sgd(parts)
    _train(parts, opt, range(1))
    path = save_checkpoint(str(tmp_path), 1, specs=parts.specs, optimizer=opt, meta=META)
    with pytest.raises(CheckpointError, match="holds SGD state; this run's optimizer is AdamW"):
        _load(path, parts, torch.optim.AdamW([p for _, p in parts.named_parameters()]))


class Crash(Exception):
    pass


def _crash_at(monkeypatch, k: int, after: bool):
    """Make the k-th os.replace / shutil.rmtree of a save crash: before it acts, or after it (rmtree: after
    deleting one file, as a process killed mid-deletion)."""
    import shutil

    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst, *a, **kw):
        calls["n"] += 1
        if calls["n"] == k and not after:
            raise Crash(f"before os.replace({src}, {dst})")
        real_replace(src, dst, *a, **kw)
        if calls["n"] == k:
            raise Crash(f"after os.replace({src}, {dst})")

    def rmtree(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == k:
            if after and os.path.isdir(path):
                files = sorted(os.listdir(path))
                if files:
                    os.remove(os.path.join(path, files[0]))
            raise Crash(f"{'during' if after else 'before'} rmtree({path})")
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return calls


def test_a_crash_anywhere_in_a_resave_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    parts = _parts()
    opt = torch.optim.AdamW([p for _, p in parts.named_parameters()], lr=1e-2)
    _train(parts, opt, range(1))
    old = [p.detach().clone() for _, p in parts.named_parameters()]
    _train(parts, opt, range(1, 2))
    new = [p.detach().clone() for _, p in parts.named_parameters()]
    crashed = 0
    for k in range(1, 20):
        for after in (False, True):
            folder = str(tmp_path / f"k{k}-{int(after)}")
            with torch.no_grad():
                for (_, p), value in zip(parts.named_parameters(), old):
                    p.copy_(value)
            save_checkpoint(folder, 3, specs=parts.specs, optimizer=opt, meta=META)
            with torch.no_grad():
                for (_, p), value in zip(parts.named_parameters(), new):
                    p.copy_(value)
            with monkeypatch.context() as m:
                calls = _crash_at(m, k, after)
                try:
                    save_checkpoint(folder, 3, specs=parts.specs, optimizer=opt, meta=META)  # the same step again
                except Crash:
                    crashed += 1
            path = latest_checkpoint(folder)
            assert path is not None, (k, after, os.listdir(folder))
            fresh = _parts(seed=2)
            _load(path, fresh)
            got = [p.detach() for _, p in fresh.named_parameters()]
            assert all(map(torch.equal, got, old)) or all(map(torch.equal, got, new)), (k, after, path)
            save_checkpoint(folder, 3, specs=parts.specs, optimizer=opt, meta=META)  # and the next save recovers
            assert sorted(os.listdir(folder)) == ["step_3"], (k, after, os.listdir(folder))
        if calls["n"] < k:
            break  # k went past the save's last file operation
    assert crashed >= 6  # the crash points reached: clean-up, both renames, the old copy's removal


def test_dropout_streams_are_restored_by_name_and_a_mismatch_is_an_error(tmp_path):
    parts = _parts()
    parts.model.blocks[0].attn.sharded_rng = ShardedRNG(7, "attention-dropout")
    streams = parts.rng_streams()
    assert list(streams) == ["attention-dropout"]
    with streams["attention-dropout"].fork("cpu"):
        torch.rand(3)
    path = save_checkpoint(str(tmp_path), 1, specs=parts.specs, optimizer=None, meta=META, rng_streams=streams)
    with streams["attention-dropout"].fork("cpu"):
        expected = torch.rand(3)  # what the stream draws right after the save
    _load(path, parts, rng_streams=streams)
    with streams["attention-dropout"].fork("cpu"):
        assert torch.equal(torch.rand(3), expected)
    other_seed = _parts()
    other_seed.model.blocks[0].attn.sharded_rng = ShardedRNG(8, "attention-dropout")
    seeded = "'attention-dropout' was seeded 7 in the checkpoint's rng_rank0.pt states, 8 here"
    with pytest.raises(CheckpointError, match=seeded):
        _load(path, other_seed, rng_streams=other_seed.rng_streams())
    renamed = _parts()
    renamed.model.blocks[0].attn.sharded_rng = ShardedRNG(7, "mlp-dropout")
    with pytest.raises(CheckpointError, match="'attention-dropout' is in the checkpoint's rng_rank0.pt"):
        _load(path, renamed, rng_streams=renamed.rng_streams())
    with pytest.raises(CheckpointError, match="'attention-dropout' of this model is not in"):
        _load(save_checkpoint(str(tmp_path / "none"), 1, specs=parts.specs, optimizer=None, meta=META,
                              rng_streams={}), parts, rng_streams=streams)


def _per_rank_worker(folder: str):
    """pp=2: each rank hashes only its own files on save and only what it reads on load; a corrupted file
    only rank 1 reads fails the load on every rank (none waits in a collective)."""
    import pipeloom.training.checkpoint_files as files
    from pipeloom.parallel.mesh import Mesh

    mesh = Mesh.build(dp=1, pp=2, tp=1)
    parts = build_parts(CONFIG, get_schedule("1f1b", pp=2, microbatches=2), mesh=mesh, seed=0)
    hashed = []
    real = files.sha256
    files.sha256 = lambda path: hashed.append(os.path.basename(path)) or real(path)
    try:
        path = save_checkpoint(folder, 1, specs=parts.specs, optimizer=None, meta=META)
        saved, hashed[:] = list(hashed), []
        _load(path, parts)
        read = list(hashed)
        torch.distributed.barrier()
        if mesh.pp_rank == 1:
            blob = os.path.join(path, "__1_0.distcp")
            data = bytearray(open(blob, "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(blob, "wb").write(bytes(data))
        torch.distributed.barrier()
        try:
            _load(path, parts)
            error = None
        except CheckpointError as err:
            error = str(err)
    finally:
        files.sha256 = real
    return {"saved": sorted(saved), "read": sorted(read), "error": error}


def test_each_rank_hashes_its_own_files_and_checks_what_it_reads(pool2, tmp_path):
    r0, r1 = pool2.run(_per_rank_worker, str(tmp_path))
    assert r0["saved"] == [".metadata", "__0_0.distcp", "rng_rank0.pt"], r0
    assert r1["saved"] == ["__1_0.distcp", "rng_rank1.pt"], r1
    assert r0["read"] == [".metadata", "__0_0.distcp", "rng_rank0.pt"], r0
    assert r1["read"] == [".metadata", "__1_0.distcp", "rng_rank1.pt"], r1
    for r in (r0, r1):
        assert r["error"] and "sha256 of __1_0.distcp" in r["error"] and "rank 1" in r["error"], r
