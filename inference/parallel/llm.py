# ParallelLLM: the LLM API over a pp x tp engine; every rank builds its part, the driver runs the engine loop.
"""Pipeline- and tensor-parallel inference with the training side's machinery, SPMD style (every rank runs the
same script, as under torchrun)::

    llm = ParallelLLM("llama-tiny", pp=2, tp=2, policy="chunked-prefill", token_budget=512)   # every rank
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))  # driver: outputs; others: []
    llm.shutdown()                                                               # every rank

Every rank loads the same model (same seed or checkpoint), applies tensor parallelism with
:func:`~pipeloom.parallel.apply.apply_tp` (vocabulary-parallel embedding and gathered logits; each rank keeps its
share of the key/value heads) over the tp groups of a :class:`~pipeloom.parallel.mesh.Mesh` (dp = 1), cuts it
with :func:`~pipeloom.parallel.split_stages` (``layout``: uniform, parameters, time, or layer counts) and keeps
its stage and that stage's KV cache (the block count is the smallest any rank can hold). The driver (global rank
0) holds the :class:`~.driver.PipelineEngine` (``llm.engine``: an ``LLMEngine``, so ``AsyncEngine`` and a server
take it); the other ranks run a :class:`~.worker.StageWorker`. ``generate`` on a worker serves until the driver's
``generate`` returns; :meth:`serve_workers` serves until the driver shuts the engine down (a server on the driver).
"""

from __future__ import annotations

import gc
import itertools
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..llm import LLM, load_model, resolve_device_dtype
from ..model_runner import CPU_KV_BYTES, local_kv_heads
from .driver import PipelineEngine
from .health import Board, Heartbeat, RankFailure
from .links import Links, Topology
from .stage import SamplingMirror, StageRunner, build_stage
from .worker import Recorder, StageWorker


