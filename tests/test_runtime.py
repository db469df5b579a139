# Pipeline runtime on 2 and 4 gloo ranks: every schedule equals one process (float64), PipeDream/2BW emulated.
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pipeloom.parallel.p2p import PipelineCommError, PipelineTimeout, check_rendezvous
from pipeloom.parallel.runtime import PipelineRuntime
from pipeloom.parallel.stage import split_stages
from pipeloom.schedules import get_schedule
from pipeloom.schedules.simulate import peak_activations
from torch import nn

EXACT = 1e-12  # float64: the pipeline sums microbatch gradients, one process sums inside the matmuls
V, D, T_MAX = 13, 8, 12
SYNC = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v"]
CHUNKS = {"attention_mask": "split"}  # the (B, T) mask is cut with the batch; position ids go whole


# ----- a user-style layer stack: tied embedding/head, extras (attention mask, position ids) ---------------
class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T_MAX, D)

    def forward(self, tokens, position_ids=None):  # (B, T) long -> (B, T, D)
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1])
        return self.tok(tokens) + self.pos(position_ids)


class Mix(nn.Module):
    """A residual block mixing over time (causal running mean), masked by attention_mask (B, T)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(2 * D, D)

    def forward(self, x, attention_mask=None):  # (B, T, D) -> (B, T, D)
        h = self.norm(x)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        h = h.cumsum(dim=1) / steps  # causal mean over time (B, T, D)
        return x + self.proj(torch.tanh(self.fc(h)))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, V, bias=False)

    def forward(self, x):  # (B, T, D) -> (B, T, V)
        return self.out(self.norm(x))


def build(blocks: int, tied: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [Embed(), *[Mix() for _ in range(blocks)], Head()]
    if tied:
        layers[-1].out.weight = layers[0].tok.weight
    return nn.Sequential(*layers).double()


def loss_fn(logits, targets):  # mean over the targets that are not -100
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def batch(B: int, T: int, seed: int):
    """Tokens, targets with -100 spread unevenly over rows, and the extras."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, : T - 1] = -100  # the first microbatch loses most of a row
    targets[-1, 1:] = -100  # the last microbatch too, differently
    mask = (torch.rand(B, T, generator=g) > 0.2).double()
    extras = {"attention_mask": mask, "position_ids": torch.arange(T)}  # mask split per microbatch, ids whole
    return tokens, targets, extras


def reference(model, tokens, targets, extras):
    ref = copy.deepcopy(model)
    h = tokens
    for layer in ref:
        kwargs = {k: v for k, v in extras.items() if k in layer.forward.__code__.co_varnames}
        h = layer(h, **kwargs)
    loss = loss_fn(h, targets)
    loss.backward()
    return ref, loss.item(), h.detach()


def _grad_diff(runtime, ref) -> float:
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    diff = 0.0
    for module in runtime.modules.values():
        for name, p in module.named_parameters():
            diff = max(diff, (p.grad - ref_params[name].grad).abs().max().item())
    return diff


def _param_diff(runtime, ref) -> float:
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    return max((p - ref_params[n]).abs().max().item() for m in runtime.modules.values()
               for n, p in m.named_parameters())


