# The pipeline runtime: executes a lowered plan's actions on this rank's stages, with p2p, losses and updates.
"""Run any :class:`~pipeloom.schedules.ir.Plan` on real stage modules, one process per pipeline rank::

    plan = get_schedule("zb-v", pp=4, microbatches=8)
    split = split_stages(model, plan.num_stages)            # every rank builds the model and splits it
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn=F.cross_entropy,
                              optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=1e-3), tied=split.tied)
    result = runtime.step(tokens, targets)                 # every rank passes the same batch
    result.loss                                            # the full-batch mean, on every rank
    runtime.report()                                       # predicted vs measured bubble rate (collective)

Per step: the batch is cut into ``plan.microbatches`` microbatches along dim 0 (``tensor_split``: an
uneven batch gives microbatches one row apart); extras (attention masks, position ids) are cut as their
chunk spec says (``extras_chunks``; whole by default, see :mod:`pipeloom.parallel.microbatch`) and each
layer receives the extras its ``forward`` names. The lowered plan was compiled once, when the runtime was
built, into a flat list of operations (:mod:`pipeloom.parallel.program`); a step runs that list:

* ``F`` runs the stage (the last stage also computes the loss); ``B`` computes the input gradient (only
  it, with the graph kept, when the plan has a ``W`` for that microbatch - see
  :mod:`pipeloom.parallel.backward`) or the full backward; ``W`` the parameter gradients.
* ``SEND_*``/``RECV_*`` runs of consecutive actions are posted together as non-blocking p2p (one call per
  process group; on NCCL each direction of each link has its own, so its unbuffered sends never queue
  behind a receive, :mod:`pipeloom.parallel.links`; ``early_receives=True`` also posts the receives of
  the next run). Gradients never carry a shape
  header (their shapes are those of the activation sent forward). Activations, with ``shapes="cached"``
  (the default), carry one only the first time their *shape key* appears: (sending stage, the
  microbatch's input signature - shapes and dtypes of its inputs and extras, and the autocast state - so
  an uneven last microbatch or a new sequence length is a new key). Every rank computes the keys from the
  batch it is given and remembers them across steps, so both ends agree which message carries the header
  (the first with a new key, in the order the receiver takes them) and the receiver otherwise posts the
  payload receive at once: one wait per activation, as in ``torch.distributed.pipelining``. This needs
  every rank to be given the batch's inputs and each stage's output shapes to follow from its input
  shapes; the sender checks that and raises :class:`PipelineCommError` naming the option when they do
  not. ``shapes="per-message"`` sends a header with every activation instead (data-dependent output
  shapes, or ranks called without the batch).
* ``UPDATE`` runs the stage's optimizer, after summing the replicas' shares of the stage's gradients over
  the data-parallel group when the runtime was given a ``mesh`` with dp > 1 (the shares of the global
  batch's mean, see loss normalisation below); ``RELEASE`` drops a stashed weight
  version (:mod:`pipeloom.parallel.versions`); ``SYNC_TIED`` sums tied parameters' gradients across the
  ranks holding them (in one fixed order, so the copies stay bitwise identical).

Loss normalisation: microbatch b's loss ``loss_fn(out_b, target_b)`` (a mean over its valid targets) is
multiplied by ``weight_b / weight_group``, where weight is the number of targets that count (``!=
ignore_index`` for integer targets, ``numel`` otherwise, or ``loss_weight(target)``) and the group is the
set of microbatches one UPDATE applies (all of them for synchronous plans), counted over every data-
parallel replica's batch when there is a ``weight_group`` (the mesh's dp group when the runtime steps the
optimizer with dp > 1). Summed, that is the mean over the whole (global) batch, so gradients equal those
of the full batch through one process, however the ignored tokens fall. Activations are dropped at the
microbatch's last backward action.

Host synchronisation (what a GPU step waits for): none inside the step. Waits pass no timeout (the link
groups' own timeout is the deadline, :mod:`pipeloom.parallel.p2p`); the full-batch loss stays on the
device and reaches every rank through an asynchronous broadcast, read when :attr:`StepResult.loss` is
asked for; the valid-target counts of integer targets are read in one transfer per step. Every
``timeline_every``-th step (the first included) times its actions (``time.perf_counter`` on CPU, CUDA
events on GPU) into a :class:`~pipeloom.schedules.timeline.Timeline`, converted only when read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from pipeloom.schedules.ir import Action, Plan
from pipeloom.schedules.lowering import lower
from pipeloom.schedules.timeline import Interval, Timeline
from pipeloom.schedules.validate import validate
from torch import nn

from .links import PipelineLinks
from .measure import ActionClock, estimate_comm
from .microbatch import batch_size, check_chunk_specs, split_batch, split_extras
from .p2p import P2P, PipelineCommError, PipelineTimeout, inbound_messages
from .shm_link import ShmLink
from .program import Program
from .runtime_setup import (device_of, forward_orders, link_pairs, p2p_transport, pipeline_group, signature,
                            stage_params, update_average_group)
from .tied import TiedParameters
from .versions import StageVersions, update_groups

__all__ = ["PipelineCommError", "PipelineRuntime", "PipelineTimeout", "StepResult"]

SHAPE_MODES = ("cached", "per-message")  # PipelineRuntime(shapes=...): how activations' shapes travel
LINK_MODES = ("auto", "shm", "gloo", "directional", "pipeline", "shared")  # PipelineRuntime(links=...): the p2p links


class StepResult:
    """What :meth:`PipelineRuntime.step` returns on every rank.

    ``loss``: the full-batch mean loss as a float on every rank (None without targets); reading it waits
    for the loss to arrive and brings it to the host. ``loss_tensor`` is the same value left on the
    device (float64 scalar; 0 without targets; None when the runtime has no ``loss_fn``). ``outputs``: the last stage's
    outputs concatenated over microbatches, on the rank holding the last stage when
    ``return_outputs=True``. ``timeline``: this rank's measured intervals in seconds, of this step when
    ``timed`` (every ``timeline_every``-th step), else of the latest timed one.
    """

    def __init__(self, value: torch.Tensor | None, work, outputs, measured: _Measured, timed: bool):
        self._value, self._work, self._loss = value, work, None  # value: (2,) float64 (has a loss, loss)
        self.outputs = outputs
        self._measured = measured
        self.timed = timed

    def _arrived(self) -> torch.Tensor | None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._value

    @property
    def loss_tensor(self) -> torch.Tensor | None:
        """The loss as a float64 scalar on the device, without a host sync (0 when ``loss`` is None)."""
        value = self._arrived()
        return None if value is None else value[1]

    @property
    def loss(self) -> float | None:
        if self._loss is None:
            value = self._arrived()
            has_loss, loss = value.tolist() if value is not None else (0.0, 0.0)
            self._loss = loss if has_loss else False
        return self._loss if self._loss is not False else None

    @property
    def timeline(self) -> Timeline | None:
        return self._measured.timeline() if self._measured is not None else None


class _Measured:
    """One timed step's records, turned into a Timeline once, when first read (CUDA events sync then)."""

    def __init__(self, rank: int, pp: int, clock: ActionClock, records: list):
        self.rank, self.pp, self.clock, self.records = rank, pp, clock, records
        self._timeline = None

    def timeline(self) -> Timeline:
        if self._timeline is None:
            times = self.clock.times
            self._timeline = Timeline(tuple(Interval(self.rank, a, *times(s, e, host))
                                            for a, s, e, host in self.records), pp=self.pp, unit="s")
            self.records = None
        return self._timeline


