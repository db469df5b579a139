# Per-stage model build: each rank materialises only its stages' layers, with the dense model's numbers and losses.
import functools
import types
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from pipeloom.models import Transformer, get_model_config
from pipeloom.schedules import get_schedule
from pipeloom.training import build_optimizer, build_parts, make_stepper
from pipeloom.training.optim import clip_grad_norm

VOCAB = 61  # not a multiple of tp: the vocab-parallel head pads


def _config(family, n_layers=6, dim=32):
    return get_model_config(f"{family}-tiny", vocab_size=VOCAB, dim=dim, n_layers=n_layers, n_heads=4,
                            n_kv_heads=2 if family == "llama" else 4, max_seq_len=16, dropout=0.0)


def _fake_mesh(pp_rank):
    return types.SimpleNamespace(pp_rank=pp_rank, tp=1, tp_rank=0)


# Every layout method: the launcher's uniform and parameters, an explicit list, interleaved and V placements.
LAYOUTS = [("1f1b", 2, "uniform"), ("1f1b", 4, "uniform"), ("1f1b", 4, "parameters"), ("gpipe", 2, [3, 5]),
           ("interleaved-1f1b", 2, "parameters"), ("zb-v", 2, "uniform")]


@pytest.mark.parametrize("family", ["gpt", "llama"])  # gpt ties its head to the embedding
def test_every_rank_holds_the_dense_models_numbers(family):
    config = _config(family)
    torch.manual_seed(7)
    dense = Transformer(config).state_dict()
    after_dense = torch.rand(4)  # where the dense build leaves the default generator
    for schedule, pp, split in LAYOUTS:
        plan = get_schedule(schedule, pp=pp, microbatches=4)
        held = set()
        for rank in range(pp):
            parts = build_parts(config, plan, mesh=_fake_mesh(rank), seed=7, split=split)
            assert torch.equal(torch.rand(4), after_dense), (schedule, split, rank)  # dropout's stream unchanged
            for spec in parts.specs:
                assert torch.equal(spec.param, dense[spec.local_name]), (schedule, split, rank, spec.name)
                held.add(spec.local_name)
            materialised = {n for n, p in parts.model.named_parameters(remove_duplicate=False) if not p.is_meta}
            tied = {"head.out.weight"}  # a tied head on the embedding's rank is the same tensor, one spec
            assert materialised - tied == {s.local_name for s in parts.specs} - tied, (schedule, split, rank)
        assert held | {"head.out.weight"} == set(dense) | {"head.out.weight"}, (schedule, split)  # all covered


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live non-meta tensor storage created inside the mode (what the build allocates)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def test_a_pp4_rank_allocates_about_a_quarter_of_the_dense_parameters():
    config = _config("llama", n_layers=14, dim=64)  # 16 pipeline layers, the blocks hold almost all weights
    plan = get_schedule("1f1b", pp=4, microbatches=4)
    with LiveBytes() as dense:
        torch.manual_seed(0)
        model = Transformer(config)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert dense.peak >= dense_bytes  # the tracker sees every parameter of the dense build
    peaks = []
    for rank in range(4):
        with LiveBytes() as build:
            parts = build_parts(config, plan, mesh=_fake_mesh(rank), seed=0, split="parameters")
        peaks.append(build.peak)
        assert sum(s.param.numel() * 4 for s in parts.specs) <= build.peak  # its own layers, and little else
    ratios = [peak / dense.peak for peak in peaks]
    print(f"peak bytes: dense {dense.peak:,}, pp=4 ranks {peaks} = {[round(r, 3) for r in ratios]} of dense")
    assert all(0.15 < r < 0.32 for r in ratios), ratios


def test_hf_folder_is_read_one_stage_at_a_time(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from pipeloom.models import hf

    config = _config("gpt", n_layers=4)
    torch.manual_seed(3)
    source = Transformer(config)
    hf.save_hf_checkpoint(source, None, tmp_path, max_shard_bytes=20_000)  # several shards
    fetched = []
    import safetensors

    original = safetensors.safe_open

    class Spy:  # safe_open, noting every stored tensor read
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            fetched.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)  # read_hf_tensors imports it where it reads
    plan = get_schedule("1f1b", pp=3, microbatches=3)
    reader = functools.partial(hf.read_hf_tensors, str(tmp_path), config)
    expected = source.state_dict()
    for rank in range(3):
        fetched.clear()
        parts = build_parts(config, plan, mesh=_fake_mesh(rank), split="uniform", init_state=reader)
        for spec in parts.specs:
            assert torch.equal(spec.param, expected[spec.local_name])
        blocks = {i - 1 for m in parts.modules.values() for i in m.layer_ids if 1 <= i <= config.n_layers}
        read_blocks = {int(k.split(".h.")[1].split(".")[0]) for k in (f".{k}" for k in fetched) if ".h." in k}
        assert fetched and read_blocks == blocks, (rank, sorted(fetched))
        assert len(set(fetched)) < 0.6 * len(hf.state_dict_to_hf(source))  # its stages' tensors, not the file