# ----- workers (module level: they run on every rank) --------------------------------------------------------
def sync_worker(pp: int, cases: list, m: int = 4, ordered: bool | None = None, shapes: str = "cached") -> dict:
    """For each (schedule, layout): two steps (SGD between) with shapes changing; max differences.

    ``ordered=True`` receives messages in each sender's order with tag 0, as on NCCL; ``shapes`` is the
    runtime's shape-header mode.
    """
    rank = dist.get_rank()
    out = {}
    for name, blocks, layout in cases:
        plan = get_schedule(name, pp=pp, microbatches=m)
        model = build(blocks)
        split = split_stages(list(model), plan.num_stages, method=layout)
        runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, tied=split.tied,
                                  optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1), timeout=60,
                                  ordered_messages=ordered, shapes=shapes, extras_chunks=CHUNKS)
        ref_model = copy.deepcopy(model)
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
        diffs = {"loss": 0.0, "out": 0.0, "grad": 0.0, "param": 0.0, "tied": 0.0}
        for step, (B, T) in enumerate([(m + 3, 5), (m + 2, 3)]):  # uneven microbatches, then shorter sequences
            tokens, targets, extras = batch(B, T, seed=step)
            result = runtime.step(tokens, targets, extras, return_outputs=True)
            ref, ref_loss, ref_out = reference(ref_model, tokens, targets, extras)
            diffs["loss"] = max(diffs["loss"], abs(result.loss - ref_loss))
            if result.outputs is not None:
                diffs["out"] = max(diffs["out"], (result.outputs - ref_out).abs().max().item())
            diffs["grad"] = max(diffs["grad"], _grad_diff(runtime, ref))
            # Activations are freed at each microbatch's last backward action, as the simulator counts them.
            diffs["peak"] = (runtime.peak_activations, peak_activations(runtime.plan)[rank])
            ref_model = ref
            ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
            ref_opt.step()
            diffs["param"] = max(diffs["param"], _param_diff(runtime, ref_model))
        tied = split.tied[0]
        mine = [runtime.modules[s].get_parameter(n) for s, n in tied.items() if s in runtime.modules]
        gathered = [None] * pp
        dist.all_gather_object(gathered, [p.detach() for p in mine])
        copies = [t for part in gathered for t in part]
        diffs["tied"] = max((c - copies[0]).abs().max().item() for c in copies)
        diffs["has_outputs"] = result.outputs is not None
        out[f"{name}/{layout}"] = diffs
    return out


def versioned_worker(pp: int, cases: list) -> dict:
    """PipeDream (stash, vertical sync) and 2BW over 3 steps vs a one-process emulation of the rules."""
    rank = dist.get_rank()
    out = {}
    for name, options, opt_name, m in cases:
        plan = get_schedule(name, pp=pp, microbatches=m, **options)
        model = build(2 * pp - 1, tied=False, seed=1)
        factory = ((lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.5)) if opt_name == "sgd"
                   else (lambda ps: torch.optim.Adam(ps, lr=0.01)))
        split = split_stages(list(model), pp)
        emulated = emulate(copy.deepcopy(split.stages), name, options, pp, m, factory)
        runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, optimizer_factory=factory, timeout=60,
                                  extras_chunks=CHUNKS)
        losses = []
        for step in range(3):
            tokens, targets, extras = batch(2 * m, 4, seed=10 + step)
            losses.append(runtime.step(tokens, targets, extras).loss)
        final = emulated(3)
        stage = split.stages[plan.stages_of(rank)[0]]
        ref = dict(final["stages"][stage.index].named_parameters())
        diff = max((p - ref[n]).abs().max().item() for n, p in stage.named_parameters())
        loss = max(abs(a - b) for a, b in zip(losses, final["losses"]))
        out[f"{name}{options}/{opt_name}"] = {"param": diff, "loss": loss}
    return out


