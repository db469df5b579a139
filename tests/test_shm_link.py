# Shared-memory p2p links: ring wrap-around, tags out of order, messages larger than the ring, full rings, deadlines,
# dead peers, nothing left in /dev/shm, and the runtime's choice between shared memory and gloo.
import glob
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pipeloom.parallel import links as links_module
from pipeloom.parallel.links import PipelineLinks
from pipeloom.parallel.p2p import P2P, PipelineCommError, PipelineTimeout, TensorSpec, Transfer
from pipeloom.parallel.runtime import PipelineRuntime
from pipeloom.parallel.runtime_setup import p2p_transport
from pipeloom.parallel.shm_link import SHM_DIR, ShmLink
from pipeloom.parallel.stage import split_stages
from pipeloom.schedules import get_schedule
from pipeloom.schedules.ir import Action, Kind
from torch import nn

RING = 4096  # bytes: small enough that the messages below wrap it, fill it and outgrow it
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.uint8]


def shm_links(ring_bytes: int = RING, timeout: float = 30.0) -> tuple[ShmLink, ShmLink]:
    """(this rank's sending end to the other rank, its receiving end from it), on 2 ranks."""
    made = PipelineLinks(ring_bytes=ring_bytes).groups(dist.group.WORLD, [0, 1], {(0, 1), (1, 0)}, timeout=timeout,
                                                       transport="shm")
    me = dist.get_rank()
    return made[(me, 1 - me)], made[(1 - me, me)]


def messages(seed: int, count: int) -> list[tuple[int, torch.Tensor]]:
    """(tag, tensor) pairs of assorted dtypes and sizes: empty, 0-dim, a few bytes, and several times the ring."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        dtype = DTYPES[i % len(DTYPES)]
        n = [0, 1, 7, 300, 1000, 3 * RING // 2 + 5][int(torch.randint(0, 6, (), generator=g))]
        if i % 17 == 3:
            n = 5 * RING + 3  # larger than the whole ring: it goes through in chunks
        shape = () if i % 23 == 5 else (n,)
        x = torch.rand(shape, generator=g) * 100
        out.append((i % 13, x.to(dtype)))  # tags repeat: messages of one tag match first in, first out
    return out


def wrap_worker(seed: int, count: int) -> dict:
    """Rank 0 sends everything at once (most of it queued: the ring is tiny), then drains; rank 1 takes the
    messages one receive at a time in a random order of tags, so most arrive before their receive."""
    out_link, in_link = shm_links()
    sent = messages(seed, count)
    if dist.get_rank() == 0:
        works = [out_link.send([x], 1, tag) for tag, x in sent]
        queued = sum(not w.is_completed() for w in works)
        for w in works:
            w.wait()
        return {"queued": queued, "name": out_link.name}
    by_tag: dict[int, list] = {}
    for tag, x in sent:
        by_tag.setdefault(tag, []).append(x)
    order = [sent[i][0] for i in torch.randperm(count, generator=torch.Generator().manual_seed(seed + 1))]
    wrong = []
    for tag in order:
        expected = by_tag[tag].pop(0)
        got = torch.empty_like(expected)
        in_link.recv([got], 0, tag).wait()
        if not torch.equal(got, expected):
            wrong.append((tag, tuple(expected.shape), str(expected.dtype)))
    return {"wrong": wrong, "stashed": sum(len(q) for q in in_link._stash.values()), "head": in_link._tail,
            "name": in_link.name}


def crossed_worker(big: int, rounds: int) -> bool:
    """Both ranks send messages many times the ring's size to each other, then block receiving from the same
    peer: gloo's buffered isend would not deadlock here, so neither may the shared-memory link."""
    out_link, in_link = shm_links()
    me = dist.get_rank()
    ok = True
    for r in range(rounds):
        mine = torch.arange(big, dtype=torch.float32) + 1000 * me + r
        work = out_link.send([mine], 1 - me, r)
        theirs = torch.empty(big, dtype=torch.float32)
        in_link.recv([theirs], 1 - me, r).wait()
        work.wait()
        ok &= torch.equal(theirs, torch.arange(big, dtype=torch.float32) + 1000 * (1 - me) + r)
    return ok


def deadline_worker(timeout: float) -> dict | None:
    """Rank 0 never sends: rank 1's receive through P2P must end in a PipelineTimeout naming rank, action, peer."""
    links = PipelineLinks().groups(dist.group.WORLD, [0, 1], {(0, 1), (1, 0)}, timeout=timeout, transport="shm")
    if dist.get_rank() == 0:
        time.sleep(timeout + 1.0)  # stay alive: a peer that exits is reported at once, not at the deadline
        return None
    p2p = P2P(dist.group.WORLD, [0, 1], 1, torch.device("cpu"), timeout, links=links)
    start = time.monotonic()
    try:
        p2p.exchange([Transfer(Action(1, Kind.RECV_F, 0), False, 0, 7, specs=[TensorSpec((3,), torch.float32)])])
        raised = "no error"
    except PipelineTimeout as error:
        raised = str(error)
    return {"raised": raised, "waited": time.monotonic() - start}