# ---------------------------------------------------------------------------------------------------------
# On 4 ranks: pp x tp x dp layouts train with the dense single-process model's losses (float64).


def _gathered(spec, tp_group):
    from pipeloom.training.checkpoint import gather_full

    return gather_full(spec, spec.param, tp_group)


def _dense_losses(config, seed, batches, steps):
    torch.manual_seed(seed)
    model = Transformer(config).double()
    opt = build_optimizer(model.named_parameters(), lr=3e-3)
    out = []
    for step in range(steps):
        x, y = batches[step][:, :-1], batches[step][:, 1:]
        loss = model.loss(model(x), y)
        loss.backward()
        clip_grad_norm([(p, True) for p in model.parameters()], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def _train_layout(dp, pp, tp, family, schedule, split, steps):
    from pipeloom.parallel.data_parallel import allreduce_gradients
    from pipeloom.parallel.mesh import Mesh

    mesh = Mesh.build(dp=dp, pp=pp, tp=tp)
    config = _config(family)
    plan = get_schedule(schedule, pp=pp, microbatches=2)
    parts = build_parts(config, plan, mesh=mesh, seed=11, split=split)
    tp_group = mesh.tp_group if tp > 1 else None
    torch.manual_seed(11)
    dense = Transformer(config).state_dict()
    weights_equal = all(torch.equal(_gathered(s, tp_group), dense[s.local_name]) for s in parts.specs)
    for module in parts.modules.values():
        module.double()
    optimizer = build_optimizer(parts.named_parameters(), lr=3e-3)
    stepper = make_stepper(parts, mesh)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, VOCAB, (8, 17), generator=gen)] * steps  # (B, T+1): one batch, learnt
    rows = slice(mesh.dp_rank * (8 // dp), (mesh.dp_rank + 1) * (8 // dp))
    params = [s.param for s in parts.specs]
    losses = []
    for step in range(steps):
        batch = batches[step][rows]
        loss, _ = stepper.step(batch[:, :-1], batch[:, 1:])
        if dp > 1:
            allreduce_gradients(params, mesh.dp_group, op="sum")
        clip_grad_norm([(s.param, s.counted) for s in parts.specs], 1.0,
                       groups=(tp_group, mesh.pp_group if pp > 1 else None))
        optimizer.step()
        total = torch.tensor([loss], dtype=torch.float64)
        if dp > 1:
            dist.all_reduce(total, group=mesh.dp_group)
        losses.append(float(total))
    reference = _dense_losses(config, 11, batches, steps) if dist.get_rank() == 0 else None
    return {"weights_equal": weights_equal, "losses": losses, "reference": reference,
            "params": sum(s.param.numel() for s in parts.specs)}


@pytest.mark.parametrize("dp, pp, tp, family, schedule, split", [
    (1, 2, 2, "gpt", "1f1b", "uniform"),
    (1, 4, 1, "llama", "1f1b", "parameters"),
    (2, 2, 1, "gpt", "interleaved-1f1b", [2, 2, 2, 2]),
    (1, 2, 2, "llama", "zb-v", "parameters"),
])
def test_per_stage_layouts_train_with_the_dense_losses(pool4, dp, pp, tp, family, schedule, split):
    results = pool4.run(_train_layout, dp, pp, tp, family, schedule, split, 3, timeout=240)
    reference = results[0]["reference"]
    assert reference[-1] < reference[0]  # it learns: a comparison that can fail
    for r in results:
        assert r["weights_equal"], r
        assert r["losses"] == pytest.approx(reference, abs=1e-10, rel=1e-10), (r["losses"], reference)
    dense_params = Transformer(_config(family)).num_params()
    assert max(r["params"] for r in results) < 0.75 * dense_params  # no rank holds the whole model