def versions_of(name: str, options: dict, p: int, m: int, s: int, b: int) -> int:
    """Version of 0-based microbatch b on stage s within one step (the plan's pipeline drains): arXiv
    1806.03377 §3.4 (stash, vertical sync), arXiv 2006.09503 §3.1 (2BW); docs/schedule-facts.md."""
    if name == "pipedream-2bw":
        return max(b // (options.get("update_every") or p) - 1, 0)
    if options.get("vertical_sync"):
        return max(0, b - p + 1)
    return max(0, b - (p - 1 - s))


def emulate(stages, name, options, p, m, factory):
    """One process runs the update rule: microbatch b uses version v(s, b) on every stage s."""
    group = (options.get("update_every") or p) if name == "pipedream-2bw" else 1
    opts = [factory(list(st.parameters())) for st in stages]

    def run(steps: int) -> dict:
        losses = []
        for step in range(steps):
            tokens, targets, extras = batch(2 * m, 4, seed=10 + step)
            xs, ys = torch.tensor_split(tokens, m), torch.tensor_split(targets, m)
            masks = torch.tensor_split(extras["attention_mask"], m)
            weights = [float((y != -100).sum()) for y in ys]
            versions = [[{n: t.detach().clone() for n, t in st.named_parameters()}] for st in stages]
            total, acc = 0.0, [None] * p
            for b in range(m):
                used = [{n: t.clone().requires_grad_() for n, t in versions[s][versions_of(name, options, p, m, s, b)]
                         .items()} for s in range(p)]
                h = xs[b]
                for s, st in enumerate(stages):
                    h = torch.func.functional_call(st, used[s], (h,), {"attention_mask": masks[b],
                                                                       "position_ids": extras["position_ids"]})
                first = b - b % group
                group_weight = sum(weights[first:first + group])
                loss = loss_fn(h, ys[b])
                total += loss.item() * weights[b] / sum(weights)
                grads = torch.autograd.grad(loss * (weights[b] / group_weight), [t for u in used for t in u.values()])
                it = iter(grads)
                for s in range(p):
                    g = [next(it) for _ in used[s]]
                    acc[s] = g if acc[s] is None else [a + x for a, x in zip(acc[s], g)]
                if (b + 1) % group == 0:
                    for s, st in enumerate(stages):
                        for t, g in zip(st.parameters(), acc[s]):
                            t.grad = g
                        opts[s].step()
                        versions[s].append({n: t.detach().clone() for n, t in st.named_parameters()})
                    acc = [None] * p
            losses.append(total)
        return {"stages": stages, "losses": losses}

    return run


def shapes_worker(pp: int, name: str, shapes: str, ordered: bool | None = None, m: int = 4) -> list[dict]:
    """Three steps: uneven microbatches at T=5, a new batch of the same shapes, then T=3. Per step: the max
    difference to one process and this rank's p2p counts, with the plan's numbers to compare them to."""
    rank = dist.get_rank()
    plan = get_schedule(name, pp=pp, microbatches=m)
    model = build(2 * pp, tied=False)  # untied: every p2p operation is a plan message
    split = split_stages(list(model), plan.num_stages)
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, timeout=60, ordered_messages=ordered,
                              shapes=shapes, extras_chunks=CHUNKS)
    lowered = runtime.plan
    boundaries = sum(1 for s in range(lowered.num_stages - 1) if lowered.rank_of(s) != lowered.rank_of(s + 1)
                     and rank in (lowered.rank_of(s), lowered.rank_of(s + 1)))
    kinds = [a.kind.name for a in lowered.ranks[rank]]
    out = []
    for step, (B, T) in enumerate([(m + 3, 5), (m + 3, 5), (m + 2, 3)]):
        tokens, targets, extras = batch(B, T, seed=20 + step)
        result = runtime.step(tokens, targets, extras, return_outputs=True)
        ref, ref_loss, ref_out = reference(model, tokens, targets, extras)
        diff = max(abs(result.loss - ref_loss), _grad_diff(runtime, ref),
                   0.0 if result.outputs is None else (result.outputs - ref_out).abs().max().item())
        out.append({"diff": diff, "counts": dict(runtime.p2p.counts), "boundaries": boundaries,
                    "recv_f": kinds.count("RECV_F"), "send_f": kinds.count("SEND_F"),
                    "comm": sum(1 for a in lowered.ranks[rank] if a.kind.is_comm)})
    return out


class Route(nn.Module):
    """A planted data-dependent shape: a microbatch whose first token is 0 loses its last position."""

    def forward(self, tokens):  # (B, T) -> (B, T or T - 1)
        return tokens[:, : tokens.shape[1] - int(tokens[0, 0].item() == 0)]