def mismatch_worker() -> str | None:
    out_link, in_link = shm_links()
    if dist.get_rank() == 0:
        out_link.send([torch.ones(2)], 1, 3).wait()
        return None
    try:
        in_link.recv([torch.empty(4)], 0, 3).wait()
    except RuntimeError as error:
        return str(error)
    return "no error"


# ----- the runtime on shared memory -------------------------------------------------------------------------
D = 8


def build(blocks: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, D), nn.Tanh()).double() for _ in range(blocks)]


def train(pp: int, name: str, links="auto", steps: int = 2, env: str | None = None, **options) -> dict:
    """A few steps of ``name`` on ``pp`` ranks: the losses, this rank's gradients, the transport, the links."""
    saved = dict(os.environ)
    if env is not None:
        os.environ["PIPELOOM_P2P"] = env
    try:
        plan = get_schedule(name, pp=pp, microbatches=4, vpp=2 if name in ("interleaved-1f1b", "zb-v") else None)
        runtime = PipelineRuntime(plan, split_stages(build(2 * pp), plan.num_stages), F.mse_loss, links=links,
                                  timeout=60, **options)
    finally:  # the pooled rank outlives this job
        os.environ.clear()
        os.environ.update(saved)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(8, 3, D, generator=g, dtype=torch.float64) for _ in range(2))
    losses = [runtime.step(x, y).loss for _ in range(steps)]
    links_ = (runtime.p2p.links or {}).values()
    return {"losses": losses, "grads": [p.grad.clone() for m in runtime.modules.values() for p in m.parameters()],
            "transport": runtime.transport, "shm": [isinstance(link, ShmLink) for link in links_],
            "names": [link.name for link in links_ if isinstance(link, ShmLink)]}


def transports_worker(pp: int, name: str) -> dict:
    """The default (shared memory), links="gloo" and PIPELOOM_P2P=gloo: the same numbers, bitwise."""
    default, gloo, env = train(pp, name), train(pp, name, links="gloo"), train(pp, name, env="gloo")
    same = all(default["losses"] == r["losses"] and all(torch.equal(a, b) for a, b in zip(default["grads"], r["grads"]))
               for r in (gloo, env))
    shm = train(pp, name, links="shm")
    return {"same": same, "default": (default["transport"], default["shm"]), "gloo": (gloo["transport"], gloo["shm"]),
            "env": (env["transport"], env["shm"]), "shm": shm["transport"], "names": default["names"] + shm["names"]}


def killed_worker() -> dict | None:
    """Rank 0 is killed between steps while rank 1 waits in its next step: rank 1 must fail at once, naming
    the exit, and the link's files must already be gone."""
    plan = get_schedule("1f1b", pp=2, microbatches=4)
    runtime = PipelineRuntime(plan, split_stages(build(4), 2), F.mse_loss, timeout=60)
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(8, 3, D, generator=g, dtype=torch.float64) for _ in range(2))
    assert runtime.step(x, y).loss > 0  # the loss broadcast is done before rank 0 dies
    names = [link.name for link in runtime.p2p.links.values()]
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        runtime.step(x, y)
        raised = "no error"
    except PipelineCommError as error:
        raised = f"{type(error).__name__}: {error}"
    return {"raised": raised, "waited": time.monotonic() - start, "names": names}


def refusal_worker(case: str) -> str:
    """Errors every rank must give alike (so none is left waiting in a collective); where "auto" falls back to
    gloo instead, what it chose."""
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    modules = split_stages(build(2), 2)
    if case in ("elsewhere", "full"):  # rank 1 reports another host, or rank 0 a /dev/shm without room
        name, value = ("host_identity", lambda: ("another-host/boot/1", "")) if case == "elsewhere" else (
            "shm_free_bytes", lambda: 4096)
        original = getattr(links_module, name)
        if dist.get_rank() == (1 if case == "elsewhere" else 0):
            setattr(links_module, name, value)
        try:
            fallback = PipelineRuntime(plan, modules, F.mse_loss, timeout=30).transport
            PipelineRuntime(plan, modules, F.mse_loss, links="shm", timeout=30)
            return f"auto gave {fallback}; shm: no error"
        except ValueError as error:
            return f"auto gave {fallback}; shm: {error}"
        finally:
            setattr(links_module, name, original)
    try:
        if case == "mixed":  # the two ends of the pipeline ask for different transports
            PipelineRuntime(plan, modules, F.mse_loss, links="shm" if dist.get_rank() == 0 else "gloo", timeout=30)
        elif case == "env":
            train(2, "1f1b", env="tcp")
        return "no error"
    except ValueError as error:
        return str(error)


# ----- tests ------------------------------------------------------------------------------------------------
def _leftovers(names) -> list[str]:
    return sorted(p for name in names for p in glob.glob(os.path.join(SHM_DIR, f"pipeloom-{name}*")))