class PipelineRuntime:
    """Executes ``plan`` on this rank's stage modules; see the module docstring for the semantics.

    Args:
        plan: a compute plan (``get_schedule(...)``) or an already lowered one; it is lowered here with
            the tied stages (optimizer step, SYNC_TIED, sends/receives) and validated.
        modules: ``{stage index: nn.Module}`` for the stages ``plan`` places on this rank (or a
            :class:`~pipeloom.parallel.stage.StageSplit`, from which this rank's stages are taken).
        loss_fn: ``loss_fn(output, target) -> mean loss`` on the last stage (needed to train).
        optimizer_factory: ``f(params) -> torch.optim.Optimizer``, one per local stage; or ``optimizers``
            ``{stage: optimizer}``. Without either, UPDATE only leaves the gradients in ``.grad`` (step the
            optimizer yourself - after reducing over dp and clipping, as torchtitan does).
        tied: ``[{stage: parameter name}, ...]`` (``StageSplit.tied``): parameters shared across stages.
        mesh: a :class:`~pipeloom.parallel.mesh.Mesh`: the pipeline group and its ranks come from it, it owns
            the link groups, and with dp > 1 and an optimizer in the runtime the counts of targets are summed
            over the mesh's dp group (it is the ``weight_group``) and every UPDATE first sums the replicas'
            shares of the stage's gradient over that group, so every replica steps with the global-batch
            gradient and the replicas stay identical. A runtime that owns optimizers on a pipeline group
            smaller than the world needs it (there may be data-parallel replicas it cannot see).
        pp_group, pp_ranks: the pipeline process group (default: the mesh's, else the world) and the global
            ranks of its members by pipeline rank (default: read from the group).
        timeout: seconds a rank waits for a peer before raising :class:`PipelineTimeout`.
        loss_weight, ignore_index: how many targets of a microbatch count (see module docstring).
        weight_group: the data-parallel group. Given, the counts are summed over its replicas (one all-reduce
            per step), so each microbatch is weighted by its share of the *global* batch: gradients and
            ``StepResult.loss`` are then this replica's share, and summing them over the group (not
            averaging) gives the global-batch mean exactly, whatever each replica's count.
        ordered_messages: receive each peer's messages in its send order with tag 0 (default: on NCCL only,
            which matches by order; True on gloo tests that path on CPU).
        shapes: ``"cached"`` (default): an activation's shape header is sent once per shape key (see the
            module docstring); every rank must be given the inputs. ``"per-message"``: a header before
            every activation, for stages whose output shapes depend on the data.
        links: which links carry the p2p; the runtime's own are owned by the mesh (or made for this runtime),
            and building the runtime is then collective over the whole world. ``"auto"`` (default): on a gloo
            pipeline of CPU tensors, shared-memory links (:mod:`pipeloom.parallel.shm_link`: a ring and a FIFO
            doorbell per direction, sends buffered, no rendezvous) when every rank of the pipeline is on this
            host, else ``"gloo"``; the ``PIPELOOM_P2P`` environment variable (``gloo`` or ``shm``) overrides that
            choice; on NCCL, ``"directional"``. ``"shm"``: shared-memory links, or an error naming the ranks'
            hosts. ``"gloo"``: gloo process groups, laid out as ``"pipeline"``. ``"directional"``: every
            direction of every pipeline link gets its own group, so NCCL's unbuffered sends cannot wait behind
            this rank's receives. ``"pipeline"``: one group of its own for all of the pipeline's p2p (gloo, whose
            sends are buffered: one I/O thread per rank then serves every link, as with the world group;
            per-link groups cost 1F1B about 20% of its step on the shared 2-core box, bench/RESULTS.md). A
            :class:`~pipeloom.parallel.links.PipelineLinks`: ``"auto"`` with that owner, shared between
            runtimes. ``"shared"``: every transfer on ``pp_group`` itself - no world collective, waits with a
            timeout, safe only where sends are buffered (gloo). :attr:`transport` says what was chosen
            (``"shm"``, else the backend's name). Only the pipeline's p2p moves to shared memory (tied
            parameters' gradient exchange included, it goes through the same links); the loss broadcast and
            data- and tensor-parallel collectives stay on their process groups.
        extras_chunks: ``{extra name: chunk spec}``, how :meth:`step` cuts each extra into microbatches
            (:func:`~pipeloom.parallel.microbatch.split_extras`: ``"split"`` or a dim, ``"replicate"``).
        timeline_every: time every n-th step's actions (the first step always); 0 never.
        early_receives: also post the receives of the next run of transfers with this one (per-direction
            links only), so messages can land while this rank computes. Off by default: on the shared 2-core
            box it bought nothing (gloo then wakes its I/O thread in the middle of compute; bench/RESULTS.md),
            and on NCCL an early receive kernel would hold GPU resources through the compute in between.
        around_action: ``f(action) -> context manager`` entered around every compute action this rank runs
            (e.g. to launch a stage's data-parallel gradient all-reduce during its last backward).
    """

    def __init__(self, plan: Plan, modules, loss_fn: Callable | None = None, *,
                 optimizer_factory: Callable | None = None, optimizers: Mapping | None = None,
                 tied=(), mesh=None, pp_group=None, pp_ranks=None, timeout: float = 300.0,
                 loss_weight: Callable | None = None, ignore_index: int = -100,
                 ordered_messages: bool | None = None, shapes: str = "cached", links="auto",
                 extras_chunks: Mapping | None = None, timeline_every: int = 10, early_receives: bool = False,
                 weight_group=None, around_action: Callable | None = None):
        if shapes not in SHAPE_MODES:
            raise ValueError(f"shapes={shapes!r}; choose one of {SHAPE_MODES}")
        if not isinstance(links, PipelineLinks) and links not in LINK_MODES:
            raise ValueError(f"links={links!r}; choose one of {LINK_MODES} or pass a PipelineLinks")
        if not isinstance(timeline_every, int) or timeline_every < 0:
            raise ValueError(f"timeline_every={timeline_every!r}; give a step interval >= 0 (0: never time)")
        self.shapes, self.timeout, self.timeline_every = shapes, float(timeout), timeline_every
        self.around_action = around_action
        self.extras_chunks = check_chunk_specs(extras_chunks)
        if mesh is not None:
            pp_group = mesh.pp_group if pp_group is None else pp_group
            pp_ranks = mesh.pp_peers if pp_ranks is None else pp_ranks
        self.mesh = mesh
        self.pp_group, self.pp_ranks, self.rank = pipeline_group(plan, pp_group, pp_ranks)
        if hasattr(modules, "for_rank"):
            modules = modules.for_rank(plan, self.rank)
        self.modules: dict[int, nn.Module] = dict(sorted(modules.items()))
        expected = plan.stages_of(self.rank)
        if tuple(self.modules) != expected:
            raise ValueError(f"plan {plan.name!r} places stages {list(expected)} on pipeline rank {self.rank}, "
                             f"but modules for stages {list(self.modules)} were given")
        self.tied_groups = [dict(group) for group in tied]
        tied_stages = sorted({s for group in self.tied_groups for s in group})
        if self.tied_groups and plan.is_versioned:
            raise NotImplementedError("tied parameters with a weight-versioned plan (PipeDream, 2BW) are not "
                                      "supported: the tied copies would live at different versions; untie them")
        self.plan = validate(lower(plan, tuple(tied_stages)))
        self.training = not self.plan.is_forward_only  # plan facts read once, here
        versioned = self.plan.is_versioned
        self.actions = self.plan.ranks[self.rank]
        self.loss_fn, self.loss_weight, self.ignore_index = loss_fn, loss_weight, ignore_index
        if loss_fn is None and self.training:
            raise ValueError(f"plan {plan.name!r} trains (it has backward actions): pass loss_fn")
        self.device = device_of(self.modules)
        self.groups = update_groups(self.plan)
        self.last_stage = self.plan.num_stages - 1
        self.params, self.owned = stage_params(self.modules)
        if optimizers is not None:
            self.optimizers = dict(optimizers)
        elif optimizer_factory is not None:
            self.optimizers = {s: optimizer_factory(ps) if ps else None for s, ps in self.owned.items()}
        else:
            self.optimizers = {}
        if versioned and not all(self.optimizers.get(s) for s in self.modules):
            raise ValueError(f"plan {plan.name!r} updates weights during the step: pass optimizer_factory")
        self.dp_group = update_average_group(mesh, self.pp_group, bool(self.optimizers))
        if self.dp_group is not None and self.optimizers:  # this runtime reduces over dp: it sums the shares
            if weight_group is not None and weight_group is not self.dp_group:
                raise ValueError(f"weight_group={weight_group!r} is not the mesh's dp group, over which this runtime "
                                 f"sums the gradients before its optimizer steps; leave weight_group out (it is "
                                 f"then the mesh's dp group) or build the runtime without an optimizer")
            weight_group = self.dp_group
        self.weight_group = weight_group  # data-parallel peers whose targets share the normalisation
        self.versions = ({s: StageVersions(s, m, self.actions) for s, m in self.modules.items()}
                         if versioned else {})
        self.p2p, self.links = None, None
        self.transport = dist.get_backend(self.pp_group) if self.plan.pp > 1 else None  # "shm" on shared memory
        if self.plan.pp > 1:
            self.p2p = self._build_p2p(ordered_messages, links)
        self._boundaries = forward_orders(self.plan, self.rank, self.p2p is not None and self.p2p.inbound is not None)
        self._known_shapes: set[tuple] = set()  # shape keys whose header went (or was planned) in earlier steps
        self._steady: dict[tuple, dict] = {}  # batch signature -> the step's forward messages, all keys known
        self.tied = TiedParameters(self.tied_groups, self.plan, self.rank, self.modules, self.p2p,
                                   tag_base=2 + 2 * self.plan.num_stages * self.plan.microbatches)
        self.tied.make_identical()
        self.program = Program(self, self.actions, early_receives)
        if self.p2p is not None:
            self.p2p.spec_of = self.program.gradient_specs
        self.steps = 0
        self._measured: _Measured | None = None
        self.peak_activations = 0.0  # of the last step, per schedules.simulate.peak_activations' units

    def _build_p2p(self, ordered_messages, links) -> P2P:
        backend = dist.get_backend(self.pp_group)
        if ordered_messages is None:  # NCCL matches p2p messages by order and ignores tags
            ordered_messages = backend == "nccl"
        if links in ("shared", "pipeline") and backend == "nccl":
            raise ValueError(f'links="{links}" would let NCCL\'s unbuffered sends deadlock (one stream for both '
                             f'directions); use links="directional" or "auto" (the default) on NCCL')
        inbound = inbound_messages(self.plan, self.rank) if ordered_messages else None
        link_groups = None
        if links != "shared":
            transport = p2p_transport(links, backend, self.device)
            owner = links if isinstance(links, PipelineLinks) else (
                self.mesh.links if self.mesh is not None else PipelineLinks())
            self.links = owner
            per_direction = links == "directional" or (links not in ("pipeline", "gloo") and backend != "gloo")
            # NCCL's watchdog enforces the groups' deadline; it comes a little after the HangWatch names the hang.
            deadline = self.timeout if backend == "gloo" else self.timeout + max(5.0, 0.1 * self.timeout)
            link_groups = owner.groups(self.pp_group, self.pp_ranks, link_pairs(self.plan, self.tied_groups),
                                       self.device, deadline, per_direction=per_direction, transport=transport)
            if any(isinstance(link, ShmLink) for link in link_groups.values()):
                self.transport = "shm"
        return P2P(self.pp_group, self.pp_ranks, self.rank, self.device, self.timeout, inbound=inbound,
                   links=link_groups)

    # ----- one step ------------------------------------------------------------------------------
    def step(self, inputs=None, targets=None, extras: Mapping | None = None, return_outputs: bool = False,
             zero_grad: bool = True) -> StepResult:
        """Run the plan once on a batch and return the full-batch loss, outputs and measured timeline.

        Pass the same ``inputs`` (stage 0's arguments), ``targets`` (the last stage's) and ``extras`` on
        every rank; each uses what its stages need (the batch size is read from inputs or targets, so a
        rank given neither cannot split tensor extras). With ``zero_grad`` (default) gradients are set to
        None first; ``zero_grad=False`` adds this step's gradients to those already in ``.grad``
        (accumulation over several calls, with the optimizer outside the runtime). After a synchronous
        plan the gradients stay in ``.grad`` (UPDATE steps the optimizer without zeroing).
        """
        plan, m, training = self.plan, self.plan.microbatches, self.training
        holds_first, holds_last = 0 in self.modules, self.last_stage in self.modules
        if holds_first and inputs is None:
            raise ValueError(f"pipeline rank {self.rank} holds stage 0 and needs the inputs")
        if holds_last and training and targets is None:
            raise ValueError(f"pipeline rank {self.rank} holds the last stage and needs targets to train")
        if not zero_grad and self.versions:
            raise ValueError(f"plan {plan.name!r} updates weights during the step, from the gradients of its own "
                             f"microbatches: zero_grad=False would fold earlier gradients into its first update")
        cached = self.p2p is not None and self.shapes == "cached"
        if cached and inputs is None:
            raise ValueError(f"pipeline rank {self.rank} was given no inputs: with shapes='cached' (the default) "
                             f"every rank derives the activation shapes from the microbatches' input shapes; pass "
                             f"the same inputs on every rank, or build the runtime with shapes='per-message'")
        inputs_mb = split_batch(inputs, m, "inputs") if holds_first or cached else None
        targets_mb = split_batch(targets, m, "targets") if holds_last and targets is not None else None
        extras_mb = split_extras(extras, m, batch_size(inputs, targets), self.extras_chunks)
        weights = self._loss_weights(targets_mb) if targets_mb is not None else None
        outputs: list | None = [None] * m if (return_outputs and holds_last) else None
        if zero_grad:
            for module in self.modules.values():
                module.zero_grad(set_to_none=True)
        for versions in self.versions.values():
            versions.begin()
        self.tied.begin()
        if self.p2p is not None:
            self.p2p.reset(self._forward_messages(inputs_mb if cached else None, extras_mb, (inputs, extras)))
        self.program.begin(inputs_mb if holds_first else None, targets_mb, extras_mb, weights, outputs)
        timed = self.timeline_every > 0 and self.steps % self.timeline_every == 0
        clock = ActionClock(self.device) if timed else None
        records = self.program.run(clock, self.around_action)
        if self.p2p is not None:
            self.p2p.drain()
        for versions in self.versions.values():
            versions.end()
        leftover = self.program.leftover()
        if leftover:
            raise RuntimeError(f"plan {plan.name!r} left state on pipeline rank {self.rank}: {leftover[:6]}")
        value, work = self._broadcast_loss() if self.loss_fn is not None else (None, None)
        if timed:
            self._measured = _Measured(self.rank, plan.pp, clock, records)
        self.steps += 1
        # In full-stage units like schedules.simulate.peak_activations: a chunk counts 1/v.
        self.peak_activations = self.program.peak / len(self.modules)
        if outputs is not None:
            outputs = (tuple(torch.cat(c) for c in zip(*outputs)) if isinstance(outputs[0], tuple)
                       else torch.cat(outputs))
        self.program.end()
        return StepResult(value, work, outputs, self._measured, timed)

    def _update(self, a: Action) -> None:
        optimizer = self.optimizers.get(a.stage)
        if optimizer is None:
            return
        if self.dp_group is not None:  # the replicas' shares summed: the global-batch gradient on every replica
            from .data_parallel import allreduce_gradients

            allreduce_gradients(self.owned[a.stage], self.dp_group, op="sum")
        if not self.versions:
            optimizer.step()
            return

        def step() -> None:
            optimizer.step()
            for p in self.params[a.stage]:
                p.grad = None

        self.versions[a.stage].update(a.version, step)

    # ----- communication and losses --------------------------------------------------------------
    def _forward_messages(self, inputs_mb, extras_mb, batch) -> dict[tuple, tuple]:
        """Per forward message ``(True, sending stage, mb)`` this rank sends or receives this step: (shape
        key, header?). Cached (``inputs_mb`` given): the key is (sending stage, the microbatch's input
        signature) and a header goes with the first message of a key not seen in an earlier step, in the
        order the receiver takes them; both ends compute the same from the plan, the batch and the keys
        of earlier steps. Per-message (``inputs_mb`` None): no key, a header on every message."""
        out = {}
        if inputs_mb is None:
            for s, order in self._boundaries.items():
                out.update({(True, s, mb): (None, True) for mb in order})
            return out
        device = self.device.type  # autocast changes output dtypes: its state is part of the key
        amp = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # The microbatches' signatures follow from the whole batch's (tensor_split and the chunk specs are
        # fixed): a batch shaped like an earlier one has every key known, so no header goes.
        whole = (amp, signature(batch[0], batch[1] or {}))
        steady = self._steady.get(whole)
        if steady is not None:
            return steady
        if len(self._steady) > 64:  # shapes change every step (variable lengths): keep the memo small
            self._steady.clear()
        signatures = tuple((amp, *signature(x, extras)) for x, extras in zip(inputs_mb, extras_mb))
        for s, order in self._boundaries.items():
            for mb in order:
                key = (s, signatures[mb])
                out[(True, s, mb)] = (key, key not in self._known_shapes)
                self._known_shapes.add(key)
        self._steady[whole] = {k: (key, False) for k, (key, _) in out.items()}
        return out

    def _broadcast_loss(self):
        """The full-batch mean loss from the last stage's rank to every rank, on the device: (value, work
        or None), value (2,) float64 = (has a loss, loss); asynchronous, so the step does not wait."""
        value = torch.zeros(2, dtype=torch.float64, device=self.device)
        total = self.program.loss_sum()
        if total is not None:
            value[0] = 1.0
            value[1] = total
        if self.plan.pp == 1:
            return value, None
        src = self.pp_ranks[self.plan.rank_of(self.last_stage)]
        return value, dist.broadcast(value, src=src, group=self.pp_group, async_op=True)

    def _loss_weights(self, targets_mb) -> list[tuple[float, float, float]]:
        """Per microbatch: (its weight, its update group's weight, the whole batch's weight); with a
        ``weight_group``, the group's and the batch's weights are summed over every replica's batch."""
        local = self._target_weights(targets_mb)  # (m,) float64, on the device
        summed = local
        if self.weight_group is not None and dist.get_world_size(self.weight_group) > 1:
            summed = local.clone()
            dist.all_reduce(summed, group=self.weight_group)  # one small all-reduce per step
        weights, summed = torch.stack([local, summed]).tolist()  # one host read for both
        total = sum(summed)
        out = [None] * len(weights)
        for group in self.groups:
            group_weight = sum(summed[b] for b in group)
            for b in group:
                out[b] = (weights[b], group_weight, total)
        return out

    def _target_weights(self, targets_mb) -> torch.Tensor:
        """(m,) float64 on the device: how many targets of each microbatch count. Integer targets are
        counted on their device, so the step reads them (and their dp sum) in one transfer."""
        if self.loss_weight is not None:
            values = [float(self.loss_weight(t)) for t in targets_mb]
        elif all(torch.is_tensor(t) and not t.is_floating_point() for t in targets_mb):
            return torch.stack([(t != self.ignore_index).sum() for t in targets_mb]).to(self.device, torch.float64)
        else:
            values = [float(t.numel()) if torch.is_tensor(t) and t.is_floating_point() else
                      float(int((t != self.ignore_index).sum())) if torch.is_tensor(t) else 1.0 for t in targets_mb]
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    # ----- measurement ---------------------------------------------------------------------------
    @property
    def last_timeline(self) -> Timeline | None:
        """This rank's intervals of the latest timed step (None before the first)."""
        return self._measured.timeline() if self._measured is not None else None

    def gather_timeline(self) -> Timeline:
        """The latest timed step's intervals of every pipeline rank (a collective: every rank must call it)."""
        if self._measured is None:
            raise RuntimeError("gather_timeline() needs a timed step() first (timeline_every > 0)")
        records = self.last_timeline.to_records()
        if self.plan.pp > 1:
            gathered = [None] * self.plan.pp
            dist.all_gather_object(gathered, records, group=self.pp_group)
            records = [r for part in gathered for r in part]
        return Timeline.from_records(records, pp=self.plan.pp, unit="s")

    def report(self, timeline: Timeline | None = None, comm: float | None = None) -> dict:
        """Predicted vs measured bubble rate: measured per-chunk F/B/W costs fed back into the simulator.

        Collective unless ``timeline`` (a gathered one) is given. ``comm`` is the latency the simulator
        adds on every cross-rank edge, in seconds; None estimates it from the run (the median time from
        a send being posted to its receive completing - clocks of one host only; pass it for several
        hosts). Returns the ``measured`` and ``predicted`` bubble rates (Zero Bubble's r, arXiv
        2401.10241 §5.3), both makespans (seconds), ``comm`` and the per-chunk ``costs``.
        """
        from pipeloom.schedules.simulate import Costs, simulate

        timeline = timeline or self.gather_timeline()
        costs = timeline.stage_costs(self.plan)
        comm = estimate_comm(timeline) if comm is None else comm
        sim = simulate(self.plan, Costs(F=list(costs["F"]), B=list(costs["B"]), W=list(costs["W"]), comm=comm))
        return {"measured": timeline.bubble_rate(), "predicted": sim.bubble_rate,
                "measured_makespan": timeline.makespan, "predicted_makespan": sim.makespan, "comm": comm,
                "costs": costs}