def data_dependent_worker(shapes: str, timeout: float) -> str:
    """1F1B on 2 ranks where stage 0's output for microbatch 1 is one position shorter than for
    microbatch 0 although their inputs have the same shapes: the error message (or the loss) per rank."""
    group = dist.new_group([0, 1])  # a fresh group: an abandoned receive stays there
    plan = get_schedule("1f1b", pp=2, microbatches=4)
    torch.manual_seed(0)
    model = nn.Sequential(Route(), Embed(), Mix(), Mix(), Head()).double()
    split = split_stages(list(model), 2)
    runtime = PipelineRuntime(plan, split.for_rank(plan, dist.get_rank()),
                              lambda logits, y: loss_fn(logits, y[:, : logits.shape[1]]),
                              pp_group=group, pp_ranks=[0, 1], timeout=timeout, shapes=shapes)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, V, (8, 5), generator=g)
    tokens[2, 0] = 0  # microbatch 1 = rows 2 and 3
    targets = torch.randint(0, V, (8, 5), generator=g)
    try:
        return f"loss {runtime.step(tokens, targets).loss}"
    except PipelineCommError as error:  # PipelineTimeout included
        return f"{type(error).__name__}: {error}"


def no_inputs_worker() -> str:
    """Cached shapes need the inputs on every rank: a rank given only targets says so before any p2p."""
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    split = split_stages(list(build(2, tied=False)), 2)
    runtime = PipelineRuntime(plan, split.for_rank(plan, dist.get_rank()), loss_fn, timeout=5)
    _, targets, _ = batch(4, 3, seed=0)
    try:
        runtime.step(None, targets)
    except ValueError as error:
        return str(error)
    return "no error"


def timeout_worker(timeout: float) -> str | None:
    """Rank 0 never sends; rank 1 must raise a timeout naming itself, the action and rank 0."""
    group = dist.new_group([0, 1])  # a fresh group: rank 1's abandoned receive stays there
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    split = split_stages(list(build(2, tied=False)), 2)
    runtime = PipelineRuntime(plan, split.for_rank(plan, dist.get_rank()), loss_fn, pp_group=group,
                              pp_ranks=[0, 1], timeout=timeout, extras_chunks=CHUNKS)
    if dist.get_rank() == 0:
        return None
    tokens, targets, extras = batch(4, 3, seed=0)
    try:
        runtime.step(tokens, targets, extras)
    except PipelineTimeout as error:
        return str(error)
    return "no error"


def errors_worker() -> list[str]:
    """Errors that must come before any communication."""
    messages = []
    model = build(2, tied=False)
    for make in (
        lambda: PipelineRuntime(get_schedule("1f1b", pp=4, microbatches=4), {0: model[0]}, loss_fn),
        lambda: PipelineRuntime(get_schedule("1f1b", pp=2, microbatches=4), {0: model[0], 1: model[1]}, loss_fn),
        lambda: PipelineRuntime(get_schedule("1f1b", pp=2, microbatches=4), {dist.get_rank(): model[0]}, loss_fn,
                                pp_ranks=[1, 0]),
        lambda: split_stages(list(model), 5),
    ):
        try:
            make()
            messages.append("no error")
        except ValueError as error:
            messages.append(str(error))
    return messages


def forward_only_worker() -> dict:
    """Inference: forward-only plan, loss and outputs equal one process, no gradients anywhere."""
    rank = dist.get_rank()
    plan = get_schedule("forward-only", pp=2, microbatches=3)
    model = build(3)
    split = split_stages(list(model), 2)
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, tied=split.tied, timeout=60,
                              extras_chunks=CHUNKS)
    tokens, targets, extras = batch(5, 4, seed=7)
    result = runtime.step(tokens, targets, extras, return_outputs=True)
    _, ref_loss, ref_out = reference(model, tokens, targets, extras)
    return {"loss": abs(result.loss - ref_loss),
            "out": None if result.outputs is None else (result.outputs - ref_out).abs().max().item(),
            "grads": any(p.grad is not None for m in runtime.modules.values() for p in m.parameters())}