def test_many_messages_wrap_the_ring_and_match_by_tag_out_of_order(pool2, seed):
    sender, receiver = pool2.run(wrap_worker, seed, 120, timeout=120)
    assert receiver["wrong"] == [], receiver
    assert sender["queued"] > 0, sender  # the ring filled up: sends were queued and flushed while rank 1 read
    assert receiver["stashed"] == 0 and receiver["head"] > 10 * RING, receiver  # wrapped many times; all taken
    assert _leftovers([sender["name"], receiver["name"]]) == []


def test_full_rings_both_ways_do_not_deadlock(pool2):
    assert pool2.run(crossed_worker, 10 * RING, 3, timeout=120) == [True, True]


def test_a_silent_peer_ends_in_a_timeout_naming_rank_action_and_peer(pool2):
    result = pool2.run(deadline_worker, 1.0, timeout=60)[1]
    raised = result["raised"]
    assert raised.startswith("pipeline rank 1") and "timed out" in raised, raised
    assert "1RECV_F0" in raised and "pipeline rank 0" in raised and result["waited"] >= 0.9, result


def test_a_size_mismatch_is_an_error(pool2):
    message = pool2.run(mismatch_worker)[1]
    assert "8 bytes" in message and "16 bytes" in message and "tag 3" in message, message


@pytest.mark.parametrize("pp,name", [(2, "1f1b"), (4, "zb-v")])
def test_the_runtime_uses_shared_memory_by_default_and_gloo_when_asked(pp, name, pool2, pool4):
    results = (pool2 if pp == 2 else pool4).run(transports_worker, pp, name, timeout=240)
    for r in results:
        assert r["same"], r  # transport changes nothing in the numbers
        transport, shm = r["default"]
        assert transport == "shm" and shm and all(shm), r  # no silent fallback to gloo
        assert r["gloo"][0] == r["env"][0] == "gloo" and not any(r["gloo"][1] + r["env"][1]), r
        assert r["shm"] == "shm", r
    assert _leftovers([n for r in results for n in r["names"]]) == []  # unlinked once both ends had them


def test_a_killed_rank_is_reported_at_once_and_leaves_no_files(pool2):
    results = pool2.run(killed_worker, timeout=120, expect_deaths=True)
    assert type(results[0]).__name__ == "RankDied", results
    survivor = results[1]
    assert "exited" in survivor["raised"] and "pipeline rank 1" in survivor["raised"], survivor
    assert survivor["waited"] < 30, survivor  # the pidfd, not the 60 s deadline
    assert _leftovers(survivor["names"]) == []


def test_refusals_are_clear_and_alike_on_every_rank(pool2):
    for message in pool2.run(refusal_worker, "mixed"):
        assert "asked for different p2p transports" in message and "PIPELOOM_P2P" in message, message
    for message in pool2.run(refusal_worker, "elsewhere"):
        assert message.startswith("auto gave gloo; shm: "), message
        assert "need every rank of the pipeline" in message and "another-host" in message, message
    for message in pool2.run(refusal_worker, "full"):
        assert message.startswith("auto gave gloo; shm: "), message
        assert "MiB of /dev/shm" in message and "0.0 MiB are free" in message and "--shm-size" in message, message
    for message in pool2.run(refusal_worker, "env"):
        assert "PIPELOOM_P2P='tcp'" in message and "('gloo', 'shm')" in message, message


def test_transport_choice_without_ranks(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("PIPELOOM_P2P", raising=False)
    assert p2p_transport("auto", "gloo", cpu) == "auto" and p2p_transport(PipelineLinks(), "gloo", cpu) == "auto"
    assert p2p_transport("gloo", "gloo", cpu) == "gloo" and p2p_transport("pipeline", "gloo", cpu) == "gloo"
    assert p2p_transport("auto", "nccl", gpu) == "gloo"  # NCCL keeps its process groups
    monkeypatch.setenv("PIPELOOM_P2P", "gloo")
    assert p2p_transport("auto", "gloo", cpu) == "gloo" and p2p_transport("shm", "gloo", cpu) == "shm"
    monkeypatch.setenv("PIPELOOM_P2P", "shm")
    assert p2p_transport("auto", "gloo", cpu) == "shm" and p2p_transport("auto", "nccl", gpu) == "gloo"
    with pytest.raises(ValueError, match='links="shm" carries CPU tensors'):
        p2p_transport("shm", "nccl", gpu)
    monkeypatch.setenv("PIPELOOM_P2P", "fast")
    with pytest.raises(ValueError, match="PIPELOOM_P2P='fast'"):
        p2p_transport("auto", "gloo", cpu)
    plan = get_schedule("1f1b", pp=1, microbatches=2)
    with pytest.raises(ValueError, match="links='fast'"):
        PipelineRuntime(plan, split_stages(build(2), 1).for_rank(plan, 0), F.mse_loss, links="fast")
