# Pipeline- and tensor-parallel inference on gloo ranks: token-for-token parity with one process (both policies,
# preemption, every layout method), the measured timeline follows its plan, and a stalled or killed rank is named.
import json
import os
import time

import pytest
import torch

from pipeloom.inference import LLM, LLMEngine, SamplingParams
from pipeloom.models import Transformer, get_model_config
from pipeloom.parallel.spawn import RankDied, RankPool

BUDGET, BLOCK = 16, 4
ROOMY, TINY = 64, 24  # blocks: TINY holds the longest request (70 + 10 tokens) but not everyone at once


def _model(family: str = "llama") -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_model_config(f"{family}-tiny", n_layers=4, max_seq_len=128)).double().eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 17, 70, 3, 33)]
    return prompts + [prompts[3][:36] + [7, 7, 7]]  # a shared prefix: prefix-cache hits across lanes


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    return [greedy, SamplingParams(temperature=0.9, top_k=20, seed=11, n=2, max_tokens=10, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=10, logprobs=2, ignore_eos=True),
            greedy, SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=10, ignore_eos=True),
            greedy, greedy]


def _summary(outputs) -> list:
    """Per request: every sample's tokens, and the logprobs of the first sample where asked."""
    return [([o.token_ids for o in r.outputs], r.outputs[0].logprobs) for r in outputs]


def _generate(family, pp, tp, cases):
    """On every rank: one engine per (policy, num_blocks, layout) case; the driver returns what each generated."""
    from pipeloom.inference.parallel import ParallelLLM

    out = []
    for policy, num_blocks, layout in cases:
        llm = ParallelLLM(_model(family), pp=pp, tp=tp, layout=layout, policy=policy, token_budget=BUDGET,
                          block_size=BLOCK, num_blocks=num_blocks, timeout=60.0)
        results = llm.generate(_prompts(), _params())
        if llm.is_driver:
            out.append({"summary": _summary(results), "stats": llm.engine.stats(), "layout": list(llm.layout),
                        "attributes": sorted(vars(llm.engine)), "lanes": len(llm.engine.scheduler.lanes)})
        llm.shutdown()
    return out


_ONE_PROCESS: dict = {}


def _reference(family: str, policy: str, num_blocks: int) -> list:
    key = (family, policy, num_blocks)
    if key not in _ONE_PROCESS:
        llm = LLM(_model(family), policy=policy, token_budget=BUDGET, block_size=BLOCK, num_blocks=num_blocks)
        _ONE_PROCESS[key] = _summary(llm.generate(_prompts(), _params(), use_tqdm=False))
    return _ONE_PROCESS[key]