def report_worker(name: str) -> dict:
    rank = dist.get_rank()
    plan = get_schedule(name, pp=dist.get_world_size(), microbatches=8)
    split = split_stages(list(build(2 * plan.num_stages - 2)), plan.num_stages)
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, tied=split.tied, timeout=60,
                              extras_chunks=CHUNKS)
    tokens, targets, extras = batch(16, 6, seed=3)
    for _ in range(2):
        result = runtime.step(tokens, targets, extras)
    report = runtime.report()
    mine = sorted(str(iv.action) for iv in result.timeline.compute())
    planned = sorted(str(a) for a in runtime.plan.ranks[rank] if a.kind.is_compute)
    return {"measured": report["measured"], "predicted": report["predicted"], "actions_match": mine == planned,
            "units": result.timeline.unit, "comm": report["comm"]}


def models_worker(names: list) -> dict:
    """pipeloom.models' tiny GPT (tied embeddings): pipeline equals one process."""
    from pipeloom.models.config import ModelConfig
    from pipeloom.models.transformer import Transformer

    rank, out = dist.get_rank(), {}
    for name in names:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(family="gpt", vocab_size=29, dim=16, n_layers=2, n_heads=2,
                                        max_seq_len=16)).double()
        ref = copy.deepcopy(model)
        plan = get_schedule(name, pp=dist.get_world_size(), microbatches=4)
        split = split_stages(model, plan.num_stages)
        runtime = PipelineRuntime(plan, split.for_rank(plan, rank), model.loss, tied=split.tied, timeout=60)
        g = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, 29, (5, 10), generator=g)
        targets = torch.randint(0, 29, (5, 10), generator=g)
        targets[1:3, 4:] = -100
        result = runtime.step(tokens, targets)
        loss = ref.loss(ref(tokens), targets)
        loss.backward()
        seq = dict(nn.Sequential(*ref.pipeline_layers()).named_parameters(remove_duplicate=False))
        grad = max((p.grad - seq[n].grad).abs().max().item() for m in runtime.modules.values()
                   for n, p in m.named_parameters())
        out[name] = {"loss": abs(result.loss - loss.item()), "grad": grad}
    return out


# ----- tests ------------------------------------------------------------------------------------------------
def _check_sync(results):
    for rank, per_rank in enumerate(results):
        for case, d in per_rank.items():
            for key in ("loss", "out", "grad", "param", "tied"):
                assert d[key] < EXACT, f"rank {rank} {case}: {key} differs by {d[key]:.3g}"
            assert d["peak"][0] == d["peak"][1], f"rank {rank} {case}: peak activations (held, planned) {d['peak']}"
    for case in results[0]:
        assert sum(r[case]["has_outputs"] for r in results) == 1, f"{case}: outputs not on exactly one rank"


def test_synchronous_schedules_equal_one_process_2_ranks(pool2):
    cases = [(name, 4, "uniform") for name in SYNC] + [("1f1b", 4, [2, 4]), ("zb-h1", 4, "parameters")]
    _check_sync(pool2.run(sync_worker, 2, cases))


def test_synchronous_schedules_equal_one_process_4_ranks(pool4):
    # zb-v and interleaved: 8 stages over 10 layers (uneven); 1f1b: an explicit uneven layout.
    cases = [(name, 8, "uniform") for name in SYNC] + [("1f1b", 5, [1, 3, 2, 1])]
    _check_sync(pool4.run(sync_worker, 4, cases))


def test_messages_matched_in_send_order_as_on_nccl(pool4):
    # zb-v on 4 ranks with 8 microbatches: rank 0 sends to rank 1 in an order rank 1 does not receive in;
    # with tag 0 everywhere (NCCL's matching) rank 1 must take and keep the early messages.
    cases = [("zb-v", 8, "uniform"), ("interleaved-1f1b", 8, "uniform"), ("zb-h2", 4, "uniform")]
    _check_sync(pool4.run(sync_worker, 4, cases, 8, True))