class ParallelLLM(LLM):
    """A model split over ``pp`` pipeline stages of ``tp`` tensor-parallel ranks each (see the module docstring).

    Beyond :class:`~pipeloom.inference.LLM`'s options: ``pp``, ``tp`` (or a built ``mesh``), ``layout`` (the stage
    split), ``microbatches`` (lanes in flight; default ``pp``), ``timeout`` (seconds any rank waits for another
    before the engine fails, naming it), ``heartbeat`` (seconds between liveness records), ``record_timeline``
    (measure every stage's forwards for :meth:`timeline`). CUDA graphs are not used by the parallel engine.
    """

    def __init__(self, model, *, pp: int = 1, tp: int = 1, mesh=None, layout="uniform", microbatches: int | None = None,
                 timeout: float = 120.0, heartbeat: float = 0.5, record_timeline: bool = False, tokenizer=None,
                 dtype: str = "auto", device: str = "auto", seed: int = 0, policy: str = "chunked-prefill",
                 token_budget: int | None = 512, max_num_seqs: int | None = None, block_size: int = 16,
                 num_blocks: int | None = None, gpu_memory_fraction: float = 0.9, enable_prefix_caching: bool = True,
                 attention: str = "auto", eos_token_id: int | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ParallelLLM needs torch.distributed initialised on every rank (launch with torchrun "
                               "--nproc_per_node=PP*TP, then dist.init_process_group); one process: use LLM")
        if timeout <= 0 or heartbeat <= 0:
            raise ValueError(f"parallel.timeout={timeout} and heartbeat={heartbeat} must be positive seconds")
        if isinstance(model, torch.nn.Module):  # a module keeps its own dtype (and device) unless asked otherwise
            param = next(model.parameters())
            device = str(param.device) if device == "auto" and param.device.type != "cpu" else device
            dtype = str(param.dtype).removeprefix("torch.") if dtype == "auto" else dtype
        dev, dt = _device_dtype(device, dtype)
        if mesh is None:
            from pipeloom.parallel.mesh import Mesh

            mesh = Mesh.build(pp=pp, tp=tp, device_type=dev.type)
        if mesh.dp != 1:
            raise ValueError(f"parallel.dp={mesh.dp}: a parallel engine is one pipeline (dp=1); run one engine per "
                             "replica")
        topo = self.topology = Topology(mesh.pp, mesh.tp, dist.get_rank())
        deadline = timedelta(seconds=timeout)
        control = dist.new_group(backend="gloo", timeout=deadline)  # setup collectives on the host, any backend
        self.model, self.tokenizer, eos = load_model(model, device=dev, dtype=dt, seed=seed, tokenizer=tokenizer)
        config = self.model.config
        if layout == "time":  # profiled once, on the driver, over the dense layers; every rank cuts the same way
            box = [None]
            if topo.is_driver:
                box = [list(build_stage(self.model, topo.pp, 0, "time", profile_on_this_rank=True)[1])]
            dist.broadcast_object_list(box, src=topo.driver, group=control)
            layout = box[0]
        tp_group = None
        for s in range(topo.pp):  # collective: every rank creates every stage's tp group
            if topo.tp > 1:
                group = dist.new_group([topo.rank_of(s, t) for t in range(topo.tp)], timeout=deadline,
                                       backend="nccl" if dev.type == "cuda" else "gloo")
                tp_group = group if s == topo.stage else tp_group
        if tp_group is not None:
            from pipeloom.parallel.apply import apply_tp

            apply_tp(self.model, tp_group, gather_logits=True)
        stage, self.layout = build_stage(self.model, topo.pp, topo.stage, layout)
        self.model = stage  # the other stages' layers go
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if num_blocks is None:
            own = torch.tensor([_stage_blocks(stage, config, block_size, dt, dev, gpu_memory_fraction)])
            dist.all_reduce(own, op=dist.ReduceOp.MIN, group=control)
            num_blocks = int(own.item())
        runner = StageRunner(stage, config, num_blocks, block_size, backend=attention)
        links = Links(topo, dev, timeout)
        n = dist.distributed_c10d._get_default_store().add(f"pipeloom/infer/instances/{topo.rank}", 1)
        board = Board(f"pipeloom/infer/{n}/")
        beat = Heartbeat(board, topo.rank, heartbeat)
        dist.barrier(group=control)  # every heartbeat is on the board before anything runs
        mirror = SamplingMirror(eos_token_id=eos_token_id or eos, seed=seed, device=dev) if topo.samples else None
        recorder = Recorder(dev, record_timeline)
        self.engine, self.worker = None, None
        if topo.is_driver:
            self.engine = PipelineEngine(
                topology=topo, runner=runner, links=links, board=board, heartbeat=beat, mirror=mirror,
                recorder=recorder, config=config, tokenizer=self.tokenizer, eos_token_id=eos_token_id or eos,
                policy=policy, token_budget=token_budget, max_num_seqs=max_num_seqs, block_size=block_size,
                num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching, microbatches=microbatches,
                timeout=timeout, interval=heartbeat)
        else:
            self.worker = StageWorker(topo, runner, links, board, beat, mirror, hidden_dim=config.dim, dtype=dt,
                                      recorder=recorder, poll=timeout, interval=heartbeat)
        self.num_blocks, self.mesh = num_blocks, mesh
        self._ids = itertools.count()
        self.last_run: dict[str, float] = {}

    @property
    def is_driver(self) -> bool:
        return self.topology.is_driver

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False):
        """On the driver: :meth:`LLM.generate` over the pipeline (one finished output per prompt, in order). On the
        other ranks: serve microbatches until the driver's call returns, then return []."""
        if not self.is_driver:
            self.worker.serve(until=("end", "stop"))
            return []
        try:
            return super().generate(prompts, sampling_params, use_tqdm)
        finally:
            self.engine.end()

    def serve_workers(self) -> None:
        """Non-driver ranks: serve until the driver shuts the engine down (for a server running on the driver)."""
        if self.is_driver:
            raise RuntimeError("serve_workers() is for the non-driver ranks; the driver runs the engine (llm.engine)")
        self.worker.serve(until=("stop",))
        self._close_worker()

    def timeline(self):
        """Driver: (measured Timeline, lanes) since the previous call; others: serve until it is published."""
        if not self.is_driver:
            self.worker.serve(until=("timeline",))
            return None
        return self.engine.timeline()

    def shutdown(self) -> None:
        """Every rank: the driver stops the workers; a worker serves until that stop (or a failure)."""
        if self.is_driver:
            self.engine.stop()
            return
        if self.worker.failure is not None:  # failed (its links are closed) or stopped already
            return
        try:
            self.worker.serve(until=("stop",))
        except RankFailure:
            return
        self._close_worker()

    def _close_worker(self) -> None:
        try:
            self.worker.links.drain("stop")  # the stop message passed on must reach the next rank before we close
        finally:
            self.worker.heartbeat.stop("stopped")
            self.worker.links.close()
            self.worker.failure = "the engine was stopped"

    def __enter__(self) -> ParallelLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: this rank's GPU (``LOCAL_RANK``) with bfloat16, else the CPU with float32."""
    dev, dt = resolve_device_dtype(device, dtype)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev, dt


def _stage_blocks(stage, config, block_size: int, dtype: torch.dtype, device: torch.device, fraction: float) -> int:
    """KV blocks this stage's attention layers fit in ``fraction`` of the device memory (CPU: of a 1 GiB budget),
    less what is allocated and 1 GiB for activations."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kv.gpu_memory_fraction={fraction} must be in (0, 1]")
    attns = [layer.attn for layer in stage.children() if hasattr(layer, "attn")]
    per_block = sum(2 * block_size * local_kv_heads(a) * config.head_dim * dtype.itemsize for a in attns)
    if per_block == 0:
        return 1 << 40  # no attention here: the other stages decide
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = fraction * total - (total - free) - (1 << 30)
    else:
        budget = fraction * CPU_KV_BYTES
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError(f"kv.gpu_memory_fraction={fraction} leaves no room for a KV block on this stage "
                         f"({per_block} bytes); raise it or set kv.num_blocks")
    return blocks