# every layout method turns up in every layout of ranks: uniform, parameters, time (profiled), explicit counts
CONFIGS = {
    "pp2": ("llama", 2, 1, ["uniform", [2, 4], "parameters", "time"]),
    "tp2": ("gpt", 1, 2, ["uniform", "uniform", "uniform", "uniform"]),
    "pp4": ("llama", 4, 1, ["parameters", "time", [1, 2, 2, 1], "uniform"]),
    "pp2xtp2": ("llama", 2, 2, ["time", "uniform", "parameters", [3, 3]]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_and_seeded_outputs_equal_one_process(name, pool2, pool4):
    family, pp, tp, layouts = CONFIGS[name]
    cases = [(policy, blocks, layout) for (policy, blocks), layout in
             zip([(p, b) for p in ("chunked-prefill", "prefill-first") for b in (ROOMY, TINY)], layouts)]
    pool = pool2 if pp * tp == 2 else pool4
    driver = pool.run(_generate, family, pp, tp, cases, timeout=600)[0]
    for (policy, blocks, layout), got in zip(cases, driver):
        want = _reference(family, policy, blocks)
        for i, ((tokens, logprobs), (want_tokens, want_logprobs)) in enumerate(zip(got["summary"], want)):
            assert tokens == want_tokens, f"{name} {policy} blocks={blocks} layout={layout}: request {i} differs"
            if want_logprobs is not None:  # float64 model: tensor parallelism only reorders the sums
                for step, want_step in zip(logprobs, want_logprobs):
                    assert step.keys() == want_step.keys()
                    assert all(abs(step[t] - want_step[t]) < 1e-9 for t in step)
        assert got["lanes"] == pp
        assert len(got["layout"]) == pp and sum(got["layout"]) == 4 + 2
        if not isinstance(layout, str):
            assert got["layout"] == layout
        if blocks == TINY:  # every policy's tiny pool preempts (and the outputs above still equal one process)
            assert got["stats"]["preemptions"] > 0, f"{name} {policy}: the tiny block pool preempted nobody"
    missing = set(vars(LLMEngine(_model(family), num_blocks=8, block_size=BLOCK))) - set(driver[0]["attributes"])
    assert not missing, f"PipelineEngine lacks LLMEngine attributes {missing}"


def _timeline(pp):
    from pipeloom.inference.parallel import ParallelLLM

    llm = ParallelLLM(_model(), pp=pp, policy="chunked-prefill", token_budget=BUDGET, block_size=BLOCK,
                      num_blocks=ROOMY, timeout=60.0, record_timeline=True)
    llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    measured = llm.timeline()
    llm.shutdown()
    if measured is None:
        return None
    timeline, lanes = measured
    return timeline.to_records(), lanes


@pytest.mark.slow
def test_measured_timeline_follows_the_inference_plan(pool2):
    """Every stage runs every microbatch once, in dispatch order; stage 1 starts a microbatch after stage 0 ended
    it; a lane's next microbatch enters stage 0 after the previous one left the last stage (one host's clock)."""
    from pipeloom.schedules.inference import inference_plan, inference_report, simulate_inference
    from pipeloom.schedules.ir import Kind
    from pipeloom.schedules.timeline import Timeline

    records, lanes = pool2.run(_timeline, 2, timeout=600)[0]
    timeline = Timeline.from_records(records, pp=2, unit="s")
    plan = inference_plan(2, lanes)
    forward = {(iv.action.stage, iv.action.microbatch): iv for iv in timeline.compute() if iv.action.kind is Kind.F}
    m = len(lanes)
    assert set(forward) == {(s, k) for s in range(2) for k in range(m)}
    for s in range(2):
        ends = [forward[(s, k)].end for k in range(m)]
        starts = [forward[(s, k)].start for k in range(m)]
        assert all(e <= s2 for e, s2 in zip(ends, starts[1:])), f"stage {s} ran microbatches out of order"
    assert all(forward[(1, k)].start >= forward[(0, k)].end for k in range(m))
    for k, j in plan.info["lane_after"]:
        assert forward[(0, k)].start >= forward[(1, j)].end, f"microbatch {k} entered before lane predecessor {j}"
    report = inference_report(plan, timeline)
    sim = simulate_inference(plan, {key: iv.duration for key, iv in forward.items()})
    assert report["predicted_makespan"] == pytest.approx(sim.makespan)
    assert report["predicted_makespan"] <= report["measured_makespan"] * (1 + 1e-9)  # no overheads in the plan
    assert 0.0 <= report["measured_bubble_rate"] < 1.0 and 0.0 <= report["predicted_pipeline_bubble"] < 1.0


# ------------------------------------------------------------------------------------------ failures


def _faulty(kind: str, victim: int, at: int, timeout: float):
    """pp=3 behind the HTTP server on the driver: ``victim`` stalls (sleeps past the timeout) or dies (os._exit) in
    its forward of microbatch ``at`` while streamed completions are in flight."""
    import threading

    import httpx
    import torch.distributed as dist

    from pipeloom.data import ByteTokenizer
    from pipeloom.inference.parallel import ParallelLLM, RankFailure
    from pipeloom.serving import Server, ServerSettings

    llm = ParallelLLM(_model(), pp=3, policy="chunked-prefill", token_budget=BUDGET, block_size=BLOCK,
                      num_blocks=ROOMY, timeout=timeout, heartbeat=0.2, tokenizer=ByteTokenizer())
    if dist.get_rank() == victim:
        run_stage = llm.worker.runner.run_stage

        def faulty_stage(host, hidden=None):
            if llm.worker.k_next == at:
                if kind == "kill":
                    # the previous microbatch's send completes first (on a loaded CPU its isend can still be in
                    # flight at os._exit): the next rank then waits for this one, in RECV_F<at>
                    llm.worker.links.drain()
                    os._exit(17)
                time.sleep(2.5 * timeout)
            return run_stage(host, hidden)

        llm.worker.runner.run_stage = faulty_stage
    start = time.time()
    if not llm.is_driver:
        try:
            llm.serve_workers()
        except RankFailure as failure:
            return {"error": str(failure), "seconds": time.time() - start}
        return {"error": None}
    server = Server(llm.engine, ServerSettings(port=0), model_name="tiny").start_in_thread()
    answers = [None] * len(_prompts())

    def client(i: int, prompt: list[int]) -> None:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        last = events[-2] if len(events) > 1 else "{}"
        answers[i] = "finished" if '"error"' not in last else last

    try:
        clients = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(_prompts())]
        for c in clients:
            c.start()
        for c in clients:
            c.join(120)
        health = httpx.get(f"{server.url}/health", timeout=30)
    finally:
        server.stop()
    return {"answers": answers, "health": health.status_code, "health_text": health.text,
            "healthy": llm.engine.healthy, "seconds": time.time() - start}


@pytest.fixture(scope="module")
def pool3():
    pool = RankPool(3)
    yield pool
    pool.close(kill=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stall", "kill"])
def test_a_stalled_or_killed_rank_is_named_and_its_requests_fail(pool3, kind):
    timeout = 3.0
    results = pool3.run(_faulty, kind, 1, 5, timeout, timeout=300, expect_deaths=True)
    driver = results[0]
    assert driver["healthy"] is False
    assert driver["health"] == 503, driver["health_text"]  # the server reports the engine dead
    failed = [a for a in driver["answers"] if a != "finished"]
    assert failed, "no streamed request failed although a rank went away mid-run"
    message = json.loads(failed[0])["error"]["message"]
    assert "parallel engine failed" in driver["health_text"]
    assert "global rank 1 (stage 1" in message.split(". Reports:")[0], message
    if kind == "stall":
        assert "stalled in 1F5" in message, message
        assert driver["seconds"] < timeout + 20, driver["seconds"]  # named within the timeout (plus diagnosis)
    else:
        assert isinstance(results[1], RankDied) and results[1].exitcode == 17
        assert "stopped answering" in message and "RECV_F5" in message, message
    assert results[2]["error"] is not None  # the rank after the victim failed too, instead of hanging