@pytest.mark.parametrize("pp", [2, 4])
def test_pipedream_and_2bw_reproduce_the_update_rules(pp, pool2, pool4):
    pool = pool2 if pp == 2 else pool4
    m = 2 * pp
    cases = [(name, options, opt, m) for name, options in
             [("pipedream", {}), ("pipedream", {"vertical_sync": True}), ("pipedream-2bw", {})]
             for opt in ("sgd", "adam")]
    for rank, per_rank in enumerate(pool.run(versioned_worker, pp, cases)):
        for case, d in per_rank.items():
            assert d["param"] < EXACT and d["loss"] < EXACT, f"rank {rank} {case}: {d}"


def test_a_silent_rank_raises_a_named_timeout(pool2):
    message = pool2.run(timeout_worker, 2.0)[1]
    assert "pipeline rank 1" in message and "1RECV_F0" in message and "pipeline rank 0" in message, message


def test_errors_before_communication(pool2):
    messages = pool2.run(errors_worker)[0]
    assert "is for 4 pipeline ranks, but the pipeline group has 2" in messages[0]
    assert "places stages [0] on pipeline rank 0" in messages[1]
    assert "does not match the pipeline group's members" in messages[2]
    assert "cannot split 4 layers into 5 stages" in messages[3]


@pytest.mark.parametrize("name", ["1f1b", "zb-v"])
def test_measured_timeline_feeds_the_simulator(name, pool2):
    for r in pool2.run(report_worker, name):
        assert r["actions_match"] and r["units"] == "s"
        assert 0.0 <= r["measured"] < 1.0 and 0.0 <= r["predicted"] < 1.0 and r["comm"] >= 0.0


def test_forward_only_inference(pool2):
    first, last = pool2.run(forward_only_worker)
    assert first["loss"] < EXACT and last["loss"] < EXACT and first["out"] is None and last["out"] < EXACT
    assert not first["grads"] and not last["grads"]


def test_models_gpt_tied_pipeline_equals_one_process(pool2):
    for rank, per_rank in enumerate(pool2.run(models_worker, ["1f1b", "zb-v", "interleaved-1f1b"])):
        for name, d in per_rank.items():
            assert d["loss"] < EXACT and d["grad"] < EXACT, f"rank {rank} {name}: {d}"


def test_one_process_without_torch_distributed():
    plan = get_schedule("zb-h1", pp=1, microbatches=3)
    model = build(3)
    runtime = PipelineRuntime(plan, split_stages(list(model), 1).for_rank(plan, 0), loss_fn, extras_chunks=CHUNKS)
    tokens, targets, extras = batch(5, 4, seed=2)
    result = runtime.step(tokens, targets, extras, return_outputs=True)
    ref, ref_loss, ref_out = reference(model, tokens, targets, extras)
    assert abs(result.loss - ref_loss) < EXACT and (result.outputs - ref_out).abs().max() < EXACT
    assert _grad_diff(runtime, ref) < EXACT


# ----- shape headers: cached per shape key (default) or per message -----------------------------------------
@pytest.mark.parametrize("pp,name,ordered", [(2, "1f1b", None), (4, "1f1b", None), (4, "interleaved-1f1b", None),
                                             (4, "zb-v", True)])
def test_cached_shapes_send_headers_once_per_key(pp, name, ordered, pool2, pool4):
    pool = pool2 if pp == 2 else pool4
    for rank, steps in enumerate(pool.run(shapes_worker, pp, name, "cached", ordered)):
        for step, d in enumerate(steps):
            assert d["diff"] < EXACT, f"rank {rank} {name} step {step}: differs by {d['diff']:.3g}"
        # Microbatch sizes 2,2,2,1 at T=5 and 2,2,1,1 at T=3: two keys per stage boundary, headers only when new.
        headers = [d["counts"].get("headers", 0) for d in steps]
        assert headers == [2 * steps[0]["boundaries"], 0, 2 * steps[0]["boundaries"]], f"rank {rank}: {headers}"
        steady = steps[1]
        # One receive-wait per activation; one p2p op per plan message (one tensor each).
        assert steady["counts"].get("forward_waits", 0) == steady["recv_f"], f"rank {rank}: {steady}"
        assert steady["counts"].get("ops", 0) == steady["comm"], f"rank {rank}: {steady}"


@pytest.mark.parametrize("ordered", [None, True])
def test_per_message_shapes_send_a_header_with_every_activation(ordered, pool4):
    for rank, steps in enumerate(pool4.run(shapes_worker, 4, "1f1b", "per-message", ordered)):
        for step, d in enumerate(steps):
            assert d["diff"] < EXACT, f"rank {rank} step {step}: differs by {d['diff']:.3g}"
            assert d["counts"].get("headers", 0) == d["recv_f"] + d["send_f"], f"rank {rank} step {step}: {d}"
            assert d["counts"].get("forward_waits", 0) == 2 * d["recv_f"], f"rank {rank} step {step}: {d}"


def test_per_message_shapes_equal_one_process(pool2, pool4):
    _check_sync(pool2.run(sync_worker, 2, [(name, 4, "uniform") for name in SYNC], 4, None, "per-message"))
    cases = [("zb-v", 8, "uniform"), ("interleaved-1f1b", 8, "uniform")]
    _check_sync(pool4.run(sync_worker, 4, cases, 8, True, "per-message"))


def test_data_dependent_shape_raises_naming_the_option_in_cached_mode(pool2):
    sender, receiver = pool2.run(data_dependent_worker, "cached", 3.0)
    assert sender.startswith("PipelineCommError") and "stage 0 microbatch 1" in sender, sender
    assert "(2, 4, 8)" in sender and "(2, 5, 8)" in sender and 'shapes="per-message"' in sender, sender
    assert receiver.startswith("PipelineTimeout") and "pipeline rank 1" in receiver, receiver
    # The same model runs with a header per message.
    first, last = pool2.run(data_dependent_worker, "per-message", 60.0)
    assert first == last and first.startswith("loss "), (first, last)


def test_cached_shapes_need_the_inputs_on_every_rank(pool2):
    first, second = pool2.run(no_inputs_worker)
    assert "holds stage 0 and needs the inputs" in first, first
    assert "given no inputs" in second and "shapes='per-message'" in second, second


def test_unknown_shapes_mode_is_refused():
    plan = get_schedule("1f1b", pp=1, microbatches=2)
    with pytest.raises(ValueError, match="shapes='sometimes'"):
        PipelineRuntime(plan, split_stages(list(build(2)), 1).for_rank(plan, 0), loss_fn, shapes="sometimes")


# ----- the p2p calls replayed under NCCL's rules (unbuffered sends, one stream per process group) ------------
# gloo buffers sends, so a CPU run cannot deadlock the way NCCL does: these tests record every batched call
# and wait the runtime makes on gloo and replay them with check_rendezvous, which applies NCCL's rules. Planted
# crossed sends show the check can fail; one group for every transfer (links="shared") fails it for ZB-V, the
# deadlock first seen on two H100s; the default per-direction links pass it for every schedule, with matched
# tensor shapes, including steps that send shape headers.
F32 = "torch.float32"


def _post(call, stream, *ops):
    return ("post", call, stream, [(send, link, (4,), F32) for send, link in ops])


def test_crossed_sends_in_separate_calls_deadlock():
    # Each rank sends, then receives, in two calls on one group: both sends wait for receives queued behind them.
    logs = {0: [_post(0, (0, "g"), (True, ("g", 0, 1))), _post(1, (0, "g"), (False, ("g", 1, 0))), ("wait", 1)],
            1: [_post(0, (1, "g"), (True, ("g", 1, 0))), _post(1, (1, "g"), (False, ("g", 0, 1))), ("wait", 1)]}
    with pytest.raises(PipelineCommError, match="deadlock under NCCL") as error:
        check_rendezvous(logs)
    assert "rank 0 waits for its call 1" in str(error.value) and "cannot finish" in str(error.value)


def test_crossed_sends_in_one_call_or_on_per_direction_groups_finish():
    one_call = {r: [_post(0, (r, "g"), (True, ("g", r, 1 - r)), (False, ("g", 1 - r, r))), ("wait", 0)]
                for r in (0, 1)}
    check_rendezvous(one_call)
    links = {r: [_post(0, (r, f"{r}>{1 - r}"), (True, (f"{r}>{1 - r}", r, 1 - r))),
                 _post(1, (r, f"{1 - r}>{r}"), (False, (f"{1 - r}>{r}", 1 - r, r))), ("wait", 1), ("wait", 0)]
             for r in (0, 1)}
    check_rendezvous(links)


def test_mismatched_shapes_and_missing_receives_are_reported():
    logs = {0: [("post", 0, (0, "g"), [(True, ("g", 0, 1), (4,), F32)]), ("wait", 0)],
            1: [("post", 0, (1, "g"), [(False, ("g", 0, 1), (64,), "torch.int64")]), ("wait", 0)]}
    with pytest.raises(PipelineCommError, match=r"sends \(\(4,\), 'torch.float32'\) but rank 1 receives"):
        check_rendezvous(logs)
    with pytest.raises(PipelineCommError, match="rank 0 waits for its call 0"):
        check_rendezvous({0: logs[0], 1: []})


def record_worker(pp: int, names: list, links: str, m: int) -> dict:
    """Per schedule: two steps (a new sequence length in the second sends new headers), NCCL-style
    ordered matching; returns this rank's recorded calls and waits."""
    rank, out = dist.get_rank(), {}
    for name in names:
        plan = get_schedule(name, pp=pp, microbatches=m)
        split = split_stages(list(build(2 * pp)), plan.num_stages)
        tied = split.tied if not plan.is_versioned else ()
        runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, tied=tied, timeout=60,
                                  optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1),
                                  ordered_messages=True, links=links)
        runtime.p2p.log = []
        for step, (B, T) in enumerate([(m + 1, 5), (m, 3)]):
            runtime.step(*batch(B, T, seed=step)[:2])
        out[name] = runtime.p2p.log
    return out


ALL = SYNC + ["pipedream", "pipedream-2bw"]


@pytest.mark.parametrize("pp", [2, 4])
def test_every_schedule_passes_nccl_rules_on_per_direction_links(pp, pool2, pool4):
    pool = pool2 if pp == 2 else pool4
    results = pool.run(record_worker, pp, ALL, "directional", 8)
    for name in ALL:
        logs = {rank: results[rank][name] for rank in range(pp)}
        assert all(any(e[0] == "post" for e in log) for log in logs.values()), name
        check_rendezvous(logs)


def test_one_shared_group_deadlocks_zb_v_under_nccl_rules(pool2):
    # What ran on two H100s before the per-direction links: ZB-V on one group for every transfer.
    results = pool2.run(record_worker, 2, ["zb-v", "1f1b"], "shared", 4)
    with pytest.raises(PipelineCommError, match="deadlock under NCCL"):
        check_rendezvous({rank: results[rank]["zb-v"] for rank in range(2)})
    check_rendezvous({rank: results[rank]["1f1b"] for rank in range(2)})  # 1F1B pairs its sends and receives


def absent_rank_worker() -> str:
    """Rank 1 never builds its runtime; rank 0's construction must name it instead of hanging."""
    if dist.get_rank() == 1:
        return "absent"
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    split = split_stages(list(build(2)), plan.num_stages)
    try:
        PipelineRuntime(plan, split.for_rank(plan, 0), loss_fn, tied=split.tied, timeout=2)
    except PipelineTimeout as error:
        return str(error)
    return "no error"


def test_a_rank_that_never_builds_its_runtime_is_named():
    from pipeloom.parallel.spawn import run_ranks

    message = run_ranks(absent_rank_worker, 2, timeout=60)[0]  # fresh processes: the pools stay in step
    assert "global ranks [1] did not" in message and "waited 2 s" in message, message
